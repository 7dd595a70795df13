//! The `shiftd` binary: command line, logging, signals, exit codes. The work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

use shiftd::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use shiftd::daemon::{self, RunError};
use shiftd::logging::{self, LogTarget};
use shiftd::summary;

/// sysexits(3) EX_CONFIG: the configuration is invalid. systemd's unit does not restart on it.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "shiftd",
    version,
    about = "Start and stop EC2 instances in other AWS accounts on a cron schedule",
    long_about = "shiftd runs on a delegate EC2 instance. It takes the instance profile's credentials \
                  (IMDSv2), assumes a role in each target account, and at each rule's instant starts or \
                  stops the selected instances there, logging every instance action.\n\n\
                  Exit codes: 0 ok, 1 error, 78 invalid configuration.",
    after_help = "Configuration: /etc/shiftd/shiftd.toml (see `man shiftd.toml` or the README).\n\
                  Logs: journald under systemd (`journalctl -u shiftd SHIFTD_RESULT=failed`), else stderr;\n\
                  SHIFTD_LOG=debug for more detail."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scheduler (SIGHUP reloads the configuration, SIGTERM/SIGINT stop it)
    Run {
        /// Configuration file
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Log every action that would be taken; call no StartInstances/StopInstances
        #[arg(long)]
        dry_run: bool,
        /// Where logs go
        #[arg(long, value_enum, default_value_t = LogTarget::Auto)]
        log: LogTarget,
    },
    /// Validate the configuration and print what it schedules (exit 78 if invalid)
    Check {
        /// Configuration file
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            dry_run,
            log,
        } => run(config, dry_run, log),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            print!("{}", summary::render(&config, chrono::Utc::now()));
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    match e {
        ConfigError::Invalid { .. } => ExitCode::from(EXIT_CONFIG),
        ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ExitCode::from(EXIT_CONFIG)
        }
        ConfigError::Read { .. } => ExitCode::FAILURE,
    }
}

fn run(config_path: PathBuf, dry_run: bool, log: LogTarget) -> ExitCode {
    if let Some(note) = logging::init(log) {
        tracing::warn!("{note}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), RunFailure> = runtime.block_on(async {
        let signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(RunFailure::Signals)?;
        let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<i32>();
        let signal_task = tokio::spawn(async move {
            let mut signals = signals;
            let mut stop_tx = Some(stop_tx);
            while let Some(signal) = signals.next().await {
                if signal == SIGHUP {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let _ = reload_tx.send(());
                } else if let Some(tx) = stop_tx.take() {
                    let _ = tx.send(signal);
                }
            }
        });
        let shutdown = async {
            if let Ok(signal) = stop_rx.await {
                let name = if signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                tracing::info!("{name}: shutting down");
            }
        };
        let settings = daemon::Settings {
            config_path,
            dry_run,
        };
        let deps = daemon::Deps {
            clock: Arc::new(daemon::SystemClock),
            reload: reload_rx,
        };
        let result = daemon::run(settings, deps, shutdown).await;
        signal_task.abort();
        result.map_err(RunFailure::Run)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunFailure::Signals(e)) => {
            tracing::error!("cannot install signal handlers: {e}");
            ExitCode::FAILURE
        }
        Err(RunFailure::Run(e)) => {
            // Under systemd stderr goes to the journal too, so this is logged once, not printed again.
            tracing::error!("{e}");
            match e {
                RunError::Config(ConfigError::Read { source, .. })
                    if source.kind() != std::io::ErrorKind::NotFound =>
                {
                    ExitCode::FAILURE
                }
                _ => ExitCode::from(EXIT_CONFIG),
            }
        }
    }
}

enum RunFailure {
    Signals(std::io::Error),
    Run(RunError),
}
