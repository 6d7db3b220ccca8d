//! Connection state shared between lb nodes (`[daemon.sync]`, docs/design/sync.md).
//!
//! Nodes with the same seed and backends place every unrecorded flow alike, changed slots
//! included: only flows with a record can go elsewhere on another node. The program reports
//! each record it writes (`lb_common::SyncEvent`, ring buffer `SYNC_EVENTS`); the *sender*
//! thread turns the reports into addresses (`Datapath::describe_event`), packs them into
//! sealed datagrams (`wire`) and sends them to every peer within a few milliseconds, with a
//! hello every second (node name, drained, table fingerprints). The *receiver* thread opens
//! what peers send, refuses what is not from a configured peer, not sealed with the key, sent
//! with another seed, stale or replayed (counted by reason), and writes the flows into this
//! node's connection table (`Datapath::adopt_peer_flow`).
//!
//! Bounded and loss-tolerant: the ring buffer is the only queue (a full one loses reports, and
//! those flows have a record on their node only); a lost datagram costs the flows it carried;
//! nothing waits for an answer.

pub mod wire;

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use lb_common::SyncEvent;
use log::{info, warn};

use crate::datapath::{Adopted, DatapathError};
pub use wire::{Body, Fingerprint, Message, Refused, SyncedFlow};

/// What the sync threads need of the node (lbd wires it to the daemon): each call takes the
/// daemon for a moment.
pub trait Node: Send + std::marker::Sync + 'static {
    /// Reported records in addresses; `None` for one whose service or backend is gone.
    fn describe(&self, events: &[SyncEvent]) -> Vec<Option<SyncedFlow>>;
    /// Writes peers' flows into the connection table, stamped `now` (the table's clock).
    fn adopt(&self, flows: &[SyncedFlow], now: u32) -> Result<Vec<Adopted>, DatapathError>;
    /// Whether the node is drained, and each service's table fingerprint.
    fn hello(&self) -> (bool, Vec<Fingerprint>);
}

/// How often a node says hello; a peer not heard for `PEER_DOWN_AFTER` is down.
const HELLO_EVERY: Duration = Duration::from_secs(1);
pub const PEER_DOWN_AFTER: Duration = Duration::from_secs(3);
/// Reported flows wait at most this long for more to fill their datagram.
const FLUSH_AFTER: Duration = Duration::from_millis(5);
/// Reports sent at once, at most, whatever their age (a burst of new flows).
const MAX_PENDING: usize = 512;
/// Datagrams sent more than this long ago (by the sender's clock) are refused.
const MAX_AGE: Duration = Duration::from_secs(30);
/// Sequence numbers this far below a peer's highest are still taken once (reordering).
const REPLAY_WINDOW: u64 = 64;

/// What the sync threads need.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub key: [u8; 32],
    pub node: String,
    pub seed: [u64; 2],
}

/// One peer as this node sees it.
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    pub addr: Option<SocketAddr>,
    /// The name it gave in its last accepted datagram.
    pub node: Option<String>,
    pub last_heard: Option<Instant>,
    /// Whether every service both nodes have has the same table fingerprint on both (from its
    /// last hello); `None` before one.
    pub agree: Option<bool>,
    pub drained: Option<bool>,
    /// Why its last datagram was refused, if it was.
    pub refused: Option<Refused>,
    pub entries_sent: u64,
    pub entries_received: u64,
    /// Flows received that this node has no service or backend for.
    pub entries_unplaced: u64,
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    /// Replay protection: the highest sequence accepted, and which of the `REPLAY_WINDOW`
    /// below it were.
    highest: Option<u64>,
    window: u64,
}

impl PeerState {
    pub fn up(&self) -> bool {
        self.last_heard
            .is_some_and(|t| t.elapsed() < PEER_DOWN_AFTER)
    }

    /// Takes `sequence` once.
    fn accept_sequence(&mut self, sequence: u64) -> bool {
        match self.highest {
            None => {
                self.highest = Some(sequence);
                self.window = 1;
                true
            }
            Some(h) if sequence > h => {
                let shift = sequence - h;
                self.window = if shift >= 64 { 0 } else { self.window << shift };
                self.window |= 1;
                self.highest = Some(sequence);
                true
            }
            Some(h) => {
                let back = h - sequence;
                if back >= REPLAY_WINDOW || self.window & (1 << back) != 0 {
                    return false;
                }
                self.window |= 1 << back;
                true
            }
        }
    }
}

/// The sync threads' counters and peers, for status and metrics.
#[derive(Default)]
pub struct SyncStatus {
    pub peers: Mutex<Vec<PeerState>>,
    /// Datagrams refused, by `Refused::ALL` index.
    pub rejected: [AtomicU64; 6],
}

impl SyncStatus {
    /// Every peer of `peers` not heard yet.
    pub fn new(peers: &[SocketAddr]) -> SyncStatus {
        SyncStatus {
            peers: Mutex::new(
                peers
                    .iter()
                    .map(|a| PeerState {
                        addr: Some(*a),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    pub fn rejected(&self, r: Refused) -> u64 {
        let i = Refused::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.rejected[i].load(Relaxed)
    }

    fn reject(&self, r: Refused) {
        let i = Refused::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.rejected[i].fetch_add(1, Relaxed);
    }

    fn peer_mut<T>(&self, addr: SocketAddr, f: impl FnOnce(&mut PeerState) -> T) -> Option<T> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.iter_mut().find(|p| p.addr == Some(addr)).map(f)
    }
}

/// The running sync threads; they stop when this is dropped.
pub struct Sync {
    pub status: Arc<SyncStatus>,
    stop: Arc<AtomicBool>,
}

impl Drop for Sync {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// The key of `[daemon.sync]` from `path` (64 hex digits), with an error naming the file.
pub fn read_key(path: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("daemon.sync.key_file: cannot read {}", path.display()))?;
    wire::parse_key(&text)
        .map_err(|e| anyhow::anyhow!("daemon.sync.key_file {}: {e}", path.display()))
}

/// Binds `settings.listen` and starts the sender (reading `events`) and the receiver.
pub fn start(
    settings: Settings,
    node: Arc<dyn Node>,
    events: RingBuf<MapData>,
) -> io::Result<Sync> {
    let socket = UdpSocket::bind(settings.listen).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "daemon.sync.listen: cannot bind UDP {}: {e}",
                settings.listen
            ),
        )
    })?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    info!(
        "sync: listening on UDP {}, peers {}",
        settings.listen,
        settings
            .peers
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let status = Arc::new(SyncStatus::new(&settings.peers));
    let stop = Arc::new(AtomicBool::new(false));
    let send_socket = socket.try_clone()?;
    {
        let (settings, node, status, stop) =
            (settings.clone(), node.clone(), status.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sync-send".into())
            .spawn(move || send_loop(settings, node, events, send_socket, status, stop))?;
    }
    {
        let (status, stop) = (status.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sync-receive".into())
            .spawn(move || receive_loop(settings, node, socket, status, stop))?;
    }
    Ok(Sync { status, stop })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, owned here, for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(1000) as i32) };
}

/// Packs flows into datagrams and hellos, and sends them to every peer.
struct Sender {
    settings: Settings,
    socket: UdpSocket,
    status: Arc<SyncStatus>,
    sequence: u64,
}

impl Sender {
    fn send(&mut self, body: Body) {
        let entries = match &body {
            Body::Flows(f) => f.len() as u64,
            Body::Hello { .. } => 0,
        };
        self.sequence += 1;
        let datagram = wire::seal(
            &self.settings.key,
            &Message {
                seed_tag: wire::seed_tag(&self.settings.seed),
                sent_at_ms: unix_ms(),
                sequence: self.sequence,
                node: self.settings.node.clone(),
                body,
            },
        );
        for peer in &self.settings.peers {
            // A peer that cannot be reached now loses this datagram, nothing else.
            let sent = self.socket.send_to(&datagram, peer).is_ok();
            self.status.peer_mut(*peer, |p| {
                if sent {
                    p.entries_sent += entries;
                    p.datagrams_sent += 1;
                    p.bytes_sent += datagram.len() as u64;
                }
            });
        }
    }

    /// Sends `flows` in as few datagrams as fit `wire::MAX_DATAGRAM`.
    fn send_flows(&mut self, flows: Vec<SyncedFlow>) {
        let budget = wire::MAX_DATAGRAM - wire::overhead(&self.settings.node);
        let mut batch = vec![];
        let mut used = 0;
        for f in flows {
            let len = wire::flow_len(&f);
            if used + len > budget && !batch.is_empty() {
                self.send(Body::Flows(std::mem::take(&mut batch)));
                used = 0;
            }
            used += len;
            batch.push(f);
        }
        if !batch.is_empty() {
            self.send(Body::Flows(batch));
        }
    }
}

fn send_loop(
    settings: Settings,
    node: Arc<dyn Node>,
    mut events: RingBuf<MapData>,
    socket: UdpSocket,
    status: Arc<SyncStatus>,
    stop: Arc<AtomicBool>,
) {
    let fd = events.as_raw_fd();
    let mut sender = Sender {
        settings,
        socket,
        status: status.clone(),
        sequence: rand::random::<u32>() as u64,
    };
    let mut pending: Vec<SyncEvent> = vec![];
    let mut pending_since: Option<Instant> = None;
    let mut next_hello = Instant::now();
    while !stop.load(Relaxed) {
        let now = Instant::now();
        let until_hello = next_hello.saturating_duration_since(now);
        let wait = match pending_since {
            Some(t) => FLUSH_AFTER.saturating_sub(t.elapsed()).min(until_hello),
            None => until_hello.min(Duration::from_millis(200)),
        };
        wait_readable(fd, wait);
        while let Some(item) = events.next() {
            if item.len() >= size_of::<SyncEvent>() {
                // SAFETY: the program writes whole `SyncEvent`s; read unaligned from its bytes.
                let e = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SyncEvent>()) };
                pending.push(e);
                pending_since.get_or_insert_with(Instant::now);
            }
        }
        if pending.len() >= MAX_PENDING || pending_since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER)
        {
            // A report whose service or backend went meanwhile has nothing left to share.
            let flows: Vec<SyncedFlow> = node.describe(&pending).into_iter().flatten().collect();
            pending.clear();
            pending_since = None;
            sender.send_flows(flows);
        }
        if Instant::now() >= next_hello {
            let (drained, fingerprints) = node.hello();
            sender.send(Body::Hello {
                drained,
                fingerprints,
            });
            next_hello = Instant::now() + HELLO_EVERY;
        }
    }
}

fn receive_loop(
    settings: Settings,
    node: Arc<dyn Node>,
    socket: UdpSocket,
    status: Arc<SyncStatus>,
    stop: Arc<AtomicBool>,
) {
    let tag = wire::seed_tag(&settings.seed);
    let mut buf = vec![0u8; 65_536];
    let mut clock = crate::datapath::TableClock::default();
    let mut warned_clock = false;
    while !stop.load(Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => {
                warn!("sync: receiving: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let verdict = check(&settings, tag, &status, from, &buf[..n]);
        let message = match verdict {
            Ok(m) => m,
            Err(r) => {
                status.reject(r);
                status.peer_mut(from, |p| p.refused = Some(r));
                continue;
            }
        };
        match message.body {
            Body::Hello {
                drained,
                fingerprints,
            } => {
                let agree = agree(&node.hello().1, &fingerprints);
                status.peer_mut(from, |p| {
                    p.agree = Some(agree);
                    p.drained = Some(drained);
                });
            }
            Body::Flows(flows) => {
                let Some(now) = clock.now() else {
                    if !warned_clock {
                        warned_clock = true;
                        warn!(
                            "sync: cannot read the kernel's jiffies from /proc/timer_list: peers' flows are not recorded"
                        );
                    }
                    continue;
                };
                let count = flows.len() as u64;
                let unplaced = match node.adopt(&flows, now) {
                    Ok(adopted) => adopted
                        .iter()
                        .filter(|a| matches!(a, Adopted::Unknown | Adopted::NoRoom))
                        .count(),
                    Err(e) => {
                        warn!("sync: recording the flows of {from}: {e}");
                        flows.len()
                    }
                } as u64;
                status.peer_mut(from, |p| {
                    p.entries_received += count;
                    p.entries_unplaced += unplaced;
                });
            }
        }
    }
}

/// The message of a datagram from `from`, or why it is refused.
fn check(
    settings: &Settings,
    tag: u64,
    status: &SyncStatus,
    from: SocketAddr,
    datagram: &[u8],
) -> Result<Message, Refused> {
    if !settings.peers.contains(&from) {
        return Err(Refused::UnknownPeer);
    }
    let m = wire::open(&settings.key, datagram)?;
    if m.seed_tag != tag {
        return Err(Refused::OtherSeed);
    }
    if unix_ms().abs_diff(m.sent_at_ms) > MAX_AGE.as_millis() as u64 {
        return Err(Refused::Stale);
    }
    let fresh = status
        .peer_mut(from, |p| p.accept_sequence(m.sequence))
        .unwrap_or(false);
    if !fresh {
        return Err(Refused::Replayed);
    }
    status.peer_mut(from, |p| {
        p.node = Some(m.node.clone());
        p.last_heard = Some(Instant::now());
        p.refused = None;
    });
    Ok(m)
}

/// Whether every service both nodes have has the same fingerprint on both.
pub fn agree(ours: &[Fingerprint], theirs: &[Fingerprint]) -> bool {
    let theirs: BTreeMap<&str, u64> = theirs
        .iter()
        .map(|f| (f.service.as_str(), f.fingerprint))
        .collect();
    ours.iter().all(|f| {
        theirs
            .get(f.service.as_str())
            .is_none_or(|t| *t == f.fingerprint)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sequence_is_taken_once_within_the_window() {
        let mut p = PeerState::default();
        assert!(p.accept_sequence(100));
        assert!(!p.accept_sequence(100));
        assert!(p.accept_sequence(102));
        assert!(p.accept_sequence(101), "reordered, inside the window");
        assert!(!p.accept_sequence(101));
        assert!(p.accept_sequence(500));
        assert!(!p.accept_sequence(500 - REPLAY_WINDOW), "below the window");
        assert!(p.accept_sequence(499));
    }

    fn settings() -> Settings {
        Settings {
            listen: "192.0.2.2:9918".parse().unwrap(),
            peers: vec!["192.0.2.3:9918".parse().unwrap()],
            key: [9; 32],
            node: "lb1".into(),
            seed: [1, 2],
        }
    }

    fn hello(seed: [u64; 2], sent_at_ms: u64, sequence: u64) -> Message {
        Message {
            seed_tag: wire::seed_tag(&seed),
            sent_at_ms,
            sequence,
            node: "lb2".into(),
            body: Body::Hello {
                drained: false,
                fingerprints: vec![],
            },
        }
    }

    #[test]
    fn only_fresh_datagrams_of_a_peer_with_the_key_and_the_seed_are_taken() {
        let s = settings();
        let status = SyncStatus::new(&s.peers);
        let tag = wire::seed_tag(&s.seed);
        let peer = s.peers[0];
        let now = unix_ms();
        let ok = wire::seal(&s.key, &hello(s.seed, now, 10));
        let check = |from, d: &[u8]| check(&s, tag, &status, from, d).map(|m| m.node);
        assert_eq!(
            check("192.0.2.9:9918".parse().unwrap(), &ok),
            Err(Refused::UnknownPeer)
        );
        assert_eq!(
            check(peer, &wire::seal(&[1; 32], &hello(s.seed, now, 11))),
            Err(Refused::Authentication)
        );
        assert_eq!(
            check(peer, &wire::seal(&s.key, &hello([1, 3], now, 12))),
            Err(Refused::OtherSeed)
        );
        assert_eq!(
            check(peer, &wire::seal(&s.key, &hello(s.seed, now - 60_000, 13))),
            Err(Refused::Stale)
        );
        assert_eq!(check(peer, &ok), Ok("lb2".to_string()));
        assert_eq!(check(peer, &ok), Err(Refused::Replayed));
        let heard = status.peer_mut(peer, |p| (p.node.clone(), p.up())).unwrap();
        assert_eq!(heard, (Some("lb2".into()), true));
    }

    #[test]
    fn nodes_agree_when_their_common_services_have_equal_fingerprints() {
        let f = |s: &str, v: u64| Fingerprint {
            service: s.into(),
            fingerprint: v,
        };
        assert!(agree(&[f("web", 1), f("dns", 2)], &[f("web", 1)]));
        assert!(!agree(&[f("web", 1)], &[f("web", 3)]));
    }
}
