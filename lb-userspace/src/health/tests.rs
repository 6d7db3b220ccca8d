use super::check::*;
use super::*;
use std::io;
use std::net::Ipv4Addr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{self, UnboundedReceiver};

const WAIT: Duration = Duration::from_secs(3);

fn spec(check: CheckKind, port: u16) -> Health {
    Health {
        check,
        port,
        path: "/healthz".into(),
        expect: 200,
        interval_ms: 50,
        timeout_ms: 30,
        rise: 2,
        fall: 3,
        ..Health::default()
    }
}

/// A backend serving on the port its check goes to (as a `nat` backend's default check).
fn target(service: &str, backend: IpAddr, spec: Health) -> Target {
    Target {
        service: service.into(),
        backend,
        port: spec.port,
        spec,
    }
}

fn lo(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn next(rx: &mut UnboundedReceiver<Report>) -> Report {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no report in time")
        .expect("channel closed")
}

/// Asserts that no report arrives within `d`.
async fn quiet(rx: &mut UnboundedReceiver<Report>, d: Duration) {
    if let Ok(r) = tokio::time::timeout(d, rx.recv()).await {
        panic!("unexpected report {r:?}");
    }
}

/// A TCP server on `addr` that accepts and closes every connection; aborting the task (and
/// awaiting it) closes the listener.
async fn tcp_server(addr: SocketAddr) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        }
    });
    (port, task)
}

async fn stop(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

/// A tiny HTTP server: 200 on /healthz, 503 elsewhere. Sends each request it got on `reqs`.
async fn http_server(addr: SocketAddr) -> (u16, UnboundedReceiver<String>, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut chunk = [0u8; 512];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).into_owned();
                let response = if req.starts_with("GET /healthz ") {
                    "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    "HTTP/1.0 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nsick"
                };
                let _ = tx.send(req);
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, rx, task)
}

#[test]
fn tracker_rise_and_fall() {
    let mut t = Tracker::new(Start::Up, 2, 3);
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(true), None, "a success resets the failures");
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), Some(false));
    assert_eq!(t.record(false), None, "already down");
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(false), None, "a failure resets the successes");
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(true), Some(true));
    assert_eq!(t.record(true), None, "already up");

    let mut t = Tracker::new(Start::Down, 2, 3);
    assert_eq!(t.record(true), None);
    assert_eq!(t.record(true), Some(true));

    let mut t = Tracker::new(Start::PendingFirstCheck, 5, 3);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(true), Some(true), "the first success joins");
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), None);
    assert_eq!(t.record(false), Some(false));
    for _ in 0..4 {
        assert_eq!(t.record(true), None, "no longer pending: rise applies");
    }
    assert_eq!(t.record(true), Some(true));

    let mut t = Tracker::new(Start::Up, 1, 1);
    assert_eq!(t.record(false), Some(false));
    assert_eq!(t.record(true), Some(true));
}

#[test]
fn delays_are_jittered() {
    let mut rng = StdRng::seed_from_u64(7);
    let interval = Duration::from_millis(1000);
    let firsts: Vec<_> = (0..1000).map(|_| first_delay(interval, &mut rng)).collect();
    assert!(firsts.iter().all(|d| *d < interval));
    let min = firsts.iter().min().unwrap();
    let max = firsts.iter().max().unwrap();
    assert!(*min < Duration::from_millis(50), "{min:?}");
    assert!(*max > Duration::from_millis(950), "{max:?}");

    let nexts: Vec<_> = (0..1000).map(|_| next_delay(interval, &mut rng)).collect();
    assert!(
        nexts
            .iter()
            .all(|d| *d >= Duration::from_millis(900) && *d <= Duration::from_millis(1100))
    );
    let min = nexts.iter().min().unwrap();
    let max = nexts.iter().max().unwrap();
    assert!(*min < Duration::from_millis(920), "{min:?}");
    assert!(*max > Duration::from_millis(1080), "{max:?}");
    assert_eq!(
        first_delay(Duration::ZERO, &mut rng),
        Duration::ZERO,
        "no panic on an empty range"
    );
}

#[test]
fn status_lines() {
    assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
    assert_eq!(
        parse_status(b"HTTP/1.0 503 Service Unavailable\r\nX: y"),
        Some(503)
    );
    assert_eq!(parse_status(b"HTTP/1.1 204\r\n"), Some(204));
    assert_eq!(parse_status(b"HTTP/1.1 204"), Some(204));
    assert_eq!(parse_status(b"SSH-2.0-OpenSSH_9.2\r\n"), None);
    assert_eq!(parse_status(b"HTTP/1.1 20 OK\r\n"), None);
    assert_eq!(parse_status(b"HTTP/1.1 abc OK\r\n"), None);
    assert_eq!(parse_status(b"\r\n"), None);
}

#[test]
fn request_format() {
    assert_eq!(
        http_request("/healthz", &host_of(lo(9))),
        "GET /healthz HTTP/1.0\r\nHost: 127.0.0.9\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n"
    );
    assert!(
        http_request("/", &host_of("2001:db8::1".parse().unwrap()))
            .contains("Host: [2001:db8::1]\r\n")
    );
}

#[test]
fn error_descriptions() {
    let e = |k| describe(io::Error::from(k));
    assert_eq!(e(io::ErrorKind::ConnectionRefused), "connection refused");
    assert_eq!(e(io::ErrorKind::ConnectionReset), "connection reset");
    assert_eq!(e(io::ErrorKind::HostUnreachable), "no route to host");
    assert_eq!(
        describe(io::Error::from_raw_os_error(113)),
        "no route to host"
    );
    assert_eq!(
        describe(io::Error::from_raw_os_error(22)),
        "invalid argument"
    );
}

#[test]
fn lack_of_resources_is_an_error_of_lbd() {
    for errno in [
        libc::EMFILE,
        libc::ENFILE,
        libc::ENOMEM,
        libc::ENOBUFS,
        libc::EADDRNOTAVAIL,
    ] {
        let f = io_failure(io::Error::from_raw_os_error(errno));
        assert_eq!(f.0, CheckResult::Error, "errno {errno}: {f:?}");
        assert!(f.1.starts_with("could not run: "), "{f:?}");
    }
    assert_eq!(
        io_failure(io::Error::from_raw_os_error(libc::EMFILE)).1,
        "could not run: too many open files"
    );
    for errno in [
        libc::ECONNREFUSED,
        libc::EHOSTUNREACH,
        libc::ETIMEDOUT,
        libc::ECONNRESET,
    ] {
        let f = io_failure(io::Error::from_raw_os_error(errno));
        assert_eq!(f.0, CheckResult::Fail, "errno {errno}: {f:?}");
    }
}

#[tokio::test]
async fn tcp_fall_and_rise() {
    let addr = SocketAddr::new(lo(21), 0);
    let (port, server) = tcp_server(addr).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    let backend = lo(21);
    m.set(
        target("web", backend, spec(CheckKind::Tcp, port)),
        Start::Up,
    );
    assert!(m.is_checked("web", backend, port));
    for _ in 0..3 {
        let r = next(&mut rx).await;
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.detail, "connected");
        assert_eq!(r.transition, None);
        assert_eq!(r.service, "web");
        assert_eq!(r.backend, backend);
    }

    stop(server).await;
    // A check already under way may still succeed; from the first failure on, count.
    let mut r = next(&mut rx).await;
    while r.ok() {
        r = next(&mut rx).await;
    }
    let mut failures = 1;
    loop {
        assert!(!r.ok(), "{r:?}");
        assert_eq!(r.detail, "connection refused");
        if r.transition.is_some() {
            break;
        }
        r = next(&mut rx).await;
        failures += 1;
    }
    assert_eq!(r.transition, Some(false));
    assert_eq!(failures, 3, "down after exactly `fall` failures");
    let r = next(&mut rx).await;
    assert!(!r.ok());
    assert_eq!(r.transition, None, "already down");

    let (_, server) = tcp_server(SocketAddr::new(backend, port)).await;
    let mut r = next(&mut rx).await;
    while !r.ok() {
        assert_eq!(r.transition, None);
        r = next(&mut rx).await;
    }
    assert_eq!(
        r.transition, None,
        "one success is not enough with rise = 2"
    );
    let r = next(&mut rx).await;
    assert!(r.ok());
    assert_eq!(r.transition, Some(true), "up after `rise` successes");
    let r = next(&mut rx).await;
    assert!(r.ok());
    assert_eq!(r.transition, None);
    m.stop_all();
    assert!(m.is_empty());
    stop(server).await;
}

#[tokio::test]
async fn http_checks() {
    let (port, mut reqs, server) = http_server(SocketAddr::new(lo(22), 0)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    let backend = lo(22);
    m.set(
        target("web", backend, spec(CheckKind::Http, port)),
        Start::Up,
    );
    for _ in 0..2 {
        let r = next(&mut rx).await;
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.detail, "HTTP 200");
    }
    let req = tokio::time::timeout(WAIT, reqs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req, http_request("/healthz", &host_of(backend)));

    let mut other = spec(CheckKind::Http, port);
    other.path = "/other".into();
    other.fall = 2;
    m.set(target("web", backend, other), Start::Up);
    let r = next(&mut rx).await;
    // Best effort: a report of the old checker may already be in the channel.
    let r = if r.ok() { next(&mut rx).await } else { r };
    assert!(!r.ok(), "{r:?}");
    assert_eq!(r.detail, "HTTP 503");
    assert_eq!(r.transition, None);
    let r = next(&mut rx).await;
    assert!(!r.ok());
    assert_eq!(r.detail, "HTTP 503");
    assert_eq!(r.transition, Some(false));

    // expect = 503 makes a 503 healthy.
    let mut inverted = spec(CheckKind::Http, port);
    inverted.path = "/other".into();
    inverted.expect = 503;
    m.set(target("web", backend, inverted), Start::Down);
    let mut r = next(&mut rx).await;
    while !r.ok() {
        r = next(&mut rx).await;
    }
    assert_eq!(r.detail, "HTTP 503");
    drop(m);
    stop(server).await;
}

#[tokio::test]
async fn malformed_and_closed_http() {
    let listener = TcpListener::bind(SocketAddr::new(lo(23), 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            n += 1;
            if n % 2 == 1 {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
            }
            let _ = s.shutdown().await;
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    m.set(
        target("web", lo(23), spec(CheckKind::Http, port)),
        Start::Up,
    );
    let mut details = Vec::new();
    for _ in 0..4 {
        let r = next(&mut rx).await;
        assert!(!r.ok());
        details.push(r.detail);
    }
    assert!(
        details.iter().any(|d| d == "malformed HTTP response"),
        "{details:?}"
    );
    assert!(
        details.iter().all(|d| d == "malformed HTTP response"
            || d == "connection closed without a response"
            || d == "connection reset"),
        "{details:?}"
    );
    drop(m);
    stop(server).await;
}

#[tokio::test]
async fn timeout_when_the_backend_never_answers() {
    let listener = TcpListener::bind(SocketAddr::new(lo(24), 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        }
    });
    let http = spec(CheckKind::Http, port);

    // One check on its own takes about the timeout.
    let addr = SocketAddr::new(lo(24), port);
    for _ in 0..3 {
        let began = std::time::Instant::now();
        let result = check("web", addr, &http).await;
        let took = began.elapsed();
        assert_eq!(result, Err(Failed::backend("timeout after 30 ms")));
        assert!(
            took >= Duration::from_millis(25) && took <= Duration::from_millis(500),
            "{took:?}"
        );
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    m.set(target("web", lo(24), http), Start::Up);
    for i in 0..3 {
        let r = next(&mut rx).await;
        assert!(!r.ok());
        assert_eq!(r.detail, "timeout after 30 ms");
        assert_eq!(r.transition, (i == 2).then_some(false));
    }
    drop(m);
    stop(server).await;
}

#[tokio::test]
async fn pending_first_check() {
    let (port, server) = tcp_server(SocketAddr::new(lo(25), 0)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    let mut s = spec(CheckKind::Tcp, port);
    s.rise = 3;
    m.set(target("web", lo(25), s.clone()), Start::PendingFirstCheck);
    let r = next(&mut rx).await;
    assert!(r.ok());
    assert_eq!(r.transition, Some(true), "the first success joins at once");
    let r = next(&mut rx).await;
    assert_eq!(r.transition, None);

    // Start::Down needs `rise` successes.
    m.set(target("web", lo(25), s.clone()), Start::Down);
    let mut r = next(&mut rx).await;
    let mut seen = 1;
    while r.transition.is_none() {
        r = next(&mut rx).await;
        seen += 1;
    }
    assert_eq!(r.transition, Some(true));
    assert!(seen >= 3, "{seen}");

    // A pending backend that fails stays quietly down, then joins on its first success.
    stop(server).await;
    m.set(target("web", lo(25), s), Start::PendingFirstCheck);
    let mut r = next(&mut rx).await;
    while r.ok() {
        // A report of the previous checker, or a check that raced the listener's close.
        r = next(&mut rx).await;
    }
    for _ in 0..4 {
        assert!(!r.ok());
        assert_eq!(r.detail, "connection refused");
        assert_eq!(r.transition, None, "pending is already not up");
        r = next(&mut rx).await;
    }
    let (_, server) = tcp_server(SocketAddr::new(lo(25), port)).await;
    while !r.ok() {
        assert_eq!(r.transition, None);
        r = next(&mut rx).await;
    }
    assert_eq!(r.transition, Some(true));
    drop(m);
    stop(server).await;
}

#[tokio::test]
async fn check_none_reports_nothing() {
    let (port, server) = tcp_server(SocketAddr::new(lo(26), 0)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    m.set(
        target("web", lo(26), spec(CheckKind::None, port)),
        Start::Up,
    );
    assert!(!m.is_checked("web", lo(26), port));
    quiet(&mut rx, Duration::from_millis(300)).await;

    // Setting `none` on a checked backend stops its checker.
    m.set(target("web", lo(26), spec(CheckKind::Tcp, port)), Start::Up);
    next(&mut rx).await;
    m.set(
        target("web", lo(26), spec(CheckKind::None, port)),
        Start::Up,
    );
    assert!(m.is_empty());
    while rx.try_recv().is_ok() {}
    quiet(&mut rx, Duration::from_millis(300)).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_stops_reports() {
    let (port, server) = tcp_server(SocketAddr::new(lo(27), 0)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    m.set(target("a", lo(27), spec(CheckKind::Tcp, port)), Start::Up);
    m.set(target("b", lo(27), spec(CheckKind::Tcp, port)), Start::Up);
    m.set(target("b", lo(28), spec(CheckKind::Tcp, port)), Start::Up);
    assert_eq!(m.len(), 3);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3 {
        let r = next(&mut rx).await;
        seen.insert((r.service, r.backend));
    }

    m.remove("a", lo(27), port);
    m.remove("a", lo(99), port); // not checked: nothing happens
    m.remove("b", lo(27), port ^ 1); // another port of a checked address: nothing either
    assert_eq!(m.len(), 2);
    while rx.try_recv().is_ok() {}
    let deadline = Instant::now() + Duration::from_millis(300);
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        assert_eq!(r.service, "b", "{r:?}");
    }

    m.remove_service("b");
    assert!(m.is_empty());
    while rx.try_recv().is_ok() {}
    quiet(&mut rx, Duration::from_millis(300)).await;
    stop(server).await;
}

#[tokio::test]
async fn drop_stops_checkers() {
    let (port, server) = tcp_server(SocketAddr::new(lo(29), 0)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    m.set(target("web", lo(29), spec(CheckKind::Tcp, port)), Start::Up);
    next(&mut rx).await;
    drop(m);
    while rx.try_recv().is_ok() {}
    // Every sender is gone once the aborted task has been dropped: the channel closes.
    let closed = tokio::time::timeout(WAIT, rx.recv()).await;
    assert!(
        matches!(closed, Ok(None)),
        "report after drop, or channel still open: {closed:?}"
    );
    stop(server).await;
}

#[tokio::test]
async fn checkers_do_not_fire_in_lockstep() {
    let (port, server) = tcp_server(SocketAddr::new(lo(30), 0)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    let mut s = spec(CheckKind::Tcp, port);
    s.interval_ms = 200;
    s.timeout_ms = 100;
    let began = Instant::now();
    for i in 0..8 {
        m.set(target(&format!("svc{i}"), lo(30), s.clone()), Start::Up);
    }
    let mut firsts = HashMap::new();
    while firsts.len() < 8 {
        let r = next(&mut rx).await;
        firsts.entry(r.service).or_insert_with(|| began.elapsed());
    }
    let min = *firsts.values().min().unwrap();
    let max = *firsts.values().max().unwrap();
    // Eight uniform delays in [0, 200 ms) all within 5 ms of each other: practically never.
    assert!(max - min > Duration::from_millis(5), "{firsts:?}");
    assert!(max < Duration::from_millis(200 + 500), "{firsts:?}");
    drop(m);
    stop(server).await;
}

// ---- the other kinds: their protocol pieces, and real processes and sockets ----

#[test]
fn resp_replies() {
    use super::redis::{Reply, command, parse, role_of};
    assert_eq!(command(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
    assert_eq!(
        command(&[b"AUTH", b"s3cret"]),
        b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n"
    );
    assert_eq!(
        parse(b"+PONG\r\n", 0),
        Ok(Some((Reply::Simple("PONG".into()), 7)))
    );
    assert_eq!(
        parse(b"-NOAUTH Authentication required.\r\n+x", 0),
        Ok(Some((
            Reply::Error("NOAUTH Authentication required.".into()),
            34
        )))
    );
    assert_eq!(parse(b"+PON", 0), Ok(None));
    assert_eq!(parse(b"$5\r\nmas", 0), Ok(None));
    assert_eq!(parse(b"HTTP/1.1 400\r\n", 0), Err(()));
    assert_eq!(parse(b"\r\n", 0), Err(()));
    let master = b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n";
    let (reply, used) = parse(master, 0).unwrap().unwrap();
    assert_eq!(used, master.len());
    assert_eq!(role_of(&reply).as_deref(), Some("master"));
    let replica = b"*5\r\n$5\r\nslave\r\n$9\r\n192.0.2.1\r\n:6379\r\n$9\r\nconnected\r\n:14\r\n";
    let (reply, _) = parse(replica, 0).unwrap().unwrap();
    assert_eq!(role_of(&reply).as_deref(), Some("replica"));
    assert_eq!(parse(&replica[..20], 0), Ok(None));
}

#[test]
fn dns_questions_and_answers() {
    use super::udp::{dns_answer, dns_query, rcode_name};
    use hickory_proto::op::Message;
    let spec = Health {
        check: CheckKind::Dns,
        query_name: "health.example".into(),
        query_type: "AAAA".into(),
        ..Health::default()
    };
    let q = dns_query(&spec, 0x1234).unwrap();
    let m = Message::from_vec(&q).unwrap();
    assert_eq!(m.id(), 0x1234);
    assert!(m.recursion_desired());
    assert_eq!(m.queries()[0].name().to_ascii(), "health.example.");
    assert_eq!(m.queries()[0].query_type().to_string(), "AAAA");
    // An answer: the query with QR set and an rcode.
    let mut reply = q.clone();
    reply[2] |= 0x80;
    assert_eq!(dns_answer(&reply, 0x1234).unwrap().unwrap(), "DNS NOERROR");
    assert!(
        dns_answer(&reply, 0x4321).is_none(),
        "another id is not our answer"
    );
    assert!(dns_answer(&q, 0x1234).is_none(), "a query is not an answer");
    reply[3] = (reply[3] & 0xf0) | 2;
    let f = dns_answer(&reply, 0x1234).unwrap().unwrap_err();
    assert_eq!(f, Failed(CheckResult::Fail, "DNS SERVFAIL".into()));
    assert_eq!(rcode_name(3), "NXDOMAIN");
    assert_eq!(rcode_name(5), "REFUSED");
    assert_eq!(rcode_name(23), "RCODE23");
    assert!(dns_answer(&[0x12, 0x34, 0x80], 0x1234).is_none());
}

#[test]
fn pgsql_messages() {
    use super::pgsql::{error_message, startup_message};
    let m = startup_message("lb", "postgres");
    assert_eq!(
        u32::from_be_bytes(m[..4].try_into().unwrap()) as usize,
        m.len()
    );
    assert_eq!(&m[4..8], &196_608u32.to_be_bytes());
    assert!(m.ends_with(b"lbd-health-check\0\0"));
    assert!(m.windows(20).any(|w| w == b"user\0lb\0database\0pos"));
    let body = b"SFATAL\0VFATAL\0C53300\0Msorry, too many clients already\0Fproc.c\0\0";
    assert_eq!(error_message(body), "sorry, too many clients already");
    assert_eq!(
        error_message(b"SFATAL\0\0"),
        "error response without a message"
    );
}

#[test]
fn first_output_line() {
    use super::exec::first_line;
    assert_eq!(
        first_line(b"\n  oops \nmore", b"out").as_deref(),
        Some("oops")
    );
    assert_eq!(first_line(b"", b"out\n").as_deref(), Some("out"));
    assert_eq!(first_line(b" \n", b""), None);
}

fn exec_spec(script: &str, timeout_ms: u64) -> Health {
    Health {
        check: CheckKind::Exec,
        port: 9,
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        user: "nobody".into(),
        timeout_ms,
        interval_ms: 1000,
        ..Health::default()
    }
}

#[tokio::test]
async fn exec_runs_as_the_user_with_the_backend_in_its_environment() {
    let addr = SocketAddr::new(lo(7), 9);
    let ok = exec_spec("exit 0", 2000);
    assert_eq!(check("web", addr, &ok).await, Ok("exit 0".into()));
    // Unprivileged, no supplementary group, a clean environment, stdin empty.
    let env = exec_spec(
        "echo \"$LB_BACKEND_ADDRESS $LB_BACKEND_PORT $LB_SERVICE $(id -u) $(id -G) $(wc -c) ${HOME:-nohome}\" >&2; exit 3",
        2000,
    );
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        check("web", addr, &env).await,
        Err(Failed(
            CheckResult::Fail,
            format!(
                "exit 3: 127.0.0.7 9 web {} {} 0 nohome",
                nobody.uid, nobody.gid
            )
        ))
    );
    let stdout = exec_spec("echo 'backend says no'; exit 1", 2000);
    assert_eq!(
        check("web", addr, &stdout).await.unwrap_err().1,
        "exit 1: backend says no"
    );
    let mut missing = exec_spec("exit 0", 2000);
    missing.command = vec!["/nonexistent/check".into()];
    let f = check("web", addr, &missing).await.unwrap_err();
    assert_eq!(f.0, CheckResult::Error, "{f:?}");
    assert!(f.1.contains("/nonexistent/check"), "{f:?}");
    let mut stranger = exec_spec("exit 0", 2000);
    stranger.user = "no-such-user-lbtest".into();
    let f = check("web", addr, &stranger).await.unwrap_err();
    assert_eq!(
        f,
        Failed(
            CheckResult::Error,
            "could not run: no user \"no-such-user-lbtest\" on this host".into()
        )
    );
}

#[tokio::test]
async fn exec_is_killed_with_its_process_group_at_the_timeout() {
    let dir = std::env::temp_dir().join(format!("lb-exec-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let pidfile = dir.join("child.pid");
    // A child of the check, in its group, that would outlive it.
    let spec = exec_spec(
        &format!("sleep 30 & echo $! > {}; sleep 30", pidfile.display()),
        300,
    );
    let began = std::time::Instant::now();
    let result = check("web", SocketAddr::new(lo(7), 9), &spec).await;
    let took = began.elapsed();
    assert_eq!(
        result,
        Err(Failed(CheckResult::Fail, "killed after 300 ms".into()))
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Gone, or a zombie waiting for a reaper: not running.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let running = state
            .as_deref()
            .and_then(|s| s.rsplit(')').next())
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'));
        if !running {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the check's child {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn udp_replies_and_port_unreachable() {
    let server = tokio::net::UdpSocket::bind((lo(1), 0)).await.unwrap();
    let port = server.local_addr().unwrap().port();
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let mut reply = b"pong:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            server.send_to(&reply, from).await.unwrap();
        }
    });
    let mut spec = Health {
        check: CheckKind::Udp,
        port,
        send: crate::config::Payload::Text("hi".into()),
        timeout_ms: 500,
        ..Health::default()
    };
    let addr = SocketAddr::new(lo(1), port);
    assert_eq!(
        check("dns", addr, &spec).await,
        Ok("UDP reply, 7 bytes".into())
    );
    spec.expect_hex = Some(b"pong".to_vec());
    assert!(check("dns", addr, &spec).await.is_ok());
    spec.expect_hex = Some(b"PONG".to_vec());
    assert_eq!(
        check("dns", addr, &spec).await.unwrap_err().1,
        "UDP reply 706f6e673a6869 does not start with 504f4e47"
    );
    stop(echo).await;
    // Nothing bound there now: the kernel answers with a port unreachable.
    assert_eq!(
        check("dns", addr, &spec).await,
        Err(Failed(CheckResult::Fail, "port unreachable".into()))
    );
    spec.check = CheckKind::Dns;
    assert_eq!(
        check("dns", addr, &spec).await,
        Err(Failed(CheckResult::Fail, "port unreachable".into()))
    );
}

/// One host serving a service on two ports: two backends, a checker each, each reporting its
/// own port; one port down leaves the other up, and removing one leaves the other checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_on_two_ports_has_two_checkers() {
    let (port_a, server_a) = tcp_server(SocketAddr::new(lo(29), 0)).await;
    let (port_b, server_b) = tcp_server(SocketAddr::new(lo(29), 0)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut m = Monitor::new(tx);
    m.set(
        target("web", lo(29), spec(CheckKind::Tcp, port_a)),
        Start::Up,
    );
    m.set(
        target("web", lo(29), spec(CheckKind::Tcp, port_b)),
        Start::Up,
    );
    assert_eq!(m.len(), 2);
    assert!(m.is_checked("web", lo(29), port_a) && m.is_checked("web", lo(29), port_b));
    // Port a stops serving: only its backend goes down.
    stop(server_a).await;
    let deadline = Instant::now() + WAIT;
    let mut down = None;
    while down.is_none() {
        assert!(Instant::now() < deadline, "port {port_a} never went down");
        let r = next(&mut rx).await;
        assert_eq!(r.backend, lo(29));
        if r.port == port_b {
            assert!(r.ok(), "port {port_b} still serves: {r:?}");
        } else if r.transition == Some(false) {
            down = Some(r.port);
        }
    }
    assert_eq!(down, Some(port_a));
    m.remove("web", lo(29), port_a);
    assert_eq!(m.len(), 1);
    while rx.try_recv().is_ok() {}
    for _ in 0..3 {
        let r = next(&mut rx).await;
        assert_eq!((r.port, r.ok()), (port_b, true), "{r:?}");
    }
    stop(server_b).await;
}
