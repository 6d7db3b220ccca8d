//! lbd: the lb daemon. Loads and pins the XDP program, fills its maps from the config, serves
//! the control socket, and leaves the data path forwarding when it exits.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use lb_userspace::{
    cli::{LbdArgs, LbdCommand},
    config, decap, run,
};

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
    let args = LbdArgs::parse();
    if let Some(dir) = &args.man_dir {
        return match lb_userspace::cli::write_man_pages(LbdArgs::command(), dir) {
            Ok(pages) => {
                for page in pages {
                    println!("{}", page.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lbd: writing man pages into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    if args.man {
        return match lb_userspace::cli::man_page(LbdArgs::command()).render(&mut std::io::stdout())
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(shell) = args.completions {
        clap_complete::generate(
            shell,
            &mut LbdArgs::command(),
            "lbd",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    if let Some(LbdCommand::Decap {
        interface,
        bpffs_dir,
        allow,
        remove,
        status,
    }) = &args.command
    {
        if args.check || args.cleanup || args.reseed {
            eprintln!("lbd: decap takes neither --check, --cleanup nor --reseed");
            return ExitCode::from(2);
        }
        init_logging(None);
        let mode = match (remove, status) {
            (true, _) => decap::Mode::Remove,
            (_, true) => decap::Mode::Status,
            _ => decap::Mode::Install,
        };
        return match decap::run(interface, bpffs_dir, mode, allow) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("{e:#}");
                ExitCode::FAILURE
            }
        };
    }
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
    // reported by run::daemon() below.
    let level = config::load(&args.config)
        .ok()
        .and_then(|l| l.config.daemon.log_level);
    init_logging(level.as_deref());
    let result = if args.cleanup {
        run::cleanup(&args.config)
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
        runtime.block_on(run::daemon(&args.config, args.reseed))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
