//! Points `LB_TESTGEN_OBJECT` at the tests' own XDP programs (lb-ebpf's `lb-testgen` bin),
//! which lb-userspace's build script builds with every other program of lb-ebpf: it publishes
//! its OUT_DIR (Cargo's `links` metadata, `DEP_LB_EBPF_OUT_DIR`), so nothing is built twice.
fn main() {
    let dir = std::env::var("DEP_LB_EBPF_OUT_DIR")
        .expect("DEP_LB_EBPF_OUT_DIR: lb-userspace's build script publishes its OUT_DIR");
    let object = format!("{dir}/lb-testgen");
    println!("cargo:rerun-if-env-changed=DEP_LB_EBPF_OUT_DIR");
    println!("cargo:rerun-if-changed={object}");
    println!("cargo:rustc-env=LB_TESTGEN_OBJECT={object}");
}
