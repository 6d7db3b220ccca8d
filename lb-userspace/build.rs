//! Builds the XDP program (lb-ebpf) with nightly and build-std, and leaves the object in
//! OUT_DIR for `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    // aya-build watches lb-ebpf; the program also compiles lb-common's shared logic.
    println!("cargo:rerun-if-changed=../lb-common/src");
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())?;
    // With AYA_BUILD_SKIP=1 (quick host-only builds) there is no object: leave an empty one so
    // the crate still compiles; lbd then refuses to load it with a clear message.
    // The same for the backends' decapsulation program (`lbd decap`).
    for name in ["lb", "lb-decap"] {
        let object = std::path::Path::new(&std::env::var("OUT_DIR")?).join(name);
        if !object.exists() {
            std::fs::write(&object, [])?;
        }
    }
    Ok(())
}
