//! Which cgroup a process is in, and the Kubernetes pod and container behind it.
//!
//! Read from `/proc/PID/cgroup` in user space, for in-flight, slow and stalled requests only
//! (never per request, never a metric label by default: pod UIDs are unbounded). Both cgroup
//! versions and both kubelet cgroup drivers are understood:
//!
//! - v2, systemd driver: `0::/kubepods.slice/kubepods-burstable.slice/`
//!   `kubepods-burstable-pod1a2b3c4d_…_.slice/cri-containerd-<64 hex>.scope`
//! - v1, cgroupfs driver: `4:blkio:/kubepods/burstable/pod1a2b3c4d-…/<64 hex>`

use procfs::{FromRead, ProcessCGroup, ProcessCGroups};
use serde::{Deserialize, Serialize};

/// A process's cgroup and, under Kubernetes, its pod and container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupInfo {
    /// The v2 (unified) path, else the v1 blkio one (what I/O throttling applies to), else
    /// the first hierarchy listed.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// The cgroup of `pid` (`None` when the process is gone or /proc is unreadable).
pub fn of_pid(pid: u32) -> Option<CgroupInfo> {
    read(format!("/proc/{pid}/cgroup"))
}

/// The cgroup of thread `tid` of process `tgid` (threads may differ under cgroup v1, where
/// writing a tid to `tasks` moves that thread alone), else of the process, else `None` (gone).
pub fn of_task(tgid: u32, tid: u32) -> Option<CgroupInfo> {
    read(format!("/proc/{tgid}/task/{tid}/cgroup")).or_else(|| of_pid(tgid))
}

fn read(path: String) -> Option<CgroupInfo> {
    ProcessCGroups::from_file(path)
        .ok()
        .map(|g| of_groups(&g.0))
}

/// The cgroup a `/proc/PID/cgroup` file lists, chosen among its hierarchies.
pub fn of_groups(groups: &[ProcessCGroup]) -> CgroupInfo {
    let mut v2 = None;
    let mut blkio = None;
    for g in groups {
        if g.hierarchy == 0 && g.controllers.is_empty() {
            v2 = Some(g.pathname.as_str());
        } else if g.controllers.iter().any(|c| c == "blkio") {
            blkio = Some(g.pathname.as_str());
        }
    }
    let first = groups.first().map(|g| g.pathname.as_str());
    // On a hybrid host the unified hierarchy may be "/" while blkio holds the real path.
    let path = match (v2, blkio) {
        (Some("/"), Some(b)) => b,
        (Some(v), _) => v,
        (None, Some(b)) => b,
        (None, None) => first.unwrap_or(""),
    };
    let (pod_uid, container_id) = kubernetes(path);
    CgroupInfo {
        path: path.to_owned(),
        pod_uid,
        container_id,
    }
}

/// The pod UID and container id in a kubepods cgroup path, if it is one.
pub fn kubernetes(path: &str) -> (Option<String>, Option<String>) {
    if !path.contains("kubepods") {
        return (None, None);
    }
    let mut pod = None;
    let mut container = None;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        let bare = seg.strip_suffix(".slice").unwrap_or(seg);
        // systemd: kubepods-burstable-pod<uid with _>; cgroupfs: pod<uid with ->.
        if let Some(i) = bare.rfind("pod") {
            let uid = &bare[i + 3..];
            if is_uid(uid) {
                pod = Some(uid.replace('_', "-"));
                continue;
            }
        }
        // systemd: cri-containerd-<id>.scope / docker-<id>.scope / crio-<id>.scope;
        // cgroupfs: the bare id.
        let bare = seg.strip_suffix(".scope").unwrap_or(seg);
        let id = bare.rsplit('-').next().unwrap_or(bare);
        if pod.is_some() && id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            container = Some(id.to_owned());
        }
    }
    (pod, container)
}

/// `1a2b3c4d-…` or `1a2b3c4d_…`: 32 hex digits in five groups.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split(['-', '_']).collect();
    groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a `/proc/PID/cgroup` of this text gives (`None`: not such a file).
    fn parse_proc_cgroup(text: &str) -> Option<CgroupInfo> {
        ProcessCGroups::from_read(text.as_bytes())
            .ok()
            .map(|g| of_groups(&g.0))
    }

    const UID: &str = "0f6e4f0a-3b1c-4d2e-9a8b-7c6d5e4f3a2b";
    const CID: &str = "4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f";

    #[test]
    fn kubernetes_v2_systemd() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        );
        let c = parse_proc_cgroup(&text).unwrap();
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container_id.as_deref(), Some(CID));
        assert!(c.path.starts_with("/kubepods.slice/"));
    }

    #[test]
    fn kubernetes_v1_cgroupfs() {
        let text = format!(
            "12:memory:/kubepods/besteffort/pod{UID}/{CID}\n4:blkio:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/\n"
        );
        let c = parse_proc_cgroup(&text).unwrap();
        assert_eq!(c.path, format!("/kubepods/besteffort/pod{UID}/{CID}"));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn plain_hosts_and_hybrids() {
        let c = parse_proc_cgroup("0::/user.slice/user-0.slice/session-1.scope\n").unwrap();
        assert_eq!(c.path, "/user.slice/user-0.slice/session-1.scope");
        assert_eq!((c.pod_uid, c.container_id), (None, None));
        // Hybrid: unified at "/", blkio has the real path (this machine's layout).
        let c = parse_proc_cgroup("5:blkio:/gds-test\n0::/\n").unwrap();
        assert_eq!(c.path, "/gds-test");
        // A pod-looking word that is not a UID is not a pod.
        assert_eq!(kubernetes("/kubepods/podcast/abc"), (None, None));
        assert_eq!(parse_proc_cgroup("garbage"), None);
        assert_eq!(of_groups(&[]), CgroupInfo::default());
    }

    #[test]
    fn this_process_has_a_cgroup() {
        let c = of_pid(std::process::id()).expect("/proc/self/cgroup");
        assert!(c.path.starts_with('/'), "{c:?}");
        // The main thread's tid is the pid.
        let pid = std::process::id();
        assert_eq!(of_task(pid, pid), Some(c));
        assert_eq!(of_task(u32::MAX, u32::MAX), None);
    }
}
