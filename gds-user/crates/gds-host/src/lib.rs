//! The foundations of gds that read the host and import nothing of gds: sizes and durations,
//! clocks, user names, the kernel's BTF, capabilities, tracefs and event formats, a process's
//! cgroup and Kubernetes pod, kernel modules, nvidia-fs's `/proc` formats, the agent's
//! config-file format, and bounded reads of host files under a root.

pub mod bounded;
pub mod btf;
pub mod cgroup;
pub mod clock;
pub mod config_file;
pub mod evidence;
pub mod kmod;
pub mod nvidia_fs;
pub mod privileges;
pub mod tracefs;
pub mod units;
pub mod users;
