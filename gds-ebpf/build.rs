use which::which;

/// Rebuild the programs when bpf-linker changes: a linker built against another LLVM
/// produces a different (or broken) object.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
