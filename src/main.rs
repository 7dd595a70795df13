//! The `shiftd` binary: command line, logging, signals, exit codes. The work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

use chrono::{DateTime, Utc};
use shiftd::alerts::{self, Alerts};
use shiftd::clock::{Clock, SystemClock};
use shiftd::config::{Action, Config, ConfigError, DEFAULT_CONFIG_PATH};
use shiftd::daemon::{self, RunError};
use shiftd::logging::{self, LogTarget};
use shiftd::metrics::{self, Metrics, MetricsSink};
use shiftd::outcome::{LogSink, OutcomeSink, ResultKind};
use shiftd::state::{DEFAULT_STATE_DIR, MemoryRecord, OccurrenceRecord, StateFile};

mod docs;

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
                  Exit codes: 0 ok, 1 error, 2 usage error, 78 invalid configuration.",
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
    ///
    /// SIGHUP reloads the configuration (an invalid file is logged and the running schedule kept).
    /// SIGTERM and SIGINT stop scheduling and exit 0: an action under way finishes its calls and
    /// follows its instances for up to 20 seconds more, then reports any instance not yet confirmed
    /// as failed. Under systemd it reports READY=1, STATUS=, WATCHDOG=1, RELOADING=1 and STOPPING=1.
    ///
    /// It keeps the instant up to which it has handled every occurrence in state.json under
    /// --state-dir. After a restart, occurrences it slept through are acted on when at most 5 minutes
    /// late and reported failed ("missed") otherwise.
    Run {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Log every action that would be taken; call no StartInstances/StopInstances
        #[arg(long)]
        dry_run: bool,
        /// Where logs go
        #[arg(long, value_enum, default_value_t = LogTarget::Auto)]
        log: LogTarget,
        /// Directory for state kept across restarts (systemd's StateDirectory= sets STATE_DIRECTORY)
        #[arg(long, value_name = "DIR", env = "STATE_DIRECTORY", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Validate the configuration and print what it schedules (exit 78 if invalid)
    Check {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the configuration, then signal the daemon to reload it (exit 78, no signal, if invalid)
    ///
    /// Validates the file as run loads it, and only then sends SIGHUP to the daemon --pid. This is
    /// the unit's ExecReload= (with $MAINPID), so "systemctl reload shiftd" fails on an invalid file
    /// and the running schedule stays in force.
    Reload {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The running daemon's PID (systemd: $MAINPID)
        #[arg(long, value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
    },
    /// List upcoming actions in time order (reads only the configuration)
    ///
    /// Uses the daemon's own schedule code, so DST days show exactly what will happen. The default
    /// window is the next 7 days; the text output ends with a note when --limit cut it.
    Plan {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Start of the window: RFC 3339, or a UTC date/time like 2026-12-01 or 2026-12-01T08:00 [default: now]
        #[arg(long, value_name = "TIME", value_parser = shiftd::plan::parse_time)]
        from: Option<DateTime<Utc>>,
        /// End of the window (same forms as --from) [default: 7 days after --from]
        #[arg(long, value_name = "TIME", value_parser = shiftd::plan::parse_time, conflicts_with = "hours")]
        until: Option<DateTime<Utc>>,
        /// Length of the window in hours
        #[arg(long, value_name = "N")]
        hours: Option<u32>,
        /// Print one JSON array (fields documented in the README)
        #[arg(long)]
        json: bool,
        /// List at most this many actions
        #[arg(long, value_name = "N", default_value_t = 1000)]
        limit: usize,
        /// Also describe each rule's selection live (assumes the roles): the instances it matches now,
        /// their state, and the override tags (shiftd:skip, shiftd:skip-until) in force
        #[arg(long)]
        instances: bool,
        /// Also list the occurrences the rules' calendars (skip, only) leave out, marked with the
        /// calendar that removed each
        #[arg(long)]
        show_skipped: bool,
        /// List a rule with accounts = [...] once per account it selects: lists the organization's
        /// accounts ([organization]) through AWS, as the daemon does
        #[arg(long)]
        accounts: bool,
    },
    /// Check the live setup: IMDS, identity, AssumeRole, instances, permissions (DryRun only)
    ///
    /// Checks IMDSv2, the delegate's identity, AssumeRole for each account, the selected instances,
    /// and permission to start and stop them (with DryRun: nothing is acted on). Each check prints
    /// ok, warn or FAIL; exit 1 when one fails.
    Doctor {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Start or stop a rule's selection now, by hand (exit 1 unless every instance ends ok or skipped)
    ///
    /// Acts on the rule's selection as its schedule would: the same describe, override tags,
    /// chunked StartInstances/StopInstances calls and verification, each instance's result logged
    /// with SHIFTD_REASON=manual (on stderr, and in the journal when it is reachable). With
    /// --dry-run it assumes the role and describes the selection, and says what it would do without
    /// calling StartInstances/StopInstances. The way to try a new setup safely before enabling the
    /// unit. Exit 0 when every instance
    /// ends ok or skipped (or dry-run), 1 otherwise, 2 for an unknown rule, 78 for an invalid
    /// configuration.
    Apply {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The rule whose selection to act on
        #[arg(value_name = "RULE")]
        rule: String,
        /// What to do
        #[arg(value_name = "ACTION")]
        action: ManualAction,
        /// Say what would be done; call no StartInstances/StopInstances
        #[arg(long)]
        dry_run: bool,
    },
    /// High availability: the claim table several delegates share ([cluster])
    ///
    /// `init` creates the table the configuration's [cluster] names (on-demand billing, the key
    /// shiftd needs, TTL on expires_at), or finds it; `status` lists recent claims: each occurrence per
    /// account and region, its holder, progress and results.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// List every account shiftd would act in: configured, and discovered from AWS Organizations
    ///
    /// Each account with its source (configured, or its OU path in the organization), its regions and
    /// the rules that act in it. With [organization] it assumes the org-reader role and lists the
    /// organization's accounts, as the daemon does. --check also assumes each account's role. Exit 1
    /// when the organization cannot be listed or (--check) a role cannot be assumed, 78 for an
    /// invalid configuration.
    Accounts {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Also assume each account's role, and say whether it can be
        #[arg(long)]
        check: bool,
        /// Print one JSON array (fields documented in the README)
        #[arg(long)]
        json: bool,
    },
    /// Print the IAM policies the configuration needs
    ///
    /// Per target account the role's trust policy (with --delegate-account or --delegate-role) and
    /// its least-privilege permission policy, then the delegate instance role's sts:AssumeRole
    /// policy. Exit 2 on an unknown --account or a malformed --delegate-account/--delegate-role.
    Policy {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Only this account's documents (and the delegate's policy for it)
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
        /// The delegate account ID, as the target roles' trust policy principal
        #[arg(long, value_name = "ID", conflicts_with = "delegate_role")]
        delegate_account: Option<String>,
        /// The delegate instance's role ARN, as a narrower trust policy principal
        #[arg(long, value_name = "ARN")]
        delegate_role: Option<String>,
        /// Print one JSON array of {title, notes, document}
        #[arg(long)]
        json: bool,
        /// Also the org-reader role's documents ([organization]): its trust policy and the
        /// Organizations calls discovery makes
        #[arg(long)]
        org: bool,
        /// Print instead a CloudFormation template (YAML) of the target role for the discovered
        /// accounts, to deploy with a service-managed StackSet: the role name a parameter, trust
        /// limited to the delegate (needs --delegate-account or --delegate-role)
        #[arg(long, conflicts_with_all = ["json", "account", "org"])]
        stackset: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create the claim table (exit 0 when it exists with the right key already)
    Init {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// List recent occurrences: holder, progress and results
    Status {
        /// Configuration file
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// How far back, in hours
        #[arg(long, value_name = "N", default_value_t = 24)]
        hours: u32,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ManualAction {
    Start,
    Stop,
}

fn main() -> ExitCode {
    // `shiftd generate-docs --out DIR` (packaging): outside the parser, so that neither `--help`, the
    // man pages nor the completions offer it.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == docs::COMMAND) {
        return docs::main(Cli::command(), &args[2..]);
    }
    match Cli::parse_from(args).command {
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
            instances,
            show_skipped,
            accounts,
        } => plan(
            &config,
            from,
            until,
            hours,
            json,
            limit,
            PlanExtras {
                instances,
                show_skipped,
                accounts,
            },
        ),
        Command::Doctor { config } => doctor(&config),
        Command::Apply {
            config,
            rule,
            action,
            dry_run,
        } => apply(&config, &rule, action, dry_run),
        Command::Cluster { command } => cluster(command),
        Command::Accounts {
            config,
            check,
            json,
        } => accounts(&config, check, json),
        Command::Policy {
            config,
            account,
            delegate_account,
            delegate_role,
            json,
            org,
            stackset,
        } => policy(
            &config,
            account.as_deref(),
            (delegate_account, delegate_role),
            PolicyOutput {
                json,
                org,
                stackset,
            },
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
    shiftd::memory::limit_arenas();
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
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

/// What `plan` shows beyond the actions.
struct PlanExtras {
    /// `--instances`: each rule's selection described live.
    instances: bool,
    /// `--show-skipped`: the occurrences the rules' calendars leave out.
    show_skipped: bool,
    /// `--accounts`: rules with `accounts` expanded per account (lists the organization's accounts).
    accounts: bool,
}

fn plan(
    path: &std::path::Path,
    from: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    hours: Option<u32>,
    json: bool,
    limit: usize,
    extras: PlanExtras,
) -> ExitCode {
    let PlanExtras {
        instances,
        show_skipped,
        accounts,
    } = extras;
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let config = if accounts {
        if let Some(note) = logging::init(LogTarget::Stderr) {
            eprintln!("{note}");
        }
        let Some(runtime) = runtime() else {
            return ExitCode::FAILURE;
        };
        match runtime.block_on(shiftd::org::expand_live(
            &config,
            Arc::new(shiftd::aws::sdk::connect),
            Arc::new(SystemClock),
        )) {
            Ok(expanded) => expanded,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        config
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
    let (mut items, truncated) =
        shiftd::plan::occurrences(&config, from, until, limit, show_skipped);
    if instances {
        if let Some(note) = logging::init(LogTarget::Stderr) {
            eprintln!("{note}");
        }
        let Some(runtime) = runtime() else {
            return ExitCode::FAILURE;
        };
        runtime.block_on(shiftd::plan::describe_live(
            &config,
            &mut items,
            Arc::new(shiftd::aws::sdk::connect),
            Arc::new(SystemClock),
        ));
    }
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

/// The async runtime of a command that talks to AWS; `None` (said on stderr and in the log) when it
/// cannot be started.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            tracing::error!("cannot start the async runtime: {e}");
            None
        }
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
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
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

fn apply(path: &std::path::Path, rule: &str, action: ManualAction, dry_run: bool) -> ExitCode {
    // It acts: the file is held to what `run` holds it to (not writable by others).
    let config = match Config::load_strict(path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    logging::init_interactive();
    let action = match action {
        ManualAction::Start => Action::Start,
        ManualAction::Stop => Action::Stop,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let outcomes = runtime.block_on(shiftd::manual::apply(
        &config,
        rule,
        action,
        dry_run,
        Arc::new(shiftd::aws::sdk::connect),
        Arc::new(SystemClock),
        Arc::new(LogSink),
    ));
    match outcomes {
        Err(e) => {
            eprintln!("shiftd apply: {e}");
            ExitCode::from(2)
        }
        Ok(outcomes) => {
            let count = |k| outcomes.iter().filter(|o| o.result == k).count();
            let _ = output(&format!(
                "{action} {rule}: {} ok, {} skipped, {} failed, {} dry-run{}\n",
                count(ResultKind::Ok),
                count(ResultKind::Skipped),
                count(ResultKind::Failed),
                count(ResultKind::DryRun),
                if outcomes.is_empty() {
                    " (the selection matches no instance)"
                } else {
                    ""
                }
            ));
            if shiftd::manual::succeeded(&outcomes) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn accounts(path: &std::path::Path, check: bool, json: bool) -> ExitCode {
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(note) = logging::init(LogTarget::Stderr) {
        eprintln!("{note}");
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let (rows, error) = runtime.block_on(shiftd::org::listing(
        &config,
        Arc::new(shiftd::aws::sdk::connect),
        Arc::new(SystemClock),
        check,
    ));
    if let Some(e) = &error {
        eprintln!("{e}: listing the configured accounts only");
    }
    let shown = if json {
        output(&format!(
            "{}\n",
            serde_json::to_string_pretty(&rows).expect("serializable")
        ))
    } else {
        output(&shiftd::org::render(&rows))
    };
    let failed = error.is_some() || rows.iter().any(|r| r.assumable == Some(false));
    if shown != ExitCode::SUCCESS || failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn cluster(command: ClusterCommand) -> ExitCode {
    let path = match &command {
        ClusterCommand::Init { config } | ClusterCommand::Status { config, .. } => config.clone(),
    };
    let config = match Config::load_strict(&path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    if config.cluster.is_none() {
        eprintln!(
            "{}: no [cluster] table: add one (table, region, lease) to run several delegates",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let connect: shiftd::aws::ConnectAws = Arc::new(shiftd::aws::sdk::connect);
    let result = runtime.block_on(async {
        match command {
            ClusterCommand::Init { .. } => shiftd::cluster::init(&config, connect).await,
            ClusterCommand::Status { hours, .. } => {
                let since = SystemClock.now() - chrono::Duration::hours(i64::from(hours));
                shiftd::cluster::status(&config, connect, since).await
            }
        }
    });
    match result {
        Ok(text) => output(&text),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// What `policy` prints besides the accounts' documents.
struct PolicyOutput {
    json: bool,
    /// `--org`: the org-reader role's documents too.
    org: bool,
    /// `--stackset`: only the CloudFormation template of the discovered accounts' role.
    stackset: bool,
}

fn policy(
    path: &std::path::Path,
    account: Option<&str>,
    (delegate_account, delegate_role): (Option<String>, Option<String>),
    out: PolicyOutput,
) -> ExitCode {
    use shiftd::policy::{self, Delegate};
    let PolicyOutput {
        json,
        org,
        stackset,
    } = out;
    let config = match load_or_exit(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if (org || stackset) && config.organization.is_none() {
        eprintln!(
            "{}: no [organization] table: --org and --stackset are about accounts discovered from \
             AWS Organizations",
            path.display()
        );
        return ExitCode::from(2);
    }
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
        (None, None) if stackset => {
            eprintln!(
                "--stackset: the role must trust the delegate: pass --delegate-account ID or \
                 --delegate-role ARN (`shiftd doctor` shows the delegate's identity)"
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
    if stackset {
        let template = delegate
            .as_ref()
            .and_then(|d| policy::stackset(&config, d))
            .expect("an [organization] and a delegate");
        return output(&template);
    }
    let mut docs = policy::documents(&config, account, delegate.as_ref());
    if org {
        docs.extend(policy::org_documents(&config, delegate.as_ref()));
    }
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
