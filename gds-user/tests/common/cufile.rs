//! What the cuFile end-to-end tests share: the real libcufile from PyPI, the stand-in library
//! and its driver built with the host's C compiler, and a child process driven line by line
//! (a command on its stdin, one answer line on its stdout: `fixtures/cufile_caller.py`,
//! `fixtures/cufile_driver.c`), sent `exit` and waited for when dropped (killed if it does not
//! exit within 10 s).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

pub struct LineChild {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LineChild {
    /// Runs `argv` in `dir` (a wrapper such as `setpriv` or `unshare` may come first: it must
    /// exec the program, so the child's pid is the program's).
    pub fn spawn(argv: &[String], dir: &Path) -> LineChild {
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        LineChild {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    /// `fixtures/cufile_caller.py` after `wrapper`, run by `python` (`/usr/bin/python3` for
    /// another user: one under /root is not reachable), in the temporary directory (cuFile
    /// writes cufile.log into its working directory).
    pub fn cufile_caller(python: &str, wrapper: &[String]) -> LineChild {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cufile_caller.py");
        let mut argv = wrapper.to_vec();
        argv.extend([python.into(), script.display().to_string()]);
        LineChild::spawn(&argv, &std::env::temp_dir())
    }

    /// Sends `line`; the answer, trimmed. Panics if the child exited.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.answer(line)
    }

    /// Sends `line` without waiting for its answer (a command that blocks until the test does
    /// something: read it later with [`LineChild::answer`]).
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
    }

    /// The next answer line, trimmed (`line`: the command it answers, for the panic message).
    pub fn answer(&mut self, line: &str) -> String {
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        assert!(!answer.is_empty(), "{:?} exited on `{line}`", self.child);
        answer.trim().to_owned()
    }

    /// The pid in an answer `<word> PID` (`loaded 1234`).
    pub fn cmd_pid(&mut self, line: &str) -> u32 {
        let a = self.cmd(line);
        a.rsplit(' ')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {a:?}"))
    }

    /// Sends `exit` and waits for the child.
    pub fn exit(self) {
        drop(self)
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// NVIDIA's libcufile from PyPI (`GDS_LIBCUFILE`, or where `cargo xtask setup` unpacks it).
pub fn libcufile() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GDS_LIBCUFILE") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/pypi/nvidia-cufile/nvidia/cu13/lib/libcufile.so.0");
    p.exists().then_some(p)
}

/// [`libcufile`], or None with a SKIPPED line where it is missing; CI must have it
/// (`cargo xtask setup` installs it), so there a missing one fails the test.
pub fn require_libcufile() -> Option<PathBuf> {
    let lib = libcufile();
    if lib.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "libcufile from PyPI is missing under target/pypi: `cargo xtask setup` installs it"
        );
        eprintln!("SKIPPED: no libcufile (run `cargo xtask setup`, or set GDS_LIBCUFILE)");
    }
    lib
}

/// Runs the host's C compiler (the one Rust links with) with `args`; panics with its output.
pub fn cc(args: &[&str]) {
    let out = Command::new("cc").args(args).output().expect("cc");
    assert!(
        out.status.success(),
        "cc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `fixtures/libcufile_standin.c` as `dir/libcufile.so.0` and `fixtures/cufile_driver.c`
/// as `dir/cufile-driver`; returns both paths.
pub fn build_standin(dir: &Path) -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (lib, driver) = (dir.join("libcufile.so.0"), dir.join("cufile-driver"));
    let (standin, driver_src) = (src.join("libcufile_standin.c"), src.join("cufile_driver.c"));
    let out = |p: &Path| p.to_str().unwrap().to_owned();
    cc(&[
        "-shared",
        "-fPIC",
        "-O2",
        "-Wall",
        "-Werror",
        "-o",
        &out(&lib),
        &out(&standin),
    ]);
    cc(&[
        "-O2",
        "-Wall",
        "-Werror",
        "-o",
        &out(&driver),
        &out(&driver_src),
        "-ldl",
    ]);
    (lib, driver)
}

/// The stand-in library, the driver and a data file, in a directory every user may read.
pub struct StandinFixtures {
    pub dir: tempfile::TempDir,
}

impl StandinFixtures {
    /// Builds both with the host's C compiler (the one Rust links with).
    pub fn build() -> StandinFixtures {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (lib, driver) = build_standin(dir.path());
        let data = dir.path().join("data");
        std::fs::write(&data, vec![7u8; 1 << 20]).unwrap();
        for f in [&lib, &driver, &data] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        StandinFixtures { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The driver under another name (its command name, for `--comm`).
    pub fn driver_named(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::copy(self.path("cufile-driver"), &p).unwrap();
        p
    }
}

/// `fixtures/cufile_driver.c`, driven line by line.
pub struct Driver(pub LineChild);

impl Driver {
    /// `wrapper… driver LIBRARY` (a wrapper must exec the driver: its pid is the driver's).
    pub fn spawn(fx: &StandinFixtures, wrapper: &[String], driver: &Path) -> Driver {
        let mut argv: Vec<String> = wrapper.to_vec();
        argv.push(driver.display().to_string());
        argv.push(fx.path("libcufile.so.0").display().to_string());
        Driver(LineChild::spawn(&argv, fx.dir.path()))
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.0.cmd(line)
    }

    /// dlopen; returns the process id.
    pub fn load(&mut self) -> u32 {
        self.0.cmd_pid("load")
    }

    pub fn exit(self) {
        self.0.exit()
    }
}
