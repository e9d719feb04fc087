//! Names, decoded once: every label and word the views show for a kernel number comes from
//! here (io_uring opcodes, NVMe opcodes and statuses, block operations, drop reasons). Stage
//! and layer names are their enums' own (`model::request`).

use std::sync::OnceLock;

use gds_common::DropReason;

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

/// io_uring opcode names of the running kernel: `enum io_uring_op` from its BTF (so a kernel
/// newer than this table names its new opcodes), else the table above.
fn opcode_names() -> &'static [String] {
    static NAMES_NOW: OnceLock<Vec<String>> = OnceLock::new();
    NAMES_NOW.get_or_init(|| {
        let from_btf = crate::btf::Btf::from_sys()
            .ok()
            .and_then(|btf| btf.enum_values("io_uring_op"))
            .map(|values| opcode_table(&values));
        match from_btf {
            Some(t) if !t.is_empty() => t,
            _ => NAMES.iter().map(|s| (*s).to_owned()).collect(),
        }
    })
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
    crate::nvme::NvmeStatus(status).name()
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

/// The label of a drop reason.
pub fn drop_reason(r: DropReason) -> &'static str {
    r.label()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_running_kernel() {
        let btf = crate::btf::Btf::from_sys().unwrap();
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
