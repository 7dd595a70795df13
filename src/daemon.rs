//! The daemon: `run(settings, deps, shutdown)`.
//!
//! It sleeps until the next due instant, hands each account's due work to the executor, keeps every
//! target account's credentials fresh in the background, reloads its configuration on request (an
//! invalid new configuration is reported and the running one kept), saves how far it got so a restart
//! resumes there (`state`), and on shutdown lets in-flight batches finish and follow their instances
//! within a bound.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::aws::AwsEnv;
use crate::config::{Account, Action, Config, ConfigError};
use crate::credentials::{self, AccountCredentials, SessionSpec};
use crate::executor::{self, AccountClients, ExecOptions};
use crate::notify::ServiceManager;
use crate::outcome::{Outcome, ResultKind};
use crate::planner;
use crate::state::{self, StateFile};

/// The longest single sleep: the loop re-reads the clock at least this often, so a wall-clock step
/// (NTP correction, resume from suspend) delays a firing by at most this much.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// After a shutdown request, how long in-flight batches may go on: acting, and following their
/// instances to the target state, so that an action taken just before the request is confirmed.
const SHUTDOWN_FOLLOW: Duration = Duration::from_secs(20);
/// Then, once told to stop following, how long they may take to report what is still unconfirmed
/// (each as failed, "requested but not confirmed"). Both together stay under the unit's
/// TimeoutStopSec (45 s).
const SHUTDOWN_REPORT: Duration = Duration::from_secs(10);

/// The wall clock, as a parameter: tests and tools can substitute their own.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

pub struct Settings {
    pub config_path: PathBuf,
    /// `--dry-run`: overrides the configuration's `dry_run = false`.
    pub dry_run: bool,
    /// Where the instant up to which occurrences were handled is kept across restarts; `None`: nowhere
    /// (a restart then starts from its own start time).
    pub state_dir: Option<PathBuf>,
}

pub struct Deps {
    pub clock: Arc<dyn Clock>,
    /// Each message asks for a configuration reload (SIGHUP in the binary).
    pub reload: mpsc::UnboundedReceiver<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no rules to run: {0} defines no [[rules]]")]
    NoRules(String),
}

struct AccountRuntime {
    spec: SessionSpec,
    clients: Arc<AccountClients>,
    refresher: JoinHandle<()>,
}

impl Drop for AccountRuntime {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

struct Daemon {
    config: Arc<Config>,
    dry_run_flag: bool,
    aws: Arc<AwsEnv>,
    session_name: String,
    accounts: BTreeMap<String, AccountRuntime>,
}

impl Daemon {
    fn exec_options(&self) -> ExecOptions {
        ExecOptions {
            dry_run: self.dry_run_flag || self.config.defaults.dry_run,
            verify_timeout: self.config.defaults.verify_timeout,
            credentials_wait: self.config.defaults.credentials_wait,
        }
    }

    /// Starts, keeps or replaces each account's credential renewal to match the configuration.
    async fn reconcile_accounts(&mut self) {
        let config = self.config.clone();
        let mut next = BTreeMap::new();
        for (name, account) in &config.accounts {
            let spec = SessionSpec::new(
                account,
                &self.session_name,
                config.defaults.session_duration,
                config.defaults.refresh_before_expiry,
            );
            let kept = self
                .accounts
                .remove(name)
                .filter(|rt| rt.spec == spec && rt.clients.account.regions == account.regions);
            let runtime = match kept {
                Some(rt) => rt,
                None => self.start_account(account, spec).await,
            };
            next.insert(name.clone(), runtime);
        }
        // Accounts left in `self.accounts` were removed or changed: dropping them stops their renewal.
        self.accounts = next;
    }

    async fn start_account(&self, account: &Account, spec: SessionSpec) -> AccountRuntime {
        let credentials = AccountCredentials::new(&account.name);
        let mut regions = BTreeMap::new();
        for region in &account.regions {
            regions.insert(
                region.clone(),
                self.aws.ec2(region, credentials.clone()).await,
            );
        }
        let sts = self.aws.sts(&account.regions[0]).await;
        let refresher = tokio::spawn(credentials::keep_fresh(
            sts,
            spec.clone(),
            credentials.clone(),
        ));
        AccountRuntime {
            spec,
            clients: Arc::new(AccountClients {
                account: account.clone(),
                credentials,
                regions,
            }),
            refresher,
        }
    }
}

impl Daemon {
    fn status_line(&self, now: DateTime<Utc>) -> String {
        let waiting: Vec<(String, String)> = self
            .accounts
            .iter()
            .filter(|(_, rt)| {
                rt.clients
                    .credentials
                    .usable_at(std::time::SystemTime::now())
                    .is_none()
            })
            .map(|(name, rt)| {
                let why = rt
                    .clients
                    .credentials
                    .last_error()
                    .unwrap_or_else(|| "no AssumeRole has succeeded yet".to_string());
                (name.clone(), why)
            })
            .collect();
        let dry_run = self.dry_run_flag || self.config.defaults.dry_run;
        crate::upcoming::status_line(&self.config, now, dry_run, &waiting)
    }
}

fn first_region(config: &Config) -> &str {
    config
        .accounts
        .values()
        .next()
        .map_or("us-east-1", |a| a.regions[0].as_str())
}

/// Loads the configuration for running: valid, and with at least one rule.
fn load(path: &std::path::Path) -> Result<Config, RunError> {
    let config = Config::load_strict(path)?;
    if config.rules.is_empty() {
        return Err(RunError::NoRules(path.display().to_string()));
    }
    Ok(config)
}

/// Runs until `shutdown` completes. Fails only if the configuration cannot be loaded at start.
pub async fn run(
    settings: Settings,
    deps: Deps,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let Deps { clock, mut reload } = deps;
    let config = Arc::new(load(&settings.config_path)?);
    let aws = Arc::new(AwsEnv::new(&config.credentials, first_region(&config)));
    let session_name = credentials::session_name(&aws.delegate_name().await);
    let mut daemon = Daemon {
        config,
        dry_run_flag: settings.dry_run,
        aws,
        session_name,
        accounts: BTreeMap::new(),
    };
    daemon.reconcile_accounts().await;
    log_started(&daemon);
    // Ready once the configuration is loaded and the schedule armed. Credential trouble is not fatal
    // (IMDS can be slow right after boot): the renewal retries, and STATUS= says so.
    let mut service = ServiceManager::from_env();
    service.ready();
    let max_sleep = service.max_sleep().map_or(MAX_SLEEP, |w| w.min(MAX_SLEEP));

    let (cancel_tx, cancel_rx) = watch::channel(false);
    let mut inflight: JoinSet<Vec<Outcome>> = JoinSet::new();
    let state = settings.state_dir.as_deref().map(StateFile::in_dir);
    let mut last_checked = resume_point(state.as_ref(), clock.now());
    let mut state_saved = true;
    let mut clock_behind = false;
    tokio::pin!(shutdown);

    loop {
        let now = clock.now();
        let work = planner::due_between(&daemon.config, last_checked, now);
        if now < last_checked - chrono::Duration::seconds(1) && !clock_behind {
            tracing::warn!(
                "the clock went back by {}s; occurrences already handled will not be repeated",
                (last_checked - now).num_seconds()
            );
        }
        clock_behind = now < last_checked;
        // A clock stepped back does not make occurrences already handled due again.
        last_checked = last_checked.max(now);
        report_missed(&daemon.config, &work.missed, now);
        if !work.due.is_empty() {
            let at = work.due.iter().map(|f| f.at).max().expect("not empty");
            for batch in planner::batches(&daemon.config, &work.due, at) {
                let Some(rt) = daemon.accounts.get(&batch.account) else {
                    continue;
                };
                tracing::info!(
                    account = %batch.account,
                    "due at {}: {}",
                    at.to_rfc3339(),
                    batch
                        .requests
                        .iter()
                        .map(|r| format!("{} {}", r.action, r.rule))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                inflight.spawn(executor::run_batch(
                    rt.clients.clone(),
                    batch,
                    daemon.exec_options(),
                    cancel_rx.clone(),
                ));
            }
        }

        if let Some(state) = &state {
            // After dispatching: a crash before this line repeats the dispatch after the restart,
            // where the instances are found in the wanted state and reported skipped.
            match state.save(last_checked) {
                Ok(()) => state_saved = true,
                Err(e) if state_saved => {
                    state_saved = false;
                    tracing::warn!(
                        "cannot save state ({e}): after a restart, occurrences due meanwhile would go unnoticed"
                    );
                }
                Err(_) => {}
            }
        }

        service.status(&daemon.status_line(now));
        // From the scheduling loop itself: a hung loop stops the pings and systemd restarts shiftd.
        service.watchdog();
        let next = planner::next_due(&daemon.config, now);
        let sleep_for = next
            .map(|n| (n - now).to_std().unwrap_or_default())
            .unwrap_or(max_sleep)
            .min(max_sleep);
        tokio::select! {
            _ = tokio::time::sleep(sleep_for) => {}
            Some(()) = reload.recv() => {
                service.reloading();
                match load(&settings.config_path) {
                    Ok(new) => {
                        let sources_differ = new.credentials != *daemon.aws.source();
                        daemon.config = Arc::new(new);
                        if sources_differ {
                            daemon.aws = Arc::new(AwsEnv::new(&daemon.config.credentials, first_region(&daemon.config)));
                            daemon.accounts.clear();
                        }
                        daemon.reconcile_accounts().await;
                        tracing::info!("configuration reloaded from {}", settings.config_path.display());
                        log_started(&daemon);
                    }
                    Err(e) => tracing::error!(
                        error = %e,
                        "configuration reload failed; still running the previous configuration:\n{e}"
                    ),
                }
                service.ready();
            }
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                log_batch_done(done);
            }
            () = &mut shutdown => break,
        }
    }

    service.stopping();
    service.status("stopping");
    if inflight.is_empty() {
        tracing::info!("shutting down: no action in flight");
    } else {
        tracing::info!(
            "shutting down: {} batch(es) in flight, following them for up to {}",
            inflight.len(),
            humantime::format_duration(SHUTDOWN_FOLLOW)
        );
    }
    let drain = async {
        while let Some(done) = inflight.join_next().await {
            log_batch_done(done);
        }
    };
    tokio::pin!(drain);
    if tokio::time::timeout(SHUTDOWN_FOLLOW, &mut drain)
        .await
        .is_err()
    {
        // Stop following: every instance still unconfirmed is reported as such.
        let _ = cancel_tx.send(true);
        if tokio::time::timeout(SHUTDOWN_REPORT, &mut drain)
            .await
            .is_err()
        {
            tracing::error!(
                "in-flight actions did not finish within the shutdown grace; abandoning them \
                 (their Start/Stop calls may have been made: check the instances)"
            );
        }
    }
    tracing::info!("stopped");
    Ok(())
}

fn log_started(daemon: &Daemon) {
    let c = &daemon.config;
    tracing::info!(
        config = %c.path.display(),
        accounts = c.accounts.len(),
        rules = c.rules.len(),
        dry_run = daemon.dry_run_flag || c.defaults.dry_run,
        session_name = %daemon.session_name,
        "running {} rule(s) over {} account(s) from {}{}",
        c.rules.len(),
        c.accounts.len(),
        c.path.display(),
        if daemon.dry_run_flag || c.defaults.dry_run { " (dry run: no instance will be started or stopped)" } else { "" }
    );
}

/// Where the scheduling loop starts: the saved instant when there is one, so the occurrences shiftd
/// slept through are caught up (at most `LATE_TOLERANCE` late) or reported as missed.
fn resume_point(state: Option<&StateFile>, now: DateTime<Utc>) -> DateTime<Utc> {
    let saved = match state.map(StateFile::load) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(at))) => Some(at),
        Some(Err(e)) => {
            tracing::warn!("{e}");
            None
        }
    };
    let (from, note) = state::resume_from(saved, now, state::MAX_LOOKBACK);
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    if from < now {
        tracing::info!(
            "resuming from {} (last run): occurrences since then are caught up when at most {} late, \
             reported as missed otherwise",
            from.to_rfc3339(),
            humantime::format_duration(planner::LATE_TOLERANCE)
        );
    }
    from
}

/// Missed occurrences reported one by one per rule and action; beyond that, one summary entry.
const MISSED_DETAIL: usize = 10;

fn report_missed(config: &Config, missed: &[planner::Firing], now: DateTime<Utc>) {
    let mut by_rule: BTreeMap<(&str, Action), Vec<&planner::Firing>> = BTreeMap::new();
    for f in missed {
        by_rule.entry((&f.rule, f.action)).or_default().push(f);
    }
    for ((rule_name, action), firings) in by_rule {
        let Some(rule) = config.rules.iter().find(|r| r.name == rule_name) else {
            continue;
        };
        let entry = |reason: String| Outcome {
            action,
            rules: vec![rule.name.clone()],
            account: rule.account.clone(),
            region: rule.regions.join(","),
            instance_id: None,
            result: ResultKind::Failed,
            reason,
        };
        // Firings come sorted; the latest are the ones reported one by one.
        let detailed = firings.len().saturating_sub(MISSED_DETAIL);
        if detailed > 0 {
            entry(format!(
                "missed {detailed} occurrence(s) from {} to {} (shiftd was not running or the machine \
                 was suspended); not acted on (selection: {})",
                firings[0].at.to_rfc3339(),
                firings[detailed - 1].at.to_rfc3339(),
                rule.selection
            ))
            .log();
        }
        for f in &firings[detailed..] {
            entry(format!(
                "missed: due at {}, noticed at {} (more than {} late: shiftd was not running or the \
                 machine was suspended); not acted on (selection: {})",
                f.at.to_rfc3339(),
                now.to_rfc3339(),
                humantime::format_duration(planner::LATE_TOLERANCE),
                rule.selection
            ))
            .log();
        }
    }
}

fn log_batch_done(done: Result<Vec<Outcome>, tokio::task::JoinError>) {
    match done {
        Ok(outcomes) => {
            let count = |k| outcomes.iter().filter(|o| o.result == k).count();
            if let Some(first) = outcomes.first() {
                tracing::info!(
                    account = %first.account,
                    "batch done for account {}: {} ok, {} skipped, {} failed, {} dry-run",
                    first.account,
                    count(ResultKind::Ok),
                    count(ResultKind::Skipped),
                    count(ResultKind::Failed),
                    count(ResultKind::DryRun)
                );
            }
        }
        Err(e) if e.is_cancelled() => {}
        Err(e) => tracing::error!("an action batch crashed: {e}"),
    }
}
