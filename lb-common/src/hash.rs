//! The keyed client hash: SipHash-1-3 under the 128-bit `hash_seed`.
//!
//! SipHash because the key must stay secret-ish (outsiders must not be able to aim many clients
//! at one backend) and because it is cheap for fixed, short inputs: hashing a client address is
//! two message blocks. The XDP program and lbd call exactly these functions, so `lbctl lookup`
//! predicts the data path.
//!
//! Inputs are raw address words as they sit in the packet (see [`crate::Addr`]); both sides run
//! on little-endian machines (the program is built for `bpfel`), so the words combine the same way.

use crate::{Addr, FlowKey};

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-1-3 of `N` little-endian 64-bit message words (`8 * N` bytes): [`Sip13`] over
/// them, unrolled (the word count is a constant).
#[inline(always)]
pub fn siphash13<const N: usize>(key: &[u64; 2], msg: &[u64; N]) -> u64 {
    let mut h = Sip13::new(key);
    let mut i = 0;
    while i < N {
        h.write(msg[i]);
        i += 1;
    }
    h.finish()
}

/// SipHash-1-3 over a stream of 64-bit words (little-endian message bytes): for fixed short
/// inputs through [`siphash13`], for long ones directly (a whole Maglev table:
/// [`crate::maglev::table_fingerprint`]).
#[derive(Clone, Copy, Debug)]
pub struct Sip13 {
    v: [u64; 4],
    words: u64,
}

impl Sip13 {
    #[inline(always)]
    pub fn new(key: &[u64; 2]) -> Sip13 {
        Sip13 {
            v: [
                key[0] ^ 0x736f_6d65_7073_6575,
                key[1] ^ 0x646f_7261_6e64_6f6d,
                key[0] ^ 0x6c79_6765_6e65_7261,
                key[1] ^ 0x7465_6462_7974_6573,
            ],
            words: 0,
        }
    }

    #[inline(always)]
    pub fn write(&mut self, word: u64) {
        self.v[3] ^= word;
        sip_round(&mut self.v);
        self.v[0] ^= word;
        self.words += 1;
    }

    /// The final block holds no trailing bytes, only the length in its top byte.
    #[inline(always)]
    pub fn finish(mut self) -> u64 {
        let last = ((8 * self.words) & 0xff) << 56;
        let v = &mut self.v;
        v[3] ^= last;
        sip_round(v);
        v[0] ^= last;
        v[2] ^= 0xff;
        sip_round(v);
        sip_round(v);
        sip_round(v);
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
}

#[inline(always)]
pub(crate) fn words(a: &Addr) -> [u64; 2] {
    [
        a[0] as u64 | (a[1] as u64) << 32,
        a[2] as u64 | (a[3] as u64) << 32,
    ]
}

/// Hash of a client address (`hash = "source"`): every packet and every fragment of a client
/// gets the same value. Which hash a service uses, and the slot it selects: `crate::maglev_slot`.
#[inline(always)]
pub fn hash_source(key: &[u64; 2], src: &Addr) -> u32 {
    let h = siphash13(key, &words(src));
    (h ^ (h >> 32)) as u32
}

/// Hash of a flow's 5-tuple (`hash = "5-tuple"`).
#[inline(always)]
pub fn hash_5tuple(key: &[u64; 2], flow: &FlowKey) -> u32 {
    let s = words(&flow.src);
    let d = words(&flow.dst);
    let tail = flow.sport as u64
        | (flow.dport as u64) << 16
        | (flow.proto as u64) << 32
        | (flow.family as u64) << 40;
    let h = siphash13(key, &[s[0], s[1], d[0], d[1], tail]);
    (h ^ (h >> 32)) as u32
}

/// One step of `flow_hash`: a bijection of `h ^ w` (odd multiplier, then an xorshift), so two
/// inputs that differ only in their last word never collide.
#[inline(always)]
fn absorb(h: u64, w: u64) -> u64 {
    let x = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 32)
}

/// The connection table's hash of a flow: its set (low bits, masked) and its identity (all 64
/// bits, see `slotstate::Record`). Not SipHash: this runs for every packet and a multiply-xorshift chain
/// over the flow's words (two for IPv4, five for IPv6) costs a fraction of it; keyed by the same secret seed (both words), so
/// outsiders cannot aim flows at one set. Every step is a bijection of the running value, and
/// the splitmix64 finaliser spreads every input bit over every output bit.
#[inline(always)]
pub fn flow_hash(key: &[u64; 2], flow: &FlowKey) -> u64 {
    let s = words(&flow.src);
    let d = words(&flow.dst);
    let tail = flow.sport as u64
        | (flow.dport as u64) << 16
        | (flow.proto as u64) << 32
        | (flow.family as u64) << 40;
    let mut h = key[0];
    if flow.family == crate::FAMILY_V6 {
        h = absorb(h, s[0]);
        h = absorb(h, s[1]);
        h = absorb(h, d[0]);
        h = absorb(h, d[1]);
    } else {
        // An IPv4 flow's addresses fill one word together (the others are zero).
        h = absorb(h, s[0] | d[0] << 32);
    }
    h = absorb(h, tail ^ key[1]);
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// 64-bit hash of a backend address for its Maglev permutation (offset and skip).
pub fn hash_backend(key: &[u64; 2], addr: &Addr) -> u64 {
    // A distinct length (3 words) keeps these values unrelated to client hashes of the same
    // address.
    let w = words(addr);
    siphash13(key, &[w[0], w[1], 0x6d61_676c_6576])
}

/// 64-bit hash of a backend address and port for its Maglev permutation: only for a second
/// backend at an address already in the service (`maglev::port_salts`); every other backend
/// keeps `hash_backend` of its address alone, so configs without such a repeat build the
/// tables they always built.
pub fn hash_backend_port(key: &[u64; 2], addr: &Addr, port: u16) -> u64 {
    // Four words: unrelated to `hash_backend` of any address and to the client hashes.
    let w = words(addr);
    siphash13(
        key,
        &[w[0], w[1], 0x6d61_676c_6576, 0x706f_7274_0000 | port as u64],
    )
}

/// Parses a `hash_seed` of exactly 32 hex digits into the two SipHash key words (the first 16
/// digits are the first word, big-endian as written).
pub fn parse_seed(hex: &str) -> Option<[u64; 2]> {
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let k0 = u64::from_str_radix(&hex[..16], 16).ok()?;
    let k1 = u64::from_str_radix(&hex[16..], 16).ok()?;
    Some([k0, k1])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `siphash13` against an independent implementation (the `siphasher` crate's
    /// `SipHasher13`, key words as they are, message words as little-endian bytes) for random
    /// keys and messages of every length the balancer hashes (2 words: a client; 3: a backend;
    /// 4: a repeated backend address with its port; 5: a 5-tuple). The seed is random unless `LB_TEST_SEED` gives one; a failure names it.
    #[test]
    fn siphash13_matches_the_siphasher_crate() {
        use core::hash::Hasher as _;
        use rand::{Rng as _, SeedableRng as _};

        fn check<const N: usize>(rng: &mut rand::rngs::StdRng, seed: u64) {
            for _ in 0..20_000 {
                let key: [u64; 2] = rng.random();
                let msg: [u64; N] = core::array::from_fn(|_| rng.random());
                let mut oracle = siphasher::sip::SipHasher13::new_with_keys(key[0], key[1]);
                for w in msg {
                    oracle.write(&w.to_le_bytes());
                }
                assert_eq!(
                    siphash13(&key, &msg),
                    oracle.finish(),
                    "key {key:x?}, message {msg:x?} (LB_TEST_SEED={seed})"
                );
            }
        }
        // The vector the word version was first checked with: key bytes 0..16, 16 bytes of data.
        let mut oracle =
            siphasher::sip::SipHasher13::new_with_key(&core::array::from_fn(|i| i as u8));
        let data: [u8; 16] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        oracle.write(&data);
        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        let w = [
            u64::from_le_bytes(data[..8].try_into().unwrap()),
            u64::from_le_bytes(data[8..].try_into().unwrap()),
        ];
        assert_eq!(siphash13(&key, &w), oracle.finish());
        let seed = std::env::var("LB_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        check::<1>(&mut rng, seed);
        check::<2>(&mut rng, seed);
        check::<3>(&mut rng, seed);
        check::<4>(&mut rng, seed);
        check::<5>(&mut rng, seed);
    }

    /// The streaming `Sip13` against the siphasher crate for long messages (a Maglev table's
    /// fingerprint hashes hundreds of thousands of words), and against `siphash13`.
    #[test]
    fn sip13_stream_matches_the_siphasher_crate() {
        use core::hash::Hasher as _;
        let key = [0x5f0c_1d2e_3f40_5162, 0x7384_95a6_b7c8_d9ea];
        for n in [0usize, 1, 2, 3, 31, 32, 33, 1000, 196_611] {
            let mut oracle = siphasher::sip::SipHasher13::new_with_keys(key[0], key[1]);
            let mut ours = Sip13::new(&key);
            for i in 0..n as u64 {
                let w = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef;
                oracle.write(&w.to_le_bytes());
                ours.write(w);
            }
            assert_eq!(ours.finish(), oracle.finish(), "{n} words");
        }
        let mut s = Sip13::new(&key);
        [1u64, 2, 3].iter().for_each(|&w| s.write(w));
        assert_eq!(s.finish(), siphash13(&key, &[1, 2, 3]));
    }

    #[test]
    fn seed_changes_the_hash() {
        let a: Addr = [u32::from_ne_bytes([198, 51, 100, 7]), 0, 0, 0];
        let h1 = hash_source(&[1, 2], &a);
        let h2 = hash_source(&[1, 3], &a);
        assert_ne!(h1, h2);
        assert_eq!(h1, hash_source(&[1, 2], &a));
    }

    #[test]
    fn seed_parsing() {
        assert_eq!(
            parse_seed("000102030405060708090a0b0c0d0e0f"),
            Some([0x0001020304050607, 0x08090a0b0c0d0e0f])
        );
        assert_eq!(parse_seed("0001"), None);
        assert_eq!(parse_seed("zz0102030405060708090a0b0c0d0e0f"), None);
    }

    #[test]
    fn source_hash_spreads_evenly() {
        // 65536 consecutive client addresses over 3 buckets: each within 2% of a third.
        let key = [0x1234, 0x5678];
        let mut counts = [0u32; 3];
        for i in 0..65536u32 {
            let a: Addr = [u32::from_be(0xc612_0000 | i), 0, 0, 0];
            counts[(hash_source(&key, &a) % 3) as usize] += 1;
        }
        for c in counts {
            let share = c as f64 / 65536.0;
            assert!((share - 1.0 / 3.0).abs() < 0.02, "{counts:?}");
        }
    }

    /// A TCP flow from client `i` of 198.18.0.0/16, port `sport`, to 203.0.113.10:80.
    pub(crate) fn flow(i: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [u32::from_be(0xc612_0000 | i), 0, 0, 0],
            dst: [u32::from_be(0xcb00_710a), 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn flow_hash_fills_sets_like_a_random_function() {
        // 1,048,576 flows (consecutive clients × 16 ports, the worst kind of regular input) into
        // 262,144 sets: a random function puts on average 4 in each, the fullest set (Poisson,
        // mean 4, over 262,144 sets) near 14; more than 20 would mean structure. And no two of
        // them share all 64 bits.
        let key = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
        let sets = 1usize << 18;
        let mut load = vec![0u16; sets];
        let mut seen = std::collections::HashSet::new();
        for i in 0..65_536u32 {
            for port in 0..16u16 {
                let h = flow_hash(&key, &flow(i, 40_000 + port));
                load[(h as usize) & (sets - 1)] += 1;
                assert!(seen.insert(h), "two flows share the hash {h:#x}");
            }
        }
        let max = *load.iter().max().unwrap();
        let empty = load.iter().filter(|&&n| n == 0).count() as f64 / sets as f64;
        assert!(max <= 20, "fullest set holds {max}");
        // Poisson(4): e^-4 = 1.83% of sets empty.
        assert!((empty - 0.0183).abs() < 0.002, "{empty}");
    }

    #[test]
    fn flow_hash_depends_on_every_field_and_the_seed() {
        let key = [1, 2];
        let base = flow(7, 40_000);
        let h = flow_hash(&key, &base);
        let variants = [
            FlowKey {
                src: [base.src[0] ^ 1, 0, 0, 0],
                ..base
            },
            FlowKey {
                dst: [base.dst[0] ^ 1, 0, 0, 0],
                ..base
            },
            FlowKey {
                sport: base.sport ^ 1,
                ..base
            },
            FlowKey {
                dport: base.dport ^ 0x100,
                ..base
            },
            FlowKey { proto: 17, ..base },
            FlowKey { family: 6, ..base },
        ];
        for v in variants {
            assert_ne!(flow_hash(&key, &v), h, "{v:?}");
        }
        // IPv6: every word of both addresses.
        let v6 = FlowKey { family: 6, ..base };
        let h6 = flow_hash(&key, &v6);
        for w in 0..4 {
            let mut src = v6.src;
            src[w] ^= 1;
            let mut dst = v6.dst;
            dst[w] ^= 1;
            assert_ne!(flow_hash(&key, &FlowKey { src, ..v6 }), h6);
            assert_ne!(flow_hash(&key, &FlowKey { dst, ..v6 }), h6);
        }
        assert_ne!(flow_hash(&[1, 3], &base), h);
        assert_ne!(flow_hash(&[0, 2], &base), h);
    }
}
