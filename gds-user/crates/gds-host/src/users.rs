//! `--cufile-users` (config key `cufile_users`): the users besides root whose processes' cuFile
//! calls count as trusted. Names are resolved once, at start, through the system's password
//! database (`getpwnam_r`: `/etc/passwd`, or LDAP/sssd where NSS is set up so); numeric uids
//! are taken as they are (a container's user need not have a name on the host).

use std::ffi::CString;

/// Why a `--cufile-users` entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("empty user name (fix: give user names or uids separated by commas)")]
    Empty,
    #[error(
        "unknown user {name:?}: not in the password database (fix: give an existing user name, \
         as `getent passwd NAME` shows it, or a numeric uid)"
    )]
    Unknown { name: String },
    #[error("user {name:?}: looking it up failed: {source} (fix: give a numeric uid instead)")]
    Lookup {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("uid {0} is (uid_t)-1, which is no user's uid")]
    Invalid(u32),
}

/// Size of the buffer `getpwnam_r` fills with the entry's strings: glibc's own hint
/// (`_SC_GETPW_R_SIZE_MAX`) is 1 KiB; grown on `ERANGE` up to [`PASSWD_BUF_MAX`].
const PASSWD_BUF: usize = 1024;
/// Largest buffer tried for one password entry: entries are a few hundred bytes; a larger one
/// is a broken database, refused rather than grown without bound.
const PASSWD_BUF_MAX: usize = 1 << 20;

/// The uid of `user`: a number, or a user name from the password database.
pub fn resolve(user: &str) -> Result<u32, UserError> {
    let user = user.trim();
    if user.is_empty() {
        return Err(UserError::Empty);
    }
    if user.bytes().all(|b| b.is_ascii_digit()) {
        return match user.parse::<u32>() {
            Ok(u32::MAX) => Err(UserError::Invalid(u32::MAX)),
            Ok(uid) => Ok(uid),
            Err(_) => Err(UserError::Unknown { name: user.into() }),
        };
    }
    let unknown = || UserError::Unknown { name: user.into() };
    let name = CString::new(user).map_err(|_| unknown())?;
    let mut size = PASSWD_BUF;
    loop {
        let mut buf = vec![0u8; size];
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids) for getpwnam_r to fill.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives it and its size is given.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Err(unknown()),
            0 => return Ok(pwd.pw_uid),
            libc::ERANGE if size < PASSWD_BUF_MAX => size *= 4,
            // "Not found" comes back as one of these from some NSS modules.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Err(unknown()),
            e => {
                return Err(UserError::Lookup {
                    name: user.into(),
                    source: std::io::Error::from_raw_os_error(e),
                });
            }
        }
    }
}

/// `resolve` as a clap value parser (its message is the error's).
pub fn parse(user: &str) -> Result<u32, String> {
    resolve(user).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uids() {
        assert_eq!(resolve("root").unwrap(), 0);
        assert_eq!(resolve("0").unwrap(), 0);
        assert_eq!(resolve(" 1234 ").unwrap(), 1234);
        // `nobody` is 65534 on every distribution this runs on.
        assert_eq!(resolve("nobody").unwrap(), 65534);
        assert!(matches!(resolve(""), Err(UserError::Empty)));
        assert!(matches!(
            resolve("4294967295"),
            Err(UserError::Invalid(u32::MAX))
        ));
        let e = resolve("no-such-user-gds").unwrap_err();
        assert!(matches!(e, UserError::Unknown { .. }), "{e}");
        assert!(
            e.to_string().contains("unknown user \"no-such-user-gds\""),
            "{e}"
        );
        assert!(matches!(
            resolve("99999999999"),
            Err(UserError::Unknown { .. })
        ));
        assert!(matches!(resolve("a\0b"), Err(UserError::Unknown { .. })));
    }
}
