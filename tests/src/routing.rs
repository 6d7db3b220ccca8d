//! Routing daemons for the multi-node tests, run as an operator would run them but inside a
//! network namespace: BIRD 2 (BGP with BFD, `protocol kernel`) and keepalived (VRRP). Each
//! runs in the foreground (`nsenter --net`, so it keeps the root's mount namespace) with its
//! config, control socket, pid files and log in a folder the caller gives (the run's work
//! folder), stops on drop, and can be killed with SIGKILL to simulate the loss of its node.
//!
//! A missing `bird`, `birdc` or `keepalived` is an error naming the Debian package that
//! `cargo xtask setup` installs: tests that need them fail, they never skip.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::{self, describe, run_output_within};
use crate::{sys, wait_until};

/// How long a `birdc` or `ip` query may take.
const QUERY_DEADLINE: Duration = Duration::from_secs(10);

/// The path of `program` (searched in PATH, then /usr/sbin and /sbin), or an error naming
/// the Debian package that has it.
pub fn require_program(program: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .collect::<Vec<_>>();
    dirs.iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "`{program}` is not installed (Debian package {package}): the multi-node tests \
                 need it; install it with `cargo xtask setup`"
            )
        })
}

/// A daemon started in the foreground inside a namespace, its output in a log file.
struct Foreground {
    label: String,
    child: Child,
    log: PathBuf,
    status: Option<std::process::ExitStatus>,
}

impl Foreground {
    fn spawn(ns: &str, cmd: &Command, log: PathBuf) -> Result<Foreground> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file")?;
        let label = format!("{} (in {ns})", describe(cmd));
        let child = netns::nsenter_command(ns, cmd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting `{label}`"))?;
        Ok(Foreground {
            label,
            child,
            log,
            status: None,
        })
    }

    fn running(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_none()
    }

    fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// SIGKILL (nothing it could do on the way out: a node that lost power), then reaped.
    fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    fn stop(&mut self, grace: Duration) {
        if self.running() {
            let _ = sys::kill(self.child.id(), libc::SIGTERM);
            let end = Instant::now() + grace;
            while self.running() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill();
    }

    /// Fails with the daemon's log if it has exited.
    fn check_running(&mut self) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        bail!(
            "`{}` exited ({:?}); its log:\n{}",
            self.label,
            self.status,
            self.log()
        )
    }
}

/// Reads a pid file (a number and a newline).
fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

// ---- BIRD ----------------------------------------------------------------------------------

/// A BIRD 2 daemon: `bird -f -c CONF -s SOCK -P PIDFILE` in a namespace.
pub struct Bird {
    name: String,
    ns: String,
    socket: PathBuf,
    birdc: PathBuf,
    proc: Foreground,
}

/// One row of `birdc show protocols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BirdProtocol {
    pub name: String,
    /// `BGP`, `Kernel`, `BFD`, `Device`, ...
    pub proto: String,
    /// `up`, `start`, `down`, ...
    pub state: String,
    /// The rest of the row after the time: for BGP e.g. `Established` or `Active  Socket: ...`.
    pub info: String,
}

impl Bird {
    /// Writes `config` to `DIR/NAME.conf` and starts BIRD on it in namespace `ns`, its
    /// control socket `DIR/NAME.ctl`, pid file `DIR/NAME.pid`, log `DIR/NAME.log` (configs
    /// should say `log stderr all;`). The config is checked first (`bird -p`); returns once
    /// the control socket answers.
    pub fn start(ns: &str, dir: &Path, name: &str, config: &str) -> Result<Bird> {
        let bird = require_program("bird", "bird2")?;
        let birdc = require_program("birdc", "bird2")?;
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let check = run_output_within(
            Command::new(&bird).arg("-p").arg("-c").arg(&conf),
            QUERY_DEADLINE,
        )?;
        if !check.status.success() {
            bail!(
                "BIRD refuses the config of {name}: {}\n--- {} ---\n{config}",
                String::from_utf8_lossy(&check.stderr).trim(),
                conf.display()
            );
        }
        let socket = dir.join(format!("{name}.ctl"));
        let mut cmd = Command::new(&bird);
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(dir.join(format!("{name}.pid")));
        let proc = Foreground::spawn(ns, &cmd, dir.join(format!("{name}.log")))?;
        let mut b = Bird {
            name: name.to_string(),
            ns: ns.to_string(),
            socket,
            birdc,
            proc,
        };
        let mut exited = false;
        let up = wait_until(
            Duration::from_secs(10),
            &format!("BIRD {name}'s control socket"),
            || {
                if !b.proc.running() {
                    exited = true;
                    return true;
                }
                b.birdc(&["show", "status"]).is_ok()
            },
        );
        if exited {
            b.proc.check_running()?;
        }
        up.with_context(|| format!("BIRD {name}'s log:\n{}", b.log()))?;
        Ok(b)
    }

    /// The name it was started with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Everything BIRD wrote to its log so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// `birdc -s SOCK ARGS...`: its output (BIRD's reply codes stripped by birdc), or an error
    /// when birdc fails or BIRD does not answer within 10 s.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = run_output_within(
            Command::new(&self.birdc)
                .arg("-s")
                .arg(&self.socket)
                .args(args),
            QUERY_DEADLINE,
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.contains("Unable to connect") {
            bail!(
                "birdc {args:?} for {} failed ({}): {}{}",
                self.name,
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(text)
    }

    /// `show protocols`, parsed.
    pub fn protocols(&self) -> Result<Vec<BirdProtocol>> {
        let text = self.birdc(&["show", "protocols"])?;
        Ok(parse_protocols(&text))
    }

    /// Waits up to `deadline` until each BGP session named in `names` is Established; the
    /// error lists every protocol's state and BIRD's log tail.
    pub fn wait_established(&mut self, names: &[&str], deadline: Duration) -> Result<()> {
        let mut last = Vec::new();
        let r = wait_until(
            deadline,
            &format!("BGP sessions {names:?} of BIRD {}", self.name),
            || {
                last = self.protocols().unwrap_or_default();
                names.iter().all(|n| {
                    last.iter()
                        .any(|p| p.name == *n && p.state == "up" && p.info.contains("Established"))
                })
            },
        );
        self.proc.check_running()?;
        r.with_context(|| {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            format!(
                "protocols: {last:#?}\nBIRD {}'s log tail:\n{}",
                self.name,
                lines[lines.len().saturating_sub(30)..].join("\n")
            )
        })
    }

    /// The next hops of every route BIRD has for `prefix` (`show route for PREFIX all`):
    /// each `via ADDRESS` of every route, in order.
    pub fn route_next_hops(&self, prefix: &str) -> Result<Vec<IpAddr>> {
        let text = self.birdc(&["show", "route", "for", prefix, "all"])?;
        Ok(parse_via(&text))
    }

    /// SIGKILL: BIRD ends without closing its sessions (its peers learn it from BFD, or from
    /// the kernel closing its sockets).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM, then SIGKILL after 2 s.
    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(2));
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Rows of `birdc show protocols` (the header and BIRD's banner skipped).
pub fn parse_protocols(text: &str) -> Vec<BirdProtocol> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || f[0] == "Name" || f[0] == "BIRD" {
                return None;
            }
            // Name Proto Table State Since Info...: Table may be `---`; Since is one word
            // (a time) or two (a date and a time).
            let rest = &f[4..];
            let info_from = if rest.len() > 1 && rest[0].contains('-') && rest[1].contains(':') {
                2
            } else {
                1
            };
            Some(BirdProtocol {
                name: f[0].to_string(),
                proto: f[1].to_string(),
                state: f[3].to_string(),
                info: rest.get(info_from..).unwrap_or_default().join(" "),
            })
        })
        .collect()
}

/// Every `via ADDRESS` in a `show route` output, in order.
pub fn parse_via(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            while let Some(w) = words.next() {
                if w == "via" {
                    return words.next()?.parse().ok();
                }
            }
            None
        })
        .collect()
}

// ---- the kernel's view ---------------------------------------------------------------------

/// The gateways of the kernel's route to `dst` (a prefix such as `203.0.113.10` or
/// `2001:db8:f00::10`) in namespace `ns`'s main table: one for a plain route, one per
/// `nexthop` of a multipath route, none when there is no such route.
pub fn kernel_next_hops(ns: &str, dst: &str) -> Result<Vec<IpAddr>> {
    let family = if dst.contains(':') { "-6" } else { "-4" };
    let out = run_output_within(
        Command::new("ip").args(["-n", ns, family, "-j", "route", "show", "exact", dst]),
        QUERY_DEADLINE,
    )?;
    if !out.status.success() {
        bail!(
            "ip route show {dst} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_route_json(&out.stdout).with_context(|| format!("ip -j route show {dst} in {ns}"))
}

fn parse_route_json(json: &[u8]) -> Result<Vec<IpAddr>> {
    let routes: serde_json::Value = serde_json::from_slice(json).context("not JSON")?;
    let mut hops = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        let gateways = match r["nexthops"].as_array() {
            Some(nhs) => nhs.iter().map(|n| &n["gateway"]).collect(),
            None => vec![&r["gateway"]],
        };
        for g in gateways {
            if let Some(a) = g.as_str().and_then(|s| s.parse().ok()) {
                hops.push(a);
            }
        }
    }
    Ok(hops)
}

/// Whether namespace `ns` holds address `addr` on any interface (e.g. a VRRP VIP that
/// keepalived added to its master's interface).
pub fn holds_address(ns: &str, addr: IpAddr) -> Result<bool> {
    let out = run_output_within(
        Command::new("ip").args(["-n", ns, "-j", "addr", "show"]),
        QUERY_DEADLINE,
    )?;
    if !out.status.success() {
        bail!(
            "ip addr show in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j addr")?;
    let want = addr.to_string();
    Ok(links.as_array().into_iter().flatten().any(|l| {
        l["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["local"] == want.as_str())
    }))
}

/// The MAC address namespace `ns`'s neighbour table has for `addr` (reachable, stale or
/// any other state with an address), if any.
pub fn neighbour_mac(ns: &str, addr: IpAddr) -> Result<Option<String>> {
    let out = run_output_within(
        Command::new("ip").args(["-n", ns, "-j", "neigh", "show", &addr.to_string()]),
        QUERY_DEADLINE,
    )?;
    let neigh: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j neigh")?;
    Ok(neigh
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|n| n["lladdr"].as_str().map(str::to_owned)))
}

// ---- keepalived ----------------------------------------------------------------------------

/// A keepalived running only its VRRP subsystem in the foreground in a namespace:
/// `keepalived -n -l -D -G -P -f CONF -p PID -r VRRP_PID -c CHECKERS_PID -b BFD_PID`, every
/// file `DIR/NAME.*` so that instances never share one.
pub struct Keepalived {
    name: String,
    vrrp_pid: PathBuf,
    proc: Foreground,
}

impl Keepalived {
    /// Writes `config` to `DIR/NAME.conf`, checks it (`keepalived -t`), starts keepalived on
    /// it in namespace `ns` and returns once its VRRP process runs.
    pub fn start(ns: &str, dir: &Path, name: &str, config: &str) -> Result<Keepalived> {
        let program = require_program("keepalived", "keepalived")?;
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let check = run_output_within(
            Command::new(&program).arg("-t").arg("-f").arg(&conf),
            QUERY_DEADLINE,
        )?;
        if !check.status.success() {
            bail!(
                "keepalived refuses the config of {name}: {}{}\n--- {} ---\n{config}",
                String::from_utf8_lossy(&check.stdout).trim(),
                String::from_utf8_lossy(&check.stderr).trim(),
                conf.display()
            );
        }
        let file = |ext: &str| dir.join(format!("{name}.{ext}"));
        let vrrp_pid = file("vrrp.pid");
        let mut cmd = Command::new(&program);
        cmd.args(["-n", "-l", "-D", "-G", "-P", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(file("pid"))
            .arg("-r")
            .arg(&vrrp_pid)
            .arg("-c")
            .arg(file("checkers.pid"))
            .arg("-b")
            .arg(file("bfd.pid"));
        let proc = Foreground::spawn(ns, &cmd, file("log"))?;
        let mut k = Keepalived {
            name: name.to_string(),
            vrrp_pid,
            proc,
        };
        let mut exited = false;
        let up = wait_until(
            Duration::from_secs(10),
            &format!("keepalived {name}'s VRRP process"),
            || {
                if !k.proc.running() {
                    exited = true;
                    return true;
                }
                k.vrrp_child()
                    .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
            },
        );
        if exited {
            k.proc.check_running()?;
        }
        up.with_context(|| format!("keepalived {name}'s log:\n{}", k.log()))?;
        Ok(k)
    }

    /// The name it was started with.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn vrrp_child(&self) -> Option<u32> {
        read_pid(&self.vrrp_pid)
    }

    /// Everything keepalived wrote so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// SIGKILL to the VRRP process first, then to the parent: nothing is said on the way out
    /// (no priority-0 advertisement), as when the node dies. The VIP stays on the interface.
    pub fn kill(&mut self) {
        if let Some(pid) = self.vrrp_child() {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        self.proc.kill();
    }

    /// SIGTERM (keepalived removes its addresses and hands over), then SIGKILL after 3 s.
    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(3));
        if let Some(pid) = self.vrrp_child() {
            // A VRRP child that outlived its parent (it should not).
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protocols() {
        let text = "BIRD 2.0.12 ready.\n\
            Name       Proto      Table      State  Since         Info\n\
            device1    Device     ---        up     12:00:01.123  \n\
            k100       Kernel     master4    up     12:00:01.123  \n\
            n2         BGP        ---        up     12:00:02.456  Established   \n\
            n3         BGP        ---        start  2026-01-02 12:00:02  Active        Socket: Connection refused\n";
        let p = parse_protocols(text);
        assert_eq!(p.len(), 4, "{p:#?}");
        assert_eq!(p[2].name, "n2");
        assert_eq!(p[2].state, "up");
        assert_eq!(p[2].info, "Established");
        assert_eq!(p[3].state, "start");
        assert_eq!(p[3].info, "Active Socket: Connection refused");
        assert_eq!(p[0].info, "");
    }

    #[test]
    fn parses_next_hops() {
        let text = "Table master4:\n\
            203.0.113.10/32      unicast [n2 12:00:02.456] * (100) [AS65001i]\n\
            \tvia 192.0.2.2 on eth0\n\
            \x20                    unicast [n3 12:00:02.456] (100) [AS65001i]\n\
            \tvia 192.0.2.3 on eth0\n";
        assert_eq!(
            parse_via(text),
            vec![
                "192.0.2.2".parse::<IpAddr>().unwrap(),
                "192.0.2.3".parse().unwrap()
            ]
        );
        let json = br#"[{"dst":"203.0.113.10","protocol":"bird","flags":[],"nexthops":[{"gateway":"192.0.2.2","dev":"eth0","weight":1,"flags":[]},{"gateway":"192.0.2.3","dev":"eth0","weight":1,"flags":[]}]}]"#;
        assert_eq!(parse_route_json(json).unwrap().len(), 2);
        let one =
            br#"[{"dst":"203.0.113.10","gateway":"192.0.2.3","dev":"eth0","protocol":"bird"}]"#;
        assert_eq!(
            parse_route_json(one).unwrap(),
            vec!["192.0.2.3".parse::<IpAddr>().unwrap()]
        );
        assert!(parse_route_json(b"[]").unwrap().is_empty());
    }
}
