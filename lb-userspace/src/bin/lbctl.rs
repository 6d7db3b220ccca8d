//! lbctl: the command line of lb, a client of lbd's control socket.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{
    api::{Stats, Status},
    client::Client,
};

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Control a running lbd")]
struct Args {
    /// lbd's control socket.
    #[arg(
        long,
        env = "LB_SOCKET",
        default_value = "/run/lb/lbd.sock",
        global = true
    )]
    socket: PathBuf,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Daemon, interfaces, mode, program id, uptime.
    Status,
    /// Packets and bytes per service and backend, and drop reasons.
    Stats,
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

async fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::new(&args.socket);
    match args.command {
        Command::Status => {
            let s: Status = client.get("/v1/status").await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!(
                "lbd {} (pid {}), up {}s, config {}, program id {}, layout v{}, pins {}",
                s.version, s.pid, s.uptime_s, s.config, s.program_id, s.layout_version, s.bpffs_dir
            );
            println!("{} service(s), {} backend(s)", s.services, s.backends);
            let rows: Vec<Vec<String>> = s
                .interfaces
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.ifindex.to_string(),
                        i.mode.clone(),
                        i.link_id.to_string(),
                    ]
                })
                .collect();
            print_table(&["INTERFACE", "IFINDEX", "MODE", "LINK"], &rows);
        }
        Command::Stats => {
            let s: Stats = client.get("/v1/stats").await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let mut rows = vec![];
            for svc in &s.services {
                rows.push(vec![
                    svc.service.clone(),
                    "*".into(),
                    svc.packets.to_string(),
                    svc.bytes.to_string(),
                ]);
                for b in &svc.backends {
                    rows.push(vec![
                        svc.service.clone(),
                        b.address.clone(),
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
            print_table(&["REASON", "PACKETS"], &rows);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
