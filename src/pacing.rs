//! Pacing: how fast shiftd calls AWS.
//!
//! - A process-wide cap on calls in flight ([`IN_FLIGHT`]), shared by EC2 and STS, of which one account
//!   may hold at most [`PER_ACCOUNT_IN_FLIGHT`]: a big account queues behind its own share, so a small
//!   account's call waits for at most one call per busy account ahead of it.
//! - Per AWS account and region, a model of EC2's token buckets ([`Ec2Limits`], the defaults of EC2's
//!   API throttling documentation unless `[pacing]` says otherwise, for every account or for one):
//!   StartInstances/StopInstances calls are sized to the resource tokens there are and sent when the
//!   model says EC2 will accept them, instead of being refused.
//! - A throttled answer (`RequestLimitExceeded`) empties the model's buckets and holds the place back
//!   for an exponential, jittered pause ([`backoff`]); the same call is then retried.
//! - AssumeRole calls take a token of a process-wide bucket ([`STS_RATE`]), so that 1,000 accounts at
//!   start-up do not hit STS at once.
//!
//! The caps and the EC2 limits are `[pacing]`'s ([`Pacer::from_config`]), changed on reload
//! ([`Pacer::reconfigure`]).
//!
//! The buckets are pure: they take the time as an argument and never read a clock. Waiting is done by
//! the callers, with `tokio::time`, so paused-time tests drive it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::aws::{AwsError, Ec2};
use crate::clock::Clock;
use crate::config::{Action, PacingConfig, Selection};
use crate::planner::InstanceView;

/// Calls to AWS in flight at once, for the whole process (EC2 and STS): `[pacing] max_in_flight`'s
/// default.
pub const IN_FLIGHT: usize = 64;
/// Of those, at most this many for one target account: `max_in_flight_per_account`'s default.
pub const PER_ACCOUNT_IN_FLIGHT: usize = 8;
/// StartInstances/StopInstances calls carry at most this many IDs.
pub const IDS_PER_CALL: usize = 100;
/// Once the resource bucket is empty, a call waits until it can carry this much refill (or 100 IDs):
/// 20 IDs every 10 s for StartInstances at 2/s, full calls every 5 s for StopInstances at 20/s.
pub const CHUNK_REFILL: Duration = Duration::from_secs(10);
/// AssumeRole calls of the whole process: a burst of 50, then 50 per second (1,000 accounts at start-up
/// in about 20 s), far below STS's own request quota.
pub const STS_RATE: Rate = Rate {
    capacity: 50.0,
    per_second: 50.0,
};
/// The model keeps this much refill in hand: EC2 takes a call's tokens when the call arrives, a little
/// after shiftd planned it, and that delay varies from call to call (at 2 tokens a second, half a token).
pub const MARGIN: Duration = Duration::from_millis(250);
/// DescribeInstances pages are of this many instances (the SDK wrapper's page size): a describe that
/// returned more took more than one request, and more than one token.
const DESCRIBE_PAGE: usize = 500;
/// A throttled describe is tried at most this many times (the pauses add up to about 30 s).
const DESCRIBE_ATTEMPTS: u32 = 5;

/// A token bucket's size and refill rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub capacity: f64,
    pub per_second: f64,
}

/// EC2's token buckets in one account and region.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ec2Limits {
    /// Request bucket of non-mutating actions (DescribeInstances, DescribeInstanceStatus).
    pub describe: Rate,
    /// Request bucket of mutating actions (StartInstances and StopInstances share it).
    pub mutate: Rate,
    /// Resource bucket of StartInstances: a token per instance in the call.
    pub start_instances: Rate,
    /// Resource bucket of StopInstances: a token per instance in the call.
    pub stop_instances: Rate,
}

impl Ec2Limits {
    /// The defaults of EC2's API throttling documentation ("Request throttling for the Amazon EC2
    /// API"), and of `[pacing.ec2]`, written here only: the in-process fake AWS (`aws::fake`, throttling like EC2) and the fleet
    /// benchmark's fake endpoint take them from here.
    pub const DEFAULT: Self = Self {
        describe: Rate {
            capacity: 100.0,
            per_second: 20.0,
        },
        mutate: Rate {
            capacity: 50.0,
            per_second: 5.0,
        },
        start_instances: Rate {
            capacity: 1000.0,
            per_second: 2.0,
        },
        stop_instances: Rate {
            capacity: 1000.0,
            per_second: 20.0,
        },
    };
}

impl Default for Ec2Limits {
    /// [`Ec2Limits::DEFAULT`].
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One token bucket, full at first. Tokens may go below zero: a reservation of tokens not there yet,
/// which later takers wait behind.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    at: Option<Instant>,
}

impl TokenBucket {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            tokens: rate.capacity,
            at: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.capacity);
        }
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }

    /// Tokens there at `now` (negative: reserved ahead).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// How long until `n` tokens are there (`n` at most the capacity).
    pub fn wait_for(&mut self, now: Instant, n: f64) -> Duration {
        self.refill(now);
        let missing = n.min(self.rate.capacity) - self.tokens;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.rate.per_second)
        }
    }

    /// Takes `n` tokens if they are there.
    pub fn take(&mut self, now: Instant, n: f64) -> bool {
        self.refill(now);
        if self.tokens + 1e-9 < n {
            return false;
        }
        self.tokens -= n;
        true
    }

    /// Takes `n` tokens whether or not they are there; returns how long until they are (the caller
    /// waits that long before its call).
    pub fn reserve(&mut self, now: Instant, n: f64) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate.per_second)
        }
    }

    /// Empties the bucket (EC2 said it is empty): reservations ahead are kept.
    pub fn drain(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = self.tokens.min(0.0);
    }

    /// The refill kept in hand ([`MARGIN`]), but never so much that a full bucket holds less than one
    /// token beyond it (a small configured bucket still lets calls go).
    fn margin(&self) -> f64 {
        (self.rate.per_second * MARGIN.as_secs_f64()).min((self.rate.capacity - 1.0).max(0.0))
    }

    /// Takes `rate` from `now` on: the tokens there are stay (refilled at the old rate until `now`),
    /// at most the new capacity; a raised capacity fills as the bucket refills.
    pub fn set_rate(&mut self, now: Instant, rate: Rate) {
        self.refill(now);
        self.rate = rate;
        self.tokens = self.tokens.min(rate.capacity);
    }
}

/// Pause before retry `attempt` (0-based) of a throttled call: 1 s doubling to 32 s, scaled by `jitter`
/// in [0, 1) into its upper half, in whole milliseconds.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(5));
    let scaled = base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    Duration::from_millis(scaled.as_millis() as u64)
}

/// Whether an answer says the caller is throttled.
pub fn is_throttling(e: &AwsError) -> bool {
    matches!(
        e.code(),
        Some("RequestLimitExceeded" | "Throttling" | "ThrottlingException")
    )
}

/// What the model says of the next Start/Stop call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Send a call with this many IDs now (its tokens are taken).
    Send(usize),
    /// Nothing can go before this much time has passed.
    Wait(Duration),
}

/// EC2's buckets in one account and region, as shiftd models them, and its throttling streak there.
#[derive(Clone, Debug)]
pub struct RegionBuckets {
    describe: TokenBucket,
    mutate: TokenBucket,
    start_instances: TokenBucket,
    stop_instances: TokenBucket,
    /// Throttled answers in a row.
    streak: u32,
    /// No call before this (after a throttled answer).
    hold_until: Option<Instant>,
}

impl RegionBuckets {
    pub fn new(limits: Ec2Limits) -> Self {
        Self {
            describe: TokenBucket::new(limits.describe),
            mutate: TokenBucket::new(limits.mutate),
            start_instances: TokenBucket::new(limits.start_instances),
            stop_instances: TokenBucket::new(limits.stop_instances),
            streak: 0,
            hold_until: None,
        }
    }

    fn resource(&mut self, action: Action) -> &mut TokenBucket {
        match action {
            Action::Start => &mut self.start_instances,
            Action::Stop => &mut self.stop_instances,
        }
    }

    fn held(&self, now: Instant) -> Option<Duration> {
        self.hold_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// The smallest call worth sending while IDs are waiting: what [`CHUNK_REFILL`] brings.
    pub fn min_chunk(&self, action: Action) -> usize {
        let rate = match action {
            Action::Start => self.start_instances.rate,
            Action::Stop => self.stop_instances.rate,
        };
        ((rate.per_second * CHUNK_REFILL.as_secs_f64()).ceil() as usize).clamp(1, IDS_PER_CALL)
    }

    /// The next call for `want` waiting IDs: how many go now (at most 100, at most the resource tokens
    /// there are, and at least [`Self::min_chunk`] unless fewer are waiting), or how long to wait.
    /// With `exact`, the call must carry all `want` (a retry of the same call).
    pub fn plan(&mut self, now: Instant, action: Action, want: usize, exact: bool) -> Plan {
        if want == 0 {
            return Plan::Send(0);
        }
        if let Some(pause) = self.held(now) {
            return Plan::Wait(pause);
        }
        let want = want.min(IDS_PER_CALL);
        let floor = if exact {
            want
        } else {
            want.min(self.min_chunk(action))
        };
        let request_margin = self.mutate.margin();
        let resource_margin = self.resource(action).margin();
        let request_wait = self.mutate.wait_for(now, 1.0 + request_margin);
        let resource_wait = self
            .resource(action)
            .wait_for(now, floor as f64 + resource_margin);
        let wait = request_wait.max(resource_wait);
        if !wait.is_zero() {
            // Never zero: a wait of a few nanoseconds must not be read as "go".
            return Plan::Wait(wait.max(Duration::from_millis(1)));
        }
        let there = (self.resource(action).available(now) - resource_margin + 1e-9)
            .floor()
            .max(0.0) as usize;
        let n = if exact { want } else { want.min(there) };
        if n == 0 {
            return Plan::Wait(Duration::from_millis(1));
        }
        self.mutate.take(now, 1.0);
        self.resource(action).take(now, n as f64);
        Plan::Send(n)
    }

    /// Takes `limits` from `now` on (a reload): see [`TokenBucket::set_rate`].
    pub fn set_limits(&mut self, now: Instant, limits: Ec2Limits) {
        self.describe.set_rate(now, limits.describe);
        self.mutate.set_rate(now, limits.mutate);
        self.start_instances.set_rate(now, limits.start_instances);
        self.stop_instances.set_rate(now, limits.stop_instances);
    }

    /// A describe's turn: takes its token, returns how long to wait before the call.
    pub fn describe_turn(&mut self, now: Instant) -> Duration {
        let held = self.held(now).unwrap_or_default();
        let wait = self.describe.reserve(now, 1.0);
        let wait = if wait.is_zero() { wait } else { wait + MARGIN };
        wait.max(held)
    }

    /// A describe took `requests` requests in all (pages): the ones beyond the first are charged now.
    pub fn charge_describes(&mut self, now: Instant, requests: usize) {
        if requests > 1 {
            self.describe.reserve(now, (requests - 1) as f64);
        }
    }

    /// EC2 answered a call of `action` (`None`: a describe) with a throttling error: the buckets it
    /// may have come from are emptied, and the place held back for a jittered, growing pause (returned).
    pub fn throttled(&mut self, now: Instant, action: Option<Action>, jitter: f64) -> Duration {
        match action {
            Some(a) => {
                self.mutate.drain(now);
                self.resource(a).drain(now);
            }
            None => self.describe.drain(now),
        }
        let pause = backoff(self.streak, jitter);
        self.streak = self.streak.saturating_add(1);
        let until = now + pause;
        self.hold_until = Some(self.hold_until.map_or(until, |h| h.max(until)));
        pause
    }

    /// A call went through: the throttling streak ends.
    pub fn accepted(&mut self) {
        self.streak = 0;
    }
}

/// One account and region's bucket model, shared by its clients.
pub type SharedBuckets = Arc<Mutex<RegionBuckets>>;

/// A place in the in-flight cap: one of the process's and one of the account's. Dropped when the
/// call is done.
pub struct Slot {
    _account: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

/// A long (paced) batch's progress, for `STATUS=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub action: Action,
    pub account: String,
    pub region: String,
    pub sent: usize,
    pub total: usize,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} of {} instances in {}/{} (paced to EC2's rate limits)",
            self.action,
            thousands(self.sent),
            thousands(self.total),
            self.account,
            self.region
        )
    }
}

/// `1357` as "1,357".
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// EC2's limits per AWS account: the default ones, and those of the accounts configured otherwise.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AccountLimits {
    pub default: Ec2Limits,
    /// Account ID (12 digits) -> its limits.
    pub accounts: HashMap<String, Ec2Limits>,
}

impl AccountLimits {
    /// The limits of the AWS account `account_id`.
    pub fn of(&self, account_id: &str) -> Ec2Limits {
        self.accounts
            .get(account_id)
            .copied()
            .unwrap_or(self.default)
    }
}

/// The in-flight caps: for the whole process, and for one account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Caps {
    in_flight: usize,
    per_account: usize,
}

impl Caps {
    fn new(in_flight: usize, per_account: usize) -> Self {
        let in_flight = in_flight.max(1);
        Self {
            in_flight,
            per_account: per_account.clamp(1, in_flight),
        }
    }
}

/// Gives `semaphore` `to` permits instead of `from`. Fewer: the free permits are taken away at once, and
/// the rest as the calls holding them finish (a waiting acquisition, first in the queue, forgets them),
/// so that no new call starts until the calls in flight are under the new cap.
fn resize(semaphore: &Arc<Semaphore>, from: usize, to: usize) {
    if to > from {
        semaphore.add_permits(to - from);
        return;
    }
    let fewer = from - to;
    let rest = fewer - semaphore.forget_permits(fewer);
    if rest > 0 {
        let semaphore = semaphore.clone();
        tokio::spawn(async move {
            if let Ok(permits) = semaphore.acquire_many_owned(rest as u32).await {
                permits.forget();
            }
        });
    }
}

/// The process-wide pacing state: the in-flight cap, the per-place bucket models, the STS bucket, and
/// the progress of paced batches. Shared (`Arc`) by every account's clients and credential renewal.
/// Its caps and EC2 limits come from `[pacing]` and change on reload ([`Pacer::reconfigure`]).
pub struct Pacer {
    global: Arc<Semaphore>,
    caps: Mutex<Caps>,
    accounts: Mutex<HashMap<String, Arc<Semaphore>>>,
    limits: Mutex<AccountLimits>,
    places: Mutex<HashMap<(String, String), SharedBuckets>>,
    sts: Mutex<TokenBucket>,
    progress: Mutex<BTreeMap<u64, Progress>>,
    next_progress: AtomicU64,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new(
            IN_FLIGHT,
            PER_ACCOUNT_IN_FLIGHT,
            Ec2Limits::default(),
            STS_RATE,
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pacer {
    pub fn new(in_flight: usize, per_account: usize, limits: Ec2Limits, sts: Rate) -> Self {
        Self::with_limits(
            in_flight,
            per_account,
            AccountLimits {
                default: limits,
                accounts: HashMap::new(),
            },
            sts,
        )
    }

    fn with_limits(in_flight: usize, per_account: usize, limits: AccountLimits, sts: Rate) -> Self {
        let caps = Caps::new(in_flight, per_account);
        Self {
            global: Arc::new(Semaphore::new(caps.in_flight)),
            caps: Mutex::new(caps),
            accounts: Default::default(),
            limits: Mutex::new(limits),
            places: Default::default(),
            sts: Mutex::new(TokenBucket::new(sts)),
            progress: Default::default(),
            next_progress: AtomicU64::new(0),
        }
    }

    /// The pacing `[pacing]` asks for.
    pub fn from_config(config: &PacingConfig) -> Self {
        Self::with_limits(
            config.max_in_flight,
            config.max_in_flight_per_account,
            config.account_limits(),
            STS_RATE,
        )
    }

    /// Takes a new `[pacing]` (a reload), from `now` on. Raised caps let waiting calls go at once;
    /// lowered ones hold new calls back until the calls in flight are under them. The bucket models
    /// keep their tokens (at most the new sizes) and refill at the new rates.
    pub fn reconfigure(&self, config: &PacingConfig, now: Instant) {
        // Locks in the order `slot` and `place` take them: no share or place is made meanwhile with
        // the old values.
        let accounts = lock(&self.accounts);
        let new = Caps::new(config.max_in_flight, config.max_in_flight_per_account);
        let old = std::mem::replace(&mut *lock(&self.caps), new);
        resize(&self.global, old.in_flight, new.in_flight);
        if new.per_account != old.per_account {
            for share in accounts.values() {
                resize(share, old.per_account, new.per_account);
            }
        }
        drop(accounts);
        let places = lock(&self.places);
        let limits = config.account_limits();
        for ((account_id, _), buckets) in places.iter() {
            lock(buckets).set_limits(now, limits.of(account_id));
        }
        *lock(&self.limits) = limits;
    }

    /// A place in the in-flight cap for a call on behalf of `account`: the account's share first, then
    /// the process's (both queues are first come, first served).
    pub async fn slot(&self, account: &str) -> Slot {
        let share = {
            let mut accounts = lock(&self.accounts);
            let per_account = lock(&self.caps).per_account;
            accounts
                .entry(account.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(per_account)))
                .clone()
        };
        let account = share.acquire_owned().await.expect("never closed");
        let global = self
            .global
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        Slot {
            _account: account,
            _global: global,
        }
    }

    /// The bucket model of one AWS account (its 12 digits) and region, shared by every client there.
    pub fn place(&self, account_id: &str, region: &str) -> SharedBuckets {
        let mut places = lock(&self.places);
        let limits = lock(&self.limits).of(account_id);
        places
            .entry((account_id.to_string(), region.to_string()))
            .or_insert_with(|| Arc::new(Mutex::new(RegionBuckets::new(limits))))
            .clone()
    }

    /// Waits for an AssumeRole's turn (the STS bucket), then for a place in the cap.
    pub async fn assume_role_turn(&self, account: &str, clock: &dyn Clock) -> Slot {
        let wait = lock(&self.sts).reserve(clock.monotonic(), 1.0);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        self.slot(account).await
    }

    /// Registers a paced batch's progress (shown until the guard is dropped).
    pub fn track(self: &Arc<Self>, progress: Progress) -> ProgressGuard {
        let id = self.next_progress.fetch_add(1, Ordering::Relaxed);
        lock(&self.progress).insert(id, progress);
        ProgressGuard {
            pacer: self.clone(),
            id,
        }
    }

    /// The paced batches in progress.
    pub fn progress(&self) -> Vec<Progress> {
        lock(&self.progress).values().cloned().collect()
    }
}

/// Keeps a paced batch's progress shown; updated with [`ProgressGuard::sent`].
pub struct ProgressGuard {
    pacer: Arc<Pacer>,
    id: u64,
}

impl ProgressGuard {
    pub fn sent(&self, sent: usize) {
        if let Some(p) = lock(&self.pacer.progress).get_mut(&self.id) {
            p.sent = sent;
        }
    }
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        lock(&self.pacer.progress).remove(&self.id);
    }
}

/// EC2 in one account and region, paced: every call takes a place in the in-flight cap, and describes
/// take their tokens of the describe bucket (a throttled describe is retried after a pause, a few
/// times). Start/Stop calls take only the place: their tokens are planned by the caller
/// ([`RegionBuckets::plan`]), which sizes them.
pub struct PacedEc2 {
    pub inner: Arc<dyn Ec2>,
    pub pacer: Arc<Pacer>,
    pub buckets: SharedBuckets,
    /// The account's name in the configuration (its share of the cap).
    pub account: String,
    pub clock: Arc<dyn Clock>,
}

impl PacedEc2 {
    async fn describe<F, Fut>(&self, call: F) -> Result<Vec<InstanceView>, AwsError>
    where
        F: Fn() -> Fut + Send + Sync,
        Fut: std::future::Future<Output = Result<Vec<InstanceView>, AwsError>> + Send,
    {
        let mut attempt = 0;
        loop {
            let wait = lock(&self.buckets).describe_turn(self.clock.monotonic());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let result = {
                let _slot = self.pacer.slot(&self.account).await;
                call().await
            };
            let now = self.clock.monotonic();
            match result {
                Ok(views) => {
                    let mut b = lock(&self.buckets);
                    b.accepted();
                    b.charge_describes(now, views.len().div_ceil(DESCRIBE_PAGE));
                    return Ok(views);
                }
                Err(e) if is_throttling(&e) && attempt + 1 < DESCRIBE_ATTEMPTS => {
                    let pause = lock(&self.buckets).throttled(now, None, rand::random());
                    attempt += 1;
                    tracing::info!(
                        account = %self.account,
                        error = %e,
                        "DescribeInstances throttled by EC2 ({e}); retrying in {}",
                        humantime::format_duration(pause)
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[async_trait]
impl Ec2 for PacedEc2 {
    async fn describe_selection(
        &self,
        selection: &Selection,
    ) -> Result<Vec<InstanceView>, AwsError> {
        self.describe(|| self.inner.describe_selection(selection))
            .await
    }

    async fn describe_ids(&self, ids: &[String]) -> Result<Vec<InstanceView>, AwsError> {
        self.describe(|| self.inner.describe_ids(ids)).await
    }

    async fn change_state(
        &self,
        action: Action,
        ids: &[String],
        dry_run: bool,
        hibernate: bool,
    ) -> Result<(), AwsError> {
        let _slot = self.pacer.slot(&self.account).await;
        self.inner
            .change_state(action, ids, dry_run, hibernate)
            .await
    }

    async fn count_instance_status(&self) -> Result<usize, AwsError> {
        let _slot = self.pacer.slot(&self.account).await;
        self.inner.count_instance_status().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Any instant will do: the model only compares the instants it is given.
    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_capacity() {
        let t0 = origin();
        let rate = Rate {
            capacity: 10.0,
            per_second: 2.0,
        };
        // (seconds after t0, take, expected taken, tokens left)
        let cases = [
            (0.0, 10.0, true, 0.0),
            (0.0, 1.0, false, 0.0),
            (1.0, 3.0, false, 2.0),
            (1.0, 2.0, true, 0.0),
            (100.0, 0.0, true, 10.0),
        ];
        let mut b = TokenBucket::new(rate);
        for (at, n, taken, left) in cases {
            let now = t0 + secs(at);
            assert_eq!(b.take(now, n), taken, "take {n} at {at}");
            assert!((b.available(now) - left).abs() < 1e-6, "left at {at}");
        }
    }

    #[test]
    fn waits_and_reservations_are_measured_from_the_refill_rate() {
        let t0 = origin();
        let rate = Rate {
            capacity: 1000.0,
            per_second: 2.0,
        };
        let mut b = TokenBucket::new(rate);
        assert_eq!(b.wait_for(t0, 1000.0), Duration::ZERO);
        assert!(b.take(t0, 1000.0));
        // (wanted, expected wait)
        for (n, wait) in [(1.0, 0.5), (20.0, 10.0), (100.0, 50.0), (5000.0, 500.0)] {
            assert_eq!(b.wait_for(t0, n), secs(wait), "{n}");
        }
        // Reservations queue: each waits behind the previous.
        assert_eq!(b.reserve(t0, 2.0), secs(1.0));
        assert_eq!(b.reserve(t0, 2.0), secs(2.0));
        // A drain keeps reservations.
        b.drain(t0 + secs(1.0));
        assert_eq!(b.wait_for(t0 + secs(1.0), 1.0), secs(1.5));
        // Time never runs backwards in the model.
        assert_eq!(b.wait_for(t0, 1.0), secs(1.5));
    }

    #[test]
    fn five_thousand_starts_go_out_as_a_thousand_then_as_the_bucket_refills() {
        let t0 = origin();
        let mut b = RegionBuckets::new(Ec2Limits::default());
        // (seconds after t0, IDs waiting, exact, expected plan)
        let cases = [
            (0.0, 5000, false, Plan::Send(100)),
            (0.0, 4900, false, Plan::Send(100)),
            (0.0, 4800, false, Plan::Send(100)),
            (0.0, 4700, false, Plan::Send(100)),
            (0.0, 4600, false, Plan::Send(100)),
            (0.0, 4500, false, Plan::Send(100)),
            (0.0, 4400, false, Plan::Send(100)),
            (0.0, 4300, false, Plan::Send(100)),
            (0.0, 4200, false, Plan::Send(100)),
            // Half a token (250 ms of refill) kept in hand.
            (0.0, 4100, false, Plan::Send(99)),
            // The resource bucket is nearly empty (1 token): wait for 20 (and the half in hand) at 2/s,
            // not for 1.
            (0.0, 4001, false, Plan::Wait(secs(9.75))),
            (4.0, 4001, false, Plan::Wait(secs(5.75))),
            (9.75, 4001, false, Plan::Send(20)),
            // A bigger wait brings a bigger call.
            (40.0, 3981, false, Plan::Send(60)),
            // Fewer waiting than the minimum: they go as soon as there are tokens for them.
            (41.0, 2, false, Plan::Send(2)),
            // A retry of a 100-ID call waits for 100 tokens.
            (41.0, 100, true, Plan::Wait(secs(49.75))),
            (91.0, 100, true, Plan::Send(100)),
        ];
        for (at, want, exact, plan) in cases {
            assert_eq!(
                b.plan(t0 + secs(at), Action::Start, want, exact),
                plan,
                "{want} waiting at {at} s"
            );
        }
    }

    #[test]
    fn stops_are_bound_by_the_request_bucket_once_the_resource_bucket_allows_full_calls() {
        let t0 = origin();
        let mut b = RegionBuckets::new(Ec2Limits::default());
        let mut sent = 0;
        // 48 one-instance stops: the request bucket's 50 tokens, 1.25 (250 ms of refill) kept in hand.
        while let Plan::Send(n) = b.plan(t0, Action::Stop, 1, false) {
            sent += n;
        }
        assert_eq!(sent, 48);
        assert_eq!(
            b.plan(t0, Action::Stop, 1, false),
            Plan::Wait(secs(0.05)),
            "5 requests per second"
        );
        assert_eq!(
            b.plan(t0 + secs(0.05), Action::Stop, 1, false),
            Plan::Send(1)
        );
        assert_eq!(
            b.plan(t0 + secs(0.05), Action::Start, 1, false),
            Plan::Wait(secs(0.2)),
            "starts share the request bucket"
        );
        assert_eq!(b.min_chunk(Action::Stop), 100);
        assert_eq!(b.min_chunk(Action::Start), 20);
    }

    #[test]
    fn a_throttled_answer_empties_the_model_and_holds_the_place_back_longer_each_time() {
        let t0 = origin();
        let mut b = RegionBuckets::new(Ec2Limits::default());
        // (jitter, expected pause)
        let cases = [(1.0, 1.0), (1.0, 2.0), (0.0, 2.0), (1.0, 8.0)];
        let mut now = t0;
        for (jitter, pause) in cases {
            assert_eq!(b.throttled(now, Some(Action::Start), jitter), secs(pause));
            assert_eq!(
                b.plan(now, Action::Start, 1, false),
                Plan::Wait(secs(pause))
            );
            now += secs(pause);
        }
        // Once the pause is over, the emptied bucket still decides.
        assert_eq!(
            b.plan(now, Action::Start, 100, true),
            Plan::Wait(secs(42.25)),
            "100 tokens and the half in hand, refilled at 2/s since the last drain (8 s ago)"
        );
        b.accepted();
        assert_eq!(b.throttled(now, None, 1.0), secs(1.0), "the streak ended");
        assert_eq!(
            b.describe_turn(now),
            secs(1.0),
            "a describe waits out the hold (its token comes meanwhile)"
        );
    }

    #[test]
    fn backoff_doubles_jitters_and_caps() {
        // (attempt, jitter, expected)
        let cases = [
            (0, 0.0, 0.5),
            (0, 1.0, 1.0),
            (3, 1.0, 8.0),
            (5, 1.0, 32.0),
            (30, 1.0, 32.0),
            (30, 0.0, 16.0),
        ];
        for (attempt, jitter, want) in cases {
            assert_eq!(backoff(attempt, jitter), secs(want), "{attempt} {jitter}");
        }
    }

    #[test]
    fn thousands_are_separated() {
        for (n, s) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (1357, "1,357"),
            (40000, "40,000"),
            (1234567, "1,234,567"),
        ] {
            assert_eq!(thousands(n), s);
        }
        let p = Progress {
            action: Action::Stop,
            account: "account1".into(),
            region: "us-east-1".into(),
            sent: 1357,
            total: 5000,
        };
        assert_eq!(
            p.to_string(),
            "stop: 1,357 of 5,000 instances in account1/us-east-1 (paced to EC2's rate limits)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_account_cannot_take_every_place_and_others_are_served_in_turn() {
        let pacer = Arc::new(Pacer::new(4, 2, Ec2Limits::default(), STS_RATE));
        let big1 = pacer.slot("big").await;
        let _big2 = pacer.slot("big").await;
        // The big account's third call waits for its own share, not for the cap.
        let waiting_big = {
            let pacer = pacer.clone();
            tokio::spawn(async move { pacer.slot("big").await })
        };
        tokio::task::yield_now().await;
        let _small1 = tokio::time::timeout(Duration::from_secs(1), pacer.slot("small"))
            .await
            .expect("the small account gets a place while the big one waits");
        let _small2 = pacer.slot("other").await;
        // The cap (4) is full now.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), pacer.slot("third"))
                .await
                .is_err()
        );
        drop(big1);
        tokio::time::timeout(Duration::from_secs(1), waiting_big)
            .await
            .expect("the big account's call goes once its own call is done")
            .unwrap();
    }

    #[test]
    fn small_configured_buckets_still_let_calls_go() {
        let t0 = origin();
        let tiny = Rate {
            capacity: 1.0,
            per_second: 2.0,
        };
        let mut b = RegionBuckets::new(Ec2Limits {
            mutate: tiny,
            start_instances: tiny,
            ..Ec2Limits::DEFAULT
        });
        // (seconds after t0, IDs waiting, expected plan): one at a time, never an empty call, as the
        // one-token buckets refill (a half token in hand would leave none to send).
        let cases = [
            (0.0, 10, Plan::Send(1)),
            (0.0, 9, Plan::Wait(secs(0.5))),
            (0.5, 9, Plan::Send(1)),
            (10.0, 8, Plan::Send(1)),
        ];
        for (at, want, plan) in cases {
            assert_eq!(
                b.plan(t0 + secs(at), Action::Start, want, false),
                plan,
                "{want} waiting at {at} s"
            );
        }
    }

    #[test]
    fn new_limits_keep_the_tokens_there_are_and_refill_at_the_new_rate() {
        let t0 = origin();
        let mut b = RegionBuckets::new(Ec2Limits::DEFAULT);
        assert!(b.start_instances.take(t0, 1000.0));
        assert_eq!(
            b.plan(t0, Action::Start, 100, true),
            Plan::Wait(secs(50.25)),
            "the default 2/s (and the half token in hand)"
        );
        // AWS raised the account's StartInstances bucket to 5,000 at 10/s; the empty bucket is not
        // assumed full, it refills faster.
        let raised = Ec2Limits {
            start_instances: Rate {
                capacity: 5000.0,
                per_second: 10.0,
            },
            ..Ec2Limits::DEFAULT
        };
        b.set_limits(t0 + secs(1.0), raised);
        assert_eq!(
            b.plan(t0 + secs(1.0), Action::Start, 100, true),
            Plan::Wait(secs(10.05)),
            "2 tokens from the first second, 98 and 2.5 in hand at 10/s"
        );
        assert_eq!(b.min_chunk(Action::Start), 100);
        // Lowered: the tokens there are stay within the new size.
        b.set_limits(t0 + secs(1000.0), Ec2Limits::DEFAULT);
        for _ in 0..9 {
            assert_eq!(
                b.plan(t0 + secs(1000.0), Action::Start, 100, true),
                Plan::Send(100)
            );
        }
        assert_eq!(
            b.plan(t0 + secs(1000.0), Action::Start, 100, true),
            Plan::Wait(secs(0.25)),
            "1,000 tokens, not the 5,000 the raised bucket had refilled to"
        );
    }

    /// Whether a slot for `account` comes within a second.
    async fn gets_slot(pacer: &Pacer, account: &str) -> Option<Slot> {
        tokio::time::timeout(Duration::from_secs(1), pacer.slot(account))
            .await
            .ok()
    }

    #[tokio::test(start_paused = true)]
    async fn lowered_caps_hold_new_calls_back_until_those_in_flight_are_under_them() {
        let pacer = Arc::new(Pacer::new(4, 4, Ec2Limits::DEFAULT, STS_RATE));
        let config = |in_flight, per_account| PacingConfig {
            max_in_flight: in_flight,
            max_in_flight_per_account: per_account,
            ..PacingConfig::default()
        };
        let mut held = Vec::new();
        for account in ["a", "a", "b"] {
            held.push(gets_slot(&pacer, account).await.expect("under the cap"));
        }
        // 3 in flight; the cap goes down to 2 (1 per account).
        pacer.reconfigure(&config(2, 1), origin());
        assert!(gets_slot(&pacer, "c").await.is_none(), "3 in flight, cap 2");
        held.pop();
        assert!(gets_slot(&pacer, "c").await.is_none(), "2 in flight, cap 2");
        held.pop();
        let c = gets_slot(&pacer, "c").await.expect("1 in flight, cap 2");
        assert!(gets_slot(&pacer, "d").await.is_none(), "2 in flight, cap 2");
        drop(c);
        assert!(
            gets_slot(&pacer, "a").await.is_none(),
            "a's share is 1 now, and a has a call in flight"
        );
        // Raised again: calls go at once.
        pacer.reconfigure(&config(8, 3), origin());
        let mut more = Vec::new();
        for account in ["a", "a", "d", "e", "f", "g"] {
            more.push(
                gets_slot(&pacer, account)
                    .await
                    .expect("under the raised caps"),
            );
        }
        assert!(gets_slot(&pacer, "a").await.is_none(), "a's share is 3");
        more.push(gets_slot(&pacer, "h").await.expect("7 in flight, cap 8"));
        assert!(gets_slot(&pacer, "i").await.is_none(), "8 in flight, cap 8");
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_configured_otherwise_gets_its_own_limits_and_a_reload_changes_them() {
        let raised = Ec2Limits {
            start_instances: Rate {
                capacity: 5000.0,
                per_second: 10.0,
            },
            ..Ec2Limits::DEFAULT
        };
        let mut config = PacingConfig::default();
        config.accounts.insert(
            "111111111111".into(),
            crate::config::AccountPacing {
                written: "raised".into(),
                ec2: raised,
            },
        );
        let pacer = Pacer::from_config(&config);
        let starts_at_once = |buckets: &SharedBuckets| {
            let mut sent = 0;
            while let Plan::Send(n) = lock(buckets).plan(origin(), Action::Start, 100, true) {
                sent += n;
            }
            sent
        };
        let raised_place = pacer.place("111111111111", "us-east-1");
        let other = pacer.place("222222222222", "us-east-1");
        assert_eq!(
            starts_at_once(&raised_place),
            4800,
            "48 calls of 100: the request bucket's 50 less what is in hand, not the 1,000 instances"
        );
        assert_eq!(starts_at_once(&other), 900, "EC2's default 1,000");
        // A reload gives every account a raised stop bucket, and takes the account's own limits away.
        let stops_raised = PacingConfig {
            ec2: Ec2Limits {
                stop_instances: Rate {
                    capacity: 100_000.0,
                    per_second: 1000.0,
                },
                ..Ec2Limits::DEFAULT
            },
            ..PacingConfig::default()
        };
        pacer.reconfigure(&stops_raised, origin());
        assert_eq!(
            lock(&raised_place).min_chunk(Action::Start),
            20,
            "2/s again"
        );
        assert_eq!(lock(&other).min_chunk(Action::Stop), 100);
        let later = pacer.place("333333333333", "eu-west-1");
        assert_eq!(lock(&later).stop_instances.rate.capacity, 100_000.0);
    }

    #[tokio::test(start_paused = true)]
    async fn assume_role_calls_go_out_at_the_sts_rate() {
        let clock = crate::clock::SimulatedClock::starting_at(chrono::DateTime::UNIX_EPOCH);
        let rate = Rate {
            capacity: 2.0,
            per_second: 4.0,
        };
        let pacer = Arc::new(Pacer::new(64, 8, Ec2Limits::default(), rate));
        let t0 = clock.monotonic();
        let mut at = Vec::new();
        for i in 0..6 {
            let _slot = pacer.assume_role_turn(&format!("a{i}"), &clock).await;
            at.push((clock.monotonic() - t0).as_millis());
        }
        assert_eq!(at, [0, 0, 250, 500, 750, 1000]);
    }
}
