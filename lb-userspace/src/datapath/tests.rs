//! `apply` on real maps (needs root and a bpffs at /sys/fs/bpf): whatever the maps held
//! before, they hold exactly the fill afterwards, as maps filled from empty do.

use super::*;
use lb_common::{
    Backend, FragKey, FragValue, ServiceEntry, ServiceKey, ServiceValue, VipKey, backend_flags,
};
use std::{
    fs,
    sync::atomic::{AtomicU32, Ordering},
};

/// A data path on maps of its own (program loaded, not attached); its pins go on drop.
struct Scratch {
    dp: Datapath,
    dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn scratch() -> Scratch {
    static N: AtomicU32 = AtomicU32::new(0);
    // `lbt<pid>x<n>-...`: the test harness's reaper removes it should this process die.
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/lbt{}x0-fill{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let dp = Datapath::open(&dir, 1024, &[]).expect("loading the program (needs root)");
    Scratch { dp, dir }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A fill of a few services (ids 0..8, keys on two VIPs), backends (ids 0..24), tables and
/// VIP entries drawn at random; DEVMAP names only `lo` (it must name real interfaces).
fn random_fill(rng: &mut Rng, config: Config) -> Fill {
    let mut f = Fill {
        config,
        ..Fill::default()
    };
    for id in 0..8u32 {
        if rng.below(3) == 0 {
            continue;
        }
        let key = ServiceKey {
            addr: [0x0a71_00cb + ((rng.below(2) as u32) << 24), 0, 0, 0],
            port: (rng.below(4) as u16 + 1).to_be(),
            proto: if rng.below(2) == 0 { 6 } else { 17 },
            family: 4,
        };
        if f.services.contains_key(&key) {
            continue;
        }
        let value = ServiceValue {
            id,
            flags: rng.below(2) as u32,
            table_size: 7,
            _pad: 0,
        };
        f.services.insert(key, value);
        f.service_by_id.insert(id, ServiceEntry { key, value });
        let table: Vec<u32> = (0..7).map(|_| rng.below(4) as u32).collect();
        f.maglev.insert(id, table.into());
        f.vips.insert(
            VipKey {
                addr: key.addr,
                proto: key.proto,
                family: 4,
                _pad: [0; 2],
            },
            value,
        );
    }
    for id in 0..24u32 {
        if rng.below(2) == 0 {
            continue;
        }
        let service = *f.service_by_id.keys().next().unwrap_or(&0);
        f.backends.insert(
            id,
            Backend {
                addr: [rng.below(4) as u32 + 1, 0, 0, 0],
                mac: [2, 0, 0, 0, 0, rng.below(3) as u8],
                port: 0,
                ifindex: 1,
                service,
                family: 4,
                flags: backend_flags::VALID | (rng.below(2) as u8 * backend_flags::DOWN),
                mtu: 1500,
                ..Backend::default()
            },
        );
    }
    f.vip_filter = vip_filter_words(f.services.keys());
    f.nat_filter = address_filter_words(
        f.backends
            .values()
            .filter(|b| b.mtu == 1500 && b.addr[0] % 2 == 1)
            .map(|b| b.addr),
    );
    if rng.below(2) == 0 {
        f.devmap.insert(1, 1);
    }
    f
}

#[test]
fn apply_leaves_exactly_the_fill_whatever_came_before() {
    let mut running = scratch();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for step in 0..60 {
        let config = running.dp.config_for([step, step + 1]).unwrap();
        let want = random_fill(&mut rng, config);
        running.dp.apply(&want).unwrap();
        let held = Fill::read_pinned(&running.dir).unwrap();
        let diff = held.diff(&want);
        assert!(diff.is_empty(), "step {step}: {diff:#?}");
        assert_eq!(running.dp.fill(), &want, "step {step}: the shadow");
        if step % 20 == 19 {
            // The same fill on new, empty maps.
            let mut fresh = scratch();
            fresh.dp.apply(&want).unwrap();
            let diff = Fill::read_pinned(&fresh.dir).unwrap().diff(&held);
            assert!(diff.is_empty(), "step {step}, fresh: {diff:#?}");
        }
    }
    // And back to nothing.
    let empty = Fill {
        config: running.dp.config_for([0, 0]).unwrap(),
        vip_filter: vip_filter_words([]),
        nat_filter: address_filter_words([]),
        ..Fill::default()
    };
    running.dp.apply(&empty).unwrap();
    assert_eq!(Fill::read_pinned(&running.dir).unwrap(), empty);
}

#[test]
fn fragments_of_ids_that_change_meaning_are_forgotten() {
    let mut s = scratch();
    let mut rng = Rng(7);
    let config = s.dp.config_for([1, 2]).unwrap();
    let mut want = random_fill(&mut rng, config);
    while want.service_by_id.is_empty() || want.backends.is_empty() {
        want = random_fill(&mut rng, config);
    }
    let (&sid, entry) = want.service_by_id.iter().next().unwrap();
    let entry = *entry;
    let bid = *want.backends.keys().next().unwrap();
    for b in want.backends.values_mut() {
        b.service = sid;
    }
    s.dp.apply(&want).unwrap();
    let frag = |id: u32| FragKey {
        src: [id, 0, 0, 0],
        dst: entry.key.addr,
        id,
        proto: entry.key.proto,
        family: 4,
        _pad: [0; 2],
    };
    let value = FragValue {
        backend: bid,
        service: entry.value,
    };
    let keys = |s: &Scratch| -> Vec<u32> {
        let mut v: Vec<u32> = read_pinned_frags(&s.dir)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.id)
            .collect();
        v.sort();
        v
    };
    s.dp.maps.frags.insert(frag(1), value, 0).unwrap();
    // A change elsewhere keeps the datagram's entry.
    let mut other = want.clone();
    other.config.hash_key = [3, 4];
    s.dp.apply(&other).unwrap();
    assert_eq!(keys(&s), [1]);
    // The service's flags change (dsr to tunnel): its fragments are forgotten.
    let mut retyped = other.clone();
    let mut e = entry;
    e.value.flags ^= 1;
    retyped.service_by_id.insert(sid, e);
    retyped.services.insert(e.key, e.value);
    s.dp.apply(&retyped).unwrap();
    assert_eq!(keys(&s), Vec::<u32>::new());
    // The service goes, and a new one takes its id with the same value and backend id.
    s.dp.apply(&other).unwrap();
    s.dp.maps.frags.insert(frag(2), value, 0).unwrap();
    let mut gone = other.clone();
    gone.services.remove(&entry.key);
    gone.service_by_id.remove(&sid);
    gone.maglev.remove(&sid);
    gone.vip_filter = vip_filter_words(gone.services.keys());
    gone.backends.retain(|_, b| b.service != sid);
    s.dp.apply(&gone).unwrap();
    assert_eq!(
        keys(&s),
        Vec::<u32>::new(),
        "removing the service forgets them"
    );
    s.dp.maps.frags.insert(frag(3), value, 0).unwrap();
    s.dp.apply(&other).unwrap();
    assert_eq!(
        keys(&s),
        Vec::<u32>::new(),
        "an entry made while the id had no service is not honoured once it has one"
    );
}

#[test]
fn array_memory_reads_and_writes_whole_values_and_nothing_past_its_bytes() {
    use aya::maps::{Array, IterableMap as _, MapData};
    let array = Array::<MapData, u64>::create(4, lb_common::MAGLEV_TABLE_FLAGS)
        .expect("creating a mmapable array (needs root)");
    let memory = sys::ArrayMemory::map(array.map(), 4 * 8, true).unwrap();
    memory.write(3, 0x1122_3344_5566_7788u64);
    assert_eq!(memory.read::<u64>(3), 0x1122_3344_5566_7788);
    // The kernel sees the same memory.
    assert_eq!(array.get(&3, 0).unwrap(), 0x1122_3344_5566_7788);
    assert_eq!(
        memory.read_at::<u32>(3 * 8),
        0x5566_7788,
        "the low half, little-endian"
    );
    memory.zero();
    assert_eq!(array.get(&3, 0).unwrap(), 0);
    let past = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| memory.read::<u64>(4)));
    assert!(
        past.is_err(),
        "element 4 of a 4-element array must be refused"
    );
    let torn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| memory.read_at::<u64>(4)));
    assert!(torn.is_err(), "an unaligned read must be refused");
    let read_only = sys::ArrayMemory::map(array.map(), 4 * 8, false).unwrap();
    let refused =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_only.write(0, 1u64)));
    assert!(refused.is_err(), "a read-only mapping must refuse writes");
}
