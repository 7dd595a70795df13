//! High availability: several delegates with one configuration agree, through a claim table (DynamoDB
//! in the delegate account), on which of them carries out each occurrence in each account and region.
//!
//! A claim is keyed by rule, action, instant, account and region, and created with a conditional write
//! that only succeeds when nobody holds it. It names its holder (the delegate's instance ID and a
//! per-process token), `lease_until`, its progress (`claimed`, `dispatched`, `done`) and the results.
//! The holder extends the lease while it works; a claim whose lease ran out unfinished is taken over
//! with a write conditional on that very `lease_until`.
//!
//! Clock skew: delegates may disagree by up to [`SKEW_TOLERANCE`] (±30 s relative) and still act once.
//! The holder makes no Start/Stop call once its own clock reaches `lease_until - SKEW_TOLERANCE`; another
//! delegate takes over only once its own clock passes `lease_until + SKEW_TOLERANCE`. Between the
//! holder's last possible call and the earliest takeover lie `2 × SKEW_TOLERANCE` of its clock, which a
//! relative skew of up to `SKEW_TOLERANCE` cannot close.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::aws::AwsError;
use crate::clock::{Clock, chrono_duration};

/// How far apart the delegates' clocks may be (relative), and still act exactly once.
pub const SKEW_TOLERANCE: Duration = Duration::from_secs(30);

/// What a claim is about: one occurrence (or enforce pass, or `shiftd apply`) in one account and region.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimKey {
    pub rule: String,
    /// `start`, `stop`, `enforce-start`, `enforce-stop`, `manual-start`, `manual-stop`.
    pub action: String,
    pub at: DateTime<Utc>,
    pub account: String,
    pub region: String,
}

impl ClaimKey {
    /// The table's key: every part, in one string.
    pub fn id(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.rule,
            self.action,
            self.at.format("%Y-%m-%dT%H:%M:%SZ"),
            self.account,
            self.region
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Claimed,
    Dispatched,
    Done,
}

impl Progress {
    pub fn as_str(self) -> &'static str {
        match self {
            Progress::Claimed => "claimed",
            Progress::Dispatched => "dispatched",
            Progress::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "claimed" => Some(Progress::Claimed),
            "dispatched" => Some(Progress::Dispatched),
            "done" => Some(Progress::Done),
            _ => None,
        }
    }
}

/// One claim as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub key: ClaimKey,
    /// `<instance ID>/<per-process token>`.
    pub owner: String,
    pub lease_until: DateTime<Utc>,
    pub progress: Progress,
    /// One line per instance result: `i-…: ok: stopped after 41s`.
    pub results: Vec<String>,
}

/// The claim table, behind shiftd's own seam: DynamoDB in the binary, memory in the tests.
#[async_trait]
pub trait ClaimTable: Send + Sync {
    /// Creates `claim` unless the key is taken: `Ok(None)` when created, else the claim that holds it.
    async fn create(&self, claim: &Claim) -> Result<Option<Claim>, AwsError>;
    /// The claim for `key`, read consistently.
    async fn get(&self, key: &ClaimKey) -> Result<Option<Claim>, AwsError>;
    /// Takes `old` over for `owner` until `lease_until`, only if it still has `old`'s `lease_until` and
    /// is not done: whether it did.
    async fn take_over(
        &self,
        old: &Claim,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<bool, AwsError>;
    /// Writes the holder's progress and results: only while `claim.owner` still holds it (whether it
    /// did).
    async fn update(&self, claim: &Claim) -> Result<bool, AwsError>;
    /// Extends the lease only: while `owner` holds it and it is not done (whether it did).
    async fn extend(
        &self,
        key: &ClaimKey,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<bool, AwsError>;
    /// Claims for occurrences at or after `since`, at most `limit`, latest first.
    async fn recent(&self, since: DateTime<Utc>, limit: usize) -> Result<Vec<Claim>, AwsError>;
    /// Creates the table (on-demand billing, the key shiftd needs, TTL on `expires_at`), or finds it.
    async fn create_table(&self) -> Result<TableSetup, AwsError>;
    /// What the table is: whether it exists with the right key.
    async fn check_table(&self) -> Result<TableSetup, AwsError>;
}

/// The claim table's key attribute (a string: [`ClaimKey::id`]).
pub const KEY_ATTRIBUTE: &str = "claim";
/// The TTL attribute: epoch seconds, a week after the occurrence.
pub const TTL_ATTRIBUTE: &str = "expires_at";
/// How long the table keeps a claim after its occurrence.
pub const KEEP_CLAIMS: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableSetup {
    Created,
    /// It exists with the right key (and TTL on, when it could be told).
    Exists,
    /// It exists, but not as shiftd needs it: what is wrong.
    WrongSchema(String),
    /// It does not exist.
    Missing,
}

/// What trying to claim came to.
pub enum Acquired {
    /// This delegate holds it: act, under the lease.
    Held(Lease),
    /// Another delegate carried it out.
    DoneBy(String),
    /// Another delegate holds it and is still at it past this delegate's catch-up window: its to
    /// finish and report.
    HeldBy(String),
    /// It could not be claimed (the table cannot be reached, or the window closed while another delegate
    /// held it): not acted on.
    NotClaimed(String),
}

/// This delegate's claiming: who it is, how long its leases run, and its clock.
#[derive(Clone)]
pub struct Claimer {
    pub table: Arc<dyn ClaimTable>,
    pub owner: String,
    pub lease: Duration,
    pub clock: Arc<dyn Clock>,
}

impl Claimer {
    /// Claims `key`, taking it over when its holder's lease runs out unfinished, until `deadline` (the
    /// end of the catch-up window): the table unreachable is retried with back-off until then.
    pub async fn acquire(&self, key: ClaimKey, deadline: DateTime<Utc>) -> Acquired {
        let mut attempt = 0u32;
        let mut last_error = String::new();
        let mut last_held: Option<Claim> = None;
        loop {
            let now = self.clock.now();
            if now > deadline {
                if !last_error.is_empty() {
                    return Acquired::NotClaimed(format!("claim table unreachable: {last_error}"));
                }
                return match last_held {
                    // Someone is still at it (a long verification): theirs to finish and report.
                    Some(held) if now <= held.lease_until + chrono_duration(SKEW_TOLERANCE) => {
                        Acquired::HeldBy(held.owner)
                    }
                    Some(held) => Acquired::NotClaimed(format!(
                        "its holder {} stopped extending its lease ({}) and the catch-up window \
                         closed before another delegate could take over",
                        held.owner,
                        held.lease_until.to_rfc3339()
                    )),
                    None => Acquired::NotClaimed("the catch-up window closed".into()),
                };
            }
            let mine = Claim {
                key: key.clone(),
                owner: self.owner.clone(),
                lease_until: now + chrono_duration(self.lease),
                progress: Progress::Claimed,
                results: Vec::new(),
            };
            let held = match self.table.create(&mine).await {
                Ok(None) => return Acquired::Held(self.lease_for(mine)),
                Ok(Some(held)) => {
                    last_held = Some(held.clone());
                    held
                }
                Err(e) => {
                    last_error = e.to_string();
                    tracing::warn!(claim = %key.id(), error = %e, "cannot claim: {e}; retrying");
                    tokio::time::sleep(crate::credentials::backoff(attempt, 0.5)).await;
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            };
            attempt = 0;
            last_error.clear();
            if held.progress == Progress::Done {
                return Acquired::DoneBy(held.owner);
            }
            if held.owner == self.owner {
                // Ours from before (this process): carry on under a fresh lease.
                if self
                    .table
                    .take_over(&held, &self.owner, mine.lease_until)
                    .await
                    == Ok(true)
                {
                    return Acquired::Held(self.lease_for(Claim {
                        progress: held.progress,
                        results: held.results,
                        ..mine
                    }));
                }
                continue;
            }
            let expired_at = held.lease_until + chrono_duration(SKEW_TOLERANCE);
            if now > expired_at {
                match self
                    .table
                    .take_over(&held, &self.owner, mine.lease_until)
                    .await
                {
                    Ok(true) => {
                        tracing::warn!(
                            claim = %key.id(),
                            "took over from {} (its lease ran out at {} while {})",
                            held.owner,
                            held.lease_until.to_rfc3339(),
                            held.progress.as_str()
                        );
                        return Acquired::Held(self.lease_for(Claim {
                            progress: held.progress,
                            results: held.results,
                            ..mine
                        }));
                    }
                    Ok(false) => continue,
                    Err(e) => {
                        last_error = e.to_string();
                        continue;
                    }
                }
            }
            tracing::debug!(
                claim = %key.id(),
                "held by {} until {} ({})",
                held.owner,
                held.lease_until.to_rfc3339(),
                held.progress.as_str()
            );
            // Look again when its lease would have run out, or sooner, to see it done.
            let wait = (expired_at - now).to_std().unwrap_or_default();
            tokio::time::sleep(wait.min(self.lease / 2).max(Duration::from_secs(1))).await;
        }
    }

    fn lease_for(&self, claim: Claim) -> Lease {
        let state = Arc::new(Mutex::new(LeaseState { claim, lost: false }));
        let renewer = tokio::spawn(renew(self.clone(), state.clone()));
        Lease {
            state,
            clock: self.clock.clone(),
            claimer: self.clone(),
            renewer,
        }
    }
}

struct LeaseState {
    claim: Claim,
    /// Another delegate holds it now (a renewal found it gone).
    lost: bool,
}

/// A claim this delegate holds, renewed in the background every third of the lease while it is held.
pub struct Lease {
    state: Arc<Mutex<LeaseState>>,
    clock: Arc<dyn Clock>,
    claimer: Claimer,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl Lease {
    pub fn key(&self) -> ClaimKey {
        self.state.lock().expect("lease lock").claim.key.clone()
    }

    /// Whether Start/Stop calls may still be made under it: held, and this clock short of
    /// `lease_until - SKEW_TOLERANCE`.
    pub fn may_act(&self) -> bool {
        let s = self.state.lock().expect("lease lock");
        !s.lost && self.clock.now() < s.claim.lease_until - chrono_duration(SKEW_TOLERANCE)
    }

    /// Records progress (and results) in the table.
    pub async fn progress(&self, progress: Progress, results: Vec<String>) -> bool {
        let claim = {
            let mut s = self.state.lock().expect("lease lock");
            s.claim.progress = progress;
            s.claim.results.extend(results);
            s.claim.clone()
        };
        match self.claimer.table.update(&claim).await {
            Ok(true) => true,
            Ok(false) => {
                self.state.lock().expect("lease lock").lost = true;
                false
            }
            Err(e) => {
                tracing::warn!(claim = %claim.key.id(), error = %e, "cannot record progress: {e}");
                false
            }
        }
    }
}

/// Extends the lease every third of its length while it is held.
async fn renew(claimer: Claimer, state: Arc<Mutex<LeaseState>>) {
    loop {
        tokio::time::sleep(claimer.lease / 3).await;
        let claim = {
            let s = state.lock().expect("lease lock");
            if s.lost || s.claim.progress == Progress::Done {
                return;
            }
            let mut next = s.claim.clone();
            next.lease_until = claimer.clock.now() + chrono_duration(claimer.lease);
            next
        };
        match claimer
            .table
            .extend(&claim.key, &claim.owner, claim.lease_until)
            .await
        {
            Ok(true) => {
                state.lock().expect("lease lock").claim.lease_until = claim.lease_until;
            }
            Ok(false) => {
                tracing::error!(
                    claim = %claim.key.id(),
                    "lost the claim to another delegate: acting no more on it"
                );
                state.lock().expect("lease lock").lost = true;
                return;
            }
            Err(e) => tracing::warn!(
                claim = %claim.key.id(),
                error = %e,
                "cannot extend the lease: {e}; no Start/Stop call after its end unless extended"
            ),
        }
    }
}

/// An in-memory claim table with the conditional semantics of the DynamoDB one, for the scenario tests;
/// `set_unreachable` makes every call fail.
#[derive(Clone, Default)]
pub struct MemoryClaims {
    inner: Arc<Mutex<MemoryClaimsInner>>,
}

#[derive(Default)]
struct MemoryClaimsInner {
    claims: std::collections::BTreeMap<String, Claim>,
    unreachable: bool,
    writes: usize,
}

impl MemoryClaims {
    pub fn set_unreachable(&self, unreachable: bool) {
        self.inner.lock().expect("claims lock").unreachable = unreachable;
    }

    /// Every claim, by key.
    pub fn claims(&self) -> Vec<Claim> {
        self.inner
            .lock()
            .expect("claims lock")
            .claims
            .values()
            .cloned()
            .collect()
    }

    /// Conditional writes made (created, taken over, updated).
    pub fn writes(&self) -> usize {
        self.inner.lock().expect("claims lock").writes
    }

    fn check(
        &self,
        operation: &str,
    ) -> Result<std::sync::MutexGuard<'_, MemoryClaimsInner>, AwsError> {
        let inner = self.inner.lock().expect("claims lock");
        if inner.unreachable {
            return Err(AwsError::new(
                operation,
                Some("ConnectionFailed"),
                "the claim table cannot be reached",
            ));
        }
        Ok(inner)
    }
}

#[async_trait]
impl ClaimTable for MemoryClaims {
    async fn create(&self, claim: &Claim) -> Result<Option<Claim>, AwsError> {
        let mut inner = self.check("dynamodb:PutItem")?;
        let id = claim.key.id();
        if let Some(held) = inner.claims.get(&id) {
            return Ok(Some(held.clone()));
        }
        inner.writes += 1;
        inner.claims.insert(id, claim.clone());
        Ok(None)
    }

    async fn get(&self, key: &ClaimKey) -> Result<Option<Claim>, AwsError> {
        Ok(self
            .check("dynamodb:GetItem")?
            .claims
            .get(&key.id())
            .cloned())
    }

    async fn take_over(
        &self,
        old: &Claim,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<bool, AwsError> {
        let mut inner = self.check("dynamodb:UpdateItem")?;
        let Some(held) = inner.claims.get_mut(&old.key.id()) else {
            return Ok(false);
        };
        if held.lease_until != old.lease_until || held.progress == Progress::Done {
            return Ok(false);
        }
        held.owner = owner.to_string();
        held.lease_until = lease_until;
        inner.writes += 1;
        Ok(true)
    }

    async fn update(&self, claim: &Claim) -> Result<bool, AwsError> {
        let mut inner = self.check("dynamodb:UpdateItem")?;
        let Some(held) = inner.claims.get_mut(&claim.key.id()) else {
            return Ok(false);
        };
        if held.owner != claim.owner {
            return Ok(false);
        }
        *held = claim.clone();
        inner.writes += 1;
        Ok(true)
    }

    async fn extend(
        &self,
        key: &ClaimKey,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<bool, AwsError> {
        let mut inner = self.check("dynamodb:UpdateItem")?;
        let Some(held) = inner.claims.get_mut(&key.id()) else {
            return Ok(false);
        };
        if held.owner != owner || held.progress == Progress::Done {
            return Ok(false);
        }
        held.lease_until = lease_until;
        inner.writes += 1;
        Ok(true)
    }

    async fn create_table(&self) -> Result<TableSetup, AwsError> {
        drop(self.check("dynamodb:CreateTable")?);
        Ok(TableSetup::Exists)
    }

    async fn check_table(&self) -> Result<TableSetup, AwsError> {
        drop(self.check("dynamodb:DescribeTable")?);
        Ok(TableSetup::Exists)
    }

    async fn recent(&self, since: DateTime<Utc>, limit: usize) -> Result<Vec<Claim>, AwsError> {
        let inner = self.check("dynamodb:Scan")?;
        let mut out: Vec<Claim> = inner
            .claims
            .values()
            .filter(|c| c.key.at >= since)
            .cloned()
            .collect();
        out.sort_by(|a, b| (b.key.at, &a.key).cmp(&(a.key.at, &b.key)));
        out.truncate(limit);
        Ok(out)
    }
}

/// `shiftd cluster init`: creates (or finds) the table `[cluster]` names; what was done, or why not.
pub async fn init(
    config: &crate::config::Config,
    connect: crate::aws::ConnectAws,
) -> Result<String, String> {
    let cluster = config.cluster.as_ref().ok_or("no [cluster] table")?;
    let aws = connect(&config.credentials, &cluster.region);
    let table = aws.claim_table(&cluster.table, &cluster.region).await;
    match table.create_table().await {
        Ok(TableSetup::Created) => Ok(format!(
            "created {} in {}: on-demand, key {KEY_ATTRIBUTE:?}, TTL on {TTL_ATTRIBUTE:?}\n",
            cluster.table, cluster.region
        )),
        Ok(TableSetup::Exists | TableSetup::Missing) => Ok(format!(
            "{} in {} exists with the right key; TTL on {TTL_ATTRIBUTE:?}\n",
            cluster.table, cluster.region
        )),
        Ok(TableSetup::WrongSchema(why)) => Err(format!(
            "{} in {} exists but cannot hold claims: {why}: name another table in [cluster]",
            cluster.table, cluster.region
        )),
        Err(e) => Err(format!(
            "cannot create {} in {}: {e} (the delegate's role needs dynamodb:CreateTable, \
             DescribeTable and UpdateTimeToLive on it: `shiftd policy` prints them)",
            cluster.table, cluster.region
        )),
    }
}

/// `shiftd cluster status`: the claims of occurrences since `since`, latest first.
pub async fn status(
    config: &crate::config::Config,
    connect: crate::aws::ConnectAws,
    since: DateTime<Utc>,
) -> Result<String, String> {
    use std::fmt::Write;
    let cluster = config.cluster.as_ref().ok_or("no [cluster] table")?;
    let aws = connect(&config.credentials, &cluster.region);
    let table = aws.claim_table(&cluster.table, &cluster.region).await;
    let claims = table
        .recent(since, 1000)
        .await
        .map_err(|e| format!("cannot read {}: {e}", cluster.table))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} claim(s) since {} in {}",
        claims.len(),
        since.format("%Y-%m-%dT%H:%M:%SZ"),
        cluster.table
    );
    for c in claims {
        let _ = writeln!(
            out,
            "{}  {:<13} {:<20} {}/{}  {:<10} held by {} (lease until {})",
            c.key.at.format("%Y-%m-%dT%H:%M:%SZ"),
            c.key.action,
            c.key.rule,
            c.key.account,
            c.key.region,
            c.progress.as_str(),
            c.owner,
            c.lease_until.format("%H:%M:%SZ")
        );
        for r in &c.results {
            let _ = writeln!(out, "    {r}");
        }
    }
    Ok(out)
}
