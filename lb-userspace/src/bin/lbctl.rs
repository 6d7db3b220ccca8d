//! lbctl: the command line of lb, a client of lbd's control socket.

use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use hyper::Method;
use lb_userspace::{
    api::{
        BackendInfo, Changed, HealthOptions, Lookup, NewBackend, NewPrefix, NewService, NewWeight,
        NodeStatus, Removal, ServiceInfo, Stats, Status, TraceLine,
    },
    cli::{
        BackendCommand, BackendName, CheckArgs, Command, LbctlArgs, NodeCommand, ServiceCommand,
    },
    client::Client,
    datapath::Start,
};

/// The health options of `service add` as `[service.health]` keys (None: no check option was
/// given, so no checks). Relative file names are taken from the current folder.
fn health_options(a: CheckArgs) -> anyhow::Result<Option<HealthOptions>> {
    let file = |p: Option<std::path::PathBuf>| -> anyhow::Result<Option<String>> {
        p.map(|p| {
            std::path::absolute(&p)
                .map(|p| p.display().to_string())
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        })
        .transpose()
    };
    let options = HealthOptions {
        check: a.check,
        port: a.check_port,
        interval_ms: a.interval_ms,
        timeout_ms: a.timeout_ms,
        rise: a.rise,
        fall: a.fall,
        path: a.path,
        expect: a.expect,
        tls_verify: a.tls_verify.then_some(true),
        sni: a.sni,
        ca_file: file(a.ca_file)?,
        send: a.send,
        send_hex: a.send_hex,
        expect_hex: a.expect_hex,
        query_name: a.query_name,
        query_type: a.query_type,
        user: a.user,
        database: a.database,
        role: a.role,
        password_file: file(a.password_file)?,
        command: (!a.command.is_empty()).then_some(a.command),
    };
    Ok((options != HealthOptions::default()).then_some(options))
}

/// Prints rows as a table aligned on a header row.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn list_or_none(l: &[String]) -> String {
    if l.is_empty() {
        "none".into()
    } else {
        l.join(", ")
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A duration in seconds, as a person reads it.
fn human_age(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn percent(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

/// The URL of a backend: its address as the path segment (IPv6 colons are fine in a path),
/// `?port=` when the command gave one, and what follows (`/drain`, ...) before the query.
fn backend_url(service: &str, b: &BackendName, rest: &str) -> anyhow::Result<String> {
    let (address, port) = b.resolve().map_err(|e| anyhow::anyhow!(e))?;
    let mut url = format!("/v1/services/{}/backends/{address}{rest}", enc(service));
    if let Some(p) = port {
        url.push_str(&format!("?port={p}"));
    }
    Ok(url)
}

/// Percent-encodes a name for a URL path segment or query value: whatever a service is called,
/// it only ever names a service.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_changes(json: bool, c: &Changed) -> anyhow::Result<()> {
    if json {
        return print_json(c);
    }
    if c.changes.is_empty() {
        println!("nothing changed");
    }
    for line in &c.changes {
        println!("{line}");
    }
    Ok(())
}

async fn show_stats(client: &Client, service: &Option<String>, json: bool) -> anyhow::Result<()> {
    let path = match service {
        Some(s) => format!("/v1/stats?service={}", enc(s)),
        None => "/v1/stats".into(),
    };
    let s: Stats = client.get(&path).await?;
    if json {
        return print_json(&s);
    }
    let mut rows = vec![];
    for svc in &s.services {
        rows.push(vec![
            svc.service.clone(),
            "(all)".into(),
            svc.packets.to_string(),
            svc.bytes.to_string(),
        ]);
        if let (Some(packets), Some(bytes)) = (svc.reply_packets, svc.reply_bytes) {
            // A nat service's replies, sent on by lb (the rows above are its requests).
            rows.push(vec![
                svc.service.clone(),
                "(replies)".into(),
                packets.to_string(),
                bytes.to_string(),
            ]);
        }
        for b in &svc.backends {
            rows.push(vec![
                svc.service.clone(),
                if b.name.is_empty() {
                    b.address.clone()
                } else {
                    b.name.clone()
                },
                b.packets.to_string(),
                b.bytes.to_string(),
            ]);
        }
    }
    print_table(&["SERVICE", "BACKEND", "PACKETS", "BYTES"], &rows);
    println!();
    let rows: Vec<Vec<String>> = s
        .dropped
        .iter()
        .map(|r| vec![r.reason.clone(), r.packets.to_string()])
        .collect();
    print_table(&["DROPPED OR PASSED", "PACKETS"], &rows);
    let rows: Vec<Vec<String>> = s
        .services
        .iter()
        .flat_map(|svc| {
            svc.dropped
                .iter()
                .filter(|r| r.packets > 0)
                .map(|r| vec![svc.service.clone(), r.reason.clone(), r.packets.to_string()])
        })
        .collect();
    if !rows.is_empty() {
        println!();
        print_table(&["SERVICE", "DROPPED OR PASSED", "PACKETS"], &rows);
    }
    println!(
        "\nconnection table: {} of {} entries in use; {} Maglev slots changed (only flows on \
         changed slots are recorded; counted about every second)",
        s.conntrack.entries, s.conntrack.capacity, s.conntrack.changed_slots
    );
    println!("NAT tables: {} flows each", s.nat_capacity);
    let new_flow = |outcome: &str| {
        s.conntrack
            .new_flows
            .iter()
            .find(|n| n.outcome == outcome)
            .map_or((0, 0), |n| (n.flows, n.per_second))
    };
    let (recorded, recorded_rate) = new_flow("recorded");
    let (over, over_rate) = new_flow("over_limit");
    let (no_room, no_room_rate) = new_flow("no_room");
    println!(
        "new flows on changed slots: {recorded_rate}/s recorded, {}/s not recorded \
         ({over_rate}/s over the limit, {no_room_rate}/s no room); since start {recorded} \
         recorded, {over} over the limit, {no_room} no room",
        over_rate + no_room_rate
    );
    Ok(())
}

/// `lbctl service allow|deny|unlist SERVICE CIDR` (`action`).
async fn change_list(
    client: &Client,
    json: bool,
    service: &str,
    action: &str,
    prefix: lb_userspace::config::Cidr,
) -> anyhow::Result<()> {
    let body = serde_json::to_value(NewPrefix { prefix })?;
    let path = format!("/v1/services/{}/{action}", enc(service));
    let c: Changed = client.request(Method::POST, &path, Some(body)).await?;
    print_changes(json, &c)
}

/// Runs the command; its exit code (1 also for `node check` finding nothing to announce).
async fn run(args: LbctlArgs) -> anyhow::Result<ExitCode> {
    if let Command::Node(NodeCommand::Check) = args.command {
        return node_check(&Client::new(&args.socket), args.json).await;
    }
    run_command(args).await.map(|()| ExitCode::SUCCESS)
}

/// `lbctl node check`: 0 when the node would announce a VIP, else 1 (keepalived's
/// track_script); an lbd that does not answer is an error (also exit 1).
async fn node_check(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let n: NodeStatus = client.get("/v1/node").await?;
    if json {
        print_json(&n)?;
    } else if n.serving.is_empty() {
        println!(
            "node {} would announce no VIP: {}",
            n.node_name,
            if n.drained {
                "it is drained"
            } else {
                "no service has a backend up (or the data path is not attached)"
            }
        );
    } else {
        println!("node {} serves {}", n.node_name, n.serving.join(", "));
    }
    Ok(if n.serving.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn run_command(args: LbctlArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.socket);
    let json = args.json;
    match args.command {
        Command::Status => {
            let s: Status = client.get("/v1/status").await?;
            if json {
                return print_json(&s);
            }
            println!(
                "lbd {} (pid {}), up {}, config {}\nprogram id {}, map layout v{}, pins {}, started: {}",
                s.version,
                s.pid,
                human_age(s.uptime_s),
                s.config,
                s.program_id,
                s.layout_version,
                s.bpffs_dir,
                match &s.start {
                    Start::Fresh => "fresh (program loaded, maps created)".to_string(),
                    Start::Adopted => "adopted the running program and its maps".to_string(),
                    Start::Upgraded =>
                        "replaced a different program in place, same maps".to_string(),
                    Start::Replaced { old_layouts } => {
                        format!(
                            "replaced program and maps of another layout ({})",
                            old_layouts.join(", ")
                        )
                    }
                    Start::Reattached =>
                        "loaded the program again on its maps, attached anew where its link was detached"
                            .to_string(),
                }
            );
            let n = &s.node;
            println!(
                "node {}{}; serving {}; announced {}",
                n.node_name,
                if n.drained { " (drained)" } else { "" },
                list_or_none(&n.serving),
                match &n.announce {
                    Some(a) => format!(
                        "{} (table {}, protocol {})",
                        list_or_none(&n.announced),
                        a.table,
                        a.protocol
                    ),
                    None => "nothing (no [daemon.announce])".into(),
                }
            );
            if let Some(p) = &n.announce_problem {
                println!("announce problem: {p}");
            }
            println!(
                "{} service(s), {} backend(s)\n",
                s.services.len(),
                s.backends
            );
            let rows: Vec<Vec<String>> = s
                .interfaces
                .iter()
                .map(|i| {
                    let state = match (&i.state, &i.problem) {
                        (Some(s), _) => format!("{s:?}").to_lowercase(),
                        (None, Some(p)) => format!("unknown ({p})"),
                        (None, None) => "unknown".into(),
                    };
                    vec![
                        i.name.clone(),
                        state,
                        i.ifindex.to_string(),
                        i.mode.clone(),
                        i.link_id.to_string(),
                    ]
                })
                .collect();
            print_table(&["INTERFACE", "STATE", "IFINDEX", "MODE", "LINK"], &rows);
            if !s.services.is_empty() {
                println!();
                let rows: Vec<Vec<String>> = s
                    .services
                    .iter()
                    .map(|svc| {
                        vec![
                            svc.name.clone(),
                            svc.vip.to_string(),
                            svc.port.to_string(),
                            svc.protocol.to_string(),
                            svc.up.to_string(),
                            svc.fingerprint.clone(),
                        ]
                    })
                    .collect();
                print_table(
                    &["SERVICE", "VIP", "PORT", "PROTOCOL", "UP", "FINGERPRINT"],
                    &rows,
                );
            }
            if let Some(peers) = &s.peers {
                println!();
                let yes_no = |b: Option<bool>| match b {
                    Some(true) => "yes".to_string(),
                    Some(false) => "no".to_string(),
                    None => "-".to_string(),
                };
                let rows: Vec<Vec<String>> = peers
                    .iter()
                    .map(|p| {
                        vec![
                            p.address.clone(),
                            p.node_name.clone().unwrap_or_else(|| "-".into()),
                            match p.last_heard_s {
                                Some(t) => format!("{t:.1}s ago"),
                                None => "never".into(),
                            },
                            if p.up { "up" } else { "down" }.into(),
                            yes_no(p.agree),
                            p.entries_sent.to_string(),
                            p.entries_received.to_string(),
                            p.refused.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "PEER",
                        "NODE",
                        "LAST HEARD",
                        "STATE",
                        "AGREE",
                        "SENT",
                        "RECEIVED",
                        "REFUSED",
                    ],
                    &rows,
                );
            }
        }
        Command::Node(NodeCommand::Drain) => {
            let c: Changed = client.request(Method::POST, "/v1/node/drain", None).await?;
            print_changes(json, &c)?;
        }
        Command::Node(NodeCommand::Undrain) => {
            let c: Changed = client
                .request(Method::POST, "/v1/node/undrain", None)
                .await?;
            print_changes(json, &c)?;
        }
        Command::Node(NodeCommand::Check) => unreachable!("answered by node_check"),
        Command::Service(ServiceCommand::List) => {
            let list: Vec<ServiceInfo> = client.get("/v1/services").await?;
            if json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.vip.to_string(),
                        s.port.to_string(),
                        format!("{:?}", s.protocol).to_lowercase(),
                        format!("{:?}", s.forwarding).to_lowercase(),
                        match s.hash {
                            lb_userspace::config::HashMode::Source => "source".into(),
                            lb_userspace::config::HashMode::FiveTuple => "5-tuple".into(),
                        },
                        format!("{}/{}", s.up, s.backends),
                        s.check.to_string(),
                        match s.allow.len() {
                            0 => "all".into(),
                            n => n.to_string(),
                        },
                        s.deny.len().to_string(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME",
                    "VIP",
                    "PORT",
                    "PROTOCOL",
                    "FORWARDING",
                    "HASH",
                    "UP",
                    "CHECK",
                    "ALLOW",
                    "DENY",
                ],
                &rows,
            );
        }
        Command::Service(ServiceCommand::Allow { service, prefix }) => {
            change_list(&client, json, &service, "allow", prefix).await?;
        }
        Command::Service(ServiceCommand::Deny { service, prefix }) => {
            change_list(&client, json, &service, "deny", prefix).await?;
        }
        Command::Service(ServiceCommand::Unlist { service, prefix }) => {
            change_list(&client, json, &service, "unlist", prefix).await?;
        }
        Command::Service(ServiceCommand::Add {
            name,
            vip,
            port,
            protocol,
            forwarding,
            hash,
            table_size,
            check,
        }) => {
            let body = NewService {
                name,
                vip,
                port,
                protocol,
                forwarding,
                hash,
                table_size,
                health: health_options(check)?,
            };
            let c: Changed = client
                .request(
                    Method::POST,
                    "/v1/services",
                    Some(serde_json::to_value(body)?),
                )
                .await?;
            print_changes(json, &c)?;
        }
        Command::Service(ServiceCommand::Remove { name }) => {
            let c: Changed = client
                .request(
                    Method::DELETE,
                    &format!("/v1/services/{}", enc(&name)),
                    None,
                )
                .await?;
            print_changes(json, &c)?;
        }
        Command::Backend(BackendCommand::List { service }) => {
            let path = match &service {
                Some(s) => format!("/v1/backends?service={}", enc(s)),
                None => "/v1/backends".into(),
            };
            let list: Vec<BackendInfo> = client.get(&path).await?;
            if json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|b| {
                    let health = match (&b.last_check, b.last_check_age_s) {
                        (Some(detail), Some(age)) => format!("{detail} ({} ago)", human_age(age)),
                        _ if b.check == lb_userspace::config::CheckKind::None => "no checks".into(),
                        _ => "not checked yet".into(),
                    };
                    vec![
                        b.address.to_string(),
                        b.weight.to_string(),
                        b.state.to_string(),
                        human_age(b.since_s),
                        b.check.to_string(),
                        match &b.problem {
                            Some(p) => format!("{health}; {p}"),
                            None => health,
                        },
                        b.packets.to_string(),
                        b.service.clone(),
                        b.port.to_string(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ADDRESS",
                    "WEIGHT",
                    "STATE",
                    "SINCE",
                    "CHECK",
                    "LAST CHECK",
                    "PACKETS",
                    "SERVICE",
                    "PORT",
                ],
                &rows,
            );
        }
        Command::Backend(BackendCommand::Add {
            service,
            address,
            weight,
            port,
        }) => {
            let (address, port) = address.with_port(port).map_err(|e| anyhow::anyhow!(e))?;
            let body = NewBackend {
                address,
                weight: Some(weight),
                port,
            };
            let c: Changed = client
                .request(
                    Method::POST,
                    &format!("/v1/services/{}/backends", enc(&service)),
                    Some(serde_json::to_value(body)?),
                )
                .await?;
            print_changes(json, &c)?;
        }
        Command::Backend(BackendCommand::Remove {
            service,
            backend,
            dry_run,
        }) => {
            if dry_run {
                let r: Removal = client
                    .get(&backend_url(&service, &backend, "/removal")?)
                    .await?;
                if json {
                    return print_json(&r);
                }
                println!(
                    "removing {} from {} would move {} of clients ({} of {} table slots): the {} on it, and {} of the others",
                    if r.name.is_empty() {
                        r.address.to_string()
                    } else {
                        r.name.clone()
                    },
                    r.service,
                    percent(r.moved_share),
                    r.moved_slots,
                    r.table_size,
                    percent(r.own_share),
                    percent(r.others_moved_share)
                );
                return Ok(());
            }
            let path = backend_url(&service, &backend, "")?;
            let c: Changed = client.request(Method::DELETE, &path, None).await?;
            print_changes(json, &c)?;
        }
        Command::Backend(BackendCommand::Drain { service, backend }) => {
            let path = backend_url(&service, &backend, "/drain")?;
            let c: Changed = client.request(Method::POST, &path, None).await?;
            print_changes(json, &c)?;
        }
        Command::Backend(BackendCommand::Undrain { service, backend }) => {
            let path = backend_url(&service, &backend, "/undrain")?;
            let c: Changed = client.request(Method::POST, &path, None).await?;
            print_changes(json, &c)?;
        }
        Command::Backend(BackendCommand::Weight {
            service,
            backend,
            weight,
        }) => {
            let path = backend_url(&service, &backend, "/weight")?;
            let body = serde_json::to_value(NewWeight { weight })?;
            let c: Changed = client.request(Method::PUT, &path, Some(body)).await?;
            print_changes(json, &c)?;
        }
        Command::Stats { service, watch } => {
            if !watch {
                return show_stats(&client, &service, json).await;
            }
            loop {
                if !json {
                    // Clear the screen and go home, like watch(1).
                    print!("\x1b[2J\x1b[H");
                }
                show_stats(&client, &service, json).await?;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Command::Trace { target, count } => {
            let body = serde_json::json!({ "target": target, "count": count });
            let mut lines: Vec<TraceLine> = Vec::new();
            // The header once lbd has begun the trace (a refusal prints no table).
            let started = || {
                if !json {
                    println!("{}", trace_row(None));
                }
            };
            client
                .post_lines("/v1/trace", body, started, |text| {
                    let line: TraceLine = serde_json::from_str(text).map_err(|e| {
                        lb_userspace::client::ClientError::Refused(format!(
                            "undecodable trace line from lbd: {e}"
                        ))
                    })?;
                    if json {
                        lines.push(line);
                    } else {
                        println!("{}", trace_row(Some(&line)));
                    }
                    Ok(())
                })
                .await?;
            if json {
                print_json(&lines)?;
            }
        }
        Command::Lookup {
            service,
            client: address,
            port,
        } => {
            let mut path = format!("/v1/lookup?service={}&client={address}", enc(&service));
            if let Some(p) = port {
                path.push_str(&format!("&port={p}"));
            }
            let l: Lookup = client.get(&path).await?;
            if json {
                return print_json(&l);
            }
            let shown = l
                .backend_name
                .clone()
                .or_else(|| l.backend.map(|b| b.to_string()));
            match (&shown, l.reason.as_str()) {
                (None, "denied") => println!(
                    "no backend: {}'s client filters drop this client's packets ({})",
                    l.service,
                    l.denied.as_deref().unwrap_or("denied")
                ),
                (None, _) => println!(
                    "{}: no usable backend (slot {} of {} is empty): packets to the VIP are dropped",
                    l.service, l.slot, l.table_size
                ),
                (Some(b), "connection-table") => println!(
                    "{b}: the connection table holds this flow ({}:{} → {}); a new connection would take slot {} of {}",
                    l.client,
                    l.client_port.unwrap_or(0),
                    l.service,
                    l.slot,
                    l.table_size
                ),
                (Some(b), "previous-backend") => println!(
                    "{b}: slot {} of {} in {}'s Maglev table changed backend and this flow ({}:{}) has no record: taken for one older than the change, it keeps the slot's previous backend (a new connection takes the current one)",
                    l.slot,
                    l.table_size,
                    l.service,
                    l.client,
                    l.client_port.unwrap_or(0)
                ),
                (Some(b), "every-port-service") => println!(
                    "{b}: {}'s port got its own service after this flow ({}:{}) may have begun, and the flow has no record: it stays with the VIP's every-port service (a new connection goes to {})",
                    l.service,
                    l.client,
                    l.client_port.unwrap_or(0),
                    l.service
                ),
                (Some(b), _) => println!(
                    "{b}: hash {:#010x} of {} selects slot {} of {} in {}'s Maglev table",
                    l.hash, l.client, l.slot, l.table_size, l.service
                ),
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <LbctlArgs as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "lbctl", &mut std::io::stdout());
        }
        Command::Man { dir } => {
            let cmd = <LbctlArgs as clap::CommandFactory>::command();
            match dir {
                Some(dir) => {
                    for page in lb_userspace::cli::write_man_pages(cmd, &dir)
                        .with_context(|| format!("writing man pages into {}", dir.display()))?
                    {
                        println!("{}", page.display());
                    }
                }
                None => lb_userspace::cli::man_page(cmd).render(&mut std::io::stdout())?,
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = LbctlArgs::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lbctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A row of `lbctl trace`'s live table (the header without a line). Fixed widths, as rows are
/// printed as packets come.
fn trace_row(line: Option<&TraceLine>) -> String {
    let cells: [String; 8] = match line {
        None => [
            "CLIENT", "VIP", "PROTO", "SERVICE", "TABLE", "BACKEND", "ACTION", "REASON",
        ]
        .map(str::to_string),
        Some(l) => {
            let flags = if l.flags.is_empty() {
                String::new()
            } else {
                format!(" {}", l.flags.join(","))
            };
            [
                join_port(l.client, l.client_port),
                join_port(l.vip, l.port),
                format!("{}{flags}", l.protocol),
                l.service.clone().unwrap_or_else(|| "-".into()),
                l.table.clone(),
                l.backend_name
                    .clone()
                    .or_else(|| l.backend.map(|b| b.to_string()))
                    .unwrap_or_else(|| "-".into()),
                l.action.clone(),
                l.reason.clone(),
            ]
        }
    };
    format!(
        "{:<45} {:<45} {:<12} {:<16} {:<8} {:<39} {:<8} {}",
        cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
    )
    .trim_end()
    .to_string()
}

/// `address:port`, IPv6 in brackets.
fn join_port(address: std::net::IpAddr, port: u16) -> String {
    match address {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}
