//! What every program object of lb-ebpf needs besides its programs: a panic handler (the
//! verifier proves no path reaches one; `no_std` still asks for it) and the license section
//! (GPL: the kernel lets only GPL programs call the helpers we use, `bpf_redirect_map` among
//! them).

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
