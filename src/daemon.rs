//! The daemon: `run(settings, deps, shutdown)`.
//!
//! It sleeps until the next due instant, hands each account's due work to the executor, keeps every
//! target account's credentials fresh in the background, reloads its configuration on request (an
//! invalid new configuration is reported and the running one kept), records each occurrence durably
//! before acting on it (`state`), and on shutdown lets in-flight batches finish and follow their
//! instances within a bound.
//!
//! Everything outside comes in through [`Deps`]: the clock, AWS, where outcomes go and the occurrence
//! record. The binary passes the real ones; the scenario tests pass fakes and run on paused time.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::aws::{Aws, ConnectAws};
use crate::clock::{Clock, chrono_duration};
use crate::cluster::Claimer;
use crate::config::{Account, Action, Config, ConfigError};
use crate::credentials::{self, AccountCredentials, SessionSpec};
use crate::executor::{self, AccountClients, BatchContext, ExecOptions};
use crate::notify::ServiceManager;
use crate::org::{self, Discovery};
use crate::outcome::{Outcome, OutcomeSink, ResultKind, Trigger};
use crate::planner::{self, AccountBatch, Firing, Missed};
use crate::state::{self, OccurrenceKey, OccurrenceRecord, Phase, Snapshot};

/// The longest single sleep: the loop re-reads the clock at least this often, so a wall-clock step
/// (NTP correction, resume from suspend) delays a firing by at most this much.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// While an account has no usable credentials, STATUS= is refreshed this often.
const CREDENTIALS_STATUS_EVERY: Duration = Duration::from_secs(2);
/// With nothing due, `checked_until` is still written this often.
const QUIET_WRITE_EVERY: Duration = Duration::from_secs(3600);
/// A difference between wall and monotonic time elapsed since the last tick beyond this is a step.
const STEP_TOLERANCE: Duration = Duration::from_secs(10);
/// After a shutdown request, how long in-flight batches may go on: acting, and following their
/// instances to the target state, so that an action taken just before the request is confirmed.
const SHUTDOWN_FOLLOW: Duration = Duration::from_secs(20);
/// Then, once told to stop following, how long they may take to report what is still unconfirmed
/// (each as failed, "requested but not confirmed"). Both together stay under the unit's
/// TimeoutStopSec (45 s).
const SHUTDOWN_REPORT: Duration = Duration::from_secs(10);
/// At start and on reload, how long the first discovery of `[organization]` accounts is waited for
/// before scheduling goes on (with the accounts known so far; the discovery's result is taken when it
/// comes).
const DISCOVERY_WAIT: Duration = Duration::from_secs(30);
/// How long a discovery waits for the org-reader role's credentials before it is a failed one.
const DISCOVERY_CREDENTIALS_WAIT: Duration = Duration::from_secs(20);
/// A discovery still under way after this long is a failed one (each call is bounded by the SDK's own
/// timeouts; this bounds a walk of many OUs as a whole).
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(600);
/// The name of the org-reader role's credentials in logs and metrics.
const ORG_CREDENTIALS: &str = "organization";

pub struct Settings {
    pub config_path: PathBuf,
    /// `--dry-run`: overrides the configuration's `dry_run = false`.
    pub dry_run: bool,
}

pub struct Deps {
    pub clock: Arc<dyn Clock>,
    /// Builds the AWS access for a credential source (again when a reload changes it).
    pub aws: ConnectAws,
    /// Where every instance action's outcome goes (the journal in the binary).
    pub outcomes: Arc<dyn OutcomeSink>,
    /// The durable record of occurrences (the state directory in the binary).
    pub record: Arc<dyn OccurrenceRecord>,
    /// Each message asks for a configuration reload (SIGHUP in the binary).
    pub reload: mpsc::UnboundedReceiver<()>,
    /// Fed with credential renewals and each rule's next action, when `[metrics]` serves them.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
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

/// `[organization]` at run time: the org-reader role's credentials, the last good list of accounts,
/// and the discovery under way.
struct OrgRuntime {
    config: crate::config::OrganizationConfig,
    spec: SessionSpec,
    credentials: AccountCredentials,
    refresher: JoinHandle<()>,
    client: Arc<dyn crate::aws::Organizations>,
    /// The last good discovery, and the wall time it ended.
    last: Option<(Discovery, DateTime<Utc>)>,
    /// Why the latest discovery failed: the list in use (`last`) is stale.
    failed: Option<String>,
    /// When the next discovery is due (monotonic).
    next: tokio::time::Instant,
    running: Option<JoinHandle<Result<Discovery, String>>>,
}

impl Drop for OrgRuntime {
    fn drop(&mut self) {
        self.refresher.abort();
        if let Some(r) = &self.running {
            r.abort();
        }
    }
}

impl OrgRuntime {
    fn accounts(&self) -> &[org::OrgAccount] {
        self.last.as_ref().map_or(&[], |(d, _)| &d.accounts)
    }

    /// Starts a discovery unless one is under way.
    fn begin(&mut self) {
        if self.running.is_some() {
            return;
        }
        let client = self.client.clone();
        let store = self.credentials.clone();
        let config = self.config.clone();
        self.running = Some(tokio::spawn(async move {
            store
                .wait_usable(DISCOVERY_CREDENTIALS_WAIT)
                .await
                .map_err(|e| format!("cannot assume {}: {e}", config.role_arn))?;
            match tokio::time::timeout(DISCOVERY_TIMEOUT, org::discover(client.as_ref(), &config))
                .await
            {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "no complete listing within {}",
                    humantime::format_duration(DISCOVERY_TIMEOUT)
                )),
            }
        }));
    }
}

/// The result of the discovery under way, when it ends; never, when none is.
async fn discovery_done(org: &mut Option<OrgRuntime>) -> Result<Discovery, String> {
    let Some(handle) = org.as_mut().and_then(|o| o.running.as_mut()) else {
        return std::future::pending().await;
    };
    let result = handle
        .await
        .unwrap_or_else(|e| Err(format!("the discovery task ended: {e}")));
    if let Some(o) = org.as_mut() {
        o.running = None;
    }
    result
}

/// What a finished batch hands back: the occurrences it carried out (none for an enforce pass), and
/// every outcome.
struct BatchDone {
    keys: Vec<OccurrenceKey>,
    outcomes: Vec<Outcome>,
    trigger: Trigger,
}

struct Daemon {
    /// The configuration the daemon runs: `written` with the discovered accounts, and one rule per
    /// account of each rule with `accounts` (`org::expand`).
    config: Arc<Config>,
    /// The configuration as loaded from the file.
    written: Arc<Config>,
    /// With `[organization]`: discovery of the organization's accounts.
    org: Option<OrgRuntime>,
    dry_run_flag: bool,
    clock: Arc<dyn Clock>,
    connect: ConnectAws,
    aws: Arc<dyn Aws>,
    sink: Arc<dyn OutcomeSink>,
    record: Arc<dyn OccurrenceRecord>,
    session_name: String,
    /// With `[cluster]`: how this delegate claims occurrences.
    claims: Option<Claimer>,
    /// This process's name in claims: `<delegate>/<random token>`.
    claim_owner: String,
    accounts: BTreeMap<String, AccountRuntime>,
    inflight: JoinSet<BatchDone>,
    cancel: watch::Receiver<bool>,
    /// True from the moment shiftd is asked to stop (`cancel` comes later, when it stops following).
    stopping: watch::Receiver<bool>,
    /// Every occurrence up to here is handled.
    checked_until: DateTime<Utc>,
    /// The next instant any rule fires, remembered between wakes (forgotten with the configuration).
    next_due: planner::NextDue,
    /// While the next instant is taken in only in part (within `resolve_ahead` of it, some of its
    /// accounts still busy with an earlier occurrence): that instant, and its occurrences already
    /// dispatched. `checked_until` stays before the instant until the rest are taken in: when their
    /// account is free again, or at the instant itself.
    partly_taken: Option<(DateTime<Utc>, BTreeSet<OccurrenceKey>)>,
    /// `checked_until` as last written to the record.
    written_until: DateTime<Utc>,
    /// Occurrences done recently (by this process or an earlier one): never done again.
    done: BTreeSet<OccurrenceKey>,
    /// Occurrences in flight.
    open: BTreeSet<OccurrenceKey>,
    /// Wall and monotonic time at the last tick, to tell a wall-clock step.
    last_tick: (DateTime<Utc>, tokio::time::Instant),
    record_ok: bool,
    /// When the next enforce pass is due (monotonic).
    next_enforce: tokio::time::Instant,
    /// Enforce once the batches in flight are done (after a catch-up).
    enforce_after_batches: bool,
    /// Enforce batches in flight: one pass at a time.
    enforcing: usize,
    /// What enforce passes last said of each instance they did not act on (held by a tag, or failed):
    /// said again only when it changes.
    enforce_said: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Results reported since the heap was last given back (see `release_memory`).
    results_since_release: usize,
    /// The process's pacing of AWS calls (in-flight cap, EC2 bucket models, the STS rate).
    pacer: Arc<crate::pacing::Pacer>,
    /// Poked when an account's credentials are renewed: wakes the loop while some account waits.
    credentials_published: Arc<Notify>,
}

/// How often STATUS= is rewritten while batches are in flight.
const STATUS_EVERY_WHILE_BUSY: Duration = Duration::from_secs(1);

/// After this many results, once no batch is in flight, freed heap is given back to the system.
const RELEASE_MEMORY_AFTER: usize = 1_000;

/// Gives memory back to the system once a burst of work is over: freed heap (glibc keeps what a large
/// action freed in its arenas, so without this the process keeps its peak size: 1 GiB after a
/// 40,000-instance stop, measured) and the executable's pages that the burst mapped (`memory`).
fn release_memory() {
    let released = crate::memory::release();
    tracing::debug!(
        code_bytes = released.code_bytes,
        "gave freed heap and the executable's mapped pages back to the system"
    );
}

impl Daemon {
    fn exec_options(&self) -> ExecOptions {
        self.exec_options_for(Trigger::Schedule)
    }

    fn exec_options_for(&self, trigger: Trigger) -> ExecOptions {
        ExecOptions {
            dry_run: self.dry_run(),
            trigger,
            verify_timeout: self.config.defaults.verify_timeout,
            credentials_wait: self.config.defaults.credentials_wait,
        }
    }

    fn dry_run(&self) -> bool {
        self.dry_run_flag || self.config.defaults.dry_run
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
        for name in self.accounts.keys().filter(|n| !next.contains_key(*n)) {
            tracing::info!(
                account = %name,
                "account {name} is no longer in the configuration or the organization's selected \
                 accounts: its credentials are forgotten"
            );
        }
        self.accounts = next;
        if let Some(m) = &self.metrics {
            m.forget_accounts_not_in(&config);
        }
    }

    async fn start_account(&self, account: &Account, spec: SessionSpec) -> AccountRuntime {
        let mut credentials = AccountCredentials::new(&account.name, self.clock.clone())
            .notifying(self.credentials_published.clone());
        if let Some(m) = &self.metrics {
            credentials = credentials.observed_by(m.clone());
        }
        let sts = self.aws.sts(&account.regions[0]).await;
        let refresher = tokio::spawn(credentials::keep_fresh(
            sts,
            spec.clone(),
            credentials.clone(),
            self.pacer.clone(),
        ));
        AccountRuntime {
            spec,
            clients: Arc::new(
                AccountClients::connect_paced(
                    self.aws.as_ref(),
                    account,
                    credentials,
                    self.pacer.clone(),
                )
                .await,
            ),
            refresher,
        }
    }

    /// Starts, keeps or replaces `[organization]`'s runtime to match the written configuration, and
    /// starts a discovery (at start and on reload), waiting for it up to [`DISCOVERY_WAIT`]. A runtime
    /// kept (same `[organization]`) keeps its last good list meanwhile.
    async fn reset_org(&mut self) {
        let Some(config) = self.written.organization.clone() else {
            self.org = None;
            return;
        };
        let spec = SessionSpec {
            role_arn: config.role_arn.clone(),
            external_id: config.external_id.clone(),
            session_name: self.session_name.clone(),
            duration: self.written.defaults.session_duration,
            refresh_before_expiry: self.written.defaults.refresh_before_expiry,
        };
        let keep = self
            .org
            .as_ref()
            .is_some_and(|o| o.config == config && o.spec == spec);
        if !keep {
            let region = org::endpoint_region(&config);
            let credentials = AccountCredentials::new(ORG_CREDENTIALS, self.clock.clone());
            let sts = self.aws.sts(region).await;
            let refresher = tokio::spawn(credentials::keep_fresh(
                sts,
                spec.clone(),
                credentials.clone(),
                self.pacer.clone(),
            ));
            let client = self
                .aws
                .organizations(region, Arc::new(credentials.clone()))
                .await;
            self.org = Some(OrgRuntime {
                next: self.clock.monotonic() + config.refresh,
                config,
                spec,
                credentials,
                refresher,
                client,
                last: None,
                failed: None,
                running: None,
            });
            // Nothing listed yet under this [organization]: no account of an earlier one stays.
            self.rebuild();
        }
        let Some(o) = self.org.as_mut() else {
            return;
        };
        if let Some(r) = o.running.take() {
            r.abort();
        }
        o.begin();
        if let Ok(result) =
            tokio::time::timeout(DISCOVERY_WAIT, discovery_done(&mut self.org)).await
        {
            self.discovered(result);
        } else {
            tracing::warn!(
                "the organization's accounts are not listed yet after {}: scheduling goes on with \
                 the accounts known so far",
                humantime::format_duration(DISCOVERY_WAIT)
            );
        }
    }

    /// Takes a discovery's result: a new list (accounts that appeared or disappeared are logged), or
    /// a failure (logged; the last good list stays in use). Arms the next refresh and rebuilds the
    /// configuration run; the caller reconciles the accounts.
    fn discovered(&mut self, result: Result<Discovery, String>) {
        let now = self.clock.now();
        let mono = self.clock.monotonic();
        let Some(o) = self.org.as_mut() else {
            return;
        };
        o.next = mono + o.config.refresh;
        match result {
            Ok(d) => {
                let (added, removed) = org::diff(o.accounts(), &d.accounts);
                let first = o.last.is_none();
                for a in &added {
                    if !first {
                        tracing::info!(
                            account = %a.id,
                            "account {} ({}, {}) appeared in the organization",
                            a.id,
                            a.name,
                            a.path_text()
                        );
                    }
                }
                for a in &removed {
                    tracing::info!(
                        account = %a.id,
                        "account {} ({}) is no longer among the organization's active accounts: it \
                         is dropped",
                        a.id,
                        a.name
                    );
                }
                if o.failed.take().is_some() {
                    tracing::info!("the organization's accounts are listed again");
                }
                tracing::info!(
                    accounts = d.accounts.len(),
                    "organization: {d} (next listing in {})",
                    humantime::format_duration(o.config.refresh)
                );
                o.last = Some((d, now));
            }
            Err(e) => {
                let kept = match &o.last {
                    Some((d, at)) => format!(
                        "keeping the last good list of {} account(s), from {}",
                        d.accounts.len(),
                        at.to_rfc3339()
                    ),
                    None => "no list yet: rules' organization accounts act nowhere until one \
                             succeeds"
                        .to_string(),
                };
                tracing::error!(
                    error = %e,
                    "listing the organization's accounts failed ({kept}; retrying in {}): {e}",
                    humantime::format_duration(o.config.refresh)
                );
                o.failed = Some(e);
            }
        }
        self.rebuild();
    }

    /// Rebuilds the configuration run from the written one and the last good discovery.
    fn rebuild(&mut self) {
        // Without a rule over several accounts there is nothing to expand: the configuration run is
        // the written one, shared rather than copied (a thousand rules' schedules are megabytes).
        self.config = if self.written.rules.iter().any(|r| r.is_multi_account()) {
            let discovered = self.org.as_ref().map_or(&[][..], OrgRuntime::accounts);
            Arc::new(org::expand(&self.written, discovered))
        } else {
            self.written.clone()
        };
        self.next_due.forget();
    }

    /// Starts a discovery when the refresh is due.
    fn maybe_refresh_org(&mut self) {
        let mono = self.clock.monotonic();
        if let Some(o) = self.org.as_mut()
            && o.running.is_none()
            && mono >= o.next
        {
            o.begin();
        }
    }

    /// Says so of each occurrence of a rule with `accounts` the next pass takes in while
    /// the organization's list is stale (the latest discovery failed): it acts on the last good list.
    fn say_stale(&mut self, now: DateTime<Utc>) {
        if self.org.as_ref().is_none_or(|o| o.failed.is_none()) {
            return;
        }
        let until = self.resolve_until(now);
        let Some(o) = &self.org else {
            return;
        };
        let Some(why) = &o.failed else {
            return;
        };
        let multi = Config {
            rules: self
                .written
                .rules
                .iter()
                .filter(|r| r.is_multi_account())
                .cloned()
                .collect(),
            ..(*self.written).clone()
        };
        let partly_taken = self.partly_taken.as_ref().map(|(at, _)| *at);
        for f in planner::due_ahead(&multi, self.checked_until, now, until).due {
            // Said when the instant was first taken in.
            if Some(f.at) == partly_taken {
                continue;
            }
            let list = match &o.last {
                Some((d, at)) => format!(
                    "the last good list of the organization's accounts ({} account(s), from {})",
                    d.accounts.len(),
                    at.to_rfc3339()
                ),
                None => "no account of the organization (none was ever listed)".to_string(),
            };
            tracing::warn!(
                rule = %f.rule,
                action = f.action.as_str(),
                "{} {} due at {} acts on {list}: the latest listing failed: {why}",
                f.action,
                f.rule,
                f.at.to_rfc3339()
            );
        }
    }

    fn status_line(&self, now: DateTime<Utc>) -> String {
        let waiting: Vec<(String, String)> = self
            .accounts
            .iter()
            .filter(|(_, rt)| !rt.clients.credentials.is_usable_now())
            .map(|(name, rt)| (name.clone(), rt.clients.credentials.why_unusable()))
            .collect();
        crate::status::with_progress(
            crate::status::line(&self.config, now, self.dry_run(), &waiting),
            &self.pacer.progress(),
        )
    }

    /// Writes to the durable record; a failure is logged once (and again once it works again).
    fn recorded(&mut self, what: &str, result: Result<(), state::StateError>) {
        match result {
            Ok(()) if !self.record_ok => {
                self.record_ok = true;
                tracing::info!("state is saved again");
            }
            Ok(()) => {}
            Err(e) if self.record_ok => {
                self.record_ok = false;
                tracing::error!(
                    "cannot save state ({what}: {e}): after a restart, occurrences in progress or due \
                     meanwhile would go unnoticed"
                );
            }
            Err(_) => {}
        }
    }

    /// Tells a wall-clock step from elapsed monotonic time; a step back rewinds the window so that
    /// occurrences not yet done run at their time (those done are not repeated).
    fn follow_clock(&mut self, now: DateTime<Utc>, mono: tokio::time::Instant) {
        let (last_wall, last_mono) = self.last_tick;
        self.last_tick = (now, mono);
        let wall = now - last_wall;
        let steady = chrono_duration(mono.duration_since(last_mono));
        let step = wall - steady;
        if step.abs() > chrono_duration(STEP_TOLERANCE) {
            let by = humantime::format_duration(step.abs().to_std().unwrap_or_default());
            if step > chrono::Duration::zero() {
                tracing::warn!(
                    step_seconds = step.num_seconds(),
                    "the wall clock jumped forward by {by} (a step, or the machine was suspended)"
                );
            } else {
                tracing::warn!(
                    step_seconds = step.num_seconds(),
                    "the wall clock was stepped back by {by}"
                );
            }
        }
        // Up to `resolve_ahead` past now is normal: the next instant's selection is being resolved.
        let ahead = chrono_duration(self.config.defaults.resolve_ahead);
        if now + ahead < self.checked_until - chrono::Duration::seconds(1) {
            tracing::warn!(
                "the clock is now {} before the last instant handled ({}): occurrences in between that \
                 were done will not be repeated; the others run at their time",
                humantime::format_duration((self.checked_until - now).to_std().unwrap_or_default()),
                self.checked_until.to_rfc3339()
            );
            self.checked_until = now;
            self.written_until = now;
            self.partly_taken = None;
            // What a clock that was ahead did early comes round again at its real instant.
            self.done.retain(|k| k.at <= now);
            // Occurrences in flight stay recorded (their batches go on).
            let r = self.record.rewind(now, DateTime::<Utc>::MAX_UTC);
            self.recorded("clock stepped back", r);
        }
    }

    /// One pass: what is due since the last pass is recorded, then dispatched; what is too old is
    /// reported missed.
    fn tick(&mut self) {
        let now = self.clock.now();
        self.follow_clock(now, self.clock.monotonic());
        let from = self.checked_until;
        let until = self.resolve_until(now);
        let work = planner::due_ahead(&self.config, from, now, until);
        report_missed(self.sink.as_ref(), &self.config, &work.missed, now);
        let (partly_at, taken) = self.partly_taken.take().unzip();
        let taken = taken.unwrap_or_default();
        let mut due = Vec::new();
        let mut ahead = Vec::new();
        for f in work.due {
            // Dispatched ahead by an earlier pass.
            if self.key(&f).is_some_and(|k| taken.contains(&k)) {
                continue;
            }
            if self.is_done_or_open(&f) {
                tracing::info!(
                    rule = %f.rule,
                    "{} {} due at {} was already done; not repeated",
                    f.rule,
                    f.action,
                    f.at.to_rfc3339()
                );
            } else if f.at > now {
                ahead.push(f);
            } else {
                due.push(f);
            }
        }
        // The next instant's occurrences are taken in ahead (`resolve_ahead`) in the accounts with no
        // occurrence in flight or due now; in the others they wait for the instant itself, so that
        // they are resolved after the earlier occurrence's effects (a rule firing more often than
        // `resolve_ahead` gets no head start), while the other accounts keep theirs.
        let busy: BTreeSet<String> = self
            .open
            .iter()
            .map(|k| k.account.clone())
            .chain(due.iter().map(|f| f.account.clone()))
            .collect();
        let (ahead, held): (Vec<Firing>, Vec<Firing>) =
            ahead.into_iter().partition(|f| !busy.contains(&f.account));
        if held.is_empty() {
            self.checked_until = self.checked_until.max(until);
        } else {
            self.checked_until = self.checked_until.max(now);
            let mut taken = if partly_at == Some(until) {
                taken
            } else {
                BTreeSet::new()
            };
            taken.extend(ahead.iter().filter_map(|f| self.key(f)));
            self.partly_taken = Some((until, taken));
        }
        due.extend(ahead);
        let keys: Vec<OccurrenceKey> = due.iter().filter_map(|f| self.key(f)).collect();
        // Durable before anything is done: a crash from here on resumes these after the restart. A
        // quiet pass needs no write: no occurrence lies between the last write and now, so resuming
        // from the last write finds the same nothing (written at least hourly all the same, so that
        // a restart does not take a long quiet spell for an outage).
        let quiet_since_write = self.checked_until - self.written_until;
        if !keys.is_empty()
            || !work.missed.is_empty()
            || quiet_since_write >= chrono_duration(QUIET_WRITE_EVERY)
        {
            let r = self.record.begin(self.checked_until, &keys);
            self.recorded("recording due occurrences", r);
            self.written_until = self.checked_until;
        }
        // After a catch-up (occurrences missed, or acted on late), enforce once the batches are done.
        if !work.missed.is_empty() || due.iter().any(|f| now - f.at > chrono_duration(MAX_SLEEP)) {
            self.enforce_after_batches = true;
        }
        // One batch per instant, oldest first: a start and a stop of one rule both caught up in one
        // pass (after a suspend) are two occurrences, not a conflict.
        let mut by_at: BTreeMap<DateTime<Utc>, Vec<Firing>> = BTreeMap::new();
        for f in due {
            by_at.entry(f.at).or_default().push(f);
        }
        for group in by_at.into_values() {
            self.dispatch(&group, None, &BTreeMap::new());
        }
    }

    /// How far a pass at `now` takes in: up to now, and the next instant when it is at most
    /// `resolve_ahead` away (its batches resolve their selections now and act at the instant; `tick`
    /// holds back those of accounts still busy). One instant at a time, so that a rule firing every
    /// second is not several occurrences at once.
    fn resolve_until(&mut self, now: DateTime<Utc>) -> DateTime<Utc> {
        // An instant taken in part is taken in whole, alone, once it comes: with the next instant in
        // the same pass, a rule firing at both would have its earlier occurrence counted as missed.
        if self.partly_taken.as_ref().is_some_and(|(at, _)| *at <= now) {
            return now;
        }
        match self.next_instant(now) {
            Some(next) if next - chrono_duration(self.config.defaults.resolve_ahead) <= now => next,
            _ => now,
        }
    }

    /// The next instant not yet taken in (in whole).
    fn next_instant(&mut self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.next_due.get(&self.config, now.max(self.checked_until))
    }

    /// When the next pass is due: `resolve_ahead` before the next instant, or the instant itself once
    /// it is taken in part (the rest wait for it; batches ending wake the loop as well, and a pass then
    /// takes in the occurrences of accounts that are free again).
    fn next_pass(&mut self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let next = self.next_instant(now)?;
        if self
            .partly_taken
            .as_ref()
            .is_some_and(|(at, _)| *at == next)
        {
            Some(next)
        } else {
            Some(next - chrono_duration(self.config.defaults.resolve_ahead))
        }
    }

    /// Starts an enforce pass when one is due: every `enforce_every`, at start-up, after a reload and
    /// after a catch-up; never two at once.
    fn maybe_enforce(&mut self) {
        if !self.config.rules.iter().any(|r| r.enforce) || self.enforcing > 0 {
            return;
        }
        let mono = self.clock.monotonic();
        let after_catch_up = self.enforce_after_batches && self.inflight.is_empty();
        if mono < self.next_enforce && !after_catch_up {
            return;
        }
        self.enforce_after_batches = false;
        // Passes fall on wall-clock multiples of enforce_every, so that delegates of a cluster claim the
        // same pass (their clocks agree within the skew tolerance).
        let every = chrono_duration(self.config.defaults.enforce_every);
        let now = self.clock.now();
        let slot = enforce_slot(now, every);
        self.next_enforce = mono + (slot + every - now).to_std().unwrap_or_default();
        self.enforce(slot);
    }

    /// One enforce pass: per account, each enforcing rule's desired action (that of its latest
    /// occurrence) on its selection, with one describe per region. A rule whose latest occurrence is
    /// still in flight is left to that occurrence.
    fn enforce(&mut self, slot: DateTime<Utc>) {
        let now = self.clock.now();
        let mut by_account: BTreeMap<String, Vec<planner::Request>> = BTreeMap::new();
        for rule in self.config.rules.iter().filter(|r| r.enforce) {
            let Some((action, at)) = planner::desired_action(rule, now) else {
                continue;
            };
            let key = OccurrenceKey {
                rule: rule.name.clone(),
                action,
                at,
                account: rule.account.clone(),
            };
            if self.open.contains(&key) || at > self.checked_until {
                continue;
            }
            let next = [Action::Start, Action::Stop]
                .into_iter()
                .flat_map(|a| rule.schedules(a))
                .filter_map(|s| s.next_after(now, rule.timezone))
                .min();
            by_account
                .entry(rule.account.clone())
                .or_default()
                .push(planner::Request {
                    valid_until: next,
                    ..planner::Request::new(rule, action)
                });
        }
        for (account, requests) in by_account {
            let Some(rt) = self.accounts.get(&account) else {
                continue;
            };
            tracing::debug!(
                account = %account,
                "enforcing: {}",
                requests
                    .iter()
                    .map(|r| format!("{} {}", r.action, r.rule))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let quiet = Arc::new(QuietRepeats {
                inner: self.sink.clone(),
                said: self.enforce_said.clone(),
                forwarded: Default::default(),
            });
            let ctx = BatchContext {
                clients: rt.clients.clone(),
                opts: self.exec_options_for(Trigger::Enforce),
                cancel: self.cancel.clone(),
                stopping: Some(self.stopping.clone()),
                clock: self.clock.clone(),
                sink: quiet.clone(),
                on_dispatch: Arc::new(|| {}),
                on_reported: Arc::new(|_| {}),
                already_reported: Arc::new(BTreeSet::new()),
                claims: self.claims.clone(),
            };
            let batch = AccountBatch {
                account,
                at: slot,
                requests,
            };
            self.enforcing += 1;
            self.inflight.spawn(async move {
                executor::run_batch(ctx, batch).await;
                BatchDone {
                    keys: Vec::new(),
                    outcomes: quiet.take_forwarded(),
                    trigger: Trigger::Enforce,
                }
            });
        }
    }

    fn key(&self, f: &Firing) -> Option<OccurrenceKey> {
        Some(OccurrenceKey {
            rule: f.rule.clone(),
            action: f.action,
            at: f.at,
            account: f.account.clone(),
        })
    }

    fn is_done_or_open(&self, f: &Firing) -> bool {
        self.key(f)
            .is_some_and(|k| self.done.contains(&k) || self.open.contains(&k))
    }

    /// Spawns one batch per account for `due`. `resumed` names the phase of occurrences picked up after
    /// a restart, and `reported` what an earlier run of them already reported.
    fn dispatch(
        &mut self,
        due: &[Firing],
        resumed: Option<Phase>,
        reported: &BTreeMap<OccurrenceKey, BTreeSet<String>>,
    ) {
        if due.is_empty() {
            return;
        }
        let at = due.iter().map(|f| f.at).max().expect("not empty");
        // Keys by account, found once (a thousand rules due at one instant are a thousand batches).
        let mut keys_by_account: BTreeMap<String, Vec<OccurrenceKey>> = BTreeMap::new();
        for f in due {
            if let Some(k) = self.key(f) {
                keys_by_account
                    .entry(k.account.clone())
                    .or_default()
                    .push(k);
            }
        }
        for batch in planner::batches(&self.config, due, at) {
            let keys = keys_by_account.remove(&batch.account).unwrap_or_default();
            let Some(rt) = self.accounts.get(&batch.account) else {
                continue;
            };
            tracing::info!(
                account = %batch.account,
                "{}due at {}: {}",
                resumed.map_or(String::new(), |p| format!("resumed after a restart (was {}): ", p.as_str())),
                at.to_rfc3339(),
                batch
                    .requests
                    .iter()
                    .map(|r| format!("{} {}", r.action, r.rule))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.open.extend(keys.iter().cloned());
            let already: BTreeSet<String> = keys
                .iter()
                .filter_map(|k| reported.get(k))
                .flatten()
                .cloned()
                .collect();
            let record = self.record.clone();
            let reported_record = self.record.clone();
            let reported_keys = keys.clone();
            let dispatched_keys = keys.clone();
            let ctx = BatchContext {
                clients: rt.clients.clone(),
                opts: self.exec_options(),
                cancel: self.cancel.clone(),
                stopping: Some(self.stopping.clone()),
                clock: self.clock.clone(),
                sink: self.sink.clone(),
                on_dispatch: Arc::new(move || {
                    if let Err(e) = record.dispatched(&dispatched_keys) {
                        tracing::error!("cannot save state (dispatching): {e}");
                    }
                }),
                on_reported: Arc::new(move |targets| {
                    if let Err(e) = reported_record.reported(&reported_keys, targets) {
                        tracing::error!("cannot save state (results reported): {e}");
                    }
                }),
                already_reported: Arc::new(already),
                claims: self.claims.clone(),
            };
            self.inflight.spawn(run_batch(ctx, batch, keys));
        }
    }

    /// Occurrences an earlier process recorded but did not finish: resumed when still within their
    /// window, reported failed otherwise.
    fn resume(&mut self, snapshot: &Snapshot) {
        let now = self.clock.now();
        let mut resumable: BTreeMap<Phase, Vec<Firing>> = BTreeMap::new();
        let mut closed = Vec::new();
        let mut interrupted = Vec::new();
        for (key, phase) in &snapshot.open {
            let rule = self
                .config
                .rules
                .iter()
                .find(|r| r.name == key.rule && r.account == key.account);
            let why = match rule {
                None => Some("its rule is no longer in the configuration".to_string()),
                Some(r) if now - key.at > chrono_duration(r.catch_up) => Some(format!(
                    "it is now {} late, past the rule's catch-up window of {}",
                    humantime::format_duration((now - key.at).to_std().unwrap_or_default()),
                    humantime::format_duration(r.catch_up)
                )),
                Some(_) => None,
            };
            match why {
                None => resumable.entry(*phase).or_default().push(Firing {
                    rule: key.rule.clone(),
                    account: key.account.clone(),
                    action: key.action,
                    at: key.at,
                }),
                Some(why) => {
                    let selection =
                        rule.map_or(String::new(), |r| format!(" (selection: {})", r.selection));
                    interrupted.push(Outcome {
                        action: key.action,
                        rules: vec![key.rule.clone()],
                        account: key.account.clone(),
                        region: rule.map_or(String::new(), |r| r.regions.join(",")),
                        instance_id: None,
                        result: ResultKind::Failed,
                        reason: format!(
                            "interrupted: shiftd stopped while this occurrence (due at {}) was {}, and {why}; \
                             not resumed{}: check the instances{selection}",
                            key.at.to_rfc3339(),
                            phase.as_str(),
                            if *phase == Phase::Dispatched { " (Start/Stop calls may have been made)" } else { "" }
                        ),
                        trigger: Trigger::Schedule,
                    });
                    closed.push(key.clone());
                }
            }
        }
        for o in &interrupted {
            self.sink.record(o);
        }
        if !interrupted.is_empty() {
            self.sink.batch_done(&interrupted);
        }
        if !closed.is_empty() {
            let r = self.record.done(&closed);
            self.recorded("closing interrupted occurrences", r);
            self.done.extend(closed);
        }
        for (phase, firings) in resumable {
            // Grouped by instant: each batch carries the occurrences of one instant.
            let mut by_at: BTreeMap<DateTime<Utc>, Vec<Firing>> = BTreeMap::new();
            for f in firings {
                by_at.entry(f.at).or_default().push(f);
            }
            for (_, group) in by_at {
                self.dispatch(&group, Some(phase), &snapshot.reported);
            }
        }
    }

    fn batch_done(&mut self, done: Result<BatchDone, tokio::task::JoinError>) {
        match done {
            Ok(BatchDone {
                keys,
                outcomes,
                trigger,
            }) => {
                log_batch_done(&outcomes);
                self.results_since_release += outcomes.len();
                if !outcomes.is_empty() {
                    self.sink.batch_done(&outcomes);
                }
                if trigger == Trigger::Enforce {
                    self.enforcing = self.enforcing.saturating_sub(1);
                } else {
                    let r = self.record.done(&keys);
                    self.recorded("recording done occurrences", r);
                    for k in keys {
                        self.open.remove(&k);
                        self.done.insert(k);
                    }
                    // Remembered as long as the record remembers them.
                    if let Some(latest) = self.done.iter().map(|k| k.at).max() {
                        let horizon = latest - chrono_duration(state::REMEMBER_DONE);
                        self.done.retain(|k| k.at >= horizon);
                    }
                }
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => tracing::error!("an action batch crashed: {e}"),
        }
        if self.inflight.is_empty() && self.results_since_release >= RELEASE_MEMORY_AFTER {
            self.results_since_release = 0;
            release_memory();
        }
    }

    /// Applies a new configuration.
    async fn apply(&mut self, new: Config, path: &std::path::Path) {
        let sources_differ = new.credentials != *self.aws.source();
        if new.metrics != self.config.metrics {
            tracing::warn!(
                "[metrics] changed: the metrics endpoint keeps its address until shiftd is restarted"
            );
        }
        if new.pacing != self.written.pacing {
            self.pacer.reconfigure(&new.pacing, self.clock.monotonic());
            let now = new.pacing.differences();
            tracing::info!(
                "[pacing] changed, applied at once (calls already in flight finish; under a lower cap, \
                 new calls wait until those in flight are under it): {}",
                if now.is_empty() {
                    "the defaults".to_string()
                } else {
                    now.join("; ")
                }
            );
        }
        self.written = Arc::new(new);
        self.rebuild();
        // An instant already taken in ahead (`resolve_ahead`) is looked at again with the new rules: a
        // rule added for it is carried out too (those already in flight are not repeated).
        self.checked_until = self.checked_until.min(self.clock.now());
        self.partly_taken = None;
        if sources_differ {
            self.aws = (self.connect)(&self.config.credentials, first_region(&self.config));
            self.accounts.clear();
            self.org = None;
        }
        self.reset_org().await;
        self.sink.configured(&self.config);
        self.reconcile_accounts().await;
        self.claims = claimer(
            &self.config,
            self.aws.as_ref(),
            &self.claim_owner,
            &self.clock,
        )
        .await;
        self.next_enforce = self.clock.monotonic();
        tracing::info!("configuration reloaded from {}", path.display());
        log_started(self);
    }
}

/// The sink of enforce passes: an instance left alone or failed for the same reason as at the last pass
/// is not logged again (a week-long `shiftd:skip-until` would otherwise be logged every
/// `enforce_every`); any other outcome, or a new reason, is, and forgets the old one.
struct QuietRepeats {
    inner: Arc<dyn OutcomeSink>,
    said: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
    /// What this pass's batch did log: what its end (and its alert) is about.
    forwarded: std::sync::Mutex<Vec<Outcome>>,
}

impl QuietRepeats {
    fn take_forwarded(&self) -> Vec<Outcome> {
        std::mem::take(&mut *self.forwarded.lock().expect("forwarded lock"))
    }
}

impl OutcomeSink for QuietRepeats {
    fn record(&self, outcome: &Outcome) {
        if let Some(id) = &outcome.instance_id {
            let mut said = self.said.lock().expect("enforce_said lock");
            let what = format!("{}: {}", outcome.result, outcome.reason);
            match outcome.result {
                ResultKind::Skipped | ResultKind::Failed | ResultKind::DryRun => {
                    if said.get(id) == Some(&what) {
                        tracing::debug!(instance_id = %id, "enforce: still {what}");
                        return;
                    }
                    said.insert(id.clone(), what);
                }
                _ => {
                    said.remove(id);
                }
            }
        }
        self.inner.record(outcome);
        self.forwarded
            .lock()
            .expect("forwarded lock")
            .push(outcome.clone());
    }
}

/// A scheduled batch: the occurrences it carries out, and every outcome.
async fn run_batch(ctx: BatchContext, batch: AccountBatch, keys: Vec<OccurrenceKey>) -> BatchDone {
    let (account, at) = (batch.account.clone(), batch.at);
    match executor::run_batch_at_instant(ctx, batch).await {
        Some(outcomes) => BatchDone {
            keys,
            outcomes,
            trigger: Trigger::Schedule,
        },
        None => {
            tracing::info!(
                account = %account,
                "shutting down before {}: its occurrences in account {account} were not acted on; they \
                 stay recorded and are resumed at the next start",
                at.to_rfc3339()
            );
            // Not done: they stay open in the record.
            BatchDone {
                keys: Vec::new(),
                outcomes: Vec::new(),
                trigger: Trigger::Schedule,
            }
        }
    }
}

/// The enforce pass `now` falls in: the latest wall-clock multiple of `every` (since the epoch).
fn enforce_slot(now: DateTime<Utc>, every: chrono::Duration) -> DateTime<Utc> {
    let every_ms = every.num_milliseconds().max(1);
    let ms = now.timestamp_millis();
    DateTime::from_timestamp_millis(ms - ms.rem_euclid(every_ms)).unwrap_or(now)
}

/// The claimer `[cluster]` asks for, if any.
pub(crate) async fn claimer(
    config: &Config,
    aws: &dyn Aws,
    owner: &str,
    clock: &Arc<dyn Clock>,
) -> Option<Claimer> {
    let cluster = config.cluster.as_ref()?;
    Some(Claimer {
        table: aws.claim_table(&cluster.table, &cluster.region).await,
        owner: owner.to_string(),
        lease: cluster.lease,
        clock: clock.clone(),
    })
}

/// Where the delegate's own STS calls go: the first configured account's first region.
pub(crate) fn first_region(config: &Config) -> &str {
    config
        .accounts
        .values()
        .next()
        .map_or("us-east-1", |a| a.regions[0].as_str())
}

/// Loads the configuration for running: valid, and with at least one rule. Off the async threads: a
/// slow or odd file cannot stall the scheduling loop.
async fn load(path: &std::path::Path) -> Result<Config, RunError> {
    let owned = path.to_path_buf();
    let config = tokio::task::spawn_blocking(move || Config::load_strict(&owned))
        .await
        .unwrap_or_else(|e| {
            Err(ConfigError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!("reading the configuration failed: {e}")),
            })
        })?;
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
    let Deps {
        clock,
        aws: connect,
        outcomes: sink,
        record,
        mut reload,
        metrics,
    } = deps;
    let config = Arc::new(load(&settings.config_path).await?);
    let aws = connect(&config.credentials, first_region(&config));
    let delegate = aws.delegate_name().await;
    let session_name = credentials::session_name(&delegate);
    let claim_owner = format!("{delegate}/{:016x}", rand::random::<u64>());
    let claims = claimer(&config, aws.as_ref(), &claim_owner, &clock).await;
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let snapshot = match record.load() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("{e}");
            Snapshot::default()
        }
    };
    let now = clock.now();
    let mut checked_until = resume_point(snapshot.checked_until, now);
    // In a cluster, look back over the shortest catch-up window whatever the state says: an occurrence
    // whose holder died is finished by whoever is alive, also by a delegate started after its instant
    // (claims keep it from being done twice; within every rule's window, nothing is reported missed).
    if claims.is_some()
        && let Some(window) = config.rules.iter().map(|r| r.catch_up).min()
    {
        checked_until = checked_until.min(now - chrono_duration(window));
    }
    // Saved by a clock that was ahead of this one: what it did after now comes round again.
    let snapshot = if snapshot.checked_until.is_some_and(|saved| saved > now) {
        // Kept: an occurrence taken in ahead of its instant, about to be resumed; forgotten: what a
        // clock that was further ahead recorded.
        let keep = now + chrono_duration(config.defaults.resolve_ahead);
        if let Err(e) = record.rewind(now, keep) {
            tracing::warn!("{e}");
        }
        record.load().unwrap_or_default()
    } else {
        snapshot
    };
    let now_mono = clock.monotonic();
    let pacer = Arc::new(crate::pacing::Pacer::from_config(&config.pacing));
    let mut daemon = Daemon {
        written: config.clone(),
        org: None,
        config,
        dry_run_flag: settings.dry_run,
        last_tick: (now, now_mono),
        clock,
        connect,
        aws,
        sink,
        record,
        session_name,
        claims,
        claim_owner,
        accounts: BTreeMap::new(),
        inflight: JoinSet::new(),
        cancel: cancel_rx,
        stopping: stopping_rx,
        checked_until,
        next_due: Default::default(),
        partly_taken: None,
        // Nothing written yet by this process: the first pass writes.
        written_until: DateTime::<Utc>::MIN_UTC,
        done: snapshot.done.clone(),
        open: BTreeSet::new(),
        record_ok: true,
        next_enforce: now_mono,
        enforce_after_batches: false,
        enforcing: 0,
        enforce_said: Default::default(),
        results_since_release: 0,
        pacer,
        metrics,
        credentials_published: Default::default(),
    };
    daemon.rebuild();
    daemon.reset_org().await;
    daemon.sink.configured(&daemon.config);
    daemon.reconcile_accounts().await;
    log_started(&daemon);
    let pacing = daemon.written.pacing.differences();
    if !pacing.is_empty() {
        tracing::info!("pacing (not the defaults): {}", pacing.join("; "));
    }
    daemon.resume(&snapshot);
    // Ready once the configuration is loaded and the schedule armed. Credential trouble is not fatal
    // (IMDS can be slow right after boot): the renewal retries, and STATUS= says so.
    let mut service = ServiceManager::from_env();
    service.ready();
    let max_sleep = service.max_sleep().map_or(MAX_SLEEP, |w| w.min(MAX_SLEEP));
    tokio::pin!(shutdown);

    // STATUS= and the next-action metrics cost a look at every rule's next occurrences: while batches
    // end one after another (a thousand accounts acting at one instant), at most once a second.
    let mut last_status: Option<tokio::time::Instant> = None;
    // Set by a burst of work that ends with nothing in flight to show for it (start-up, credentials
    // fetched, a reload): memory is given back once the daemon is idle again. Start-up's is the largest:
    // the parsed documents and a thousand rules' intermediate forms freed, the argument parser's, the
    // configuration's and the SDK's set-up code mapped.
    let mut release_pending = true;
    loop {
        daemon.maybe_refresh_org();
        daemon.say_stale(daemon.clock.now());
        daemon.tick();
        daemon.maybe_enforce();
        let now = daemon.clock.now();
        let mono = daemon.clock.monotonic();
        if daemon.inflight.is_empty()
            || last_status.is_none_or(|t| mono.duration_since(t) >= STATUS_EVERY_WHILE_BUSY)
        {
            last_status = Some(mono);
            if let Some(m) = &daemon.metrics {
                m.set_next_actions(&daemon.config, now);
            }
            service.status(&daemon.status_line(now));
        }
        // From the scheduling loop itself: a hung loop stops the pings and systemd restarts shiftd.
        service.watchdog();
        // While an account waits for credentials, wake often enough that STATUS= shows when they came;
        // while a batch is paced, often enough that it shows its progress.
        let no_credentials: Vec<AccountCredentials> = daemon
            .accounts
            .values()
            .filter(|rt| !rt.clients.credentials.is_usable_now())
            .map(|rt| rt.clients.credentials.clone())
            .collect();
        let waiting = !no_credentials.is_empty() || !daemon.pacer.progress().is_empty();
        if waiting {
            release_pending = true;
        } else if release_pending && daemon.inflight.is_empty() {
            release_pending = false;
            release_memory();
        }
        let cap = if waiting {
            max_sleep.min(CREDENTIALS_STATUS_EVERY)
        } else {
            max_sleep
        };
        // (While a pass runs, the next is started once it is done: woken by its batches ending.)
        let cap = if daemon.config.rules.iter().any(|r| r.enforce) && daemon.enforcing == 0 {
            cap.min(
                daemon
                    .next_enforce
                    .saturating_duration_since(daemon.clock.monotonic()),
            )
        } else {
            cap
        };
        // The next listing of the organization's accounts (while none is under way).
        let cap = match &daemon.org {
            Some(o) if o.running.is_none() => {
                cap.min(o.next.saturating_duration_since(daemon.clock.monotonic()))
            }
            _ => cap,
        };
        let sleep_for = daemon
            .next_pass(now)
            .map(|n| (n - now).to_std().unwrap_or_default())
            .unwrap_or(cap)
            .min(cap);
        tokio::select! {
            () = sleep_or_credentials(sleep_for, &daemon.credentials_published, no_credentials) => {}
            // (Polled only while an account waits: renewals later on need no wake.)
            Some(()) = reload.recv() => {
                service.reloading();
                match load(&settings.config_path).await {
                    Ok(new) => daemon.apply(new, &settings.config_path).await,
                    Err(e) => tracing::error!(
                        error = %e,
                        "configuration reload failed; still running the previous configuration:\n{e}"
                    ),
                }
                service.ready();
                release_pending = true;
            }
            Some(done) = daemon.inflight.join_next(), if !daemon.inflight.is_empty() => {
                daemon.batch_done(done);
            }
            result = discovery_done(&mut daemon.org) => {
                daemon.discovered(result);
                daemon.sink.configured(&daemon.config);
                daemon.reconcile_accounts().await;
            }
            () = &mut shutdown => break,
        }
    }

    service.stopping();
    service.status("stopping");
    let _ = stopping_tx.send(true);
    drain(&mut daemon, cancel_tx).await;
    tracing::info!("stopped");
    Ok(())
}

/// Sleeps for `duration`, or until each account of `waiting_for` has usable credentials (woken by
/// `published` at each renewal): STATUS= then says so at once, and what start-up used is given back.
async fn sleep_or_credentials(
    duration: Duration,
    published: &Notify,
    waiting_for: Vec<AccountCredentials>,
) {
    let sleep = tokio::time::sleep(duration);
    tokio::pin!(sleep);
    if waiting_for.is_empty() {
        return sleep.await;
    }
    loop {
        tokio::select! {
            () = &mut sleep => return,
            () = published.notified() => {
                if waiting_for.iter().all(AccountCredentials::is_usable_now) {
                    return;
                }
            }
        }
    }
}

/// Lets in-flight batches finish within the shutdown bounds; what they cannot confirm is reported.
async fn drain(daemon: &mut Daemon, cancel: watch::Sender<bool>) {
    if daemon.inflight.is_empty() {
        tracing::info!("shutting down: no action in flight");
        return;
    }
    tracing::info!(
        "shutting down: {} batch(es) in flight, following them for up to {}",
        daemon.inflight.len(),
        humantime::format_duration(SHUTDOWN_FOLLOW)
    );
    let mut bound = SHUTDOWN_FOLLOW;
    loop {
        match tokio::time::timeout(bound, daemon.inflight.join_next()).await {
            Ok(Some(done)) => daemon.batch_done(done),
            Ok(None) => return,
            Err(_) if !*cancel.borrow() => {
                // Stop following: every instance still unconfirmed is reported as such.
                let _ = cancel.send(true);
                bound = SHUTDOWN_REPORT;
            }
            Err(_) => {
                tracing::error!(
                    "in-flight actions did not finish within the shutdown grace; abandoning them \
                     (their Start/Stop calls may have been made: they are resumed at the next start)"
                );
                return;
            }
        }
    }
}

fn log_started(daemon: &Daemon) {
    let c = &daemon.config;
    tracing::info!(
        config = %c.path.display(),
        accounts = c.accounts.len(),
        rules = c.rules.len(),
        dry_run = daemon.dry_run(),
        session_name = %daemon.session_name,
        "running {} rule(s) over {} account(s) from {}{}",
        c.rules.len(),
        c.accounts.len(),
        c.path.display(),
        if daemon.dry_run() { " (dry run: no instance will be started or stopped)" } else { "" }
    );
}

/// Where the scheduling loop starts: the saved instant when there is one, so the occurrences shiftd
/// slept through are caught up (at most each rule's `catch_up` late) or reported as missed.
fn resume_point(saved: Option<DateTime<Utc>>, now: DateTime<Utc>) -> DateTime<Utc> {
    let (from, note) = state::resume_from(saved, now, state::MAX_LOOKBACK);
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    if from < now {
        tracing::info!(
            "resuming from {} (last run): occurrences since then are caught up when at most their \
             rule's catch_up late, reported as missed otherwise",
            from.to_rfc3339(),
        );
    }
    from
}

/// One entry per rule and action that missed occurrences: the occurrence itself when it is one, the
/// count and the span otherwise.
fn report_missed(sink: &dyn OutcomeSink, config: &Config, missed: &[Missed], now: DateTime<Utc>) {
    let mut outcomes = Vec::new();
    for m in missed {
        let Some(rule) = config
            .rules
            .iter()
            .find(|r| r.name == m.rule && r.account == m.account)
        else {
            continue;
        };
        let reason = if m.count == 1 {
            format!(
                "missed: due at {}, noticed at {} (more than catch_up = {} late: shiftd was not \
                 running or the machine was suspended); not acted on (selection: {})",
                m.first.to_rfc3339(),
                now.to_rfc3339(),
                humantime::format_duration(rule.catch_up),
                rule.selection
            )
        } else {
            format!(
                "missed {}{} occurrence(s) from {} to {}, noticed at {} (shiftd was not running or the \
                 machine was suspended); not acted on (selection: {})",
                if m.count_is_lower_bound {
                    "at least "
                } else {
                    ""
                },
                m.count,
                m.first.to_rfc3339(),
                m.last.to_rfc3339(),
                now.to_rfc3339(),
                rule.selection
            )
        };
        let outcome = Outcome {
            action: m.action,
            rules: vec![rule.name.clone()],
            account: rule.account.clone(),
            region: rule.regions.join(","),
            instance_id: None,
            result: ResultKind::Missed,
            reason,
            trigger: Trigger::Schedule,
        };
        sink.record(&outcome);
        outcomes.push(outcome);
    }
    if !outcomes.is_empty() {
        sink.batch_done(&outcomes);
    }
}

fn log_batch_done(outcomes: &[Outcome]) {
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
