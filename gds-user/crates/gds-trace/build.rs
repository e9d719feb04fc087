use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the eBPF programs (gds-ebpf) for the BPF target with the nightly toolchain and
/// bpf-linker; the object is embedded in the agent with `include_bytes_aligned!`.
/// `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "gds-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../../../gds-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .context("building gds-ebpf failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker")
}
