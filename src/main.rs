//! The `shiftd` binary: command line, logging, signals, exit codes. The work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

use chrono::{DateTime, Utc};
use shiftd::alerts::{self, Alerts};
use shiftd::clock::{Clock, SystemClock};
use shiftd::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use shiftd::daemon::{self, RunError};
use shiftd::logging::{self, LogTarget};
use shiftd::metrics::{self, Metrics, MetricsSink};
use shiftd::outcome::{LogSink, OutcomeSink};
use shiftd::state::{DEFAULT_STATE_DIR, MemoryRecord, OccurrenceRecord, StateFile};

/// sysexits(3) EX_CONFIG: the configuration is invalid. systemd's unit does not restart on it.
const EXIT_CONFIG: u8 = 78;

/// At shutdown, alerts still queued get this long to go out (in-flight batches took at most 30 s of
/// the unit's 45 s TimeoutStopSec).
const ALERTS_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

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
        /// Directory for state kept across restarts (systemd's StateDirectory= sets STATE_DIRECTORY)
        #[arg(long, env = "STATE_DIRECTORY", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Validate the configuration and print what it schedules (exit 78 if invalid)
    Check {
        /// Configuration file
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the configuration, then signal the daemon to reload it (exit 78, no signal, if invalid)
    Reload {
        /// Configuration file
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The running daemon's PID (systemd: $MAINPID)
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
    },
    /// List upcoming actions in time order (reads only the configuration)
    Plan {
        /// Configuration file
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Start of the window: RFC 3339, or a UTC date/time like 2026-12-01 or 2026-12-01T08:00 [default: now]
        #[arg(long, value_parser = shiftd::plan::parse_time)]
        from: Option<DateTime<Utc>>,
        /// End of the window (same forms as --from) [default: 7 days after --from]
        #[arg(long, value_parser = shiftd::plan::parse_time, conflicts_with = "hours")]
        until: Option<DateTime<Utc>>,
        /// Length of the window in hours
        #[arg(long)]
        hours: Option<u32>,
        /// Print one JSON array (fields documented in the README)
        #[arg(long)]
        json: bool,
        /// List at most this many actions
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Check the live setup: IMDS, identity, AssumeRole, instances, permissions (DryRun only)
    Doctor {
        /// Configuration file
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print the IAM policies the configuration needs
    Policy {
        /// Configuration file
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Only this account's documents (and the delegate's policy for it)
        #[arg(long)]
        account: Option<String>,
        /// The delegate account ID, as the target roles' trust policy principal
        #[arg(long, conflicts_with = "delegate_role")]
        delegate_account: Option<String>,
        /// The delegate instance's role ARN, as a narrower trust policy principal
        #[arg(long)]
        delegate_role: Option<String>,
        /// Print one JSON array of {title, notes, document}
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { config } => check(&config),
        Command::Reload { config, pid } => reload(&config, pid),
        Command::Run {
            config,
            dry_run,
            log,
            state_dir,
        } => run(config, dry_run, log, state_dir),
        Command::Plan {
            config,
            from,
            until,
            hours,
            json,
            limit,
        } => plan(&config, from, until, hours, json, limit),
        Command::Doctor { config } => doctor(&config),
        Command::Policy {
            config,
            account,
            delegate_account,
            delegate_role,
            json,
        } => policy(
            &config,
            account.as_deref(),
            delegate_account,
            delegate_role,
            json,
        ),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load_strict(path) {
        Ok(config) => output(&shiftd::check::render(&config, SystemClock.now())),
        Err(e) => config_error(&e),
    }
}

/// `systemctl reload`: the file is validated as `run` will load it, and only a valid one is signalled,
/// so an invalid file fails the reload and the running schedule stays. kill(2) directly: minimal
/// systems have no kill(1) (procps).
fn reload(path: &std::path::Path, pid: i32) -> ExitCode {
    match Config::load_strict(path) {
        Ok(config) if config.rules.is_empty() => {
            eprintln!("{}: no [[rules]]: not reloaded", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
        Ok(_) => {}
        Err(e) => return config_error(&e),
    }
    // SAFETY: kill(2) takes no pointers; clap keeps `pid` positive, so it names one process.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        eprintln!(
            "cannot signal shiftd (PID {pid}): {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    println!("{}: valid; reload requested (PID {pid})", path.display());
    ExitCode::SUCCESS
}

/// Every configuration problem (invalid, unreadable, not a regular file, not UTF-8, too large) exits 78:
/// systemd's unit does not restart on it, and the message names the place.
fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(config_path: PathBuf, dry_run: bool, log: LogTarget, state_dir: PathBuf) -> ExitCode {
    if let Some(note) = logging::init(log) {
        tracing::warn!("{note}");
    }
    // A configuration error is the one to report, even when another daemon holds the state directory
    // (`run` loads the file again, off the async threads).
    let metrics_config = match Config::load_strict(&config_path) {
        Ok(config) => config.metrics,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The lock is held until the process exits: two daemons on one state directory would act twice.
    let (record, _lock): (Arc<dyn OccurrenceRecord>, _) = match std::fs::create_dir_all(&state_dir)
        .map_err(|source| shiftd::state::StateError::Io {
            path: state_dir.clone(),
            source,
        })
        .and_then(|()| shiftd::state::lock_dir(&state_dir))
    {
        Ok(lock) => (Arc::new(StateFile::in_dir(&state_dir)), Some(lock)),
        Err(e @ shiftd::state::StateError::Locked { .. }) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            tracing::warn!(
                "state directory {}: {e}; running without state: occurrences due while shiftd is \
                 not running will be neither caught up nor reported",
                state_dir.display()
            );
            (Arc::new(MemoryRecord::default()), None)
        }
    };
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
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        // Bound before the daemon starts: a taken port is reported at once, not after READY=1.
        let metrics = match metrics_config {
            Some(m) => {
                let listener = metrics::bind(m.listen).await.map_err(RunFailure::Metrics)?;
                let served = Metrics::new();
                tracing::info!("metrics served at http://{}/metrics", m.listen);
                tokio::spawn(metrics::serve(listener, served.clone()));
                Some(served)
            }
            None => None,
        };
        let mut outcomes: Arc<dyn OutcomeSink> = Arc::new(LogSink);
        if let Some(m) = &metrics {
            outcomes = Arc::new(MetricsSink {
                inner: outcomes,
                metrics: m.clone(),
                clock: clock.clone(),
            });
        }
        let alerts = Arc::new(Alerts::new(
            outcomes,
            alerts::transports(Arc::new(shiftd::aws::sdk::connect)),
            clock.clone(),
            alerts::DELIVERY,
        ));
        let deps = daemon::Deps {
            clock,
            aws: Arc::new(shiftd::aws::sdk::connect),
            outcomes: alerts.clone(),
            record,
            reload: reload_rx,
            metrics,
        };
        let result = daemon::run(settings, deps, shutdown).await;
        // Alerts about the last batches still go out, within the unit's stop timeout.
        alerts.flush(ALERTS_FLUSH).await;
        signal_task.abort();
        result.map_err(RunFailure::Run)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunFailure::Signals(e)) => {
            tracing::error!("cannot install signal handlers: {e}");
            ExitCode::FAILURE
        }
        Err(RunFailure::Metrics(e)) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
        Err(RunFailure::Run(e)) => {
            // Under systemd stderr goes to the journal too, so this is logged once, not printed again.
            tracing::error!("{e}");
            // Every way `run` fails is about the configuration.
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

enum RunFailure {
    Signals(std::io::Error),
    Metrics(shiftd::metrics::MetricsError),
    Run(RunError),
}

fn load_or_exit(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| config_error(&e))
}

fn plan(
    path: &std::path::Path,
    from: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    hours: Option<u32>,
    json: bool,
    limit: usize,
) -> ExitCode {
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let from = from.unwrap_or_else(|| SystemClock.now());
    let hours = hours.unwrap_or(24 * 7);
    let Some(until) =
        until.or_else(|| from.checked_add_signed(chrono::Duration::hours(i64::from(hours))))
    else {
        eprintln!("--hours {hours}: the window would end past what a date can hold");
        return ExitCode::from(2);
    };
    if until <= from {
        eprintln!("--until must be after --from");
        return ExitCode::from(2);
    }
    let (items, truncated) = shiftd::plan::upcoming(&config, from, until, limit);
    if json {
        if truncated {
            eprintln!("cut at {limit} actions: narrow the window or raise --limit");
        }
        output(&format!(
            "{}\n",
            serde_json::to_string_pretty(&items).expect("serializable")
        ))
    } else {
        output(&shiftd::plan::render_text(
            &config, &items, from, until, truncated,
        ))
    }
}

/// Writes a command's output to stdout. A reader that went away (`shiftd plan | head`) ends the
/// command quietly, as it does for other Unix tools; any other write error is reported.
fn output(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn doctor(path: &std::path::Path) -> ExitCode {
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(shiftd::doctor::run(
        &config,
        Arc::new(shiftd::aws::sdk::connect),
        Arc::new(SystemClock),
    ));
    let _ = output(&format!(
        "\n{} failure(s), {} warning(s)\n",
        report.failures(),
        report.warnings()
    ));
    if report.failures() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn policy(
    path: &std::path::Path,
    account: Option<&str>,
    delegate_account: Option<String>,
    delegate_role: Option<String>,
    json: bool,
) -> ExitCode {
    use shiftd::policy::{self, Delegate};
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(name) = account
        && config.account(name).is_none()
    {
        let known: Vec<&str> = config.accounts.keys().map(String::as_str).collect();
        eprintln!(
            "account {name:?} is not in {}: expected one of [{}]",
            path.display(),
            known.join(", ")
        );
        return ExitCode::from(2);
    }
    let delegate = match (delegate_account, delegate_role) {
        (Some(id), _) if id.len() == 12 && id.chars().all(|c| c.is_ascii_digit()) => {
            Some(Delegate::Account(id))
        }
        (Some(id), _) => {
            eprintln!("--delegate-account {id:?}: expected a 12-digit account ID");
            return ExitCode::from(2);
        }
        (None, Some(arn)) if arn.starts_with("arn:") && arn.contains(":role/") => {
            Some(Delegate::Role(arn))
        }
        (None, Some(arn)) => {
            eprintln!(
                "--delegate-role {arn:?}: expected a role ARN (arn:aws:iam::<account>:role/<name>)"
            );
            return ExitCode::from(2);
        }
        (None, None) => {
            eprintln!(
                "note: trust policies left out: pass --delegate-account ID or --delegate-role ARN \
                 (`shiftd doctor` shows the delegate's identity)"
            );
            None
        }
    };
    let docs = policy::documents(&config, account, delegate.as_ref());
    if json {
        let array: Vec<serde_json::Value> = docs
            .iter()
            .map(|d| serde_json::json!({ "title": d.title, "notes": d.notes, "document": d.json }))
            .collect();
        output(&format!(
            "{}\n",
            serde_json::to_string_pretty(&array).expect("serializable")
        ))
    } else {
        output(&policy::render(&docs))
    }
}
