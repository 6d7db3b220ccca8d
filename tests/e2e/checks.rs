//! End to end, the health check kinds against real servers: nginx over TLS (a certificate of a
//! test CA made with the openssl CLI), dnsmasq, PostgreSQL 15 (a primary and a streaming
//! replica made with pg_basebackup -R), Redis 7 (a master and its replica, both with a
//! password), and exec checks running pg_isready. Backend 1 holds the primaries, backend 2 the
//! replicas. One lbd runs one service per case; every backend's state and LAST CHECK detail
//! are read with `lbctl backend list --json` until they all match (with a deadline). Then a
//! dnsmasq is stopped and started again under a `dns` check (the detection times are
//! printed), and services with checks are added with `lbctl service add`.
//!
//! The servers are started once for the file (one test function). Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    ProcHandle, Topology, TopologyOptions,
    lbd::{Lbd, LbdPaths, start_lbd},
    require_root, retry_until, wait_until,
};
use serde_json::Value;

const VIP: &str = "203.0.113.10";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const REDIS_PASSWORD: &str = "redis-test-pass";
const PG_PASSWORD: &str = "pg-test-pass";
/// Ports on backend 1 where nothing listens, and where a socket never answers.
const CLOSED: u16 = 5499;
const SILENT_UDP: u16 = 5300;
const SILENT_TCP: u16 = 7000;
/// The table cases' timing: one check decides (rise = fall = 1).
const INTERVAL_MS: u64 = 1000;
const TIMEOUT_MS: u64 = 800;
/// Small Maglev tables (1 or 2 backends each): lbd's slot upkeep over 38 services of the
/// default 65537 slots takes seconds in a debug build, and holds health reports up meanwhile.
const TABLE_SIZE: u32 = 251;

fn baddr(i: usize) -> IpAddr {
    format!("192.0.2.{}", 10 + i).parse().unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command run as user postgres (its uid, gid and groups).
fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
        program,
    ]);
    c
}

fn mkdir(path: &Path, owner: Option<&str>) {
    std::fs::create_dir_all(path).unwrap();
    if let Some(owner) = owner {
        run(Command::new("chown")
            .args([&format!("{owner}:{owner}")])
            .arg(path));
    }
}

// ---- the servers ----

struct Servers {
    dir: PathBuf,
    ca: PathBuf,
    dnsmasq_b2: Option<ProcHandle>,
}

/// A test CA and a certificate it signed for backend.test (a self-signed leaf would be a CA
/// used as an end entity, which webpki refuses).
fn certificates(dir: &Path) -> PathBuf {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-days", "2", "-subj", "/CN=lb test CA"])
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.pem")));
    run(Command::new("openssl")
        .arg("req")
        .args(ec)
        .args(["-subj", "/CN=backend.test"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("leaf.csr")));
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:backend.test\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(dir.join("leaf.csr"))
        .arg("-CA")
        .arg(dir.join("ca.pem"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-extfile")
        .arg(dir.join("leaf.ext"))
        .arg("-out")
        .arg(dir.join("cert.pem")));
    dir.join("ca.pem")
}

fn start_nginx(t: &Topology, dir: &Path) {
    let b1 = baddr(1);
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n  access_log off;\n  server {{\n    listen {b1}:8443 ssl;\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n    location = /healthz {{ return 200 \"ok\\n\"; }}\n    location / {{ return 404; }}\n  }}\n  server {{\n    listen {b1}:8080;\n    location / {{ return 200 \"plain\\n\"; }}\n  }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-e", "stderr"]);
    t.spawn_nsenter(t.backend_ns(1), &cmd).unwrap();
    wait_tcp(t, 1, 8443);
}

/// Waits until backend `i` accepts TCP connections on `port`.
fn wait_tcp(t: &Topology, i: usize, port: u16) {
    let dst = SocketAddr::new(baddr(i), port);
    retry_until(
        Duration::from_secs(30),
        &format!("{dst} to accept connections"),
        || {
            t.in_netns(t.backend_ns(i), || {
                std::net::TcpStream::connect_timeout(&dst, Duration::from_millis(200))?;
                Ok(())
            })
        },
    )
    .unwrap();
}

fn start_dnsmasq(t: &Topology, i: usize, dir: &Path) -> ProcHandle {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--bind-interfaces",
        "--port=53",
        "--user=root",
        "--group=root",
        "--address=/health.example/192.0.2.200",
    ])
    .arg(format!("--listen-address={}", baddr(i)))
    .arg(format!("--pid-file={}/dnsmasq-b{i}.pid", dir.display()));
    let h = t.spawn_nsenter(t.backend_ns(i), &cmd).unwrap();
    // dnsmasq answers once it is bound: ask it (dig is in bind9-dnsutils).
    let ns = t.backend_ns(i).to_string();
    retry_until(Duration::from_secs(10), "dnsmasq to answer", || {
        let out = t.exec(
            &ns,
            &[
                "dig",
                "+tries=1",
                "+time=1",
                &format!("@{}", baddr(i)),
                "health.example",
                "A",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(text.contains("status: NOERROR"), "not yet: {text}");
        Ok(())
    })
    .unwrap();
    h
}

fn start_postgres(t: &Topology, i: usize, data: &Path, sockets: &Path) {
    let mut cmd = as_postgres(&format!("{PG_BIN}/postgres"));
    cmd.arg("-D").arg(data).args([
        "-c",
        &format!("listen_addresses={}", baddr(i)),
        "-c",
        "port=5432",
        "-c",
        &format!("unix_socket_directories={}", sockets.display()),
        "-c",
        "max_connections=40",
        "-c",
        "shared_buffers=16MB",
        "-c",
        "fsync=off",
    ]);
    t.spawn_nsenter(t.backend_ns(i), &cmd).unwrap();
    retry_until(
        Duration::from_secs(60),
        &format!("PostgreSQL on backend {i}"),
        || {
            let out = Command::new(format!("{PG_BIN}/pg_isready"))
                .arg("-h")
                .arg(sockets)
                .args(["-p", "5432", "-U", "postgres"])
                .output()?;
            anyhow::ensure!(out.status.success(), "not ready");
            Ok(())
        },
    )
    .unwrap();
}

/// A primary on backend 1 and its streaming replica on backend 2, each with its own folder and
/// socket folder, owned by postgres; role `lb` with a SCRAM password, role `lb_rejected` refused
/// by pg_hba.
fn start_postgresql(t: &Topology, dir: &Path) {
    let (data1, sock1) = (dir.join("pg1"), dir.join("pg1-sockets"));
    let (data2, sock2) = (dir.join("pg2"), dir.join("pg2-sockets"));
    for d in [&data1, &data2, &sock1, &sock2] {
        mkdir(d, Some("postgres"));
    }
    run(Command::new("chmod").arg("0700").arg(&data2));
    run(as_postgres(&format!("{PG_BIN}/initdb"))
        .arg("-D")
        .arg(&data1)
        .args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-N",
        ]));
    std::fs::write(
        data1.join("pg_hba.conf"),
        "local all all trust\nhost replication postgres 192.0.2.0/24 trust\nhost all lb_rejected 0.0.0.0/0 reject\nhost all all 0.0.0.0/0 scram-sha-256\n",
    )
    .unwrap();
    start_postgres(t, 1, &data1, &sock1);
    run(Command::new(format!("{PG_BIN}/psql"))
        .arg("-h")
        .arg(&sock1)
        .args([
            "-p",
            "5432",
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
        ])
        .arg(format!(
            "CREATE ROLE lb LOGIN PASSWORD '{PG_PASSWORD}'; CREATE ROLE lb_rejected LOGIN;"
        )));
    // The replica: a base backup taken from backend 2's namespace, streaming from then on.
    let mut backup = as_postgres(&format!("{PG_BIN}/pg_basebackup"));
    backup
        .args([
            "-h",
            &baddr(1).to_string(),
            "-p",
            "5432",
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-D",
        ])
        .arg(&data2);
    let out = t.nsenter_output(t.backend_ns(2), &backup).unwrap();
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start_postgres(t, 2, &data2, &sock2);
    let in_recovery = run(Command::new(format!("{PG_BIN}/psql"))
        .arg("-h")
        .arg(&sock2)
        .args([
            "-p",
            "5432",
            "-U",
            "postgres",
            "-tAc",
            "SELECT pg_is_in_recovery()",
        ]));
    assert_eq!(
        in_recovery.trim(),
        "t",
        "backend 2's PostgreSQL is a replica"
    );
}

fn start_redis(t: &Topology, i: usize, dir: &Path) {
    let data = dir.join(format!("redis{i}"));
    mkdir(&data, None);
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--bind",
        &baddr(i).to_string(),
        "--port",
        "6379",
        "--requirepass",
        REDIS_PASSWORD,
        "--masterauth",
        REDIS_PASSWORD,
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--repl-diskless-sync-delay",
        "0",
    ])
    .arg("--dir")
    .arg(&data);
    if i == 2 {
        cmd.args(["--replicaof", &baddr(1).to_string(), "6379"]);
    }
    t.spawn_nsenter(t.backend_ns(i), &cmd).unwrap();
    let ns = t.backend_ns(i).to_string();
    let want = if i == 1 {
        "role:master"
    } else {
        "master_link_status:up"
    };
    retry_until(
        Duration::from_secs(20),
        &format!("redis on backend {i}"),
        || {
            let out = t.exec(
                &ns,
                &[
                    "redis-cli",
                    "--no-auth-warning",
                    "-h",
                    &baddr(i).to_string(),
                    "-a",
                    REDIS_PASSWORD,
                    "info",
                    "replication",
                ],
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            anyhow::ensure!(text.contains(want), "not yet: {text}");
            Ok(())
        },
    )
    .unwrap();
}

/// A UDP socket on backend 1 that never answers (python3, as a server that hangs would).
fn start_silent_udp(t: &Topology) {
    let script = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('{}', {SILENT_UDP}))\nprint('bound', flush=True)\ntime.sleep(3600)\n",
        baddr(1)
    );
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", &script]);
    let h = t.spawn_nsenter(t.backend_ns(1), &cmd).unwrap();
    wait_until(Duration::from_secs(10), "the silent UDP socket", || {
        t.log_of(h).contains("bound")
    })
    .unwrap();
}

fn start_servers(t: &Topology) -> Servers {
    let dir = t.work_dir().join("servers");
    mkdir(&dir, None);
    let ca = certificates(&dir);
    start_nginx(t, &dir);
    start_dnsmasq(t, 1, &dir);
    let dnsmasq_b2 = Some(start_dnsmasq(t, 2, &dir));
    start_postgresql(t, &dir);
    start_redis(t, 1, &dir);
    start_redis(t, 2, &dir);
    start_silent_udp(t);
    // Three cases ask backend 1's closed port every second, and the flapping one backend 2's
    // stopped dnsmasq every 200 ms: let their kernels answer each with a port unreachable (by
    // default one a second goes to a peer, and a check waiting for a rate-limited one would end
    // in a timeout instead).
    for i in [1, 2] {
        t.sysctl(t.backend_ns(i), "net.ipv4.icmp_ratelimit", "0")
            .unwrap();
    }
    // A TCP server that accepts and never answers (it waits for the client to finish sending).
    t.serve_sink(t.backend_ns(1), SocketAddr::new(baddr(1), SILENT_TCP))
        .unwrap();
    Servers {
        dir,
        ca,
        dnsmasq_b2,
    }
}

// ---- the cases ----

/// One service of the table: its health keys, and per backend the state and the detail
/// (`=` exact, else a prefix) expected.
struct Case {
    name: &'static str,
    protocol: &'static str,
    health: String,
    expect: Vec<(usize, &'static str, String)>,
}

fn case(
    name: &'static str,
    protocol: &'static str,
    health: impl Into<String>,
    expect: &[(usize, &'static str, &str)],
) -> Case {
    Case {
        name,
        protocol,
        health: health.into(),
        expect: expect
            .iter()
            .map(|(i, s, d)| (*i, *s, d.to_string()))
            .collect(),
    }
}

fn cases(s: &Servers) -> Vec<Case> {
    let dir = s.dir.display();
    let ca = s.ca.display();
    let good_pg = format!("{dir}/pg.pass");
    let bad_pg = format!("{dir}/pg-wrong.pass");
    let good_redis = format!("{dir}/redis.pass");
    let bad_redis = format!("{dir}/redis-wrong.pass");
    std::fs::write(&good_pg, format!("{PG_PASSWORD}\n")).unwrap();
    std::fs::write(&bad_pg, "not-the-password\n").unwrap();
    std::fs::write(&good_redis, format!("{REDIS_PASSWORD}\n")).unwrap();
    std::fs::write(&bad_redis, "not-the-password\n").unwrap();
    let timeout = format!("=timeout after {TIMEOUT_MS} ms");
    let pg_isready = |port: u16| {
        format!(
            "check = \"exec\"\nport = {port}\ncommand = [\"/bin/sh\", \"-c\", \"exec {PG_BIN}/pg_isready -h \\\"$LB_BACKEND_ADDRESS\\\" -p \\\"$LB_BACKEND_PORT\\\" -t 1\"]"
        )
    };
    vec![
        // https
        case(
            "https-ok",
            "tcp",
            "check = \"https\"\nport = 8443\npath = \"/healthz\"",
            &[(1, "up", "=HTTPS 200")],
        ),
        case(
            "https-404",
            "tcp",
            "check = \"https\"\nport = 8443\npath = \"/missing\"",
            &[(1, "down", "=HTTPS 404")],
        ),
        case(
            "https-expect-404",
            "tcp",
            "check = \"https\"\nport = 8443\npath = \"/missing\"\nexpect = 404",
            &[(1, "up", "=HTTPS 404")],
        ),
        case(
            "https-verified",
            "tcp",
            format!(
                "check = \"https\"\nport = 8443\npath = \"/healthz\"\ntls_verify = true\nca_file = \"{ca}\"\nsni = \"backend.test\""
            ),
            &[(1, "up", "=HTTPS 200")],
        ),
        case(
            "https-unknown-ca",
            "tcp",
            "check = \"https\"\nport = 8443\npath = \"/healthz\"\ntls_verify = true\nsni = \"backend.test\"",
            &[(1, "down", "=TLS: invalid peer certificate: UnknownIssuer")],
        ),
        case(
            "https-wrong-name",
            "tcp",
            format!("check = \"https\"\nport = 8443\ntls_verify = true\nca_file = \"{ca}\""),
            &[(
                1,
                "down",
                "TLS: invalid peer certificate: certificate not valid for name \"192.0.2.11\"",
            )],
        ),
        case(
            "https-plain-port",
            "tcp",
            "check = \"https\"\nport = 8080",
            &[(1, "down", "TLS: ")],
        ),
        case(
            "https-refused",
            "tcp",
            format!("check = \"https\"\nport = {CLOSED}"),
            &[(1, "down", "=connection refused")],
        ),
        case(
            "https-timeout",
            "tcp",
            format!("check = \"https\"\nport = {SILENT_TCP}"),
            &[(1, "down", &timeout)],
        ),
        // udp: a DNS query (id abcd) sent as hex to dnsmasq
        case(
            "udp-ok",
            "udp",
            "check = \"udp\"\nport = 53\nsend_hex = \"abcd01000001000000000000066865616c7468076578616d706c650000010001\"\nexpect_hex = \"abcd\"",
            &[(1, "up", "UDP reply, ")],
        ),
        case(
            "udp-any-reply",
            "udp",
            "check = \"udp\"\nport = 53\nsend_hex = \"abcd01000001000000000000066865616c7468076578616d706c650000010001\"",
            &[(1, "up", "UDP reply, ")],
        ),
        case(
            "udp-wrong-reply",
            "udp",
            "check = \"udp\"\nport = 53\nsend_hex = \"abcd01000001000000000000066865616c7468076578616d706c650000010001\"\nexpect_hex = \"abcd0000\"",
            &[(1, "down", "UDP reply abcd")],
        ),
        case(
            "udp-unreachable",
            "udp",
            format!("check = \"udp\"\nport = {CLOSED}\nsend = \"x\""),
            &[(1, "down", "=port unreachable")],
        ),
        case(
            "udp-timeout",
            "udp",
            format!("check = \"udp\"\nport = {SILENT_UDP}\nsend = \"x\""),
            &[(1, "down", &timeout)],
        ),
        // dns
        case(
            "dns-ok",
            "udp",
            "check = \"dns\"\nport = 53\nquery_name = \"health.example.\"",
            &[(1, "up", "=DNS NOERROR"), (2, "up", "=DNS NOERROR")],
        ),
        case(
            "dns-refused",
            "udp",
            "check = \"dns\"\nport = 53\nquery_name = \"other.example.\"\nquery_type = \"AAAA\"",
            &[(1, "down", "=DNS REFUSED")],
        ),
        case(
            "dns-unreachable",
            "udp",
            format!("check = \"dns\"\nport = {CLOSED}"),
            &[(1, "down", "=port unreachable")],
        ),
        case(
            "dns-timeout",
            "udp",
            format!("check = \"dns\"\nport = {SILENT_UDP}"),
            &[(1, "down", &timeout)],
        ),
        // pgsql
        case(
            "pg-up",
            "tcp",
            "check = \"pgsql\"\nport = 5432",
            &[
                (1, "up", "=pgsql: accepting connections"),
                (2, "up", "=pgsql: accepting connections"),
            ],
        ),
        case(
            "pg-rejected",
            "tcp",
            "check = \"pgsql\"\nport = 5432\nuser = \"lb_rejected\"",
            &[(
                1,
                "down",
                "=pgsql: pg_hba.conf rejects connection for host \"192.0.2.2\", user \"lb_rejected\", database \"postgres\", no encryption",
            )],
        ),
        case(
            "pg-primary",
            "tcp",
            format!(
                "check = \"pgsql\"\nport = 5432\nrole = \"primary\"\npassword_file = \"{good_pg}\""
            ),
            &[
                (1, "up", "=pgsql: primary"),
                (2, "down", "=role primary expected, server is a replica"),
            ],
        ),
        case(
            "pg-replica",
            "tcp",
            format!(
                "check = \"pgsql\"\nport = 5432\nrole = \"replica\"\npassword_file = \"{good_pg}\""
            ),
            &[
                (1, "down", "=role replica expected, server is a primary"),
                (2, "up", "=pgsql: replica"),
            ],
        ),
        case(
            "pg-wrong-password",
            "tcp",
            format!(
                "check = \"pgsql\"\nport = 5432\nrole = \"primary\"\npassword_file = \"{bad_pg}\""
            ),
            &[(
                1,
                "down",
                "=pgsql: password authentication failed for user \"lb\"",
            )],
        ),
        // lbd's own problem: the backend stays up (the check counts neither way).
        case(
            "pg-no-password-file",
            "tcp",
            format!(
                "check = \"pgsql\"\nport = 5432\nrole = \"primary\"\npassword_file = \"{dir}/missing.pass\""
            ),
            &[(
                1,
                "up",
                &format!(
                    "=could not run: password_file {dir}/missing.pass: no such file or directory"
                ),
            )],
        ),
        case(
            "pg-refused",
            "tcp",
            format!("check = \"pgsql\"\nport = {CLOSED}"),
            &[(1, "down", "=connection refused")],
        ),
        case(
            "pg-timeout",
            "tcp",
            format!("check = \"pgsql\"\nport = {SILENT_TCP}"),
            &[(1, "down", &timeout)],
        ),
        // redis
        case(
            "redis-ok",
            "tcp",
            format!("check = \"redis\"\nport = 6379\npassword_file = \"{good_redis}\""),
            &[(1, "up", "=redis PONG"), (2, "up", "=redis PONG")],
        ),
        case(
            "redis-noauth",
            "tcp",
            "check = \"redis\"\nport = 6379",
            &[(1, "down", "=redis: NOAUTH Authentication required.")],
        ),
        case(
            "redis-wrong-password",
            "tcp",
            format!("check = \"redis\"\nport = 6379\npassword_file = \"{bad_redis}\""),
            &[(
                1,
                "down",
                "=redis: WRONGPASS invalid username-password pair or user is disabled.",
            )],
        ),
        case(
            "redis-master",
            "tcp",
            format!(
                "check = \"redis\"\nport = 6379\nrole = \"master\"\npassword_file = \"{good_redis}\""
            ),
            &[
                (1, "up", "=redis master"),
                (2, "down", "=role master expected, server is a replica"),
            ],
        ),
        case(
            "redis-replica",
            "tcp",
            format!(
                "check = \"redis\"\nport = 6379\nrole = \"replica\"\npassword_file = \"{good_redis}\""
            ),
            &[
                (1, "down", "=role replica expected, server is a master"),
                (2, "up", "=redis replica"),
            ],
        ),
        case(
            "redis-refused",
            "tcp",
            format!("check = \"redis\"\nport = {CLOSED}"),
            &[(1, "down", "=connection refused")],
        ),
        case(
            "redis-timeout",
            "tcp",
            format!("check = \"redis\"\nport = {SILENT_TCP}"),
            &[(1, "down", &timeout)],
        ),
        // exec
        case(
            "exec-ok",
            "tcp",
            pg_isready(5432),
            &[(1, "up", "=exit 0"), (2, "up", "=exit 0")],
        ),
        case(
            "exec-down",
            "tcp",
            pg_isready(CLOSED),
            &[(
                1,
                "down",
                &format!("=exit 2: {}:{CLOSED} - no response", baddr(1)),
            )],
        ),
        case(
            "exec-killed",
            "tcp",
            "check = \"exec\"\ncommand = [\"/bin/sleep\", \"5\"]",
            &[(1, "down", &format!("=killed after {TIMEOUT_MS} ms"))],
        ),
        case(
            "exec-no-user",
            "tcp",
            "check = \"exec\"\ncommand = [\"/bin/true\"]\nuser = \"no-such-user-lbtest\"",
            &[(
                1,
                "up",
                "=could not run: no user \"no-such-user-lbtest\" on this host",
            )],
        ),
    ]
}

fn config(paths: &LbdPaths, cases: &[Case], extra: &str) -> String {
    let mut c = paths.daemon_section("");
    for (n, k) in cases.iter().enumerate() {
        c.push_str(&format!(
            "\n[[service]]\nname = \"{}\"\nvip = \"{VIP}\"\nport = {}\nprotocol = \"{}\"\ntable_size = {TABLE_SIZE}\n\n[service.health]\n{}\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = 1\nfall = 1\n",
            k.name,
            1000 + n,
            k.protocol,
            k.health
        ));
        for (i, _, _) in &k.expect {
            c.push_str(&format!(
                "\n[[service.backend]]\naddress = \"{}\"\n",
                baddr(*i)
            ));
        }
    }
    c.push_str(extra);
    c
}

fn rows(lbd: &Lbd, service: Option<&str>) -> Vec<Value> {
    let mut args = vec!["backend", "list"];
    args.extend(service);
    lbd.lbctl_json(&args)
        .expect("lbctl backend list")
        .as_array()
        .expect("an array")
        .clone()
}

fn row<'a>(rows: &'a [Value], service: &str, i: usize) -> Option<&'a Value> {
    let a = baddr(i).to_string();
    rows.iter()
        .find(|r| r["service"] == service && r["address"] == a)
}

/// What does not match yet, one line per backend.
fn mismatches(rows: &[Value], cases: &[Case]) -> Vec<String> {
    let mut out = vec![];
    for k in cases {
        for (i, state, detail) in &k.expect {
            let Some(r) = row(rows, k.name, *i) else {
                out.push(format!("{} backend {i}: not listed", k.name));
                continue;
            };
            let got_state = r["state"].as_str().unwrap_or("?");
            let got = r["last_check"].as_str().unwrap_or("(no check yet)");
            let ok = match detail.strip_prefix('=') {
                Some(exact) => got == exact,
                None => got.starts_with(detail.as_str()),
            };
            if got_state != *state || !ok {
                out.push(format!(
                    "{} backend {i}: {got_state} {got:?}, expected {state} {detail:?}",
                    k.name
                ));
            }
        }
    }
    out
}

fn state(lbd: &Lbd, service: &str, i: usize) -> Option<(String, String)> {
    let rows = rows(lbd, Some(service));
    let r = row(&rows, service, i)?;
    Some((
        r["state"].as_str()?.to_string(),
        r["last_check"].as_str().unwrap_or("").to_string(),
    ))
}

/// Polls until the backend's state is `want`; returns how long that took.
fn time_until(lbd: &Lbd, service: &str, i: usize, want: &str, deadline: Duration) -> Duration {
    let began = Instant::now();
    wait_until(deadline, &format!("{service} backend {i} {want}"), || {
        state(lbd, service, i).is_some_and(|(s, _)| s == want)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {:?}\nlbd log:\n{}",
            state(lbd, service, i),
            lbd.log_tail()
        )
    });
    began.elapsed()
}

#[test]
fn check_kinds_against_real_servers() {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 2,
        clients: 0,
        addresses_per_client: 0,
        vips: vec![],
        start_servers: false,
        backend_side: None,
    })
    .expect("building the namespace topology");
    let mut servers = start_servers(&t);
    let cases = cases(&servers);

    // The flapping service: dnsmasq of backend 2 under a dns check.
    let flap = format!(
        "\n[[service]]\nname = \"dns-flap\"\nvip = \"{VIP}\"\nport = 53\nprotocol = \"udp\"\ntable_size = {TABLE_SIZE}\n\n[service.health]\ncheck = \"dns\"\nquery_name = \"health.example.\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 3\n\n[[service.backend]]\naddress = \"{}\"\n",
        baddr(2)
    );
    let paths = LbdPaths::for_topology(&t);
    let text = config(&paths, &cases, &flap);
    let check = Command::new(lb_tests::lbd::bin("lbd"))
        .args(["--check", "--config"])
        .arg({
            std::fs::write(t.work_dir().join("check.toml"), &text).unwrap();
            t.work_dir().join("check.toml")
        })
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "lbd --check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // A key of another kind: refused by `lbd --check` with its key and line.
    let bad = text.replacen(
        "check = \"redis\"\nport = 6379\n",
        "check = \"redis\"\nport = 6379\nuser = \"lb\"\n",
        1,
    );
    assert_ne!(bad, text);
    let line = bad[..bad.find("user = \"lb\"").unwrap()].lines().count() + 1;
    std::fs::write(t.work_dir().join("bad.toml"), &bad).unwrap();
    let refused = Command::new(lb_tests::lbd::bin("lbd"))
        .args(["--check", "--config"])
        .arg(t.work_dir().join("bad.toml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    let redis_ok = cases.iter().position(|c| c.name == "redis-ok").unwrap();
    let want = format!(
        "line {line}: `service[{redis_ok}].health.user`: is not a key of check = \"redis\": it belongs to check = \"pgsql\" or \"exec\""
    );
    assert!(said.contains(&want), "{said:?} does not say {want:?}");

    let lbd = start_lbd(&t, &text).expect("starting lbd");

    // Every case settles where it should.
    let began = Instant::now();
    let mut last = vec![];
    let settled = wait_until(Duration::from_secs(30), "every case to settle", || {
        last = mismatches(&rows(&lbd, None), &cases);
        last.is_empty()
    });
    assert!(
        settled.is_ok(),
        "not as expected after 30 s:\n  {}\nlbd log:\n{}",
        last.join("\n  "),
        lbd.log_tail()
    );
    eprintln!(
        "{} backends of {} services as expected after {:?}",
        cases.iter().map(|c| c.expect.len()).sum::<usize>(),
        cases.len(),
        began.elapsed()
    );
    // Stable: a second look a few intervals later agrees (no flapping case).
    std::thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    let again = mismatches(&rows(&lbd, None), &cases);
    assert!(again.is_empty(), "changed later:\n  {}", again.join("\n  "));
    // lbd logged the reasons of the transitions.
    let log = lbd.log();
    for reason in [
        "role primary expected, server is a replica",
        "DNS REFUSED",
        &format!("killed after {TIMEOUT_MS} ms"),
    ] {
        assert!(log.contains(reason), "lbd's log does not say {reason:?}");
    }

    // A backend that goes down and comes back: stop backend 2's dnsmasq, then start it again.
    time_until(&lbd, "dns-flap", 2, "up", Duration::from_secs(5));
    let h = servers.dnsmasq_b2.take().unwrap();
    let stopped = Instant::now();
    t.stop(h, Duration::from_secs(5)).unwrap();
    let stop_took = stopped.elapsed();
    let down = time_until(&lbd, "dns-flap", 2, "down", Duration::from_secs(5));
    let (_, detail) = state(&lbd, "dns-flap", 2).unwrap();
    assert_eq!(detail, "port unreachable");
    let restarted = Instant::now();
    start_dnsmasq(&t, 2, &servers.dir);
    let up = time_until(&lbd, "dns-flap", 2, "up", Duration::from_secs(5));
    let (_, detail) = state(&lbd, "dns-flap", 2).unwrap();
    assert_eq!(detail, "DNS NOERROR");
    eprintln!(
        "dns-flap (interval 200 ms, fall 3, rise 2): down {:?} after dnsmasq stopped (stopping it took {:?}), up {:?} after it answered again ({:?} after the restart began)",
        down,
        stop_took,
        up,
        restarted.elapsed()
    );
    // fall = 3 failures at 200 ms (±10%) apart: at least ~2 intervals, at most ~4 and a margin.
    assert!(
        down >= Duration::from_millis(300),
        "down after only {down:?}"
    );
    assert!(down < Duration::from_millis(2000), "down after {down:?}");
    assert!(up < Duration::from_millis(2000), "up after {up:?}");

    add_services_with_checks(&t, &lbd, &servers);
}

/// `lbctl service add --check …`: validated as the file is, written through, and checking.
fn add_services_with_checks(t: &Topology, lbd: &Lbd, servers: &Servers) {
    let pass = format!("{}/redis.pass", servers.dir.display());
    lbd.lbctl_ok(&[
        "service",
        "add",
        "cache",
        "--vip",
        VIP,
        "--port",
        "6379",
        "--protocol",
        "tcp",
        "--table-size",
        "251",
        "--check",
        "redis",
        "--role",
        "replica",
        "--password-file",
        &pass,
        "--interval-ms",
        "300",
        "--timeout-ms",
        "250",
        "--rise",
        "1",
        "--fall",
        "2",
    ]);
    let b1 = baddr(1).to_string();
    let b2 = baddr(2).to_string();
    lbd.lbctl_ok(&["backend", "add", "cache", &b1]);
    lbd.lbctl_ok(&["backend", "add", "cache", &b2]);
    // A new backend of a checked service joins once its first check passes: the replica does,
    // the master never does.
    time_until(lbd, "cache", 2, "up", Duration::from_secs(5));
    wait_until(Duration::from_secs(5), "the master's check", || {
        state(lbd, "cache", 1)
            .is_some_and(|(_, d)| d == "role replica expected, server is a master")
    })
    .unwrap();
    assert_eq!(state(lbd, "cache", 1).unwrap().0, "down");
    // Written through: the file holds the health table with the keys given.
    let file = std::fs::read_to_string(&lbd.paths.config).unwrap();
    let added = &file[file.find("name = \"cache\"").expect("cache written")..];
    for line in [
        "table_size = 251",
        "check = \"redis\"",
        "role = \"replica\"",
        &format!("password_file = \"{pass}\""),
        "interval_ms = 300",
        "timeout_ms = 250",
        "rise = 1",
        "fall = 2",
    ] {
        assert!(added.contains(line), "{line:?} missing from:\n{added}");
    }
    // An exec check; its command after `--`.
    lbd.lbctl_ok(&[
        "service",
        "add",
        "pg-exec",
        "--vip",
        VIP,
        "--port",
        "5432",
        "--protocol",
        "tcp",
        "--check",
        "exec",
        "--user",
        "nobody",
        "--interval-ms",
        "300",
        "--timeout-ms",
        "250",
        "--",
        "/bin/sh",
        "-c",
        "test \"$LB_SERVICE:$LB_BACKEND_PORT\" = pg-exec:5432",
    ]);
    lbd.lbctl_ok(&["backend", "add", "pg-exec", &b1]);
    wait_until(Duration::from_secs(5), "the exec check to pass", || {
        state(lbd, "pg-exec", 1).is_some_and(|(s, d)| s == "up" && d == "exit 0")
    })
    .unwrap();
    let file: toml::Table = std::fs::read_to_string(&lbd.paths.config)
        .unwrap()
        .parse()
        .unwrap();
    let service = file["service"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"].as_str() == Some("pg-exec"))
        .expect("pg-exec written");
    let command: Vec<&str> = service["health"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        command,
        [
            "/bin/sh",
            "-c",
            "test \"$LB_SERVICE:$LB_BACKEND_PORT\" = pg-exec:5432"
        ]
    );
    assert!(
        service["health"].get("user").is_none(),
        "nobody is the default"
    );

    // Refused with the option named, nothing written.
    let before = std::fs::read_to_string(&lbd.paths.config).unwrap();
    for (args, says) in [
        (&["--check", "tcp", "--path", "/x"][..], "--path"),
        (&["--check", "exec"][..], "command"),
        (&["--check", "exec", "--", "check-it"][..], "absolute path"),
        (
            &["--check", "pgsql", "--role", "primary"][..],
            "--password-file",
        ),
        (
            &["--check", "redis", "--role", "primary"][..],
            "\"master\" or \"replica\"",
        ),
        (&["--check", "udp"][..], "--send"),
        (
            &["--check", "dns", "--query-type", "BOGUS"][..],
            "--query-type",
        ),
        (&["--check", "https", "--sni", "192.0.2.1"][..], "--sni"),
        (
            &["--check", "http", "--timeout-ms", "5000"][..],
            "--timeout-ms",
        ),
        (&["--table-size", "100"][..], "not a prime"),
    ] {
        let mut all = vec![
            "service",
            "add",
            "bad",
            "--vip",
            VIP,
            "--port",
            "9",
            "--protocol",
            "tcp",
        ];
        all.extend_from_slice(args);
        let out = lbd.lbctl(&all).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(
            err.contains(says),
            "{args:?}: {err:?} does not say {says:?}"
        );
    }
    assert_eq!(std::fs::read_to_string(&lbd.paths.config).unwrap(), before);
    let _ = t;
}
