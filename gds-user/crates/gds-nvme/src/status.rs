//! Completion decoding for NVMe passthrough.
//!
//! The CQE `res` of an `IORING_OP_URING_CMD` on an NVMe char device is either `-errno` (the
//! kernel refused or failed the command before/around the device) or, when positive, the NVMe
//! status field of the completion without the phase bit (`nvme_req(req)->status`, i.e.
//! `le16_to_cpu(cqe.status) >> 1`): bits 7:0 status code, 10:8 status code type, 12:11 command
//! retry delay, 13 more, 14 do not retry. The NVMe command result (CQE dword 0/1) travels in the
//! first u64 of the 32-byte CQE's extra half.

use std::fmt;

/// An NVMe completion status as the kernel reports it in a passthrough CQE.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NvmeStatus(pub u16);

/// Status code type (NVMe base spec, "Status Code Type").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusCodeType {
    Generic,
    CommandSpecific,
    MediaAndDataIntegrity,
    Path,
    VendorSpecific,
    Reserved(u8),
}

impl StatusCodeType {
    fn from_bits(sct: u8) -> Self {
        match sct {
            0 => Self::Generic,
            1 => Self::CommandSpecific,
            2 => Self::MediaAndDataIntegrity,
            3 => Self::Path,
            7 => Self::VendorSpecific,
            other => Self::Reserved(other),
        }
    }

    /// Short name used in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Generic => "generic",
            Self::CommandSpecific => "command-specific",
            Self::MediaAndDataIntegrity => "media",
            Self::Path => "path",
            Self::VendorSpecific => "vendor",
            Self::Reserved(_) => "reserved",
        }
    }
}

impl NvmeStatus {
    /// Generic: LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Generic: Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    /// Generic: Invalid Field in Command.
    pub const INVALID_FIELD: u8 = 0x02;

    /// Status code (bits 7:0).
    pub fn sc(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    /// Status code type (bits 10:8) as a raw number.
    pub fn sct_bits(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    pub fn sct(self) -> StatusCodeType {
        StatusCodeType::from_bits(self.sct_bits())
    }

    /// Do Not Retry: the controller says the same command will fail again.
    pub fn dnr(self) -> bool {
        self.0 & 0x4000 != 0
    }

    /// More: a log page has more information.
    pub fn more(self) -> bool {
        self.0 & 0x2000 != 0
    }

    /// Command Retry Delay selector (0 = none).
    pub fn crd(self) -> u8 {
        ((self.0 >> 11) & 0x3) as u8
    }

    pub fn is_success(self) -> bool {
        self.sct_bits() == 0 && self.sc() == 0
    }

    /// The status' name from the NVMe base and NVM command set specifications, or a generic
    /// description when the code is not one this decoder knows.
    pub fn name(self) -> &'static str {
        status_name(self.sct_bits(), self.sc())
    }
}

impl fmt::Debug for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NvmeStatus({:#06x} {})", self.0, self)
    }
}

impl fmt::Display for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (SCT {:#x} {}, SC {:#04x}{})",
            self.name(),
            self.sct_bits(),
            self.sct().name(),
            self.sc(),
            if self.dnr() { ", do not retry" } else { "" }
        )
    }
}

fn status_name(sct: u8, sc: u8) -> &'static str {
    match (sct, sc) {
        (0, 0x00) => "Successful Completion",
        (0, 0x01) => "Invalid Command Opcode",
        (0, 0x02) => "Invalid Field in Command",
        (0, 0x03) => "Command ID Conflict",
        (0, 0x04) => "Data Transfer Error",
        (0, 0x05) => "Commands Aborted due to Power Loss Notification",
        (0, 0x06) => "Internal Error",
        (0, 0x07) => "Command Abort Requested",
        (0, 0x08) => "Command Aborted due to SQ Deletion",
        (0, 0x09) => "Command Aborted due to Failed Fused Command",
        (0, 0x0a) => "Command Aborted due to Missing Fused Command",
        (0, 0x0b) => "Invalid Namespace or Format",
        (0, 0x0c) => "Command Sequence Error",
        (0, 0x0d) => "Invalid SGL Segment Descriptor",
        (0, 0x0e) => "Invalid Number of SGL Descriptors",
        (0, 0x0f) => "Data SGL Length Invalid",
        (0, 0x10) => "Metadata SGL Length Invalid",
        (0, 0x11) => "SGL Descriptor Type Invalid",
        (0, 0x12) => "Invalid Use of Controller Memory Buffer",
        (0, 0x13) => "PRP Offset Invalid",
        (0, 0x14) => "Atomic Write Unit Exceeded",
        (0, 0x15) => "Operation Denied",
        (0, 0x16) => "SGL Offset Invalid",
        (0, 0x18) => "Host Identifier Inconsistent Format",
        (0, 0x19) => "Keep Alive Timer Expired",
        (0, 0x1a) => "Keep Alive Timeout Invalid",
        (0, 0x1b) => "Command Aborted due to Preempt and Abort",
        (0, 0x1c) => "Sanitize Failed",
        (0, 0x1d) => "Sanitize In Progress",
        (0, 0x1e) => "SGL Data Block Granularity Invalid",
        (0, 0x1f) => "Command Not Supported for Queue in CMB",
        (0, 0x20) => "Namespace is Write Protected",
        (0, 0x21) => "Command Interrupted",
        (0, 0x22) => "Transient Transport Error",
        (0, 0x80) => "LBA Out of Range",
        (0, 0x81) => "Capacity Exceeded",
        (0, 0x82) => "Namespace Not Ready",
        (0, 0x83) => "Reservation Conflict",
        (0, 0x84) => "Format In Progress",
        (1, 0x00) => "Completion Queue Invalid",
        (1, 0x01) => "Invalid Queue Identifier",
        (1, 0x02) => "Invalid Queue Size",
        (1, 0x03) => "Abort Command Limit Exceeded",
        (1, 0x05) => "Asynchronous Event Request Limit Exceeded",
        (1, 0x06) => "Invalid Firmware Slot",
        (1, 0x07) => "Invalid Firmware Image",
        (1, 0x08) => "Invalid Interrupt Vector",
        (1, 0x09) => "Invalid Log Page",
        (1, 0x0a) => "Invalid Format",
        (1, 0x0b) => "Firmware Activation Requires Conventional Reset",
        (1, 0x0c) => "Invalid Queue Deletion",
        (1, 0x0d) => "Feature Identifier Not Saveable",
        (1, 0x0e) => "Feature Not Changeable",
        (1, 0x0f) => "Feature Not Namespace Specific",
        (1, 0x10) => "Firmware Activation Requires NVM Subsystem Reset",
        (1, 0x11) => "Firmware Activation Requires Controller Level Reset",
        (1, 0x12) => "Firmware Activation Requires Maximum Time Violation",
        (1, 0x13) => "Firmware Activation Prohibited",
        (1, 0x14) => "Overlapping Range",
        (1, 0x15) => "Namespace Insufficient Capacity",
        (1, 0x16) => "Namespace Identifier Unavailable",
        (1, 0x18) => "Namespace Already Attached",
        (1, 0x19) => "Namespace Is Private",
        (1, 0x1a) => "Namespace Not Attached",
        (1, 0x1b) => "Thin Provisioning Not Supported",
        (1, 0x1c) => "Controller List Invalid",
        (1, 0x80) => "Conflicting Attributes",
        (1, 0x81) => "Invalid Protection Information",
        (1, 0x82) => "Attempted Write to Read Only Range",
        (2, 0x80) => "Write Fault",
        (2, 0x81) => "Unrecovered Read Error",
        (2, 0x82) => "End-to-end Guard Check Error",
        (2, 0x83) => "End-to-end Application Tag Check Error",
        (2, 0x84) => "End-to-end Reference Tag Check Error",
        (2, 0x85) => "Compare Failure",
        (2, 0x86) => "Access Denied",
        (2, 0x87) => "Deallocated or Unwritten Logical Block",
        (3, 0x00) => "Internal Path Error",
        (3, 0x01) => "Asymmetric Access Persistent Loss",
        (3, 0x02) => "Asymmetric Access Inaccessible",
        (3, 0x03) => "Asymmetric Access Transition",
        (3, 0x60) => "Controller Pathing Error",
        (3, 0x70) => "Host Pathing Error",
        (3, 0x71) => "Command Aborted By Host",
        (7, _) => "Vendor Specific",
        (0, _) => "Unknown Generic Status",
        (1, _) => "Unknown Command Specific Status",
        (2, _) => "Unknown Media Error",
        (3, _) => "Unknown Path Error",
        _ => "Reserved Status Code Type",
    }
}

/// What one passthrough completion means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionOutcome {
    /// The device completed the command; `result` is CQE dword 0/1.
    Success { result: u64 },
    /// The kernel failed the command with this errno (the device may never have seen it).
    Errno(i32),
    /// The device completed the command with an error status.
    Device(NvmeStatus),
}

impl CompletionOutcome {
    /// Decode a CQE's `res` and the first u64 of its big-CQE half.
    pub fn decode(res: i32, result: u64) -> Self {
        if res < 0 {
            // saturating: -i32::MIN does not fit (a panic in debug builds, a negative errno in
            // release); no errno is that large anyway.
            Self::Errno(res.saturating_neg())
        } else if res == 0 {
            Self::Success { result }
        } else {
            // Only the low 15 bits carry status; bit 15 is not an NVMe status bit and is kept
            // so the raw value is still visible in the decoded form. Nothing above 16 bits can
            // come from the kernel; such a value saturates rather than wrapping (0x10000 would
            // otherwise read as "Successful Completion").
            Self::Device(NvmeStatus(u16::try_from(res).unwrap_or(u16::MAX)))
        }
    }
}

/// The errno's symbolic name plus a hint about what usually causes it for NVMe passthrough.
pub fn errno_hint(errno: i32) -> (&'static str, &'static str) {
    match errno {
        libc::EPERM | libc::EACCES => (
            if errno == libc::EPERM {
                "EPERM"
            } else {
                "EACCES"
            },
            "passthrough needs CAP_SYS_ADMIN or read/write permission on the /dev/ng* node",
        ),
        libc::EINVAL => (
            "EINVAL",
            "the kernel rejected the command: data_len above max_hw_sectors_kb (MDTS), a bad \
             buffer/length pair, reserved fields set, or fixed-buffer index out of range",
        ),
        libc::EFAULT => (
            "EFAULT",
            "the data buffer or the registered buffer range is not mapped in this process",
        ),
        libc::ENOTTY | libc::EOPNOTSUPP => (
            if errno == libc::ENOTTY {
                "ENOTTY"
            } else {
                "EOPNOTSUPP"
            },
            "this file does not support the NVMe uring command: use the generic char device \
             /dev/ngXnY for I/O and /dev/nvmeX for admin commands, on Linux >= 5.19",
        ),
        libc::EINTR => ("EINTR", "interrupted; retry"),
        libc::EAGAIN => (
            "EAGAIN",
            "no request tag available; retry at a lower queue depth",
        ),
        libc::ENOMEM => (
            "ENOMEM",
            "the kernel could not allocate a request or map the buffer",
        ),
        libc::EIO => ("EIO", "the controller or the path to it failed the command"),
        libc::ETIMEDOUT => ("ETIMEDOUT", "the command timed out in the driver"),
        libc::ENODEV | libc::ENXIO => ("ENODEV", "the namespace or controller went away"),
        libc::EBADF => (
            "EBADF",
            "the file descriptor is not open for this operation",
        ),
        _ => ("errno", "see errno(3)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lba_out_of_range_with_dnr() {
        // As the kernel reports it: DNR (0x4000) | SCT 0 | SC 0x80.
        let st = NvmeStatus(0x4080);
        assert_eq!(st.sct(), StatusCodeType::Generic);
        assert_eq!(st.sc(), NvmeStatus::LBA_OUT_OF_RANGE);
        assert!(st.dnr());
        assert_eq!(st.name(), "LBA Out of Range");
        assert_eq!(
            st.to_string(),
            "LBA Out of Range (SCT 0x0 generic, SC 0x80, do not retry)"
        );
    }

    #[test]
    fn names_across_types() {
        assert_eq!(NvmeStatus(0x000b).name(), "Invalid Namespace or Format");
        assert_eq!(NvmeStatus(0x0002).name(), "Invalid Field in Command");
        assert_eq!(NvmeStatus(0x0082).name(), "Namespace Not Ready");
        assert_eq!(NvmeStatus(0x0281).name(), "Unrecovered Read Error");
        assert_eq!(NvmeStatus(0x0370).name(), "Host Pathing Error");
        assert_eq!(NvmeStatus(0x0299).name(), "Unknown Media Error");
        assert_eq!(
            NvmeStatus(0x0700 | 0xc1).sct(),
            StatusCodeType::VendorSpecific
        );
        assert_eq!(NvmeStatus(0x1000).crd(), 2);
        assert!(NvmeStatus(0x2000).more());
    }

    #[test]
    fn decode_res() {
        assert_eq!(
            CompletionOutcome::decode(0, 7),
            CompletionOutcome::Success { result: 7 }
        );
        assert_eq!(
            CompletionOutcome::decode(-libc::EINVAL, 0),
            CompletionOutcome::Errno(libc::EINVAL)
        );
        assert_eq!(
            CompletionOutcome::decode(0x4080, 0),
            CompletionOutcome::Device(NvmeStatus(0x4080))
        );
        assert_eq!(errno_hint(libc::ENOTTY).0, "ENOTTY");
    }

    /// Found by the `nvme_command` fuzz target: a positive `res` above 16 bits wrapped to a
    /// status of 0, a failed command reading as "Successful Completion".
    #[test]
    fn decode_res_above_16_bits_is_not_success() {
        let CompletionOutcome::Device(st) = CompletionOutcome::decode(0x3600_0000, 0) else {
            panic!("positive res must decode as a device status");
        };
        assert!(!st.is_success(), "{st:?}");
        assert_eq!(
            CompletionOutcome::decode(0x1_0000, 0),
            CompletionOutcome::Device(NvmeStatus(u16::MAX))
        );
        // Also found by the fuzz target: -i32::MIN overflowed.
        assert_eq!(
            CompletionOutcome::decode(i32::MIN, 0),
            CompletionOutcome::Errno(i32::MAX)
        );
        assert!(matches!(
            CompletionOutcome::decode(i32::MAX, 0),
            CompletionOutcome::Device(NvmeStatus(u16::MAX))
        ));
    }
}
