//! Names, decoded once: every label and word the views show for a kernel number comes from
//! here (io_uring opcodes, NVMe opcodes and statuses, block operations, drop reasons). Stage
//! and layer names are their enums' own (`model::request`).

use std::sync::OnceLock;

use gds_common::{DropReason, cufile::CUFILE_OP_TABLE};

/// `enum io_uring_op` (include/uapi/linux/io_uring.h) without the `IORING_OP_` prefix, in value
/// order: the fallback when the running kernel's BTF cannot be read. The values are UAPI: new
/// kernels only append.
const NAMES: &[&str] = &[
    "NOP",
    "READV",
    "WRITEV",
    "FSYNC",
    "READ_FIXED",
    "WRITE_FIXED",
    "POLL_ADD",
    "POLL_REMOVE",
    "SYNC_FILE_RANGE",
    "SENDMSG",
    "RECVMSG",
    "TIMEOUT",
    "TIMEOUT_REMOVE",
    "ACCEPT",
    "ASYNC_CANCEL",
    "LINK_TIMEOUT",
    "CONNECT",
    "FALLOCATE",
    "OPENAT",
    "CLOSE",
    "FILES_UPDATE",
    "STATX",
    "READ",
    "WRITE",
    "FADVISE",
    "MADVISE",
    "SEND",
    "RECV",
    "OPENAT2",
    "EPOLL_CTL",
    "SPLICE",
    "PROVIDE_BUFFERS",
    "REMOVE_BUFFERS",
    "TEE",
    "SHUTDOWN",
    "RENAMEAT",
    "UNLINKAT",
    "MKDIRAT",
    "SYMLINKAT",
    "LINKAT",
    "MSG_RING",
    "FSETXATTR",
    "SETXATTR",
    "FGETXATTR",
    "GETXATTR",
    "SOCKET",
    "URING_CMD",
    "SEND_ZC",
    "SENDMSG_ZC",
    "READ_MULTISHOT",
    "WAITID",
    "FUTEX_WAIT",
    "FUTEX_WAKE",
    "FUTEX_WAITV",
    "FIXED_FD_INSTALL",
    "FTRUNCATE",
    "BIND",
    "LISTEN",
    "RECV_ZC",
    "EPOLL_WAIT",
    "READV_FIXED",
    "WRITEV_FIXED",
    "PIPE",
];

/// io_uring opcode names of the running kernel, once [`learn_opcodes`] was told them; the table
/// above until then.
static NAMES_NOW: OnceLock<Vec<String>> = OnceLock::new();

/// Names the running kernel's io_uring opcodes from its `enum io_uring_op` (`values`, from its
/// BTF), so a kernel newer than the table above names its new opcodes. The tracer calls it at
/// start with the BTF it parsed anyway: parsing it here, lazily, put a second whole-BTF parse
/// (tens of ms natively, seconds under emulation) inside the first `/metrics` or `/debug`
/// answer that named an opcode. Later calls change nothing.
pub fn learn_opcodes(values: &[(String, i64)]) {
    let t = opcode_table(values);
    if !t.is_empty() {
        let _ = NAMES_NOW.set(t);
    }
}

fn opcode_names() -> &'static [String] {
    static TABLE: OnceLock<Vec<String>> = OnceLock::new();
    match NAMES_NOW.get() {
        Some(t) => t,
        None => TABLE.get_or_init(|| NAMES.iter().map(|s| (*s).to_owned()).collect()),
    }
}

/// Index = opcode value, from `IORING_OP_*` enumerators (`IORING_OP_LAST` left out); a gap,
/// never seen in practice, is filled from the static table.
fn opcode_table(values: &[(String, i64)]) -> Vec<String> {
    let mut t: Vec<String> = Vec::new();
    for (n, v) in values {
        let Some(bare) = n.strip_prefix("IORING_OP_") else {
            continue;
        };
        let Ok(v) = usize::try_from(*v) else {
            continue;
        };
        if bare == "LAST" || v > u8::MAX as usize {
            continue;
        }
        if t.len() <= v {
            t.resize(v + 1, String::new());
        }
        t[v] = bare.to_owned();
    }
    for (i, name) in t.iter_mut().enumerate() {
        if name.is_empty() {
            *name = NAMES
                .get(i)
                .map_or_else(|| format!("OP_{i}"), |s| (*s).to_owned());
        }
    }
    t
}

/// The label of io_uring opcode `opcode` (`READ`, `URING_CMD`, …; `OP_<n>` for a number the
/// running kernel does not know, such as an invalid SQE's).
pub fn opcode(opcode: u8) -> String {
    opcode_names()
        .get(opcode as usize)
        .cloned()
        .unwrap_or_else(|| format!("OP_{opcode}"))
}

/// Parses an opcode given by name (case-insensitive, `IORING_OP_` prefix optional) or number.
pub fn parse_opcode(s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return Some(n);
    }
    let up = s.to_ascii_uppercase();
    let bare = up.strip_prefix("IORING_OP_").unwrap_or(&up);
    NAMES
        .iter()
        .position(|n| *n == bare)
        .or_else(|| opcode_names().iter().position(|n| n == bare))
        .map(|p| p as u8)
}

/// NVMe opcode names (NVMe base / NVM command set specs), I/O and admin.
pub fn nvme_opcode(opcode: u8, admin: bool) -> String {
    let name = if admin {
        match opcode {
            0x00 => "delete_sq",
            0x01 => "create_sq",
            0x02 => "get_log_page",
            0x04 => "delete_cq",
            0x05 => "create_cq",
            0x06 => "identify",
            0x08 => "abort",
            0x09 => "set_features",
            0x0a => "get_features",
            0x0c => "async_event",
            0x18 => "keep_alive",
            _ => "",
        }
    } else {
        match opcode {
            0x00 => "flush",
            0x01 => "write",
            0x02 => "read",
            0x04 => "write_uncorrectable",
            0x05 => "compare",
            0x08 => "write_zeroes",
            0x09 => "dataset_management",
            0x0d => "reservation_register",
            0x19 => "copy",
            _ => "",
        }
    };
    if name.is_empty() {
        format!("{}0x{opcode:02x}", if admin { "admin_" } else { "io_" })
    } else {
        name.into()
    }
}

/// The name of an NVMe completion status (SCT << 8 | SC), e.g. `LBA Out of Range`.
pub fn nvme_status(status: u16) -> &'static str {
    gds_nvme::NvmeStatus(status).name()
}

/// File call operations (`op` of the `gds_file_*` families; `gds_common::file::FILE_OP_*`).
pub fn file_op(op: u8) -> &'static str {
    match op {
        gds_common::file::FILE_OP_READ => "read",
        gds_common::file::FILE_OP_WRITE => "write",
        gds_common::file::FILE_OP_FSYNC => "fsync",
        _ => "other",
    }
}

/// What caused a request (`origin` of `gds_request_stage_duration_seconds`;
/// `gds_common::file::ORIGIN_*`).
pub fn origin(code: u8) -> &'static str {
    use gds_common::file::*;
    match code {
        ORIGIN_SYSCALL => "syscall",
        ORIGIN_URING => "uring",
        ORIGIN_URING_CMD => "uring_cmd",
        ORIGIN_KERNEL => "kernel",
        ORIGIN_NVFS => "nvfs",
        _ => "unknown",
    }
}

/// How a block request was linked to its cause (`gds_common::LINK_*`).
pub fn block_link(link: u8) -> &'static str {
    match link {
        gds_common::LINK_CALL => "call",
        gds_common::LINK_PAGE => "page",
        _ => "none",
    }
}

/// The `direct` label: `true` for O_DIRECT calls.
pub fn file_direct(direct: bool) -> &'static str {
    if direct { "true" } else { "false" }
}

/// Block request operation names (`enum req_op`).
pub fn block_op(op: u8) -> &'static str {
    match op {
        0 => "read",
        1 => "write",
        2 => "flush",
        3 => "discard",
        5 => "secure_erase",
        9 => "write_zeroes",
        34 => "drv_in",
        35 => "drv_out",
        _ => "other",
    }
}

/// What a block request's data buffer is (the `memory` label): `p2pdma` when the kernel saw
/// P2PDMA pages; otherwise `host` where it looked (or where the kernel cannot have peer
/// memory), `unknown` where it could not look.
pub fn block_memory(p2pdma: bool, unflagged_is_host: bool) -> &'static str {
    match (p2pdma, unflagged_is_host) {
        (true, _) => "p2pdma",
        (false, true) => "host",
        (false, false) => "unknown",
    }
}

/// The label of a drop reason.
pub fn drop_reason(r: DropReason) -> &'static str {
    r.label()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_running_kernel() {
        let btf = gds_host::btf::Btf::from_sys().unwrap();
        let values = btf
            .enum_values("io_uring_op")
            .expect("enum io_uring_op in BTF");
        let mut checked = 0;
        for (n, v) in &values {
            let Some(bare) = n.strip_prefix("IORING_OP_") else {
                continue;
            };
            if bare == "LAST" {
                continue;
            }
            // Every opcode the kernel knows has its own name, the kernel's.
            assert_eq!(opcode(*v as u8), bare, "opcode {v}");
            if (*v as usize) < NAMES.len() {
                assert_eq!(NAMES[*v as usize], bare, "static table, opcode {v}");
            }
            checked += 1;
        }
        assert!(checked > 50, "only {checked} opcodes checked");
    }

    #[test]
    fn parse_and_name_round_trip() {
        assert_eq!(parse_opcode("URING_CMD"), Some(46));
        assert_eq!(parse_opcode("ioring_op_nop"), Some(0));
        assert_eq!(parse_opcode("22"), Some(22));
        assert_eq!(parse_opcode("bogus"), None);
        assert_eq!(opcode(46), "URING_CMD");
        // Not capped: a number no kernel knows keeps its own label.
        assert_eq!(opcode(200), "OP_200");
    }

    #[test]
    fn btf_table_beyond_the_static_one() {
        let mut values: Vec<(String, i64)> = NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("IORING_OP_{n}"), i as i64))
            .collect();
        let next = NAMES.len() as i64;
        values.push(("IORING_OP_FUTURE".into(), next));
        values.push(("IORING_OP_LAST".into(), next + 1));
        let t = opcode_table(&values);
        assert_eq!(t.len(), NAMES.len() + 1);
        assert_eq!(t[next as usize], "FUTURE");
    }

    #[test]
    fn device_names() {
        assert_eq!(nvme_opcode(0x02, false), "read");
        assert_eq!(nvme_opcode(0x06, true), "identify");
        assert_eq!(nvme_opcode(0x7c, true), "admin_0x7c");
        assert_eq!(block_op(34), "drv_in");
        assert_eq!(nvme_status(0x0080), "LBA Out of Range");
    }
}

/// The name of cuFile operation `op` (`gds_cufile_*{op}`), from the one table of operations.
pub fn cufile_op(op: u32) -> &'static str {
    CUFILE_OP_TABLE
        .get(op as usize)
        .map_or("unknown", |o| o.label)
}

/// User shares (`gds_cufile_*{user}`), indexed by `USER_*`: calls of root and
/// `--cufile-users`, and of everyone else. Two values, whatever the host's users.
pub const CUFILE_USERS: [&str; 2] = ["trusted", "other"];

pub fn cufile_user(user: usize) -> &'static str {
    CUFILE_USERS.get(user).copied().unwrap_or("other")
}

/// Data path names (`gds_cufile_bytes_total{path}`), indexed by `PATH_*`.
pub const CUFILE_PATHS: [&str; 4] = ["unknown", "compat", "nvfs", "p2pdma"];

/// `CUfileOpError` (cufile.h, CUDA 12.x/13.x) names, the `error` label. Codes not in the table
/// are `unknown` (bounded); code 1 of a read or write is its `-1` return: errno set.
const CUFILE_ERRORS: &[(i32, &str)] = &[
    (5001, "CU_FILE_DRIVER_NOT_INITIALIZED"),
    (5002, "CU_FILE_DRIVER_INVALID_PROPS"),
    (5003, "CU_FILE_DRIVER_UNSUPPORTED_LIMIT"),
    (5004, "CU_FILE_DRIVER_VERSION_MISMATCH"),
    (5005, "CU_FILE_DRIVER_VERSION_READ_ERROR"),
    (5006, "CU_FILE_DRIVER_CLOSING"),
    (5007, "CU_FILE_PLATFORM_NOT_SUPPORTED"),
    (5008, "CU_FILE_IO_NOT_SUPPORTED"),
    (5009, "CU_FILE_DEVICE_NOT_SUPPORTED"),
    (5010, "CU_FILE_NVFS_DRIVER_ERROR"),
    (5011, "CU_FILE_CUDA_DRIVER_ERROR"),
    (5012, "CU_FILE_CUDA_POINTER_INVALID"),
    (5013, "CU_FILE_CUDA_MEMORY_TYPE_INVALID"),
    (5014, "CU_FILE_CUDA_POINTER_RANGE_ERROR"),
    (5015, "CU_FILE_CUDA_CONTEXT_MISMATCH"),
    (5016, "CU_FILE_INVALID_MAPPING_SIZE"),
    (5017, "CU_FILE_INVALID_MAPPING_RANGE"),
    (5018, "CU_FILE_INVALID_FILE_TYPE"),
    (5019, "CU_FILE_INVALID_FILE_OPEN_FLAG"),
    (5020, "CU_FILE_DIO_NOT_SET"),
    (5022, "CU_FILE_INVALID_VALUE"),
    (5023, "CU_FILE_MEMORY_ALREADY_REGISTERED"),
    (5024, "CU_FILE_MEMORY_NOT_REGISTERED"),
    (5025, "CU_FILE_PERMISSION_DENIED"),
    (5026, "CU_FILE_DRIVER_ALREADY_OPEN"),
    (5027, "CU_FILE_HANDLE_NOT_REGISTERED"),
    (5028, "CU_FILE_HANDLE_ALREADY_REGISTERED"),
    (5029, "CU_FILE_DEVICE_NOT_FOUND"),
    (5030, "CU_FILE_INTERNAL_ERROR"),
    (5031, "CU_FILE_GETNEWFD_FAILED"),
    (5033, "CU_FILE_NVFS_SETUP_ERROR"),
    (5034, "CU_FILE_IO_DISABLED"),
    (5035, "CU_FILE_BATCH_SUBMIT_FAILED"),
    (5036, "CU_FILE_GPU_MEMORY_PINNING_FAILED"),
    (5037, "CU_FILE_BATCH_FULL"),
    (5038, "CU_FILE_ASYNC_NOT_SUPPORTED"),
    (5039, "CU_FILE_INTERNAL_BATCH_SETUP_ERROR"),
    (5040, "CU_FILE_INTERNAL_BATCH_SUBMIT_ERROR"),
    (5041, "CU_FILE_INTERNAL_BATCH_GETSTATUS_ERROR"),
    (5042, "CU_FILE_INTERNAL_BATCH_CANCEL_ERROR"),
    (5043, "CU_FILE_NOMEM_ERROR"),
    (5044, "CU_FILE_IO_ERROR"),
    (5045, "CU_FILE_INTERNAL_BUF_REGISTER_ERROR"),
    (5046, "CU_FILE_HASH_OPR_ERROR"),
    (5047, "CU_FILE_INVALID_CONTEXT_ERROR"),
    (5048, "CU_FILE_NVFS_INTERNAL_DRIVER_ERROR"),
    (5049, "CU_FILE_BATCH_NOCOMPAT_ERROR"),
];

/// The `error` label of cuFile error `code` from operation `op` (see `CufileErrKey`).
pub fn cufile_error(op: u32, code: i32) -> &'static str {
    use gds_common::cufile::{CUFILE_OP_READ, CUFILE_OP_WRITE};
    if code == 1 && (op == CUFILE_OP_READ || op == CUFILE_OP_WRITE) {
        return "errno";
    }
    CUFILE_ERRORS
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("unknown", |(_, n)| n)
}

/// Names of the cuFile layer's own counters (`CufileCount`): drops go to
/// `gds_trace_dropped_total{reason}`, the rest to `gds_cufile_beneath_total{link}`.
pub fn cufile_count(c: gds_common::cufile::CufileCount) -> (&'static str, bool) {
    use gds_common::cufile::CufileCount::*;
    let drop = !matches!(
        c,
        Nested | BeneathLinked | BeneathUnlinked | NvfsIoctls | BeneathUnseen
    );
    (c.label(), drop)
}

#[cfg(test)]
mod cufile_tests {
    use super::*;
    use gds_common::cufile::{CUFILE_OP_BATCH_SUBMIT, CUFILE_OP_READ};

    /// README's metrics table lists the `op` values of `gds_cufile_calls_total`: exactly the
    /// table's names, in its order.
    #[test]
    fn readme_lists_every_cufile_op() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../README.md"))
                .unwrap();
        let row = readme
            .lines()
            .find(|l| l.starts_with("| `gds_cufile_calls_total` |"))
            .expect("README's metrics table has gds_cufile_calls_total");
        let values = row
            .split_once("op (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .expect("its labels say `op (…)`")
            .0;
        let listed: Vec<&str> = values
            .split(',')
            .map(|v| v.trim().trim_matches('`'))
            .collect();
        let table: Vec<&str> = CUFILE_OP_TABLE.iter().map(|o| o.label).collect();
        assert_eq!(listed, table, "README's op values against CUFILE_OP_TABLE");
    }

    #[test]
    fn every_op_has_a_name_and_errors_are_bounded() {
        assert_eq!(cufile_op(0), "read");
        assert_eq!(cufile_op(99), "unknown");
        assert_eq!(cufile_error(CUFILE_OP_READ, 1), "errno");
        assert_eq!(
            cufile_error(CUFILE_OP_READ, 5027),
            "CU_FILE_HANDLE_NOT_REGISTERED"
        );
        assert_eq!(cufile_error(CUFILE_OP_BATCH_SUBMIT, 1), "unknown");
        assert_eq!(cufile_error(CUFILE_OP_BATCH_SUBMIT, 123_456), "unknown");
        assert_eq!(CUFILE_USERS.len(), gds_common::cufile::CUFILE_USERS);
        assert_eq!(cufile_user(gds_common::cufile::USER_TRUSTED), "trusted");
        assert_eq!(cufile_user(gds_common::cufile::USER_OTHER), "other");
        assert_eq!(cufile_user(7), "other");
        let mut codes: Vec<i32> = CUFILE_ERRORS.iter().map(|(c, _)| *c).collect();
        codes.dedup();
        assert_eq!(codes.len(), CUFILE_ERRORS.len(), "sorted and unique");
    }
}
