//! Per-packet cost of the XDP program through BPF_PROG_TEST_RUN (kernel-timed, repeat runs):
//! a new TCP connection (SYN), an established flow (ACK), a non-VIP packet. Prints ns per run.
//! Needs root. `lb-progbench [REPEAT]`.

use std::{net::Ipv4Addr, path::PathBuf};

use lb_common::{
    Backend, ServiceKey, ServiceValue, backend_flags,
    maglev::{MaglevBackend, build_table},
};
use lb_tests::packet::ipv4_tcp;
use lb_userspace::{
    datapath::{self, Datapath},
    state::to_addr,
};

fn main() -> anyhow::Result<()> {
    lb_tests::require_root();
    let repeat: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = PathBuf::from(format!("/sys/fs/bpf/lbt-progbench-{}", std::process::id()));
    // Removes the pins also when `run` panics (e.g. printing into a closed pipe).
    struct Pins(PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = datapath::cleanup(&self.0);
        }
    }
    let pins = Pins(dir);
    run(&pins.0, repeat)
}

fn run(dir: &std::path::Path, repeat: u32) -> anyhow::Result<()> {
    let seed = [1, 2];
    let mut dp = Datapath::open(dir, 65_536, &[])?;
    dp.set_config(seed)?;
    let vip = Ipv4Addr::new(203, 0, 113, 10);
    let mut live = vec![];
    for i in 0..3u32 {
        let addr = to_addr(Ipv4Addr::new(192, 0, 2, 11 + i as u8).into());
        let b = Backend {
            addr,
            mac: [2, 0, 0, 0, 0xb, i as u8],
            port: 0,
            src_mac: [2, 0, 0, 0, 0, 2],
            ifindex: 1,
            family: 4,
            flags: backend_flags::VALID,
            ..Default::default()
        };
        dp.set_backend(i, &b)?;
        live.push(MaglevBackend {
            id: i,
            addr,
            salt: 0,
            weight: 100,
        });
    }
    let table = build_table(&seed, &live, 65_537);
    let key = ServiceKey {
        addr: to_addr(vip.into()),
        port: 80u16.to_be(),
        proto: 6,
        family: 4,
    };
    dp.set_service(
        &key,
        &ServiceValue {
            id: 0,
            flags: 0,
            table_size: 65_537,
            _pad: 0,
        },
        &table,
    )?;
    let client = Ipv4Addr::new(198, 18, 0, 1);
    let (mac_a, mac_b) = ([2, 0, 0, 0, 0, 0x65], [2, 0, 0, 0, 0, 2]);
    let cases = [
        (
            "syn (new flow)",
            ipv4_tcp(mac_a, mac_b, client, vip, 40000, 80, 0x02, b""),
        ),
        (
            "ack (established)",
            ipv4_tcp(mac_a, mac_b, client, vip, 40000, 80, 0x10, b""),
        ),
        (
            "non-vip",
            ipv4_tcp(
                mac_a,
                mac_b,
                client,
                Ipv4Addr::new(192, 0, 2, 2),
                40000,
                80,
                0x10,
                b"",
            ),
        ),
    ];
    for (name, frame) in cases {
        let (action, per_run) = dp.test_run_repeat(&frame.bytes, repeat)?;
        println!(
            "{name:<28} action {action}  {:>6} ns/packet  (repeat {repeat})",
            per_run.as_nanos()
        );
    }
    // A repeated run reuses one frame, so only its first SYN is a new flow. New flows are
    // measured with single runs on fresh client addresses (198.18.0.0/15), beside single runs
    // of one established flow, so the per-call overhead of a single run shows up in both.
    let single = |flags: u8, fresh: Option<Ipv4Addr>| -> anyhow::Result<f64> {
        let n = 20_000u32;
        let mut total = 0u128;
        for i in 0..n {
            let src = match fresh {
                Some(base) => Ipv4Addr::from(u32::from(base) + 1 + i),
                None => client,
            };
            let frame = ipv4_tcp(mac_a, mac_b, src, vip, 40000, 80, flags, b"");
            total += dp.test_run_repeat(&frame.bytes, 1)?.1.as_nanos();
        }
        Ok(total as f64 / n as f64)
    };
    println!(
        "{:<28} {:>6.0} ns/packet  (single runs, fresh clients)",
        "syn, new flow",
        single(0x02, Some(Ipv4Addr::new(198, 18, 0, 0)))?
    );
    println!(
        "{:<28} {:>6.0} ns/packet  (single runs, fresh clients)",
        "ack, new flow (miss)",
        single(0x10, Some(Ipv4Addr::new(198, 19, 0, 0)))?
    );
    println!(
        "{:<28} {:>6.0} ns/packet  (single runs, one flow)",
        "ack, established (hit)",
        single(0x10, None)?
    );
    Ok(())
}
