//! Client filters (`lb_common::filter`): whether a service takes packets from a client. Checked
//! right after a packet's service is known, before anything else is done for it.

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    Addr, FILTER_LOOKUP_LEN, FilterData, Reason, ServiceValue, filter_list, service_flags,
};

use crate::{maps::FILTERS, verdict::Skip};

/// `Denied` (counted for the service) when `service` refuses client `src`: a deny prefix holds
/// it, or the service has an allow list and no prefix of it holds it. A service without lists
/// costs one branch.
#[inline(always)]
pub fn check(src: &Addr, service: &ServiceValue) -> Result<(), Skip> {
    if service.flags & (service_flags::HAS_DENY | service_flags::HAS_ALLOW) != 0
        && denied(src, service.id, service.flags)
    {
        return Err(Skip::refused(Reason::Denied, service.id));
    }
    Ok(())
}

/// The lists' verdict: deny first, then the allow list. A call of its own, its key on its own
/// frame: inlined, the key's stack writes made the states after a filtered service's check
/// differ from an unfiltered one's, and the verifier explored everything after it once per
/// kind (728,498 instructions processed of its limit of 1,000,000; tests/e2e/filters.rs
/// checks the headroom).
#[inline(never)]
fn denied(src: &Addr, id: u32, flags: u32) -> bool {
    let mut key = Key::new(
        FILTER_LOOKUP_LEN,
        FilterData {
            service: id,
            list: filter_list::DENY,
            _pad: [0; 3],
            addr: *src,
        },
    );
    if flags & service_flags::HAS_DENY != 0 && FILTERS.get(&key).is_some() {
        return true;
    }
    if flags & service_flags::HAS_ALLOW != 0 {
        key.data.list = filter_list::ALLOW;
        return FILTERS.get(&key).is_none();
    }
    false
}
