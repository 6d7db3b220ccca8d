//! End to end: a small hosting stack behind lb, built once from real Debian servers in
//! namespaces the test creates, and real clients through lb's VIPs.
//!
//! | backend | address        | runs                                    | behind VIP (service)            |
//! |---------|----------------|-----------------------------------------|---------------------------------|
//! | 1, 2    | 192.0.2.11, 12 | gunicorn + a Flask app (`app1`, `app2`) | 203.0.113.20:80/tcp (`app`)     |
//! | 3       | 192.0.2.13     | PostgreSQL 15 primary                   | none (reached directly)         |
//! | 4, 5    | 192.0.2.14, 15 | PostgreSQL 15 streaming replicas        | 203.0.113.21:5432/tcp (`pg-ro`) |
//! | 6       | 192.0.2.16     | Redis                                   | 203.0.113.22:6379/tcp (`redis`) |
//! | 7, 8    | 192.0.2.17, 18 | dnsmasq answering `stack.test`          | 203.0.113.23:53/udp (`dns`)     |
//!
//! Each backend holds only its own service's VIP on `lo` (DSR). The app servers are clients of
//! `pg-ro` themselves: their route to its VIP goes through the LB, so every request to
//! `/account/N` crosses lb twice. Health checks by protocol: `http`, `pgsql` with
//! `role = "replica"`, `redis` with `role = "master"`, `dns`. `pgbench -S` (32 clients),
//! `redis-benchmark`, bursts of DNS queries and HTTP requests run from the client namespaces,
//! through lb and, for comparison, straight to the servers. Then, under load: a replica
//! stopped, the same replica back, a DNS server stopped, a replica promoted to primary. Every
//! figure is printed (`stack:` lines on stderr).
//!
//! Needs root and `cargo xtask setup` (postgresql-15, redis-server, redis-tools, dnsmasq-base,
//! bind9-dnsutils, gunicorn, python3-flask, python3-psycopg2).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_tests::lbd::{Lbd, LbdPaths, start_lbd};
use lb_tests::{
    ProcHandle, StopOnDrop, Topology, TopologyOptions, require_root, retry_until, wait_until,
};

const APP_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const PG_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
const REDIS_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 22);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 23);

/// Backends (1-based, as the topology numbers them).
const APPS: [usize; 2] = [1, 2];
const PRIMARY: usize = 3;
const REPLICAS: [usize; 2] = [4, 5];
const REDIS: usize = 6;
const DNS: [usize; 2] = [7, 8];

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The password of every database role of the test (scram-sha-256 over TCP).
const PG_PASSWORD: &str = "stack-test-password";
/// Health checks: a state change is seen after `fall` (or `rise`) checks `INTERVAL_MS` apart.
const INTERVAL_MS: u64 = 250;
const TIMEOUT_MS: u64 = 250;
const FALL: u64 = 2;
/// How long the DNS clients wait for an answer before trying again, and how many tries they
/// make: the last try of a query whose first was under way at the failure begins after the
/// worst detection time the test accepts (see `DETECTION_SLACK`), so every query is answered.
const DNS_TIMEOUT: Duration = Duration::from_millis(500);
const DNS_TRIES: u32 = 5;
/// The worst detection time the checks allow: `fall` intervals and a timeout, plus the
/// interval a failure may wait for the next check.
const DETECTION_BOUND: Duration = Duration::from_millis(INTERVAL_MS * (FALL + 1) + TIMEOUT_MS);
/// What a detection may take beyond `DETECTION_BOUND` on a busy machine (lbctl's own latency).
const DETECTION_SLACK: Duration = Duration::from_millis(250);
const _: () = assert!(
    DNS_TIMEOUT.as_millis() * (DNS_TRIES as u128 - 2)
        > DETECTION_BOUND.as_millis() + DETECTION_SLACK.as_millis()
);

/// Runs `cmd` in namespace `ns` (only its network namespace entered) and returns its output
/// whatever the exit status; an error when it has not exited within `deadline` (killed then):
/// a client stuck on a connection that went silent fails the test instead of hanging it.
fn run_in(ns: &str, cmd: &Command, deadline: Duration) -> Result<Output> {
    lb_tests::netns::run_output_within(&mut lb_tests::netns::nsenter_command(ns, cmd), deadline)
}

/// Like [`run_in`], and fails (naming the command and its stderr) unless it exits 0; returns
/// stdout.
fn run_ok_in(ns: &str, cmd: &Command, deadline: Duration) -> Result<String> {
    let out = run_in(ns, cmd, deadline)?;
    if !out.status.success() {
        bail!(
            "`{}` in {ns} failed ({}): {}",
            lb_tests::netns::describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// `stack:` lines are the figures of the run, printed as they come.
macro_rules! figure {
    ($($arg:tt)*) => { eprintln!("stack: {}", format!($($arg)*)) };
}

// ---- the stack ---------------------------------------------------------------------------------

struct Stack<'t> {
    t: &'t Topology,
    lbd: Lbd<'t>,
    /// The postgres process of each of PRIMARY and REPLICAS (index = backend - PRIMARY).
    postgres: Mutex<[Option<ProcHandle>; 3]>,
    dnsmasq: Mutex<[Option<ProcHandle>; 2]>,
}

fn topology() -> Topology {
    require_root();
    let t = Topology::new(TopologyOptions {
        backends: 8,
        clients: 2,
        addresses_per_client: 16,
        vips: [APP_VIP, PG_VIP, REDIS_VIP, DNS_VIP]
            .into_iter()
            .map(ip)
            .collect(),
        start_servers: false,
        backend_side: None,
    })
    .expect("building the namespace topology");
    // Each backend keeps only its own VIP on lo; the app servers reach pg-ro through the LB.
    for b in 1..=8 {
        let own = match b {
            1 | 2 => Some(APP_VIP),
            4 | 5 => Some(PG_VIP),
            6 => Some(REDIS_VIP),
            7 | 8 => Some(DNS_VIP),
            _ => None,
        };
        let mut batch = String::new();
        for v in [APP_VIP, PG_VIP, REDIS_VIP, DNS_VIP] {
            if Some(v) != own {
                batch.push_str(&format!("addr del {v}/32 dev lo\n"));
            }
        }
        if APPS.contains(&b) {
            batch.push_str(&format!("route add {PG_VIP}/32 via {}\n", t.lb_addr()));
        }
        lb_tests::topology::ip_batch(t.backend_ns(b), &batch).expect("backend VIPs");
    }
    t
}

fn health(check: &str, extra: &str) -> String {
    format!(
        "[service.health]\ncheck = \"{check}\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = 2\nfall = {FALL}\n{extra}"
    )
}

fn backends(list: &[usize], t: &Topology) -> String {
    list.iter()
        .map(|&b| {
            format!(
                "\n[[service.backend]]\naddress = \"{}\"\n",
                t.backend_addr(b)
            )
        })
        .collect()
}

fn lbd_config(t: &Topology, paths: &LbdPaths) -> String {
    let mut c = paths.daemon_section("");
    c.push_str(&format!(
        r#"
[[service]]
name = "app"
vip = "{APP_VIP}"
port = 80
protocol = "tcp"
{app_health}{app_backends}
# Connections to a read-only pool spread over the replicas whoever the client is.
[[service]]
name = "pg-ro"
vip = "{PG_VIP}"
port = 5432
protocol = "tcp"
hash = "5-tuple"
{pg_health}{pg_backends}
[[service]]
name = "redis"
vip = "{REDIS_VIP}"
port = 6379
protocol = "tcp"
{redis_health}{redis_backends}
# Every query (a new source port) may go to either server.
[[service]]
name = "dns"
vip = "{DNS_VIP}"
port = 53
protocol = "udp"
hash = "5-tuple"
{dns_health}{dns_backends}"#,
        app_health = health("http", "path = \"/healthz\"\n"),
        app_backends = backends(&APPS, t),
        // A promoted replica must leave the read-only pool: the check logs in and asks.
        pg_health = health(
            "pgsql",
            &format!(
                "user = \"lb\"\nrole = \"replica\"\npassword_file = \"{}\"\n",
                pg_password_file(t).display()
            )
        ),
        pg_backends = backends(&REPLICAS, t),
        redis_health = health("redis", "role = \"master\"\n"),
        redis_backends = backends(&[REDIS], t),
        dns_health = health(
            "dns",
            "query_name = \"www.stack.test.\"\nquery_type = \"A\"\n"
        ),
        dns_backends = backends(&DNS, t),
    ));
    c
}

/// The password of the health checks' database role `lb` (mode 0600, lbd reads it).
fn pg_password_file(t: &Topology) -> PathBuf {
    t.work_dir().join("lb-pgsql.password")
}

impl<'t> Stack<'t> {
    fn build(t: &'t Topology) -> Stack<'t> {
        let started = Instant::now();
        let postgres = Mutex::new([None, None, None]);
        let dnsmasq = Mutex::new([None, None]);
        // lbd first, as on a host whose balancer runs before the services behind it: each
        // backend is down until its server answers its checks.
        let paths = LbdPaths::for_topology(t);
        let secret = pg_password_file(t);
        std::fs::write(&secret, format!("{PG_PASSWORD}\n")).expect("writing the password file");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the password file");
        let lbd = start_lbd(t, &lbd_config(t, &paths)).expect("starting lbd");
        let s = Stack {
            t,
            lbd,
            postgres,
            dnsmasq,
        };
        s.start_primary().expect("PostgreSQL primary");
        s.init_bench().expect("pgbench tables on the primary");
        for r in REPLICAS {
            s.make_replica(r).expect("PostgreSQL replica");
        }
        s.start_redis().expect("redis");
        for d in DNS {
            s.start_dnsmasq(d).expect("dnsmasq");
        }
        s.write_app().expect("writing the Flask app");
        for a in APPS {
            s.start_app(a).expect("gunicorn");
        }
        s.wait_up("app", &APPS);
        s.wait_up("pg-ro", &REPLICAS);
        s.wait_up("redis", &[REDIS]);
        s.wait_up("dns", &DNS);
        figure!("stack built in {:.1} s", started.elapsed().as_secs_f64());
        s
    }

    fn addr(&self, b: usize) -> IpAddr {
        self.t.backend_addr(b)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.t.work_dir().join("stack").join(name)
    }

    // ---- PostgreSQL ----

    fn pg_dir(&self, b: usize) -> PathBuf {
        self.dir(&format!("pg{b}"))
    }

    fn pg_name(b: usize) -> String {
        if b == PRIMARY {
            "primary".into()
        } else {
            format!("replica{}", b - PRIMARY)
        }
    }

    /// A directory owned by postgres, mode 0700.
    fn postgres_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        lb_tests::netns::run_checked(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir),
            None,
        )?;
        lb_tests::netns::run_checked(Command::new("chmod").arg("0700").arg(dir), None)?;
        Ok(())
    }

    /// Runs `PG_BIN/prog args` as user postgres in backend `b`'s namespace; fails unless it
    /// exits 0.
    fn as_postgres(&self, b: usize, prog: &str, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(Path::new(PG_BIN).join(prog))
            .args(args)
            .env("PGPASSWORD", PG_PASSWORD)
            .current_dir(self.t.work_dir());
        let out = run_in(self.t.backend_ns(b), &cmd, Duration::from_secs(120))?;
        if !out.status.success() {
            bail!(
                "{prog} {args:?} as postgres on backend {b} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `postgresql.conf` lines of instance `b` (appended: later lines win).
    fn pg_conf(&self, b: usize) -> String {
        format!(
            "\n# lb-tests stack\nlisten_addresses = '*'\nport = 5432\nunix_socket_directories = '{sock}'\ncluster_name = '{name}'\nmax_connections = 100\nshared_buffers = 32MB\nfsync = off\nsynchronous_commit = off\nlog_min_messages = warning\n",
            sock = self.pg_dir(b).join("sock").display(),
            name = Self::pg_name(b),
        )
    }

    fn append(path: &Path, text: &str) -> Result<()> {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("appending to {}", path.display()))
    }

    /// Starts postgres of backend `b` (as user postgres) and returns at once.
    fn spawn_postgres_process(&self, b: usize) -> Result<ProcHandle> {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(Path::new(PG_BIN).join("postgres"))
            .arg("-D")
            .arg(self.pg_dir(b).join("data"))
            .current_dir(self.t.work_dir());
        let h = self.t.spawn_nsenter(self.t.backend_ns(b), &cmd)?;
        self.postgres.lock().unwrap()[b - PRIMARY] = Some(h);
        Ok(h)
    }

    /// Starts postgres of backend `b` and waits until it answers over TCP.
    fn spawn_postgres(&self, b: usize) -> Result<()> {
        let h = self.spawn_postgres_process(b)?;
        let addr = self.addr(b);
        retry_until(
            Duration::from_secs(30),
            &format!("{} to accept connections", Self::pg_name(b)),
            || {
                if let Ok(Some(st)) = self.t.try_wait(h) {
                    return Ok(Err(anyhow!(
                        "postgres on backend {b} exited ({st}): {}",
                        self.t.log_of(h)
                    )));
                }
                self.psql(self.t.backend_ns(b), addr, "bench", "SELECT 1")
                    .map(|_| Ok(()))
            },
        )?
    }

    /// `psql` as `user` from namespace `ns` to `host`, database `bench`: the rows, `|`-separated.
    fn psql(&self, ns: &str, host: IpAddr, user: &str, sql: &str) -> Result<String> {
        let mut cmd = Command::new(Path::new(PG_BIN).join("psql"));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host={host} port=5432 dbname=bench user={user} connect_timeout=3"
            ))
            .args(["-c", sql])
            .env("PGPASSWORD", PG_PASSWORD);
        let out = run_in(ns, &cmd, Duration::from_secs(30))?;
        if !out.status.success() {
            bail!(
                "psql -c {sql:?} to {host} as {user}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn start_primary(&self) -> Result<()> {
        let dir = self.pg_dir(PRIMARY);
        self.postgres_dir(&dir)?;
        self.postgres_dir(&dir.join("sock"))?;
        let data = dir.join("data");
        self.as_postgres(
            PRIMARY,
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "--locale=C",
                "--encoding=UTF8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-U",
                "postgres",
            ],
        )?;
        Self::append(&data.join("postgresql.conf"), &self.pg_conf(PRIMARY))?;
        // The whole file: local (socket in a 0700 folder) trusted, every TCP client with a
        // password.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host replication replicator 192.0.2.0/24 scram-sha-256\n\
             host all all 192.0.2.0/24 scram-sha-256\n\
             host all all 198.51.100.0/24 scram-sha-256\n",
        )
        .context("writing pg_hba.conf")?;
        // The roles and the database, made over the socket (as postgres, trusted there).
        let b = PRIMARY;
        let h = self.spawn_postgres_process(b)?;
        let sock = self.pg_dir(b).join("sock");
        let sql = format!(
            "CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '{PG_PASSWORD}';\n\
             CREATE ROLE bench LOGIN PASSWORD '{PG_PASSWORD}';\n\
             CREATE ROLE app LOGIN PASSWORD '{PG_PASSWORD}';\n\
             CREATE ROLE lb LOGIN PASSWORD '{PG_PASSWORD}';\n\
             CREATE DATABASE bench OWNER bench;\n"
        );
        retry_until(Duration::from_secs(30), "the primary's socket", || {
            if let Ok(Some(st)) = self.t.try_wait(h) {
                return Ok(Err(anyhow!(
                    "postgres on backend {b} exited ({st}): {}",
                    self.t.log_of(h)
                )));
            }
            self.as_postgres(
                b,
                "psql",
                &[
                    "-X",
                    "-q",
                    "-h",
                    &sock.to_string_lossy(),
                    "-d",
                    "postgres",
                    "-c",
                    "SELECT 1",
                ],
            )
            .map(|_| Ok(()))
        })??;
        for stmt in sql.lines() {
            self.as_postgres(
                b,
                "psql",
                &[
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    &sock.to_string_lossy(),
                    "-d",
                    "postgres",
                    "-c",
                    stmt,
                ],
            )?;
        }
        self.psql(self.t.backend_ns(b), self.addr(b), "bench", "SELECT 1")?;
        Ok(())
    }

    fn init_bench(&self) -> Result<()> {
        let started = Instant::now();
        let mut cmd = Command::new(Path::new(PG_BIN).join("pgbench"));
        cmd.args(["-i", "-s", "1", "-q", "-h"])
            .arg(self.addr(PRIMARY).to_string())
            .args(["-U", "bench", "bench"])
            .env("PGPASSWORD", PG_PASSWORD);
        let out = run_in(self.t.client_ns(1), &cmd, Duration::from_secs(120))?;
        if !out.status.success() {
            bail!(
                "pgbench -i on the primary: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The app role reads, the health-check role needs nothing.
        let ns = self.t.client_ns(1);
        self.psql(
            ns,
            self.addr(PRIMARY),
            "bench",
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO app",
        )?;
        figure!(
            "pgbench -i -s 1 on the primary (100000 accounts) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// `pg_basebackup -R` from the primary into backend `b`, then starts it as a streaming
    /// replica.
    fn make_replica(&self, b: usize) -> Result<()> {
        let started = Instant::now();
        let dir = self.pg_dir(b);
        self.postgres_dir(&dir)?;
        self.postgres_dir(&dir.join("sock"))?;
        let data = dir.join("data");
        let conn = format!(
            "host={} port=5432 user=replicator password={PG_PASSWORD}",
            self.addr(PRIMARY)
        );
        self.as_postgres(
            b,
            "pg_basebackup",
            &[
                "-d",
                &conn,
                "-D",
                &data.to_string_lossy(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        )?;
        Self::append(&data.join("postgresql.conf"), &self.pg_conf(b))?;
        self.spawn_postgres(b)?;
        let ns = self.t.backend_ns(b);
        let rec = self.psql(ns, self.addr(b), "bench", "SELECT pg_is_in_recovery()")?;
        if rec != "t" {
            bail!("{} is not in recovery: {rec}", Self::pg_name(b));
        }
        figure!(
            "{} made by pg_basebackup -R and streaming in {:.1} s",
            Self::pg_name(b),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Writes a row on the primary and waits until every running replica has it.
    fn check_streaming(&self, replicas: &[usize]) -> Result<()> {
        let ns = self.t.client_ns(1);
        let marker: u64 = rand::random::<u32>().into();
        self.psql(
            ns,
            self.addr(PRIMARY),
            "bench",
            &format!(
                "CREATE TABLE IF NOT EXISTS stack_marker (v bigint); INSERT INTO stack_marker VALUES ({marker})"
            ),
        )?;
        for &r in replicas {
            let started = Instant::now();
            retry_until(
                Duration::from_secs(10),
                &format!("{} to replay the marker", Self::pg_name(r)),
                || {
                    let n = self.psql(
                        ns,
                        self.addr(r),
                        "bench",
                        &format!("SELECT count(*) FROM stack_marker WHERE v = {marker}"),
                    )?;
                    if n == "1" { Ok(()) } else { bail!("{n} rows") }
                },
            )?;
            figure!(
                "a row written on the primary was on {} {:.0} ms later",
                Self::pg_name(r),
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
        Ok(())
    }

    /// Stops postgres of backend `b` with a fast shutdown (SIGINT: sessions are terminated,
    /// the listening socket closed), as an operator's `pg_ctl stop -m fast`.
    fn stop_postgres(&self, b: usize) -> Result<()> {
        let h = self.postgres.lock().unwrap()[b - PRIMARY]
            .take()
            .ok_or_else(|| anyhow!("postgres on backend {b} is not running"))?;
        self.t.signal(h, libc::SIGINT)?;
        wait_until(
            Duration::from_secs(15),
            &format!("postgres on backend {b} to stop"),
            || !self.t.is_running(h),
        )
    }

    // ---- Redis, dnsmasq, the app ----

    fn start_redis(&self) -> Result<()> {
        let dir = self.dir("redis");
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
        ])
        .arg(&dir);
        let h = self.t.spawn_nsenter(self.t.backend_ns(REDIS), &cmd)?;
        let addr = self.addr(REDIS);
        retry_until(Duration::from_secs(10), "redis to answer PING", || {
            if let Ok(Some(st)) = self.t.try_wait(h) {
                return Ok(Err(anyhow!("redis exited ({st}): {}", self.t.log_of(h))));
            }
            let out = self.redis_cli(self.t.backend_ns(REDIS), addr, &["PING"])?;
            if out == "PONG" {
                Ok(Ok(()))
            } else {
                bail!("PING: {out}")
            }
        })?
    }

    fn redis_cli(&self, ns: &str, host: IpAddr, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("-h")
            .arg(host.to_string())
            .args(["-p", "6379"])
            .args(args);
        let out = run_ok_in(ns, &cmd, Duration::from_secs(30))?;
        Ok(out.trim().to_string())
    }

    fn start_dnsmasq(&self, b: usize) -> Result<()> {
        let n = b - DNS[0] + 1;
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--pid-file=",
            "--user=nobody",
            "--port=53",
            "--log-facility=-",
            "--local=/stack.test/",
            "--host-record=www.stack.test,192.0.2.80",
            "--host-record=db.stack.test,203.0.113.21",
            // Which server answered: a TXT record of its own.
        ])
        .arg(format!("--txt-record=who.stack.test,dns{n}"));
        let h = self.t.spawn_nsenter(self.t.backend_ns(b), &cmd)?;
        self.dnsmasq.lock().unwrap()[n - 1] = Some(h);
        let server = SocketAddr::new(self.addr(b), 53);
        retry_until(
            Duration::from_secs(10),
            &format!("dnsmasq dns{n} to answer"),
            || {
                if let Ok(Some(st)) = self.t.try_wait(h) {
                    return Ok(Err(anyhow!("dnsmasq exited ({st}): {}", self.t.log_of(h))));
                }
                let who = dns_who(
                    self.t,
                    self.t.backend_ns(b),
                    server,
                    Duration::from_millis(300),
                )?;
                Ok(Ok(who))
            },
        )??;
        Ok(())
    }

    fn stop_dnsmasq(&self, b: usize) -> Result<()> {
        let h = self.dnsmasq.lock().unwrap()[b - DNS[0]]
            .take()
            .ok_or_else(|| anyhow!("dnsmasq on backend {b} is not running"))?;
        self.t.stop(h, Duration::from_secs(5))?;
        Ok(())
    }

    fn write_app(&self) -> Result<()> {
        let dir = self.dir("app");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("stackapp.py"), APP_PY).context("writing stackapp.py")?;
        Ok(())
    }

    fn start_app(&self, b: usize) -> Result<()> {
        let dir = self.dir("app");
        let mut cmd = Command::new("/usr/bin/gunicorn");
        cmd.arg("--chdir")
            .arg(&dir)
            .args([
                "--bind",
                "0.0.0.0:80",
                "--workers",
                "2",
                "--user",
                "65534",
                "--group",
                "65534",
                "--worker-tmp-dir",
                "/dev/shm",
                "--access-logfile",
                "-",
                "stackapp:app",
            ])
            .env("STACK_APP_NAME", format!("app{b}"))
            .env(
                "STACK_DSN",
                format!(
                    "host={PG_VIP} port=5432 dbname=bench user=app password={PG_PASSWORD} connect_timeout=3"
                ),
            );
        let h = self.t.spawn_nsenter(self.t.backend_ns(b), &cmd)?;
        let dst = SocketAddr::new(self.addr(b), 80);
        let ns = self.t.backend_ns(b);
        retry_until(
            Duration::from_secs(20),
            &format!("gunicorn app{b} to answer /healthz"),
            || {
                if let Ok(Some(st)) = self.t.try_wait(h) {
                    return Ok(Err(anyhow!("gunicorn exited ({st}): {}", self.t.log_of(h))));
                }
                let r = self.t.http_get_with(
                    ns,
                    None,
                    dst,
                    "/healthz",
                    Duration::from_millis(500),
                    Duration::from_secs(2),
                )?;
                if r.status == 200 {
                    Ok(Ok(()))
                } else {
                    bail!("status {}", r.status)
                }
            },
        )?
    }

    // ---- lbctl ----

    /// (address, state, health detail) of each backend of `service`.
    fn states(&self, service: &str) -> Result<Vec<(IpAddr, String, String)>> {
        let list = self.lbd.lbctl_json(&["backend", "list", service])?;
        let rows = list
            .as_array()
            .ok_or_else(|| anyhow!("backend list is not an array: {list}"))?;
        rows.iter()
            .map(|r| {
                let addr = r["address"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| anyhow!("no address in {r}"))?;
                Ok((
                    addr,
                    r["state"].as_str().unwrap_or_default().to_string(),
                    r["last_check"].as_str().unwrap_or_default().to_string(),
                ))
            })
            .collect()
    }

    fn state_of(&self, service: &str, b: usize) -> Result<String> {
        let addr = self.addr(b);
        self.states(service)?
            .into_iter()
            .find(|(a, _, _)| *a == addr)
            .map(|(_, s, _)| s)
            .ok_or_else(|| anyhow!("{addr} is not a backend of {service}"))
    }

    /// Waits until every backend `bs` of `service` is up by a check that passed (a backend
    /// starts up before lbd has checked it).
    fn wait_up(&self, service: &str, bs: &[usize]) {
        let mut last = serde_json::Value::Null;
        let ok = wait_until(
            Duration::from_secs(30),
            &format!("{service}'s backends {bs:?} up by their checks"),
            || {
                last = self
                    .lbd
                    .lbctl_json(&["backend", "list", service])
                    .unwrap_or_default();
                bs.iter().all(|&b| {
                    let addr = self.addr(b).to_string();
                    last.as_array().into_iter().flatten().any(|r| {
                        r["address"] == addr.as_str()
                            && r["state"] == "up"
                            && r["last_check_ok"] == true
                    })
                })
            },
        );
        if let Err(e) = ok {
            panic!("{e:#}; last seen {last}\nlbd log:\n{}", self.lbd.log_tail());
        }
    }

    /// Polls `service`'s backend `b` every few ms until its state is `want`; returns when it
    /// was first seen so.
    fn wait_state_since(&self, service: &str, b: usize, want: &str, deadline: Duration) -> Instant {
        let mut last;
        let start = Instant::now();
        loop {
            match self.state_of(service, b) {
                Ok(s) if s == want => return Instant::now(),
                Ok(s) => last = s,
                Err(e) => last = format!("{e:#}"),
            }
            if start.elapsed() > deadline {
                panic!(
                    "{service}: backend {} not {want} after {deadline:?} (last: {last})\nlbd log:\n{}",
                    self.addr(b),
                    self.lbd.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn backend_packets(&self, service: &str) -> BTreeMap<String, u64> {
        let stats = self
            .lbd
            .lbctl_json(&["stats", service])
            .expect("lbctl stats");
        let mut out = BTreeMap::new();
        for s in stats["services"].as_array().into_iter().flatten() {
            for b in s["backends"].as_array().into_iter().flatten() {
                out.insert(
                    b["address"].as_str().unwrap_or_default().to_string(),
                    b["packets"].as_u64().unwrap_or_default(),
                );
            }
        }
        out
    }
}

/// The Flask app: `/healthz`, and `/account/N`, which reads account N through the read-only
/// VIP (one connection per request) and says which app and which database server answered.
const APP_PY: &str = r#"import os

import psycopg2
from flask import Flask, jsonify

app = Flask(__name__)
NAME = os.environ["STACK_APP_NAME"]
DSN = os.environ["STACK_DSN"]


@app.get("/healthz")
def healthz():
    return "ok\n"


@app.get("/account/<int:aid>")
def account(aid):
    conn = psycopg2.connect(DSN)
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT abalance, current_setting('cluster_name'), pg_is_in_recovery()"
            " FROM pgbench_accounts WHERE aid = %s",
            (aid,),
        )
        row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        return jsonify(app=NAME, error="no such account"), 404
    return jsonify(app=NAME, account=aid, balance=row[0], db=row[1], in_recovery=row[2])
"#;

// ---- DNS ---------------------------------------------------------------------------------------

/// A DNS query for `name` (TXT, class IN, recursion desired) with id `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 16, 0, 1]);
    q
}

/// The first TXT string of the answer to query `id`, or why there is none.
fn dns_txt_answer(id: u16, resp: &[u8]) -> Result<String> {
    if resp.len() < 12 || u16::from_be_bytes([resp[0], resp[1]]) != id {
        bail!("not an answer to query {id}");
    }
    let rcode = resp[3] & 0x0f;
    if rcode != 0 {
        bail!("rcode {rcode}");
    }
    let ancount = u16::from_be_bytes([resp[6], resp[7]]);
    if ancount == 0 {
        bail!("no answer");
    }
    // Skip the question: a name (labels, or a pointer) then type and class.
    let mut i = 12;
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let l = *resp.get(i)? as usize;
            if l == 0 {
                return Some(i + 1);
            }
            if l & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            i += 1 + l;
        }
    };
    i = skip_name(i).ok_or_else(|| anyhow!("short question"))? + 4;
    i = skip_name(i).ok_or_else(|| anyhow!("short answer"))?;
    let rr = resp.get(i..i + 10).ok_or_else(|| anyhow!("short answer"))?;
    if u16::from_be_bytes([rr[0], rr[1]]) != 16 {
        bail!("answer of type {}", u16::from_be_bytes([rr[0], rr[1]]));
    }
    let rdata = resp.get(i + 10..).ok_or_else(|| anyhow!("no rdata"))?;
    let len = *rdata.first().ok_or_else(|| anyhow!("empty TXT"))? as usize;
    let text = rdata.get(1..1 + len).ok_or_else(|| anyhow!("short TXT"))?;
    Ok(String::from_utf8_lossy(text).into_owned())
}

/// One TXT query for `who.stack.test` to `server` from a fresh socket (a new source port),
/// inside the calling thread's namespace: the name of the server that answered.
fn dns_who_here(server: SocketAddr, timeout: Duration) -> Result<String> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
    sock.connect(server).context("connecting the UDP socket")?;
    sock.set_read_timeout(Some(timeout))?;
    let id: u16 = rand::random();
    sock.send(&dns_query(id, "who.stack.test"))
        .context("sending the query")?;
    let mut buf = [0u8; 512];
    let start = Instant::now();
    loop {
        // ECONNREFUSED here is the ICMP port unreachable of a server that is gone.
        let n = sock.recv(&mut buf).context("receiving the answer")?;
        match dns_txt_answer(id, &buf[..n]) {
            Ok(who) => return Ok(who),
            Err(e) if start.elapsed() >= timeout => return Err(e),
            Err(_) => continue,
        }
    }
}

fn dns_who(t: &Topology, ns: &str, server: SocketAddr, timeout: Duration) -> Result<String> {
    t.in_netns(ns, || dns_who_here(server, timeout))
}

/// The outcome of a burst of DNS queries, each tried up to `tries` times from a new socket.
#[derive(Debug, Default)]
struct DnsBurst {
    queries: usize,
    /// Queries answered, per server.
    answered: BTreeMap<String, usize>,
    /// Queries not answered after every try.
    unanswered: usize,
    /// Tries that failed (refused or timed out), with when each began (since the epoch).
    failed_tries: Vec<(Duration, String)>,
    elapsed: Duration,
}

/// DNS clients in namespace `ns`: `threads` threads, each sending TXT queries to `server` one
/// after the other, each query tried up to `tries` times (`DNS_TIMEOUT` each, a new socket and
/// so a new source port each time), as a stub resolver does.
struct DnsLoad<'a> {
    ns: &'a str,
    server: SocketAddr,
    threads: usize,
    tries: u32,
    epoch: Instant,
    stop: AtomicBool,
    /// Queries answered so far.
    answered: AtomicUsize,
}

impl<'a> DnsLoad<'a> {
    fn new(ns: &'a str, server: SocketAddr, threads: usize, tries: u32) -> DnsLoad<'a> {
        DnsLoad {
            ns,
            server,
            threads,
            tries,
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            answered: AtomicUsize::new(0),
        }
    }

    /// Sends `count` queries in all, or, when `count` is 0, queries until `stop` is set.
    fn run(&self, count: usize) -> DnsBurst {
        let start = Instant::now();
        let sent = AtomicUsize::new(0);
        let results: Vec<DnsBurst> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.threads)
                .map(|_| {
                    let sent = &sent;
                    s.spawn(move || {
                        lb_tests::in_netns(self.ns, || Ok(self.client(count, sent)))
                            .expect("DNS client thread")
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all = DnsBurst {
            elapsed: start.elapsed(),
            ..Default::default()
        };
        for r in results {
            all.queries += r.queries;
            all.unanswered += r.unanswered;
            all.failed_tries.extend(r.failed_tries);
            for (k, v) in r.answered {
                *all.answered.entry(k).or_default() += v;
            }
        }
        all.failed_tries.sort_by_key(|(t, _)| *t);
        all
    }

    /// One client thread (inside the namespace).
    fn client(&self, count: usize, sent: &AtomicUsize) -> DnsBurst {
        let mut r = DnsBurst::default();
        loop {
            if count > 0 {
                if sent.fetch_add(1, Ordering::Relaxed) >= count {
                    break;
                }
            } else if self.stop.load(Ordering::Relaxed) {
                break;
            }
            r.queries += 1;
            let mut ok = false;
            for _ in 0..self.tries {
                let began = self.epoch.elapsed();
                match dns_who_here(self.server, DNS_TIMEOUT) {
                    Ok(who) => {
                        *r.answered.entry(who).or_default() += 1;
                        self.answered.fetch_add(1, Ordering::Relaxed);
                        ok = true;
                        break;
                    }
                    Err(e) => {
                        r.failed_tries.push((began, format!("{e:#}")));
                        // A resolver's retransmission timer: the next try when the timeout
                        // has passed, also after a refusal (an ICMP port unreachable).
                        let next = began + DNS_TIMEOUT;
                        if let Some(wait) = next.checked_sub(self.epoch.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            }
            if !ok {
                r.unanswered += 1;
            }
        }
        r
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Waits until `n` more queries than `from` were answered.
    fn wait_answered(&self, from: usize, n: usize) {
        wait_until(Duration::from_secs(20), &format!("{n} DNS answers"), || {
            self.answered() >= from + n
        })
        .unwrap();
    }
}

// ---- pgbench -----------------------------------------------------------------------------------

/// One `pgbench -S` run.
#[derive(Debug, Clone)]
struct BenchRun {
    /// When it started and ended, since the loop's epoch.
    start: Duration,
    end: Duration,
    exit: Option<i32>,
    processed: u64,
    tps: Option<f64>,
    /// Clients aborted during the run (their connection broke).
    aborted: usize,
    /// The run could not start: a client could not connect (pgbench then gives up at once).
    connect_failed: bool,
    stderr: String,
}

impl BenchRun {
    fn failed(&self) -> bool {
        self.connect_failed || self.aborted > 0 || self.exit != Some(0)
    }
}

/// `pgbench -S` with `clients` clients on `threads` threads for `seconds`.
fn pgbench_cmd(host: IpAddr, clients: usize, threads: usize, seconds: u64) -> Command {
    let mut cmd = Command::new(Path::new(PG_BIN).join("pgbench"));
    cmd.args(["-S", "-n", "-c"])
        .arg(clients.to_string())
        .arg("-j")
        .arg(threads.to_string())
        .arg("-T")
        .arg(seconds.to_string())
        .arg("-h")
        .arg(host.to_string())
        .args(["-U", "bench", "bench"])
        .env("PGPASSWORD", PG_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "3");
    cmd
}

fn parse_run(out: &Output, start: Duration, end: Duration) -> BenchRun {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value_after = |key: &str| -> Option<&str> {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(str::trim)
    };
    let processed = value_after("number of transactions actually processed:")
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let tps = value_after("tps =").and_then(|v| v.split_whitespace().next()?.parse().ok());
    let aborted = stderr
        .lines()
        .filter(|l| l.contains("aborted in command"))
        .count();
    let connect_failed = stderr.contains("could not create connection")
        || (processed == 0 && stderr.contains("connection to server"));
    BenchRun {
        start,
        end,
        exit: out.status.code(),
        processed,
        tps,
        aborted,
        connect_failed,
        stderr,
    }
}

/// `pgbench -S` from client 1 to `host`, `clients` clients, for `seconds`: its TPS (fails
/// unless every client finished).
fn pgbench_tps(t: &Topology, host: IpAddr, clients: usize, threads: usize, seconds: u64) -> f64 {
    let out = run_in(
        t.client_ns(1),
        &pgbench_cmd(host, clients, threads, seconds),
        Duration::from_secs(seconds + 60),
    )
    .expect("running pgbench");
    let run = parse_run(&out, Duration::ZERO, Duration::ZERO);
    assert!(
        !run.failed() && run.processed > 0,
        "pgbench -S to {host}: {run:?}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    run.tps.expect("a tps line")
}

/// Load on the read-only VIP while a scenario runs: `pgbench -S` (32 clients, 1 s) again and
/// again from client 1, as an application whose pool reconnects after an error does (after a
/// run that could not start it waits 50 ms, its retry pause, before the next); and new
/// connections one after the other from client 2 (`psql`, a new source port each), as an
/// application opening connections on demand.
struct PgLoad {
    epoch: Instant,
    stop: AtomicBool,
    runs: Mutex<Vec<BenchRun>>,
    probes: Mutex<Vec<Probe>>,
}

impl PgLoad {
    /// Runs `scenario` under the load; returns its result, every pgbench run and every probe.
    fn during<R>(s: &Stack, scenario: impl FnOnce(&PgLoad) -> R) -> (R, Vec<BenchRun>, Vec<Probe>) {
        let load = PgLoad {
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            runs: Mutex::new(Vec::new()),
            probes: Mutex::new(Vec::new()),
        };
        let r = std::thread::scope(|sc| {
            let _stop = StopOnDrop(&load.stop);
            sc.spawn(|| load.bench(s.t));
            sc.spawn(|| load.probe(s));
            scenario(&load)
        });
        let runs = std::mem::take(&mut *load.runs.lock().unwrap());
        let probes = std::mem::take(&mut *load.probes.lock().unwrap());
        (r, runs, probes)
    }

    fn bench(&self, t: &Topology) {
        while !self.stop.load(Ordering::Relaxed) {
            let start = self.now();
            let out = run_in(
                t.client_ns(1),
                &pgbench_cmd(ip(PG_VIP), 32, 2, 1),
                Duration::from_secs(60),
            )
            .expect("running pgbench");
            let run = parse_run(&out, start, self.now());
            let pause = run.connect_failed;
            self.runs.lock().unwrap().push(run);
            if pause {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn probe(&self, s: &Stack) {
        while !self.stop.load(Ordering::Relaxed) {
            let start = self.now();
            let result = s
                .psql(
                    s.t.client_ns(2),
                    ip(PG_VIP),
                    "bench",
                    "SELECT current_setting('cluster_name')",
                )
                .map_err(|e| format!("{e:#}"));
            self.probes.lock().unwrap().push(Probe {
                start,
                end: self.now(),
                result,
            });
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Waits until `runs` pgbench runs and `probes` new connections begun after `after` have
    /// ended.
    fn wait_after(&self, after: Duration, runs: usize, probes: usize) {
        wait_until(
            Duration::from_secs(30),
            &format!("{runs} pgbench runs and {probes} new connections begun after {after:?}"),
            || {
                self.runs
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|r| r.start > after)
                    .count()
                    >= runs
                    && self
                        .probes
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|p| p.start > after)
                        .count()
                        >= probes
            },
        )
        .unwrap();
    }
}

fn print_runs(what: &str, runs: &[BenchRun], event: Duration) {
    for r in runs {
        figure!(
            "{what}: run {:+7.3}..{:+7.3} s: exit {:?}, {} transactions, tps {}, aborted clients {}, {}{}",
            r.start.as_secs_f64() - event.as_secs_f64(),
            r.end.as_secs_f64() - event.as_secs_f64(),
            r.exit,
            r.processed,
            r.tps.map_or("-".into(), |t| format!("{t:.0}")),
            r.aborted,
            if r.connect_failed {
                "could not connect"
            } else {
                "started"
            },
            r.stderr
                .lines()
                .find(|l| l.contains("error"))
                .map(|l| format!(" ({})", l.trim()))
                .unwrap_or_default()
        );
    }
}

/// One new connection of a `PgLoad`: when it began and ended (since the epoch), and the
/// server that answered or why it failed.
#[derive(Debug)]
struct Probe {
    start: Duration,
    end: Duration,
    result: std::result::Result<String, String>,
}

impl Probe {
    /// Whether it was under way at some moment between `from` and `to`.
    fn overlaps(&self, from: Duration, to: Duration) -> bool {
        self.end >= from && self.start <= to
    }
}

// ---- redis-benchmark ---------------------------------------------------------------------------

/// `redis-benchmark` (SET and GET, 50 clients, 100000 requests each) from client 2 to `host`:
/// requests per second of each test.
fn redis_benchmark(t: &Topology, host: IpAddr) -> BTreeMap<String, f64> {
    let mut cmd = Command::new("redis-benchmark");
    cmd.arg("-h").arg(host.to_string()).args([
        "-p", "6379", "-t", "set,get", "-n", "100000", "-c", "50", "--csv",
    ]);
    let out = run_ok_in(t.client_ns(2), &cmd, Duration::from_secs(120)).expect("redis-benchmark");
    let mut rps = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        if cols.len() >= 2 {
            if let Ok(v) = cols[1].parse::<f64>() {
                rps.insert(cols[0].to_string(), v);
            }
        }
    }
    assert!(
        rps.contains_key("SET") && rps.contains_key("GET"),
        "redis-benchmark printed no SET/GET figures: {out}"
    );
    rps
}

// ---- HTTP --------------------------------------------------------------------------------------

/// `GET /account/N` through the app VIP from `src`: (app, db) of the JSON answer.
fn app_account(t: &Topology, src: IpAddr, aid: u32) -> Result<(String, String, bool)> {
    let ns = t
        .client_ns_of(src)
        .ok_or_else(|| anyhow!("{src} is no client's"))?;
    let r = t.http_get(
        ns,
        src,
        SocketAddr::new(ip(APP_VIP), 80),
        &format!("/account/{aid}"),
    )?;
    if r.status != 200 {
        bail!(
            "GET /account/{aid} from {src}: status {}: {}",
            r.status,
            r.text()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .with_context(|| format!("GET /account/{aid}: not JSON: {}", r.text()))?;
    if v["account"] != aid {
        bail!("GET /account/{aid}: {v}");
    }
    Ok((
        v["app"].as_str().unwrap_or_default().to_string(),
        v["db"].as_str().unwrap_or_default().to_string(),
        v["in_recovery"].as_bool().unwrap_or(false),
    ))
}

// ---- the scenarios ----------------------------------------------------------------------------

/// Milliseconds of `d` relative to `origin`, signed, for the figures.
fn ms_from(d: Duration, origin: Duration) -> f64 {
    (d.as_secs_f64() - origin.as_secs_f64()) * 1000.0
}

/// HTTP that touches the database, from every client address: both app servers and both
/// replicas answer, every answer from a replica in recovery.
fn http_through_both_tiers(s: &Stack) {
    let t = s.t;
    let mut apps: BTreeMap<String, usize> = BTreeMap::new();
    let mut dbs: BTreeMap<String, usize> = BTreeMap::new();
    let sources = t.all_client_sources();
    let started = Instant::now();
    for (k, &src) in sources.iter().enumerate() {
        for n in 0..2 {
            let aid = (k * 2 + n + 1) as u32;
            let (app, db, rec) = app_account(t, src, aid)
                .unwrap_or_else(|e| panic!("{e:#}\nlbd log:\n{}", s.lbd.log_tail()));
            assert!(rec, "{db} answered /account/{aid} out of recovery");
            *apps.entry(app).or_default() += 1;
            *dbs.entry(db).or_default() += 1;
        }
    }
    figure!(
        "HTTP: {} GET /account/N from {} client addresses through {APP_VIP} (each a query through {PG_VIP}) in {:.2} s: apps {apps:?}, database servers {dbs:?}",
        sources.len() * 2,
        sources.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        apps.keys().collect::<Vec<_>>(),
        ["app1", "app2"],
        "{apps:?}"
    );
    assert_eq!(
        dbs.keys().collect::<Vec<_>>(),
        ["replica1", "replica2"],
        "{dbs:?}"
    );
}

/// `dig` through the DNS VIP, then bursts of queries through it and straight to one server.
fn dns_steady(s: &Stack) {
    let t = s.t;
    let dig = run_ok_in(
        t.client_ns(2),
        Command::new("dig").args([
            &format!("@{DNS_VIP}"),
            "+short",
            "+tries=1",
            "+time=2",
            "www.stack.test",
            "A",
        ]),
        Duration::from_secs(10),
    )
    .expect("dig");
    assert_eq!(
        dig.trim(),
        "192.0.2.80",
        "dig www.stack.test through {DNS_VIP}"
    );
    for (what, server) in [
        (
            format!("through {DNS_VIP}"),
            SocketAddr::new(ip(DNS_VIP), 53),
        ),
        (
            "straight to dns1".to_string(),
            SocketAddr::new(s.addr(DNS[0]), 53),
        ),
    ] {
        let burst = DnsLoad::new(t.client_ns(2), server, 4, 1).run(4000);
        figure!(
            "DNS: {} queries (4 clients) {what} in {:.2} s ({:.0}/s), answered by {:?}, {} unanswered",
            burst.queries,
            burst.elapsed.as_secs_f64(),
            burst.queries as f64 / burst.elapsed.as_secs_f64(),
            burst.answered,
            burst.unanswered
        );
        assert_eq!(burst.unanswered, 0, "{what}: {:?}", burst.failed_tries);
        if server.ip() == ip(DNS_VIP) {
            assert_eq!(
                burst.answered.keys().collect::<Vec<_>>(),
                ["dns1", "dns2"],
                "{:?}",
                burst.answered
            );
        }
    }
}

/// A value written through the Redis VIP is the server's; redis-benchmark straight to the
/// server and through lb, two rounds in turn (the machine's load varies).
fn redis_steady(s: &Stack) {
    let t = s.t;
    assert_eq!(
        s.redis_cli(
            t.client_ns(2),
            ip(REDIS_VIP),
            &["SET", "stack", "through-lb"]
        )
        .unwrap(),
        "OK"
    );
    assert_eq!(
        s.redis_cli(t.backend_ns(REDIS), s.addr(REDIS), &["GET", "stack"])
            .unwrap(),
        "through-lb"
    );
    for round in 1..=2 {
        let direct = redis_benchmark(t, s.addr(REDIS));
        let via = redis_benchmark(t, ip(REDIS_VIP));
        figure!(
            "redis-benchmark (50 clients, 100000 requests per test), round {round}: straight to the server {direct:.0?}, through {REDIS_VIP} {via:.0?} requests/s"
        );
    }
}

/// pgbench -S, 32 clients on 2 threads through the read-only VIP (its connections spread over
/// both replicas); the same work without lb, 16 clients on 1 thread straight to each replica at
/// once; and 32 on 2 threads straight to one replica. Two rounds in turn.
fn pgbench_steady(s: &Stack) {
    let t = s.t;
    let before = s.backend_packets("pg-ro");
    let split = || -> f64 {
        std::thread::scope(|sc| {
            let runs: Vec<_> = REPLICAS
                .iter()
                .map(|&r| {
                    let addr = s.addr(r);
                    sc.spawn(move || pgbench_tps(t, addr, 16, 1, 4))
                })
                .collect();
            runs.into_iter().map(|h| h.join().unwrap()).sum()
        })
    };
    let via = || pgbench_tps(t, ip(PG_VIP), 32, 2, 4);
    for round in 1..=2 {
        // Each first in one round.
        let (via, split) = if round == 1 {
            let v = via();
            (v, split())
        } else {
            let sp = split();
            (via(), sp)
        };
        figure!(
            "pgbench -S -T 4, round {round}: 32 clients through {PG_VIP} {via:.0} tps; 16 + 16 clients straight to the two replicas {split:.0} tps"
        );
    }
    let one = pgbench_tps(t, s.addr(REPLICAS[0]), 32, 2, 4);
    figure!("pgbench -S -T 4: 32 clients straight to replica1 alone {one:.0} tps");
    let after = s.backend_packets("pg-ro");
    figure!("pg-ro packets per backend during those runs: before {before:?}, after {after:?}");
    for (addr, n) in &after {
        assert!(
            n > before.get(addr).unwrap_or(&0),
            "replica {addr} got no pgbench packets through lb: {before:?} -> {after:?}"
        );
    }
}

/// Checks the load of an event at `event` detected at `detected` (since the load's epoch):
/// every failed pgbench run and new connection was under way between the two; every run and
/// connection begun after the detection succeeded, the connections all on `survivor`. Prints
/// the figures; returns (aborted clients, runs that could not connect, failed new connections).
fn check_pg_load(
    what: &str,
    runs: &[BenchRun],
    probes: &[Probe],
    event: Duration,
    detected: Duration,
    survivor: &str,
) -> (usize, usize, usize) {
    print_runs(what, runs, event);
    let aborted: usize = runs.iter().map(|r| r.aborted).sum();
    let refused = runs.iter().filter(|r| r.connect_failed).count();
    let failed: Vec<&Probe> = probes.iter().filter(|p| p.result.is_err()).collect();
    let in_window = probes
        .iter()
        .filter(|p| p.overlaps(event, detected))
        .count();
    let count = |ps: &mut dyn Iterator<Item = &Probe>| {
        ps.fold(BTreeMap::<String, usize>::new(), |mut m, p| {
            let k = match &p.result {
                Ok(name) => name.clone(),
                Err(_) => "failed".into(),
            };
            *m.entry(k).or_default() += 1;
            m
        })
    };
    let window = count(&mut probes.iter().filter(|p| p.overlaps(event, detected)));
    let after = count(&mut probes.iter().filter(|p| p.start > detected));
    figure!(
        "{what}: pgbench: {aborted} clients aborted (their connection broke), {refused} runs could not connect"
    );
    figure!(
        "{what}: {} new connections through {PG_VIP}, {} failed{}; {in_window} under way in the detection window: {window:?}; begun after it: {after:?}",
        probes.len(),
        failed.len(),
        failed
            .first()
            .map(|p| format!(
                " (the first begun at {:+.0} ms: {})",
                ms_from(p.start, event),
                p.result.as_ref().err().map_or("", |e| e.as_str())
            ))
            .unwrap_or_default()
    );
    for r in runs.iter().filter(|r| r.failed()) {
        assert!(
            r.start <= detected && r.end >= event,
            "{what}: a pgbench run failed outside the detection window {event:?}..{detected:?}: {r:?}"
        );
    }
    for p in &failed {
        assert!(
            p.overlaps(event, detected),
            "{what}: a new connection failed outside the detection window {event:?}..{detected:?}: {p:?}"
        );
    }
    let clean_after: Vec<&BenchRun> = runs.iter().filter(|r| r.start > detected).collect();
    assert!(clean_after.len() >= 2, "{what}: {runs:?}");
    // (On a busy machine a 1 s run may spend it all connecting its 32 clients: it then
    // processes nothing, without an error.)
    assert!(
        clean_after.iter().all(|r| !r.failed())
            && clean_after.iter().map(|r| r.processed).sum::<u64>() > 0,
        "{what}: {clean_after:?}"
    );
    assert!(
        runs.iter().any(|r| r.end < event && !r.failed()),
        "{what}: no clean run before the event: {runs:?}"
    );
    assert!(
        after.keys().all(|k| k == survivor) && after.get(survivor).copied().unwrap_or(0) >= 5,
        "{what}: new connections after the detection: {after:?}"
    );
    let tps_after: Vec<f64> = clean_after.iter().filter_map(|r| r.tps).collect();
    figure!("{what}: tps of the runs begun after the detection: {tps_after:.0?}");
    (aborted, refused, failed.len())
}

/// replica1 stopped (fast shutdown) under load: detected within the checks' bound; failures
/// only in the window; afterwards everything on replica2.
fn replica_stopped(s: &Stack) -> Duration {
    let ((stopped, detected), runs, probes) = PgLoad::during(s, |load| {
        load.wait_after(Duration::ZERO, 2, 5);
        let stopped = load.now();
        s.stop_postgres(REPLICAS[0]).expect("stopping replica1");
        let down = s.wait_state_since("pg-ro", REPLICAS[0], "down", Duration::from_secs(10));
        let detected = down - load.epoch;
        load.wait_after(detected, 3, 10);
        (stopped, detected)
    });
    let detection = detected - stopped;
    figure!(
        "replica1 stopped (fast shutdown) at +0: down in lbctl after {:.0} ms (checks every {INTERVAL_MS} ms, fall {FALL}: at most {:.0} ms)",
        detection.as_secs_f64() * 1000.0,
        DETECTION_BOUND.as_secs_f64() * 1000.0
    );
    let (aborted, refused, _) = check_pg_load(
        "replica1 stopped",
        &runs,
        &probes,
        stopped,
        detected,
        "replica2",
    );
    assert!(
        detection <= DETECTION_BOUND + DETECTION_SLACK,
        "detection took {detection:?}"
    );
    // Bounded by the window: a refused connection fails at once and the loop then pauses
    // 50 ms, so at most window / 50 ms + 1 such runs; at most every client aborts once.
    let bound = (detection.as_millis() / 50) as usize + 2;
    assert!(refused <= bound, "{refused} refused runs in {detection:?}");
    assert!(aborted <= 32, "{aborted} aborted clients");
    detection
}

/// replica1 back: it catches up, rejoins the pool by its checks, and no connection breaks
/// (lb keeps established flows on their backend when the table changes).
fn replica_rejoins(s: &Stack) -> Duration {
    let ((restarted, up), runs, probes) = PgLoad::during(s, |load| {
        load.wait_after(Duration::ZERO, 1, 5);
        let restarted = load.now();
        s.spawn_postgres(REPLICAS[0]).expect("restarting replica1");
        let up =
            s.wait_state_since("pg-ro", REPLICAS[0], "up", Duration::from_secs(10)) - load.epoch;
        load.wait_after(up, 2, 10);
        (restarted, up)
    });
    print_runs("replica1 back", &runs, restarted);
    let after: BTreeMap<String, usize> =
        probes
            .iter()
            .filter(|p| p.start > up)
            .fold(BTreeMap::new(), |mut m, p| {
                *m.entry(p.result.clone().unwrap_or_else(|e| e)).or_default() += 1;
                m
            });
    figure!(
        "replica1 restarted at +0 (caught up, streaming): up in lbctl {:.0} ms later; {} pgbench runs and {} new connections, none failed; new connections after: {after:?}",
        ms_from(up, restarted),
        runs.len(),
        probes.len()
    );
    let failed: Vec<&BenchRun> = runs.iter().filter(|r| r.failed()).collect();
    assert!(
        failed.is_empty(),
        "pgbench runs failed while replica1 rejoined: {failed:?}"
    );
    let failed: Vec<&Probe> = probes.iter().filter(|p| p.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "new connections failed while replica1 rejoined: {failed:?}"
    );
    assert!(
        after.contains_key("replica1"),
        "no new connection reached replica1 once up: {after:?}"
    );
    s.check_streaming(&REPLICAS)
        .expect("replica1 streams again");
    up - restarted
}

/// dns1 stopped under a burst of queries retried as a stub resolver does: every query
/// answered; only tries under way before the detection failed.
fn dns_server_stopped(s: &Stack) -> Duration {
    let load = DnsLoad::new(
        s.t.client_ns(2),
        SocketAddr::new(ip(DNS_VIP), 53),
        8,
        DNS_TRIES,
    );
    let (burst, stopped, detected) = std::thread::scope(|sc| {
        let _stop = StopOnDrop(&load.stop);
        let b = sc.spawn(|| load.run(0));
        load.wait_answered(0, 2000);
        let stopped = load.now();
        s.stop_dnsmasq(DNS[0]).expect("stopping dns1");
        let detected =
            s.wait_state_since("dns", DNS[0], "down", Duration::from_secs(10)) - load.epoch;
        load.wait_answered(load.answered(), 5000);
        load.stop.store(true, Ordering::Relaxed);
        (b.join().unwrap(), stopped, detected)
    });
    let detection = detected - stopped;
    let late: Vec<&(Duration, String)> = burst
        .failed_tries
        .iter()
        .filter(|(at, _)| *at > detected)
        .collect();
    let timeouts = burst
        .failed_tries
        .iter()
        .filter(|(_, e)| e.contains("temporarily unavailable") || e.contains("timed out"))
        .count();
    figure!(
        "dns1 stopped at +0 under a burst (8 clients, up to {DNS_TRIES} tries {} ms apart, each from a new port): down in lbctl after {:.0} ms; {} queries in {:.1} s, answered {:?}, {} unanswered; {} failed tries ({timeouts} timed out, {} refused), {} of them begun after the detection",
        DNS_TIMEOUT.as_millis(),
        detection.as_secs_f64() * 1000.0,
        burst.queries,
        burst.elapsed.as_secs_f64(),
        burst.answered,
        burst.unanswered,
        burst.failed_tries.len(),
        burst.failed_tries.len() - timeouts,
        late.len()
    );
    if let (Some(first), Some(last)) = (burst.failed_tries.first(), burst.failed_tries.last()) {
        figure!(
            "dns1 stopped: the failed tries began from {:+.0} ms to {:+.0} ms (the first: {})",
            ms_from(first.0, stopped),
            ms_from(last.0, stopped),
            first.1
        );
    }
    assert_eq!(burst.unanswered, 0, "{:?}", burst.failed_tries);
    assert!(
        late.is_empty(),
        "tries failed after dns1 was down: {late:?}"
    );
    assert!(
        detection <= DETECTION_BOUND + DETECTION_SLACK,
        "detection took {detection:?}"
    );
    for (at, e) in &burst.failed_tries {
        assert!(
            *at + DNS_TIMEOUT >= stopped,
            "a try begun at {at:?} failed before dns1 was stopped at {stopped:?}: {e}"
        );
    }
    detection
}

/// replica2 promoted to primary under load: it leaves the read-only pool by its health check
/// (`pgsql`, `role = "replica"`); afterwards every read goes to replica1, in recovery.
fn replica_promoted(s: &Stack) -> Duration {
    let ((promoted, done, detected), runs, probes) = PgLoad::during(s, |load| {
        load.wait_after(Duration::ZERO, 2, 5);
        let promoted = load.now();
        s.as_postgres(
            REPLICAS[1],
            "pg_ctl",
            &[
                "promote",
                "-w",
                "-D",
                &s.pg_dir(REPLICAS[1]).join("data").to_string_lossy(),
            ],
        )
        .expect("pg_ctl promote");
        let done = load.now();
        figure!(
            "replica2 promoted (pg_ctl promote -w) in {:.0} ms",
            ms_from(done, promoted)
        );
        let rec = s
            .psql(
                s.t.client_ns(1),
                s.addr(REPLICAS[1]),
                "bench",
                "SELECT pg_is_in_recovery()",
            )
            .unwrap();
        assert_eq!(rec, "f", "replica2 out of recovery once promoted");
        let down = s.wait_state_since("pg-ro", REPLICAS[1], "down", Duration::from_secs(10));
        let detected = down - load.epoch;
        load.wait_after(detected, 3, 10);
        (promoted, done, detected)
    });
    // From the end of the promotion (the server out of recovery) to lbctl showing it down.
    let detection = detected - done;
    let detail = s
        .states("pg-ro")
        .unwrap()
        .into_iter()
        .find(|(a, _, _)| *a == s.addr(REPLICAS[1]))
        .map(|(_, _, d)| d)
        .unwrap_or_default();
    figure!(
        "replica2 promoted at +0 (done at {:+.0} ms): out of pg-ro {:.0} ms after it was done (its check: {detail}; at most {:.0} ms)",
        ms_from(done, promoted),
        detection.as_secs_f64() * 1000.0,
        DETECTION_BOUND.as_secs_f64() * 1000.0
    );
    assert!(
        detection <= DETECTION_BOUND + DETECTION_SLACK,
        "detection took {detection:?}"
    );
    assert!(
        detail.contains("primary"),
        "replica2's check should say it is a primary: {detail}"
    );
    check_pg_load(
        "replica2 promoted",
        &runs,
        &probes,
        promoted,
        detected,
        "replica1",
    );
    // The app's reads: all from replica1, in recovery.
    let mut dbs: BTreeMap<String, usize> = BTreeMap::new();
    for (k, &src) in s.t.all_client_sources().iter().enumerate().take(20) {
        let (_, db, rec) = app_account(s.t, src, 500 + k as u32).expect("GET /account");
        assert!(rec, "{db} answered out of recovery after the promotion");
        *dbs.entry(db).or_default() += 1;
    }
    figure!("after the promotion: 20 GET /account/N answered by {dbs:?}");
    assert_eq!(dbs.keys().collect::<Vec<_>>(), ["replica1"]);
    detection
}

// ---- the test ----------------------------------------------------------------------------------

#[test]
fn hosting_stack_through_lb_survives_replica_loss_promotion_and_dns_loss() {
    let started = Instant::now();
    let t = topology();
    let s = Stack::build(&t);
    s.check_streaming(&REPLICAS).expect("streaming replication");

    http_through_both_tiers(&s);
    dns_steady(&s);
    redis_steady(&s);
    pgbench_steady(&s);

    let replica_down = replica_stopped(&s);
    let replica_up = replica_rejoins(&s);
    let dns_down = dns_server_stopped(&s);
    let promoted_out = replica_promoted(&s);

    // The final states, as an operator sees them.
    let final_states: Vec<String> = ["app", "pg-ro", "redis", "dns"]
        .iter()
        .flat_map(|svc| {
            s.states(svc)
                .unwrap()
                .into_iter()
                .map(move |(a, st, d)| format!("{svc} {a} {st} ({d})"))
        })
        .collect();
    figure!("final backend states:\n  {}", final_states.join("\n  "));
    assert_eq!(s.state_of("pg-ro", REPLICAS[0]).unwrap(), "up");
    assert_eq!(s.state_of("pg-ro", REPLICAS[1]).unwrap(), "down");
    assert_eq!(s.state_of("dns", DNS[0]).unwrap(), "down");
    assert_eq!(s.state_of("dns", DNS[1]).unwrap(), "up");
    assert_eq!(s.state_of("redis", REDIS).unwrap(), "up");
    figure!(
        "detection: replica stopped {:.0} ms, replica back {:.0} ms, DNS server stopped {:.0} ms, replica promoted {:.0} ms; whole test {:.0} s",
        replica_down.as_secs_f64() * 1000.0,
        replica_up.as_secs_f64() * 1000.0,
        dns_down.as_secs_f64() * 1000.0,
        promoted_out.as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64()
    );
}
