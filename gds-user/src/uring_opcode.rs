//! io_uring opcode names, as used in metric labels (`URING_CMD`, `READ`, `NOP`, …).

use gds_common::MAX_OPCODES;

/// `enum io_uring_op` (include/uapi/linux/io_uring.h) without the `IORING_OP_` prefix, in value
/// order. The values are UAPI: new kernels only append. Checked against the running kernel's
/// BTF in the tests below.
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

/// Label for an opcode slot. The last slot collects every opcode ≥ `MAX_OPCODES - 1`.
pub fn name(opcode: usize) -> String {
    if opcode >= MAX_OPCODES - 1 {
        return "OTHER".into();
    }
    NAMES
        .get(opcode)
        .map(|s| (*s).to_owned())
        .unwrap_or_else(|| format!("OP_{opcode}"))
}

/// Parses an opcode given by name (case-insensitive, `IORING_OP_` prefix optional) or number.
pub fn parse(s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return Some(n);
    }
    let up = s.to_ascii_uppercase();
    let bare = up.strip_prefix("IORING_OP_").unwrap_or(&up);
    NAMES.iter().position(|n| *n == bare).map(|p| p as u8)
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
        for (n, v) in values {
            let Some(bare) = n.strip_prefix("IORING_OP_") else {
                continue;
            };
            if bare == "LAST" || v as usize >= NAMES.len() {
                continue;
            }
            assert_eq!(NAMES[v as usize], bare, "opcode {v}");
            checked += 1;
        }
        assert!(checked > 50, "only {checked} opcodes checked");
    }

    #[test]
    fn parse_and_name_round_trip() {
        assert_eq!(parse("URING_CMD"), Some(46));
        assert_eq!(parse("ioring_op_nop"), Some(0));
        assert_eq!(parse("22"), Some(22));
        assert_eq!(parse("bogus"), None);
        assert_eq!(name(46), "URING_CMD");
        assert_eq!(name(63), "OTHER");
    }
}
