//! `POST /v1/trace` (`lbctl trace`): turns the data path's sampling on for one service (or every
//! service), streams the packets it reports (`lb_common::TraceEvent`, read from `TRACE_EVENTS`
//! on a thread of its own) as JSON lines, and turns it off when `count` packets have been sent,
//! when the client goes, or when lbd stops. One trace at a time.

use std::{net::IpAddr, time::Duration};

use axum::{Json, body::Body, extract::State, http::header, response::Response};
use aya::maps::{MapData, RingBuf};
use lb_common::{Reason, TRACE_ALL, TraceEvent, Verdict, trace_outcome, trace_table};
use tokio::sync::mpsc;

use super::{
    handlers::{Refusal, bad, conflict, internal, not_found},
    types::{TraceLine, TraceRequest},
};
use crate::{
    daemon::{Daemon, Shared},
    state,
};

/// Most packets one trace may ask for.
pub const MAX_TRACE_COUNT: u32 = 100_000;

pub(super) async fn trace(
    State(shared): State<Shared>,
    Json(req): Json<TraceRequest>,
) -> Result<Response, Refusal> {
    if req.count == 0 || req.count > MAX_TRACE_COUNT {
        return Err(bad(format!(
            "count {} is out of range: 1 to {MAX_TRACE_COUNT}",
            req.count
        )));
    }
    let (trace, keep) = {
        let d = shared.lock().await;
        target(&d, req.target.as_deref())?
    };
    let (events, load) = {
        let mut d = shared.lock().await;
        if d.trace != 0 {
            return Err(conflict(
                "a trace is running already (another lbctl trace): one at a time".into(),
            ));
        }
        let events = d
            .datapath
            .take_trace_events()
            .ok_or_else(|| conflict("a trace is running already: one at a time".into()))?;
        match d.datapath.trace_load() {
            Ok(load) => (events, load),
            Err(e) => {
                d.datapath.give_back_trace_events(events);
                return Err(internal(format!("starting the trace: {e:#}")));
            }
        }
    };
    // The first trace loads the traced program (and, after an adopting start, the plain one
    // to swap back): seconds of verification, without holding the daemon.
    let loaded = match load {
        None => Ok(None),
        Some(load) => match tokio::task::spawn_blocking(move || load.load()).await {
            Ok(loaded) => loaded.map(Some).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    };
    let programs = match loaded {
        Ok(programs) => programs,
        Err(why) => {
            shared.lock().await.datapath.give_back_trace_events(events);
            return Err(internal(format!(
                "loading the traced program for the trace: {why}"
            )));
        }
    };
    {
        let mut d = shared.lock().await;
        if let Some(programs) = programs {
            d.datapath.keep_trace_programs(programs);
        }
        if let Err(e) = d.set_trace(trace) {
            d.datapath.give_back_trace_events(events);
            return Err(internal(format!("starting the trace: {e:#}")));
        }
    }
    let (tx, rx) = mpsc::channel::<String>(256);
    let runtime = tokio::runtime::Handle::current();
    let session = shared.clone();
    std::thread::Builder::new()
        .name("trace".into())
        .spawn(move || {
            let events = read(events, &session, &runtime, &keep, req.count, &tx);
            runtime.block_on(async {
                let mut d = session.lock().await;
                if let Err(e) = d.set_trace(0) {
                    log::warn!("stopping the trace: {e:#}");
                }
                d.datapath.give_back_trace_events(events);
            });
        })
        .map_err(|e| internal(format!("starting the trace's thread: {e}")))?;
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .map_err(internal)
}

/// Which traced packets a trace shows: those of a VIP, of a service, or all.
enum Keep {
    All,
    Vip(IpAddr),
    /// The program sends a later fragment whatever its service (it has no ports to tell it
    /// by): lbd keeps those whose verdict names the service.
    Service(String),
}

impl Keep {
    fn keeps(&self, line: &TraceLine) -> bool {
        match self {
            Keep::All => true,
            Keep::Vip(vip) => line.vip == *vip,
            Keep::Service(name) => line.service.as_deref() == Some(name),
        }
    }
}

/// `Config::trace` for a target, and which of the packets the program sends to keep (a VIP
/// target traces every service and keeps that VIP's packets).
fn target(d: &Daemon, target: Option<&str>) -> Result<(u32, Keep), Refusal> {
    let Some(t) = target else {
        return Ok((TRACE_ALL, Keep::All));
    };
    if let Ok(vip) = t.parse::<IpAddr>() {
        if !d.services.iter().any(|s| s.cfg.vip == vip) {
            return Err(not_found(format!(
                "no service has the VIP {vip} (see `lbctl service list`)"
            )));
        }
        return Ok((TRACE_ALL, Keep::Vip(vip)));
    }
    let s = d.find_service(t).map_err(not_found)?;
    Ok((s.id + 1, Keep::Service(s.cfg.name.clone())))
}

/// Reads the ring until `count` lines went out, the client left, or lbd is stopping; gives the
/// ring back.
fn read(
    mut events: RingBuf<MapData>,
    shared: &Shared,
    runtime: &tokio::runtime::Handle,
    keep: &Keep,
    count: u32,
    tx: &mpsc::Sender<String>,
) -> RingBuf<MapData> {
    use std::os::fd::AsRawFd as _;
    // Left over from an earlier trace: not this one's packets.
    while events.next().is_some() {}
    let mut sent = 0;
    while sent < count && !tx.is_closed() {
        wait_readable(events.as_raw_fd(), Duration::from_millis(200));
        let mut batch = Vec::new();
        while let Some(item) = events.next() {
            if item.len() >= size_of::<TraceEvent>() {
                // SAFETY: the program writes whole `TraceEvent`s (plain data, any bytes valid);
                // read unaligned from the ring's bytes.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceEvent>()) });
            }
        }
        if batch.is_empty() {
            continue;
        }
        let lines: Vec<String> = runtime.block_on(async {
            let d = shared.lock().await;
            batch
                .iter()
                .map(|e| describe(&d, e))
                .filter(|l| keep.keeps(l))
                .map(|l| serde_json::to_string(&l).unwrap_or_default() + "\n")
                .collect()
        });
        for line in lines {
            if sent == count || tx.blocking_send(line).is_err() {
                return events;
            }
            sent += 1;
        }
    }
    events
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, owned here, for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
}

/// A traced packet in lbd's names.
pub fn describe(d: &Daemon, e: &TraceEvent) -> TraceLine {
    let client = state::from_addr(&e.flow.src, e.flow.family);
    let vip = state::from_addr(&e.flow.dst, e.flow.family);
    let verdict = Verdict(e.verdict);
    let service = verdict
        .service()
        .and_then(|id| d.services.iter().find(|s| s.id == id));
    let flags = [
        (e.syn != 0, "syn"),
        (e.closing != 0, "closing"),
        (e.icmp_error != 0, "icmp-error"),
        (e.fragment != 0, "fragment"),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_string())
    .collect();
    let table = verdict.table();
    let outcome = verdict.outcome();
    let backend = verdict
        .backend()
        .and_then(|id| service.and_then(|s| s.by_id(id).map(|b| (s, b))));
    TraceLine {
        client,
        client_port: u16::from_be(e.flow.sport),
        vip,
        port: u16::from_be(e.flow.dport),
        protocol: match e.flow.proto {
            lb_common::PROTO_TCP => "tcp".into(),
            lb_common::PROTO_UDP => "udp".into(),
            p => format!("ip protocol {p}"),
        },
        flags,
        service: service.map(|s| s.cfg.name.clone()),
        table: match table {
            trace_table::HIT => "hit",
            trace_table::MISS => "miss",
            _ => "not-read",
        }
        .into(),
        backend: verdict
            .backend()
            .and_then(|id| service.and_then(|s| s.address_of(id))),
        backend_port: backend.map(|(s, b)| b.cfg.port_or(s.cfg.port)),
        backend_name: backend.map(|(s, b)| s.name_of(b)),
        action: match verdict.action() {
            1 => "drop",
            2 => "pass",
            3 => "tx",
            4 => "redirect",
            _ => "aborted",
        }
        .into(),
        reason: if outcome & trace_outcome::REFUSED != 0 {
            Reason::from_index(outcome & trace_outcome::REASON)
                .label()
                .into()
        } else if outcome & trace_outcome::NO_SERVICE != 0 {
            "no_service".into()
        } else if outcome & trace_outcome::NOT_REWRITTEN != 0 {
            "not_rewritten".into()
        } else {
            "forwarded".into()
        },
        bytes: e.len,
    }
}
