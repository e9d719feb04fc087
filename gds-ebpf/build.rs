use which::which;

/// Rebuild the programs when bpf-linker changes: a linker built against another LLVM
/// produces a different (or broken) object.
fn main() {
    // 32-bit ALU (BPF ISA v3 level, Linux 5.1+; gds supports 6.1+): LLVM lowers 64-bit
    // compare-and-swap (the in-flight slot table's claim) only with it. rustc already passes
    // `--cpu generic` and bpf-linker refuses a second --cpu, so the feature goes alone.
    println!("cargo:rustc-link-arg-bins=--cpu-features=+alu32");
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
