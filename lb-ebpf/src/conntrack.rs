//! A packet's place in the connection table (`CONNTRACK`): its flow's set, the way holding the
//! flow's entry if there is one, and the way a new entry would take. Classification reads it
//! (an established flow), backend selection reads and writes it (a recorded backend, a new
//! flow's choice).

use lb_common::{Config, FLOW_WAYS, FlowEntry, FlowSet, hash};

use crate::{maps::CONNTRACK, packet::Packet};

/// A packet's place in the connection table: its flow's hash and set, the way holding its entry
/// if there is one, and the way a new entry would take (a free one, else the least recently
/// seen).
pub struct FlowSlot {
    hash: u64,
    set: &'static mut FlowSet,
    /// The way holding the flow's entry, if the table knows the flow.
    pub found: Option<usize>,
    victim: usize,
    now: u32,
}

impl FlowSlot {
    /// The place of `p`'s flow; `None` when the set cannot be read (a table not sized yet).
    #[inline(always)]
    pub fn find(p: &Packet, config: &Config) -> Option<FlowSlot> {
        let hash = hash::flow_hash(&config.hash_key, &p.flow_key());
        let set = CONNTRACK.get_ptr_mut(hash as u32 & config.flow_set_mask)?;
        // SAFETY: a pointer returned by a map lookup is valid for this program run; other CPUs
        // may write the set meanwhile, which `FlowEntry::belongs_to` tolerates.
        let set = unsafe { &mut *set };
        let now = clock();
        let (found, victim) = set.place(hash, now);
        Some(FlowSlot {
            hash,
            set,
            found,
            victim,
            now,
        })
    }

    /// Way `i` of the set (`i % FLOW_WAYS`: the verifier must see the index is in bounds).
    #[inline(always)]
    pub fn way(&mut self, i: usize) -> &mut FlowEntry {
        &mut self.set.ways[i % FLOW_WAYS]
    }

    /// Marks way `i` seen now (a store only when the coarse clock has moved).
    #[inline(always)]
    pub fn touch(&mut self, i: usize) {
        let now = self.now;
        let e = self.way(i);
        if e.seen != now {
            e.seen = now;
        }
    }

    /// Records the flow on `backend` of `service`: its own entry if it has one (a SYN reusing
    /// a port, a flow whose backend went away), else the victim way.
    #[inline(always)]
    pub fn record(&mut self, backend: u32, service: u32) {
        let i = self.found.unwrap_or(self.victim);
        let ids = FlowEntry::ids_of(backend, service);
        let check = self.hash ^ ids as u64;
        let now = self.now;
        let e = self.way(i);
        if e.ids != ids || e.check != check {
            // `check` last: until it is written the entry belongs to no flow.
            e.ids = ids;
            e.seen = now;
            e.check = check;
        } else {
            self.touch(i);
        }
    }
}

/// The connection table's clock: jiffies / 64 (64 ms at HZ=1000, 256 ms at HZ=250), never 0
/// (0 marks a free entry). Coarse on purpose: an established flow then rewrites its entry's
/// stamp a few times a second, not on every packet. bpf_jiffies64 is inlined by the verifier
/// into a load of `jiffies`.
#[inline(always)]
fn clock() -> u32 {
    // SAFETY: a helper without arguments.
    let jiffies = unsafe { aya_ebpf::helpers::bpf_jiffies64() };
    (jiffies >> 6) as u32 | 1
}
