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
}
