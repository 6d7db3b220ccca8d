//! The test harness's network namespaces, found by their name prefix.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::Result;

use crate::cmd;

/// Every namespace the harness in tests/ creates has a name starting with this.
pub const PREFIX: &str = "lbt";

/// The harness's namespaces that exist now.
pub fn list() -> Result<BTreeSet<String>> {
    let output = cmd::stdout_of(Command::new("ip").args(["netns", "list"]))?;
    Ok(harness_names(&output))
}

/// Names from `ip netns list` output ("NAME" or "NAME (id: N)" a line) that have the prefix.
fn harness_names(ip_netns_list: &str) -> BTreeSet<String> {
    ip_netns_list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

/// The processes still inside a namespace, as `ip netns pids` lists them.
pub fn pids(name: &str) -> Vec<String> {
    cmd::stdout_of(Command::new("ip").args(["netns", "pids", name]))
        .map(|output| output.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Whether the process a harness name is made after (`lbt<pid>x<n>...`) still runs.
pub fn owner_runs(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// The pid in a harness name `lbt<pid>x<n>...`, if it has one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, n) = rest.split_once('x')?;
    if !n.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

pub fn delete(name: &str) -> Result<()> {
    cmd::run(Command::new("ip").args(["netns", "delete", name]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_harness_names() {
        let output = "lbt-7-client (id: 2)\nother\nlbt-7-lb\n\nxlbt (id: 4)\n";
        let names: Vec<String> = harness_names(output).into_iter().collect();
        assert_eq!(names, ["lbt-7-client", "lbt-7-lb"]);
    }

    #[test]
    fn owner_is_the_pid_in_the_name() {
        assert_eq!(owner_pid("lbt1234x0-lb"), Some(1234));
        assert_eq!(owner_pid("lbt1234x12"), Some(1234));
        assert_eq!(owner_pid("lbt-7-lb"), None);
        assert_eq!(owner_pid("lbt1234xy"), None);
        assert!(owner_runs(&format!("lbt{}x0-lb", std::process::id())));
    }
}
