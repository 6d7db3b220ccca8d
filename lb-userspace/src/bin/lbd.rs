//! lbd: the lb daemon. Loads and pins the XDP program, fills its maps from the config, serves
//! the control socket, and leaves the data path forwarding when it exits.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use lb_userspace::{config, daemon};

#[derive(Parser)]
#[command(name = "lbd", version, about = "lb daemon: XDP layer-4 load balancer")]
struct Args {
    /// The configuration file.
    #[arg(long, short, default_value = "/etc/lb/lb.toml")]
    config: PathBuf,
    /// Validate the configuration file and exit (touches nothing on the system).
    #[arg(long, conflicts_with = "cleanup")]
    check: bool,
    /// Detach the program and remove every pin: takes lb out of the path.
    #[arg(long)]
    cleanup: bool,
}

fn init_logging(level: Option<&str>) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Info);
    if let Some(level) = level {
        builder.parse_filters(level);
    }
    // RUST_LOG, when set, wins over the config.
    if let Ok(env) = std::env::var("RUST_LOG") {
        builder.parse_filters(&env);
    }
    builder.format_timestamp_millis().init();
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.check {
        return match config::load(&args.config) {
            Ok(loaded) => {
                print!("{}", loaded.config.summary());
                for w in loaded.warnings {
                    println!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    // The level comes from the config when it can be read; errors about the config itself are
    // reported by run() below.
    let level = config::load(&args.config)
        .ok()
        .and_then(|l| l.config.daemon.log_level);
    init_logging(level.as_deref());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        log::warn!(
            "lbd is not running as root: loading XDP programs needs CAP_BPF, CAP_NET_ADMIN (and CAP_SYS_ADMIN for bpffs)"
        );
    }
    let result = if args.cleanup {
        daemon::cleanup(&args.config)
    } else {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("lbd: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        runtime.block_on(daemon::run(&args.config))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
