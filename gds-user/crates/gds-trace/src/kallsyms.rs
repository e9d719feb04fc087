//! Kernel symbol addresses from `/proc/kallsyms`, for programs that compare a kernel pointer
//! with a function (a bio's completion, a file's `read_iter`).

use std::{io::BufRead as _, path::Path};

/// The addresses of kernel symbols `names` (streamed once; stops when all are found). None for
/// a name not there, or whose address is hidden (`kptr_restrict`: shown as 0).
pub(crate) fn addresses<const N: usize>(path: &Path, names: [&str; N]) -> [Option<u64>; N] {
    let mut found = [None; N];
    let Ok(f) = std::fs::File::open(path) else {
        return found;
    };
    for line in std::io::BufReader::new(f).lines() {
        let Ok(line) = line else { break };
        let mut it = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| *n == name) {
            found[i] = u64::from_str_radix(addr, 16).ok().filter(|a| *a != 0);
            if found.iter().all(Option::is_some) {
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_names_and_treats_hidden_addresses_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kallsyms");
        std::fs::write(
            &p,
            "ffffffff81000000 T _stext\n\
             ffffffff8123abcd t ext4_file_read_iter\t[ext4]\n\
             0000000000000000 T blkdev_read_iter\n",
        )
        .unwrap();
        let [ext4, blk, none] = addresses(
            &p,
            [
                "ext4_file_read_iter",
                "blkdev_read_iter",
                "xfs_file_read_iter",
            ],
        );
        assert_eq!(ext4, Some(0xffff_ffff_8123_abcd));
        assert_eq!(blk, None, "a hidden (0) address is no address");
        assert_eq!(none, None);
        assert_eq!(addresses(&dir.path().join("absent"), ["x"]), [None]);
    }
}
