//! Carries out one account's batch: resolve selections, decide (planner), act, follow the instances to
//! their target state, and report every instance action exactly once.
//!
//! Per region: [`resolve`] (describe each request's selection), [`plan`] (the planner's decisions),
//! [`act`] (Start/Stop calls), [`verify`] (follow to the target state). Instances in the opposite
//! transition are waited for ([`await_transitions`]) and then decided again.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::aws::{AwsError, Ec2};
use crate::clock::Clock;
use crate::cluster::{Acquired, ClaimKey, Claimer, Lease};
use crate::config::{Account, Action, Selection, StopMode};
use crate::credentials::AccountCredentials;
use crate::outcome::{Outcome, OutcomeSink, ResultKind, Trigger};
use crate::pacing::{PacedEc2, Pacer, Plan, RegionBuckets, SharedBuckets};
use crate::planner::{self, AccountBatch, Decision, InstanceView, Progress, Request, Selected};

/// No single AWS call may take longer than this, whatever the client below does (the SDK's own
/// operation timeout, 60 s, normally fires first).
const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// EC2 in one region of an account, and the lock batches take there.
#[derive(Clone)]
pub struct RegionClient {
    /// Paced ([`PacedEc2`]): every call takes a place in the process's in-flight cap.
    pub ec2: Arc<dyn Ec2>,
    /// The model of EC2's token buckets of the account and region (shared with `ec2`).
    pub buckets: SharedBuckets,
    /// Held while a batch resolves its selection and acts, so that batches due close together for the
    /// same account and region see each other's effects instead of acting twice.
    pub exclusive: Arc<tokio::sync::Mutex<()>>,
}

/// One target account's clients: its credentials and EC2 per configured region.
pub struct AccountClients {
    pub account: Account,
    pub credentials: AccountCredentials,
    pub regions: BTreeMap<String, RegionClient>,
    /// The process's pacing (in-flight cap, bucket models, progress of paced batches).
    pub pacer: Arc<Pacer>,
}

impl AccountClients {
    /// EC2 in each of `account`'s regions, signing with `credentials` (always the newest), paced by
    /// `pacer` (the daemon's, shared by every account; or one command's own, of `[pacing]`).
    pub async fn connect_paced(
        aws: &dyn crate::aws::Aws,
        account: &Account,
        credentials: AccountCredentials,
        pacer: Arc<Pacer>,
    ) -> Self {
        let mut regions = BTreeMap::new();
        for region in &account.regions {
            let buckets = pacer.place(&account.account_id, region);
            let ec2 = PacedEc2 {
                inner: aws.ec2(region, Arc::new(credentials.clone())).await,
                pacer: pacer.clone(),
                buckets: buckets.clone(),
                account: account.name.clone(),
                clock: credentials.clock().clone(),
            };
            regions.insert(
                region.clone(),
                RegionClient {
                    ec2: Arc::new(ec2),
                    buckets,
                    exclusive: Default::default(),
                },
            );
        }
        AccountClients {
            account: account.clone(),
            credentials,
            regions,
            pacer,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ExecOptions {
    pub dry_run: bool,
    /// What made shiftd act: logged with every outcome.
    pub trigger: Trigger,
    pub verify_timeout: Duration,
    pub credentials_wait: Duration,
}

/// Everything a batch needs besides the batch itself.
#[derive(Clone)]
pub struct BatchContext {
    pub clients: Arc<AccountClients>,
    pub opts: ExecOptions,
    /// Becomes true when shiftd stops following instances (shutdown).
    pub cancel: watch::Receiver<bool>,
    /// True once shiftd is shutting down: a batch still waiting for its instant does not act.
    pub stopping: Option<watch::Receiver<bool>>,
    pub clock: Arc<dyn Clock>,
    pub sink: Arc<dyn OutcomeSink>,
    /// Called once, just before the batch's first Start/Stop call (the durable record's "dispatched").
    pub on_dispatch: Arc<dyn Fn() + Send + Sync>,
    /// Called with what has its result logged (instance IDs, or `selection:` names), before the batch
    /// waits on anything, so that a batch resumed after a crash does not report it again.
    pub on_reported: OnReported,
    /// What an earlier run of this batch (before a crash) already reported: neither acted on nor
    /// reported again.
    pub already_reported: Arc<BTreeSet<String>>,
    /// With `[cluster]`: each request is claimed per region before it is acted on there.
    pub claims: Option<Claimer>,
}

/// Called with the names (instance IDs, `selection:` names) whose results were logged.
pub type OnReported = Arc<dyn Fn(&[String]) + Send + Sync>;

/// What an outcome is about, as recorded in the durable record: the instance, or the selection.
fn reported_name(o: &Outcome) -> String {
    match &o.instance_id {
        Some(id) => instance_name(id, &o.rules, o.action),
        None => format!("selection:{}:{}:{}", o.rules.join(","), o.action, o.region),
    }
}

/// An instance's result for these rules and this action: another rule's result for the same instance
/// is another name.
fn instance_name(id: &str, rules: &[String], action: Action) -> String {
    format!("{id}:{}:{action}", rules.join(","))
}

/// Collects outcomes and hands each to the sink as it is recorded; `flush` makes what was reported
/// durable, and is called before every wait, so a crash cannot make a resumed batch report it twice.
struct Report {
    sink: Arc<dyn OutcomeSink>,
    outcomes: Vec<Outcome>,
    already: Arc<BTreeSet<String>>,
    unflushed: Vec<String>,
    on_reported: OnReported,
    /// While the batch works ahead of its instant: outcomes decided then (skipped, failed describes),
    /// logged at the instant.
    held: Option<Vec<Outcome>>,
}

impl Report {
    fn new(ctx: &BatchContext) -> Self {
        Self {
            sink: ctx.sink.clone(),
            outcomes: Vec::new(),
            already: ctx.already_reported.clone(),
            unflushed: Vec::new(),
            on_reported: ctx.on_reported.clone(),
            held: None,
        }
    }

    fn push(&mut self, o: Outcome) {
        if let Some(held) = &mut self.held {
            held.push(o);
            return;
        }
        let name = reported_name(&o);
        if self.already.contains(&name) {
            return;
        }
        self.sink.record(&o);
        self.outcomes.push(o);
        self.unflushed.push(name);
    }

    /// Holds outcomes back (ahead of the instant) until `release`.
    fn hold(&mut self) {
        self.held.get_or_insert_with(Vec::new);
    }

    /// Whether outcomes are being held back (the batch works ahead of its instant).
    fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// Drops held-back outcomes of these instances for `action` (decided again at the instant).
    fn unhold(&mut self, action: Action, ids: &BTreeSet<&str>) {
        if let Some(held) = &mut self.held {
            held.retain(|o| {
                o.action != action || !o.instance_id.as_deref().is_some_and(|i| ids.contains(i))
            });
        }
    }

    /// Reports what was held back.
    fn release(&mut self) {
        for o in self.held.take().unwrap_or_default() {
            self.push(o);
        }
    }

    fn flush(&mut self) {
        if self.held.is_some() {
            return;
        }
        if !self.unflushed.is_empty() {
            (self.on_reported)(&std::mem::take(&mut self.unflushed));
        }
    }
}

/// Where an outcome happened and for which rules.
struct Place<'a> {
    account: &'a str,
    region: &'a str,
    trigger: Trigger,
}

impl Place<'_> {
    fn outcome(
        &self,
        action: Action,
        rules: Vec<String>,
        instance_id: Option<String>,
        result: ResultKind,
        reason: impl Into<String>,
    ) -> Outcome {
        Outcome {
            action,
            rules,
            account: self.account.to_string(),
            region: self.region.to_string(),
            instance_id,
            result,
            reason: reason.into(),
            trigger: self.trigger,
        }
    }
}

/// An AWS call bounded by [`CALL_TIMEOUT`].
async fn bounded<T>(
    operation: &str,
    call: impl Future<Output = Result<T, AwsError>>,
) -> Result<T, AwsError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(AwsError::new(
                operation,
                Some("Timeout"),
                format!(
                    "no answer within {}",
                    humantime::format_duration(CALL_TIMEOUT)
                ),
            ))
        })
}

/// Reports a request that could not be resolved into instances: one entry per listed instance, and one
/// for the tag selection when the request has no listed instances.
fn fail_request(report: &mut Report, place: &Place, req: &Request, reason: &str) {
    let rules = vec![req.rule.clone()];
    if req.selection.instance_ids.is_empty() {
        let reason = format!("{reason} (selection: {})", req.selection);
        report.push(place.outcome(req.action, rules, None, ResultKind::Failed, reason));
    } else {
        for id in &req.selection.instance_ids {
            report.push(place.outcome(
                req.action,
                rules.clone(),
                Some(id.clone()),
                ResultKind::Failed,
                reason,
            ));
        }
    }
}

/// Carries out `batch` and returns every outcome (each already handed to the sink).
pub async fn run_batch(ctx: BatchContext, batch: AccountBatch) -> Vec<Outcome> {
    run_batch_at_instant(ctx, batch).await.unwrap_or_default()
}

/// As [`run_batch`]; `None` when shiftd shut down while the batch waited for its instant (resolved
/// ahead of it): nothing was called or reported, and the occurrence is to be resumed at the next start.
pub async fn run_batch_at_instant(ctx: BatchContext, batch: AccountBatch) -> Option<Vec<Outcome>> {
    let mut report = Report::new(&ctx);
    let clients = ctx.clients.clone();
    let account = clients.account.name.clone();

    let mut shutdown = ctx.cancel.clone();
    let credentials = tokio::select! {
        r = clients.credentials.wait_usable(ctx.opts.credentials_wait) => r,
        Ok(_) = shutdown.wait_for(|c| *c) => {
            Err("shiftd is shutting down: no valid credentials came before the shutdown".to_string())
        }
    };
    if let Err(reason) = credentials {
        for req in &batch.requests {
            let regions = req.regions.join(",");
            let place = Place {
                account: &account,
                region: &regions,
                trigger: ctx.opts.trigger,
            };
            fail_request(&mut report, &place, req, &reason);
        }
        report.flush();
        return Some(report.outcomes);
    }

    let regions = batch.regions();
    let per_region = futures::future::join_all(
        regions
            .iter()
            .map(|region| run_region(&ctx, &batch, region)),
    )
    .await;
    if per_region.iter().any(|r| r.interrupted) {
        // Every region waits for the same instant: none acted.
        return None;
    }

    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unresolved: BTreeSet<String> = BTreeSet::new();
    let mut describe_errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for region_result in per_region {
        if report.outcomes.is_empty() {
            report.outcomes = region_result.outcomes;
        } else {
            report.outcomes.extend(region_result.outcomes);
        }
        for (rule, ids) in region_result.found {
            found.entry(rule).or_default().extend(ids);
        }
        unresolved.extend(region_result.unresolved);
        for (rule, why) in region_result.describe_errors {
            describe_errors.entry(rule).or_default().push(why);
        }
    }
    let lookup = Lookup {
        found: &found,
        unresolved: &unresolved,
        describe_errors: &describe_errors,
    };
    report_not_found(&mut report, &clients, &batch, &lookup, ctx.opts.trigger);
    report.flush();
    Some(report.outcomes)
}

/// What the regions of a batch found, per rule.
struct Lookup<'a> {
    found: &'a BTreeMap<String, BTreeSet<String>>,
    unresolved: &'a BTreeSet<String>,
    describe_errors: &'a BTreeMap<String, Vec<String>>,
}

/// Listed instances found in none of the rule's regions: reported once each (the rest were acted on;
/// EC2 would reject a whole call for one unknown ID, which is why selections are resolved first). When a
/// region could not be described, that is the reason given: the instance may live there.
fn report_not_found(
    report: &mut Report,
    clients: &AccountClients,
    batch: &AccountBatch,
    lookup: &Lookup,
    trigger: Trigger,
) {
    let account = clients.account.name.as_str();
    for req in &batch.requests {
        if lookup.unresolved.contains(&req.rule) {
            continue;
        }
        let regions = req.regions.join(",");
        let place = Place {
            account,
            region: &regions,
            trigger,
        };
        let seen = lookup.found.get(&req.rule);
        let why = match lookup.describe_errors.get(&req.rule) {
            Some(errors) => errors.join("; "),
            None => format!(
                "instance not found in account {} ({}), region(s) {}",
                account,
                clients.account.account_id,
                req.regions.join(", ")
            ),
        };
        for id in &req.selection.instance_ids {
            if seen.is_none_or(|s| !s.contains(id)) {
                report.push(place.outcome(
                    req.action,
                    vec![req.rule.clone()],
                    Some(id.clone()),
                    ResultKind::Failed,
                    why.clone(),
                ));
            }
        }
    }
}

#[derive(Default)]
struct RegionResult {
    outcomes: Vec<Outcome>,
    /// Per rule, the listed instance IDs that exist in this region (matching or not).
    found: BTreeMap<String, BTreeSet<String>>,
    /// Rules whose selection could not be resolved here (already reported).
    unresolved: Vec<String>,
    /// Rules with listed instances whose describe failed here: rule -> why (not yet reported).
    describe_errors: BTreeMap<String, String>,
    /// Shut down while waiting for the instant: nothing was called, nothing is reported.
    interrupted: bool,
}

/// One region's selections resolved and merged by instance.
struct Resolved {
    selected: Vec<Selected>,
    found: BTreeMap<String, BTreeSet<String>>,
    unresolved: Vec<String>,
    /// Rules with listed instances whose describe failed here: rule -> why.
    describe_errors: BTreeMap<String, String>,
}

/// An instance to act on (or follow), with the rules that asked.
#[derive(Clone, Debug)]
struct Target {
    id: String,
    rules: Vec<String>,
    /// Its state when it was decided on.
    state: String,
    state_reason: Option<String>,
    /// A stop asked to hibernate it (a rule with `stop_mode = "hibernate"`), and it is configured for
    /// hibernation.
    hibernate: bool,
    /// Said with its result: how it was stopped when that is not a plain stop.
    note: Option<String>,
}

/// What the planner's decisions come to in one region.
#[derive(Default)]
struct RegionPlan {
    act: BTreeMap<Action, Vec<Target>>,
    follow: BTreeMap<Action, Vec<Target>>,
    wait: BTreeMap<Action, Vec<Target>>,
    /// Planned ahead of the instant as already in the wanted state (`skipped`): looked at again at
    /// the instant, in case someone changed them in between.
    recheck: BTreeMap<Action, Vec<Target>>,
}

async fn run_region(ctx: &BatchContext, batch: &AccountBatch, region: &str) -> RegionResult {
    let account = ctx.clients.account.name.as_str();
    let place = Place {
        account,
        region,
        trigger: ctx.opts.trigger,
    };
    let mut report = Report::new(ctx);
    let requests: Vec<&Request> = batch
        .requests
        .iter()
        .filter(|r| r.regions.iter().any(|x| x == region))
        .collect();
    let Some(client) = ctx.clients.regions.get(region) else {
        for req in &requests {
            fail_request(&mut report, &place, req, "no EC2 client for this region");
        }
        report.flush();
        return RegionResult {
            outcomes: report.outcomes,
            unresolved: requests.iter().map(|r| r.rule.clone()).collect(),
            ..Default::default()
        };
    };
    let ec2 = client.ec2.as_ref();

    // With a claim table: only what this delegate holds (claims are taken before the region's lock:
    // waiting for another holder must not hold up other batches).
    let (requests, leases, not_ours) = match &ctx.claims {
        Some(claimer) => claim_requests(ctx, claimer, batch, &place, requests, &mut report).await,
        None => (requests, Vec::new(), Vec::new()),
    };
    if requests.is_empty() {
        report.flush();
        return RegionResult {
            outcomes: report.outcomes,
            unresolved: not_ours,
            ..Default::default()
        };
    }

    let guard = client.exclusive.lock().await;
    // Ahead of the instant (`resolve_ahead`): what is decided now is reported at the instant.
    if batch.at > ctx.clock.now() {
        report.hold();
    }
    let resolved = if ctx.opts.trigger == Trigger::Enforce {
        resolve_at_once(ec2, &place, &requests, &mut report).await
    } else {
        resolve(ec2, &place, &requests, &mut report).await
    };
    let Resolved {
        selected,
        found,
        mut unresolved,
        describe_errors,
    } = resolved;
    let mut plan = plan(ctx, &place, (&requests, batch.at), &selected, &mut report);
    // What was described (tags and all) is not needed past the plan: at a fleet's instant, thousands
    // of regions wait for it and act at once, and each region keeps only its targets until it is done.
    drop(selected);
    // Calls to make: the occurrences are recorded as dispatched now, before the wait, so that the
    // record's write (an fsync) and the claims' update are not paid between the instant and the first
    // call. A crash in between leaves them "dispatched" with no call made, which a resumed or
    // interrupted occurrence reads as "Start/Stop calls may have been made": still true.
    let dispatched = std::sync::atomic::AtomicBool::new(false);
    if plan.act.values().any(|targets| !targets.is_empty()) {
        mark_dispatched(ctx, &leases, &dispatched).await;
    }
    // Resolved ahead of the instant: the calls leave at the instant itself. A shutdown before it
    // leaves the occurrence to the next start (it stays in the record, resumed then).
    if !wait_for_instant(
        ctx.clock.as_ref(),
        batch.at,
        ctx.stopping.clone().unwrap_or_else(|| ctx.cancel.clone()),
    )
    .await
    {
        return RegionResult {
            interrupted: true,
            ..Default::default()
        };
    }
    let mut accepted = BTreeMap::new();
    let windows = act_windows(batch, &requests);
    for (action, targets) in std::mem::take(&mut plan.act) {
        let ok = act(
            ctx,
            ec2,
            &place,
            action,
            targets,
            (&leases, &windows, &dispatched),
            &mut report,
        )
        .await;
        accepted.insert(action, ok);
    }
    // Those found in the wanted state ahead of the instant, looked at again now that the calls are
    // out: one started (or stopped) by hand in between is acted on after all, not reported skipped.
    let changed = recheck(ec2, &place, std::mem::take(&mut plan.recheck)).await;
    for (action, targets) in &changed {
        let ids: BTreeSet<&str> = targets.iter().map(|t| t.id.as_str()).collect();
        report.unhold(*action, &ids);
    }
    report.release();
    report.flush();
    for (action, targets) in changed {
        let ok = act(
            ctx,
            ec2,
            &place,
            action,
            targets,
            (&leases, &windows, &dispatched),
            &mut report,
        )
        .await;
        accepted.entry(action).or_default().extend(ok);
    }
    drop(guard);

    for (action, targets) in std::mem::take(&mut plan.wait) {
        let ready = await_transitions(ctx, ec2, &place, action, targets, &mut report).await;
        report.flush();
        let _guard = client.exclusive.lock().await;
        let ok = act(
            ctx,
            ec2,
            &place,
            action,
            ready,
            (&leases, &windows, &dispatched),
            &mut report,
        )
        .await;
        accepted.entry(action).or_default().extend(ok);
    }
    for (action, targets) in std::mem::take(&mut plan.follow) {
        accepted.entry(action).or_default().extend(targets);
    }
    for (action, targets) in accepted {
        if !targets.is_empty() {
            verify(ctx, ec2, &place, action, targets, &mut report).await;
        }
    }
    report.flush();
    for lease in &leases {
        let rule = lease.key().rule;
        let results = report
            .outcomes
            .iter()
            .filter(|o| o.rules.contains(&rule))
            .map(|o| {
                format!(
                    "{}: {}: {}",
                    o.instance_id.as_deref().unwrap_or("(selection)"),
                    o.result,
                    o.reason
                )
            })
            .collect();
        lease
            .progress(crate::cluster::Progress::Done, results)
            .await;
    }
    unresolved.extend(not_ours);
    RegionResult {
        outcomes: report.outcomes,
        found,
        unresolved,
        describe_errors,
        interrupted: false,
    }
}

/// Returns once the wall clock reads `at` (at once when it is past). Slept in steps that re-read the
/// clock, so that a clock stepped forward meanwhile does not delay the action, and one stepped back does
/// not make it early.
/// Of the instances found in the wanted state ahead of the instant, those now in the opposite state
/// (`running` for a stop, `stopped` for a start): one describe for them all. When it fails, they stay
/// skipped as decided (said in the log).
async fn recheck(
    ec2: &dyn Ec2,
    place: &Place<'_>,
    planned: BTreeMap<Action, Vec<Target>>,
) -> BTreeMap<Action, Vec<Target>> {
    let ids: Vec<String> = planned.values().flatten().map(|t| t.id.clone()).collect();
    if ids.is_empty() {
        return BTreeMap::new();
    }
    let views = match bounded("ec2:DescribeInstances", ec2.describe_ids(&ids)).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(
                account = place.account, region = place.region, error = %e,
                "could not look again at {} instance(s) found already in the wanted state ahead of the \
                 instant; they stay skipped: {e}", ids.len()
            );
            return BTreeMap::new();
        }
    };
    let now: BTreeMap<&str, &InstanceView> = views.iter().map(|v| (v.id.as_str(), v)).collect();
    let mut changed: BTreeMap<Action, Vec<Target>> = BTreeMap::new();
    for (action, targets) in planned {
        // The state the other action ends in: `running` for a stop, `stopped` for a start.
        let opposite = match action {
            Action::Start => Action::Stop,
            Action::Stop => Action::Start,
        }
        .target_state();
        for mut t in targets {
            if let Some(v) = now.get(t.id.as_str())
                && v.state == opposite
            {
                tracing::info!(
                    account = place.account, region = place.region, instance_id = %t.id,
                    "{} was {} ahead of the instant and is {} now: {action} after all",
                    t.id, t.state, v.state
                );
                t.state = v.state.clone();
                t.state_reason = v.state_reason.clone();
                changed.entry(action).or_default().push(t);
            }
        }
    }
    changed
}

/// Returns false when shiftd is shutting down before the instant.
async fn wait_for_instant(
    clock: &dyn Clock,
    at: chrono::DateTime<chrono::Utc>,
    mut cancel: watch::Receiver<bool>,
) -> bool {
    crate::clock::sleep_until(clock, at, Some(&mut cancel)).await
}

/// Claims each request in this region. Returns the requests this delegate holds, their leases, and the
/// rules it does not act on here (carried out by another delegate: logged at debug; or not claimed:
/// reported failed).
async fn claim_requests<'r>(
    ctx: &BatchContext,
    claimer: &Claimer,
    batch: &AccountBatch,
    place: &Place<'_>,
    requests: Vec<&'r Request>,
    report: &mut Report,
) -> (Vec<&'r Request>, Vec<Lease>, Vec<String>) {
    let label = match ctx.opts.trigger {
        Trigger::Schedule => "",
        Trigger::Enforce => "enforce-",
        Trigger::Manual => "manual-",
    };
    let attempts = requests.iter().map(|req| {
        let key = ClaimKey {
            rule: req.rule.clone(),
            action: format!("{label}{}", req.action),
            at: batch.at,
            account: place.account.to_string(),
            region: place.region.to_string(),
        };
        let deadline = batch.at + crate::clock::chrono_duration(req.catch_up);
        claimer.acquire(key, deadline)
    });
    let acquired = futures::future::join_all(attempts).await;
    let mut mine = Vec::new();
    let mut leases = Vec::new();
    let mut not_ours = Vec::new();
    for (req, got) in requests.into_iter().zip(acquired) {
        match got {
            Acquired::Held(lease) => {
                mine.push(req);
                leases.push(lease);
            }
            Acquired::DoneBy(owner) | Acquired::HeldBy(owner) => {
                tracing::debug!(
                    rule = %req.rule,
                    account = place.account,
                    region = place.region,
                    "{} {} in {}/{}: carried out (or still being carried out) by {owner}",
                    req.action,
                    req.rule,
                    place.account,
                    place.region
                );
                not_ours.push(req.rule.clone());
            }
            Acquired::NotClaimed(why) => {
                fail_request(
                    report,
                    place,
                    req,
                    &format!("not claimed: {why}; not acted on"),
                );
                not_ours.push(req.rule.clone());
            }
        }
    }
    (mine, leases, not_ours)
}

/// Describes each request's selection and merges the instances found by ID. Listed instances that
/// exist but lack the rule's tags are reported skipped; a selection that cannot be described is
/// reported failed.
async fn resolve(
    ec2: &dyn Ec2,
    place: &Place<'_>,
    requests: &[&Request],
    report: &mut Report,
) -> Resolved {
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unresolved = Vec::new();
    let mut unlisted = BTreeMap::new();
    let mut selected: BTreeMap<String, Selected> = BTreeMap::new();
    for req in requests {
        report.flush();
        let views = match bounded(
            "ec2:DescribeInstances",
            ec2.describe_selection(&req.selection),
        )
        .await
        {
            Ok(v) => v,
            // Listed instances may live in another of the rule's regions: they are reported once, for
            // the whole batch, if no region finds them (with this error). A tag selection is reported
            // here, for this region.
            Err(e) if !req.selection.instance_ids.is_empty() => {
                unlisted.insert(
                    req.rule.clone(),
                    format!(
                        "could not list the selected instances in {}: {e}",
                        place.region
                    ),
                );
                continue;
            }
            Err(e) => {
                fail_request(
                    report,
                    place,
                    req,
                    &format!("could not list the selected instances: {e}"),
                );
                unresolved.push(req.rule.clone());
                continue;
            }
        };
        let matched: BTreeSet<&str> = views.iter().map(|v| v.id.as_str()).collect();
        let seen = found.entry(req.rule.clone()).or_default();
        let mut unmatched = Vec::new();
        for id in &req.selection.instance_ids {
            if matched.contains(id.as_str()) {
                seen.insert(id.clone());
            } else {
                unmatched.push(id.clone());
            }
        }
        // Listed instances that exist but do not carry the rule's tags are left alone, and said so.
        if !req.selection.tags.is_empty() && !unmatched.is_empty() {
            let outcome = |id: String, result, reason: String| {
                place.outcome(req.action, vec![req.rule.clone()], Some(id), result, reason)
            };
            report.flush();
            match bounded("ec2:DescribeInstances", ec2.describe_ids(&unmatched)).await {
                Ok(existing) => {
                    for v in existing {
                        seen.insert(v.id.clone());
                        report.push(outcome(
                            v.id,
                            ResultKind::Skipped,
                            "listed, but does not carry the rule's tags".into(),
                        ));
                    }
                }
                Err(e) => {
                    for id in unmatched {
                        seen.insert(id.clone());
                        report.push(outcome(
                            id,
                            ResultKind::Failed,
                            format!("could not check the instance: {e}"),
                        ));
                    }
                }
            }
        }
        for v in views {
            selected
                .entry(v.id.clone())
                .or_insert_with(|| Selected {
                    instance: v,
                    by: Vec::new(),
                })
                .by
                .push((req.rule.clone(), req.action));
        }
    }
    Resolved {
        selected: selected.into_values().collect(),
        found,
        unresolved,
        describe_errors: unlisted,
    }
}

/// Whether this process has not yet warned about this unreadable override value on this instance.
fn first_warning(instance: &str, value: &str) -> bool {
    static WARNED: std::sync::Mutex<BTreeSet<(String, String)>> =
        std::sync::Mutex::new(BTreeSet::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.len() > 100_000 {
        warned.clear();
    }
    warned.insert((instance.to_string(), value.to_string()))
}

/// An enforce pass's resolve: one DescribeInstances (paginated) for the whole region, whatever the
/// number of rules, each request's selection matched here. Listed instances not found are not
/// reported (the scheduled occurrences do that); a region that cannot be described fails each request.
async fn resolve_at_once(
    ec2: &dyn Ec2,
    place: &Place<'_>,
    requests: &[&Request],
    report: &mut Report,
) -> Resolved {
    let mut resolved = Resolved {
        selected: Vec::new(),
        found: BTreeMap::new(),
        unresolved: Vec::new(),
        describe_errors: BTreeMap::new(),
    };
    let views = match bounded(
        "ec2:DescribeInstances",
        ec2.describe_selection(&Selection::default()),
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            for req in requests {
                fail_request(
                    report,
                    place,
                    req,
                    &format!("could not list the instances to enforce: {e}"),
                );
                resolved.unresolved.push(req.rule.clone());
            }
            return resolved;
        }
    };
    for view in views {
        let by: Vec<(String, Action)> = requests
            .iter()
            .filter(|r| r.selection.matches(&view.id, &view.tags))
            .map(|r| (r.rule.clone(), r.action))
            .collect();
        if by.is_empty() {
            continue;
        }
        for (rule, _) in &by {
            resolved
                .found
                .entry(rule.clone())
                .or_default()
                .insert(view.id.clone());
        }
        resolved.selected.push(Selected { instance: view, by });
    }
    // Nothing to say of listed instances it did not find: mark every rule resolved.
    for req in requests {
        resolved
            .found
            .entry(req.rule.clone())
            .or_default()
            .extend(req.selection.instance_ids.iter().cloned());
    }
    resolved
}

/// The planner's decisions: skips and failures reported, the rest sorted into act, follow and wait.
/// An instance held by an override tag is left alone (and said so) instead of acted on. An enforce pass
/// only speaks of the instances it would act on: those already in the desired state, or on their way
/// (in transition), are neither acted on nor logged.
fn plan(
    ctx: &BatchContext,
    place: &Place,
    (requests, at): (&[&Request], chrono::DateTime<chrono::Utc>),
    selected: &[Selected],
    report: &mut Report,
) -> RegionPlan {
    let dry_run = ctx.opts.dry_run;
    let enforcing = ctx.opts.trigger == Trigger::Enforce;
    // Planned ahead of the instant (`resolve_ahead`), the plan is for the instant: an override tag that
    // ends between now and then no longer holds.
    let now = ctx.clock.now().max(at);
    let views: BTreeMap<&str, &InstanceView> = selected
        .iter()
        .map(|s| (s.instance.id.as_str(), &s.instance))
        .collect();
    let request_of = |rules: &[String]| {
        requests
            .iter()
            .find(|r| rules.first().is_some_and(|n| *n == r.rule))
            .copied()
    };
    let mut out = RegionPlan::default();
    for p in planner::decide(selected) {
        // Reported by a run of this batch before a crash: its result stands.
        if report
            .already
            .contains(&instance_name(&p.instance_id, &p.rules, p.action))
        {
            continue;
        }
        let view = views[p.instance_id.as_str()];
        let wants_hibernate = p.action == Action::Stop
            && requests.iter().any(|r| {
                p.rules.contains(&r.rule)
                    && r.action == Action::Stop
                    && r.stop_mode == StopMode::Hibernate
            });
        let note = match (wants_hibernate, view.hibernation_configured) {
            (true, true) => Some("hibernated".to_string()),
            (true, false) => Some(
                "plain stop: the instance is not configured for hibernation (a fall-back)"
                    .to_string(),
            ),
            (false, _) => None,
        };
        let target = Target {
            id: p.instance_id.clone(),
            rules: p.rules.clone(),
            state: view.state.clone(),
            state_reason: view.state_reason.clone(),
            hibernate: wants_hibernate && view.hibernation_configured,
            note,
        };
        let record = |result, reason: String| {
            place.outcome(
                p.action,
                p.rules.clone(),
                Some(p.instance_id.clone()),
                result,
                reason,
            )
        };
        let zone = request_of(&p.rules).map_or(chrono_tz::UTC, |r| r.timezone);
        let would_act = matches!(
            p.decision,
            Decision::Act | Decision::AwaitTransition(_) | Decision::Follow(_)
        );
        if would_act && let Some(held) = planner::override_in_force(&view.tags, now, zone) {
            // Warned once per instance and value by enforce passes (which see it every few minutes).
            if held.unreadable && (!enforcing || first_warning(&p.instance_id, &held.value)) {
                tracing::warn!(
                    account = place.account,
                    region = place.region,
                    instance_id = %p.instance_id,
                    tag = held.tag,
                    value = %held.value,
                    "instance {} has tag {}={:?}, which does not parse: it is left alone",
                    p.instance_id,
                    held.tag,
                    held.value
                );
            }
            report.push(record(ResultKind::Skipped, held.reason()));
            continue;
        }
        // A pass whose describe took it past the rule's next occurrence: that occurrence decides now.
        if enforcing
            && request_of(&p.rules)
                .and_then(|r| r.valid_until)
                .is_some_and(|until| now >= until)
        {
            tracing::debug!(
                instance_id = %p.instance_id,
                "enforce: the rule's next occurrence came while the pass described; not acted on"
            );
            continue;
        }
        if enforcing {
            match &p.decision {
                // In the desired state, or on its way there or back: nothing to enforce.
                Decision::Skip(_) | Decision::Follow(_) | Decision::AwaitTransition(_) => continue,
                Decision::Act | Decision::Fail(_) => {}
            }
        }
        match p.decision {
            Decision::Skip(why) => {
                if report.holding() && !dry_run && view.state == p.action.target_state() {
                    out.recheck.entry(p.action).or_default().push(target);
                }
                report.push(record(ResultKind::Skipped, why));
            }
            Decision::Fail(why) => report.push(record(ResultKind::Failed, why)),
            Decision::Act | Decision::AwaitTransition(_) | Decision::Follow(_) if dry_run => report
                .push(record(
                    ResultKind::DryRun,
                    format!(
                        "would {} (currently {}); dry run, nothing called",
                        p.action, view.state
                    ),
                )),
            Decision::Act => out.act.entry(p.action).or_default().push(target),
            Decision::Follow(_) => out.follow.entry(p.action).or_default().push(target),
            Decision::AwaitTransition(_) => out.wait.entry(p.action).or_default().push(target),
        }
    }
    out
}

/// When a request can no longer be acted on: the rule's next occurrence (`valid_until`), from which
/// it may want otherwise; for a rule without one, a day after the instant. Not `catch_up`: that is how
/// late an occurrence may start after downtime, and a batch paced by EC2's limits (5,000 starts take
/// some 35 minutes) has started. Per rule.
fn act_windows(batch: &AccountBatch, requests: &[&Request]) -> BTreeMap<String, DateTime<Utc>> {
    requests
        .iter()
        .map(|r| {
            let end = r
                .valid_until
                .unwrap_or(batch.at + chrono::Duration::days(1));
            (r.rule.clone(), end)
        })
        .collect()
}

/// However late a batch comes to act, a throttled or paced call is given this long.
const MIN_ACT_WINDOW: Duration = Duration::from_secs(60);

/// How one region's Start/Stop calls are made: where, for which rules' windows, under which leases.
struct Acting<'a> {
    ctx: &'a BatchContext,
    ec2: &'a dyn Ec2,
    place: &'a Place<'a>,
    action: Action,
    leases: &'a [Lease],
    /// Per rule: when its request can no longer be acted on (see [`act_windows`]).
    windows: &'a BTreeMap<String, DateTime<Utc>>,
    /// No target gives up before this (the act's start plus [`MIN_ACT_WINDOW`]).
    floor: DateTime<Utc>,
}

impl Acting<'_> {
    /// When `target` can no longer be acted on: the earliest window of its rules.
    fn until(&self, target: &Target) -> DateTime<Utc> {
        target
            .rules
            .iter()
            .filter_map(|r| self.windows.get(r))
            .min()
            .copied()
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
            .max(self.floor)
    }
}

/// Calls Start/Stop in chunks, paced (see [`act_chunks`]). A chunk EC2 rejects as a whole (other than
/// throttling) is retried one instance at a time, so one bad instance (gone, wrong state, no capacity)
/// does not sink the others. Returns what was accepted.
async fn act(
    ctx: &BatchContext,
    ec2: &dyn Ec2,
    place: &Place<'_>,
    action: Action,
    targets: Vec<Target>,
    (leases, windows, dispatched): (
        &[Lease],
        &BTreeMap<String, DateTime<Utc>>,
        &std::sync::atomic::AtomicBool,
    ),
    report: &mut Report,
) -> Vec<Target> {
    if targets.is_empty() {
        return targets;
    }
    mark_dispatched(ctx, leases, dispatched).await;
    let how = Acting {
        ctx,
        ec2,
        place,
        action,
        leases,
        windows,
        floor: ctx.clock.now() + crate::clock::chrono_duration(MIN_ACT_WINDOW),
    };
    let mut accepted = Vec::new();
    let groups = if targets.iter().any(|t| t.hibernate) {
        let (hibernating, plain): (Vec<Target>, Vec<Target>) =
            targets.into_iter().partition(|t| t.hibernate);
        vec![(true, hibernating), (false, plain)]
    } else {
        vec![(false, targets)]
    };
    for (hibernate, targets) in groups {
        let rest = act_chunks(&how, hibernate, targets, report, &mut accepted).await;
        if !rest.is_empty() {
            // EC2 refused to hibernate them: a plain stop instead, said with each result.
            tracing::warn!(
                account = place.account,
                region = place.region,
                "{} instance(s) cannot be hibernated (UnsupportedHibernationConfiguration): stopping them \
                 instead",
                rest.len()
            );
            let rest: Vec<Target> = rest
                .into_iter()
                .map(|mut t| {
                    t.hibernate = false;
                    t.note = Some(
                        "plain stop: EC2 refused to hibernate it (UnsupportedHibernationConfiguration, a \
                         fall-back)"
                            .to_string(),
                    );
                    t
                })
                .collect();
            act_chunks(&how, false, rest, report, &mut accepted).await;
        }
    }
    report.flush();
    accepted
}

/// Records the region's occurrences as dispatched (the durable record's "dispatched", the claims'
/// progress), once: before the first Start/Stop call may leave.
async fn mark_dispatched(
    ctx: &BatchContext,
    leases: &[Lease],
    dispatched: &std::sync::atomic::AtomicBool,
) {
    if dispatched.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    (ctx.on_dispatch)();
    for lease in leases {
        lease
            .progress(crate::cluster::Progress::Dispatched, Vec::new())
            .await;
    }
}

/// One Start/Stop call still to make: its instances, and the throttled answers it has had.
struct Call {
    targets: Vec<Target>,
    throttled: u32,
}

/// Start/Stop calls for `targets`, paced by the model of EC2's buckets of the account and region:
/// calls are sized to the resource tokens there are (at most 100 IDs) and sent concurrently while the
/// model allows, then as the buckets refill. A throttled call is not a failure: the model is emptied,
/// the place held back (exponential, jittered), and the same call retried; only a target whose window
/// ends (or a shutdown) before it could be sent is reported failed, as throttled. A call rejected as a
/// whole for another reason is retried one instance at a time. What was accepted is added to
/// `accepted`. With `hibernate`, the instances EC2 refuses to hibernate are returned (not reported), to
/// be stopped plainly.
async fn act_chunks(
    how: &Acting<'_>,
    hibernate: bool,
    targets: Vec<Target>,
    report: &mut Report,
    accepted: &mut Vec<Target>,
) -> Vec<Target> {
    let Acting {
        ctx,
        ec2,
        place,
        action,
        leases,
        ..
    } = *how;
    let operation = match action {
        Action::Start => "ec2:StartInstances",
        Action::Stop => "ec2:StopInstances",
    };
    let cannot_hibernate =
        |e: &AwsError| hibernate && e.code() == Some("UnsupportedHibernationConfiguration");
    let buckets = ctx
        .clients
        .regions
        .get(place.region)
        .map(|c| c.buckets.clone())
        .unwrap_or_else(|| {
            Arc::new(std::sync::Mutex::new(
                RegionBuckets::new(Default::default()),
            ))
        });
    let model = || buckets.lock().unwrap_or_else(|e| e.into_inner());
    let total = targets.len();
    let mut fresh: std::collections::VecDeque<Target> = targets.into();
    // Calls to make again whole (throttled) or one by one (rejected): before any fresh one.
    let mut again: std::collections::VecDeque<Call> = Default::default();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut refused = Vec::new();
    let mut sent = 0;
    // IDs in the calls in flight.
    let mut sending = 0;
    let mut throttled = 0u32;
    let mut last_throttle: Option<AwsError> = None;
    let mut progress = None;
    let started = ctx.clock.monotonic();
    let mut cancel = ctx.cancel.clone();
    loop {
        // Send every call the model allows now.
        let mut wait = None;
        loop {
            let (want, exact) = match (again.front(), fresh.is_empty()) {
                (Some(c), _) => (c.targets.len(), true),
                (None, false) => (fresh.len(), false),
                (None, true) => break,
            };
            // Under a claim, no call once its lease is (nearly) gone: another delegate may take over.
            if leases.iter().any(|l| !l.may_act()) {
                let rest = again
                    .drain(..)
                    .flat_map(|c| c.targets)
                    .chain(fresh.drain(..));
                for t in rest {
                    report.push(place.outcome(
                        action,
                        t.rules.clone(),
                        Some(t.id.clone()),
                        ResultKind::Failed,
                        "not acted on: this delegate's claim lease ran out (the claim table could not \
                         be reached to extend it); another delegate takes over once it has expired",
                    ));
                }
                break;
            }
            match model().plan(ctx.clock.monotonic(), action, want, exact) {
                Plan::Send(n) => {
                    let call = match again.pop_front() {
                        Some(c) => c,
                        // All that is left in one call (a region's 10 or 100 instances): the buffer
                        // itself, not a copy of it beside an emptied one, for each of thousands of
                        // regions acting at one instant.
                        None if n >= fresh.len() => Call {
                            targets: std::mem::take(&mut fresh).into(),
                            throttled: 0,
                        },
                        None => Call {
                            targets: fresh.drain(..n).collect(),
                            throttled: 0,
                        },
                    };
                    let ids: Vec<String> = call.targets.iter().map(|t| t.id.clone()).collect();
                    sending += ids.len();
                    in_flight.push(async move {
                        let result =
                            bounded(operation, ec2.change_state(action, &ids, false, hibernate))
                                .await;
                        (call, result)
                    });
                }
                Plan::Wait(d) => {
                    wait = Some(d);
                    break;
                }
            }
        }
        if in_flight.is_empty() && wait.is_none() {
            break;
        }
        if wait.is_some() && progress.is_none() {
            let waiting = fresh.len() + again.iter().map(|c| c.targets.len()).sum::<usize>();
            tracing::info!(
                account = place.account,
                region = place.region,
                action = action.as_str(),
                "{action}: {} of {total} instance(s) in {}/{} sent; the rest ({waiting}) go as EC2's \
                 token buckets refill (paced to EC2's rate limits)",
                crate::pacing::thousands(sent + sending),
                place.account,
                place.region,
            );
            let guard = ctx.clients.pacer.track(crate::pacing::Progress {
                action,
                account: place.account.to_string(),
                region: place.region.to_string(),
                sent,
                total,
            });
            progress = Some(guard);
        }
        report.flush();
        let pause = wait.unwrap_or(Duration::MAX);
        let mut give_up: Option<String> = None;
        tokio::select! {
            Some((mut call, result)) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                let now = ctx.clock.monotonic();
                sending -= call.targets.len();
                match result {
                    Ok(()) => {
                        model().accepted();
                        sent += call.targets.len();
                        if let Some(p) = &progress {
                            p.sent(sent);
                        }
                        if accepted.is_empty() {
                            *accepted = call.targets;
                        } else {
                            accepted.extend(call.targets);
                        }
                    }
                    Err(e) if crate::pacing::is_throttling(&e) => {
                        let pause = model().throttled(now, Some(action), rand::random());
                        throttled += 1;
                        call.throttled += 1;
                        tracing::warn!(
                            account = place.account, region = place.region, action = action.as_str(),
                            error = %e,
                            "{action} call for {} instance(s) throttled by EC2 ({e}); retrying the same \
                             call in {} or once EC2's token bucket has refilled (throttled {} time(s))",
                            call.targets.len(),
                            humantime::format_duration(pause),
                            call.throttled
                        );
                        last_throttle = Some(e);
                        again.push_front(call);
                    }
                    Err(e) if call.targets.len() == 1 && cannot_hibernate(&e) => {
                        refused.extend(call.targets);
                    }
                    Err(e) if call.targets.len() == 1 => {
                        report.push(failed_call(place, action, &call.targets[0], &e));
                    }
                    Err(e) => {
                        tracing::warn!(
                            account = place.account, region = place.region, action = action.as_str(),
                            error = %e,
                            "{action} call for {} instances rejected ({e}); retrying one by one",
                            call.targets.len()
                        );
                        again.extend(call.targets.into_iter().map(|t| Call {
                            targets: vec![t],
                            throttled: 0,
                        }));
                    }
                }
            }
            () = tokio::time::sleep(pause), if wait.is_some() => {}
            Ok(_) = cancel.wait_for(|c| *c), if wait.is_some() => {
                give_up = Some(format!(
                    "shiftd is shutting down: not {}, throttled (paced to EC2's rate limits, {} of {total} \
                     sent)",
                    done_word(action),
                    sent
                ));
            }
        }
        // Targets whose window has ended while waiting for their turn.
        if wait.is_some() || give_up.is_some() {
            let now = ctx.clock.now();
            let ended = |t: &Target| give_up.is_some() || now >= how.until(t);
            let why = |t: &Target| {
                give_up.clone().unwrap_or_else(|| {
                    format!(
                        "not {}, throttled: EC2's rate limits for {operation} in this account and region \
                         did not allow it before {} ({}; {} throttled answer(s){})",
                        done_word(action),
                        how.until(t).to_rfc3339(),
                        "the rule's next occurrence",
                        throttled,
                        last_throttle
                            .as_ref()
                            .map_or(String::new(), |e| format!(", the last: {e}"))
                    )
                })
            };
            let mut expired = Vec::new();
            for call in &mut again {
                let (gone, kept): (Vec<Target>, Vec<Target>) = std::mem::take(&mut call.targets)
                    .into_iter()
                    .partition(ended);
                expired.extend(gone);
                call.targets = kept;
            }
            again.retain(|c| !c.targets.is_empty());
            let (gone, kept): (Vec<Target>, Vec<Target>) = fresh.drain(..).partition(ended);
            fresh = kept.into();
            expired.extend(gone);
            for t in expired {
                let reason = why(&t);
                report.push(place.outcome(
                    action,
                    t.rules.clone(),
                    Some(t.id.clone()),
                    ResultKind::Failed,
                    reason,
                ));
            }
        }
    }
    if progress.is_some() || throttled > 0 {
        tracing::info!(
            account = place.account,
            region = place.region,
            action = action.as_str(),
            throttled,
            "{action}: {} of {total} instance(s) in {}/{} accepted by EC2 after {} ({throttled} throttled \
             answer(s))",
            crate::pacing::thousands(sent),
            place.account,
            place.region,
            humantime::format_duration(Duration::from_secs(
                ctx.clock.monotonic().duration_since(started).as_secs()
            )),
        );
    }
    refused
}

/// "started" or "stopped".
fn done_word(action: Action) -> &'static str {
    match action {
        Action::Start => "started",
        Action::Stop => "stopped",
    }
}

fn failed_call(place: &Place, action: Action, target: &Target, e: &AwsError) -> Outcome {
    let reason = match e.code() {
        Some(code) if code.starts_with("InvalidInstanceID") => {
            format!("instance no longer exists: {e}")
        }
        _ => format!("{action} call failed: {e}"),
    };
    place.outcome(
        action,
        target.rules.clone(),
        Some(target.id.clone()),
        ResultKind::Failed,
        reason,
    )
}

/// One round of following instances: their states, or why following ends.
#[derive(Debug, PartialEq, Eq)]
enum Poll {
    States(Vec<InstanceView>),
    /// The describe failed (logged); try again at the next round.
    Unavailable,
    /// shiftd is shutting down.
    Cancelled,
    /// `verify_timeout` has passed.
    OutOfTime,
}

/// Describes instances on the back-off schedule of `planner::poll_interval`, until `verify_timeout`
/// passes or shiftd shuts down.
struct Poller {
    deadline: tokio::time::Instant,
    attempt: u32,
    cancel: watch::Receiver<bool>,
}

impl Poller {
    fn new(ctx: &BatchContext) -> Self {
        Self {
            deadline: ctx.clock.monotonic() + ctx.opts.verify_timeout,
            attempt: 0,
            cancel: ctx.cancel.clone(),
        }
    }

    async fn next(
        &mut self,
        ctx: &BatchContext,
        ec2: &dyn Ec2,
        place: &Place<'_>,
        ids: &[String],
    ) -> Poll {
        let now = ctx.clock.monotonic();
        let pause =
            planner::poll_interval(self.attempt).min(self.deadline.saturating_duration_since(now));
        self.attempt += 1;
        let cancelled = tokio::select! {
            _ = tokio::time::sleep(pause) => false,
            Ok(_) = self.cancel.wait_for(|c| *c) => true,
        };
        if cancelled {
            return Poll::Cancelled;
        }
        if pause.is_zero() && ctx.clock.monotonic() >= self.deadline {
            return Poll::OutOfTime;
        }
        match bounded("ec2:DescribeInstances", ec2.describe_ids(ids)).await {
            Ok(views) => Poll::States(views),
            Err(e) => {
                tracing::warn!(account = place.account, region = place.region, error = %e, "could not check instance states: {e}");
                Poll::Unavailable
            }
        }
    }
}

/// Waits (within `verify_timeout`) for instances in the opposite transition to settle, then decides
/// again: those now ready for `action` are returned; the rest are reported.
async fn await_transitions(
    ctx: &BatchContext,
    ec2: &dyn Ec2,
    place: &Place<'_>,
    action: Action,
    targets: Vec<Target>,
    report: &mut Report,
) -> Vec<Target> {
    let mut waiting: BTreeMap<String, Target> =
        targets.into_iter().map(|t| (t.id.clone(), t)).collect();
    let mut ready = Vec::new();
    let mut poller = Poller::new(ctx);
    while !waiting.is_empty() {
        report.flush();
        let ids: Vec<String> = waiting.keys().cloned().collect();
        let views = match poller.next(ctx, ec2, place, &ids).await {
            Poll::States(views) => views,
            Poll::Unavailable => continue,
            end => {
                let why = if end == Poll::Cancelled {
                    format!("shiftd is shutting down: {action} not done")
                } else {
                    format!(
                        "still in transition after {}: {action} not done",
                        humantime::format_duration(ctx.opts.verify_timeout)
                    )
                };
                for (_, t) in std::mem::take(&mut waiting) {
                    report.push(place.outcome(
                        action,
                        t.rules,
                        Some(t.id),
                        ResultKind::Failed,
                        format!("{why} (last seen: {})", t.state),
                    ));
                }
                break;
            }
        };
        for v in views {
            let Some(t) = waiting.get_mut(&v.id) else {
                continue;
            };
            t.state = v.state.clone();
            t.state_reason = v.state_reason.clone();
            let selected = Selected {
                instance: v.clone(),
                by: t.rules.iter().map(|r| (r.clone(), action)).collect(),
            };
            let decision = planner::decide(&[selected])
                .pop()
                .expect("one decision per instance")
                .decision;
            match decision {
                Decision::AwaitTransition(_) => continue,
                Decision::Act | Decision::Follow(_) => {
                    tracing::info!(
                        account = place.account, region = place.region, instance_id = %v.id,
                        "{} left its transition ({}); {action} goes ahead", v.id, v.state
                    );
                    ready.push(waiting.remove(&v.id).expect("present"));
                }
                Decision::Skip(why) => {
                    let t = waiting.remove(&v.id).expect("present");
                    report.push(place.outcome(
                        action,
                        t.rules,
                        Some(t.id),
                        ResultKind::Skipped,
                        why,
                    ));
                }
                Decision::Fail(why) => {
                    let t = waiting.remove(&v.id).expect("present");
                    report.push(place.outcome(
                        action,
                        t.rules,
                        Some(t.id),
                        ResultKind::Failed,
                        why,
                    ));
                }
            }
        }
    }
    // Followed ones (now in the wanted transition already) need no call: act() sees them as
    // already there and EC2 accepts the call as a no-op.
    ready
}

/// While a batch logs many results in a row (a thousand instances reaching their state in one poll
/// take tens of milliseconds of journal writes), it yields to the runtime this often: the runtime
/// then polls its timers, so another batch's instant that comes meanwhile is not held up until the
/// whole list is logged (measured: the fleet benchmark's scenario d, 1,000 instances an occurrence).
const YIELD_EVERY_RESULTS: usize = 50;

/// Follows accepted instances until each reaches the action's target state, fails, or the bound passes.
async fn verify(
    ctx: &BatchContext,
    ec2: &dyn Ec2,
    place: &Place<'_>,
    action: Action,
    accepted: Vec<Target>,
    report: &mut Report,
) {
    let started = ctx.clock.monotonic();
    // Per instance: the target (with its initial state), whether it was seen to leave that state, and
    // the state last seen.
    let mut pending: BTreeMap<String, (Target, bool, String)> = accepted
        .into_iter()
        .map(|t| {
            let last = t.state.clone();
            (t.id.clone(), (t, false, last))
        })
        .collect();
    let mut poller = Poller::new(ctx);
    let mut reported = 0usize;
    while !pending.is_empty() {
        report.flush();
        let ids: Vec<String> = pending.keys().cloned().collect();
        let views = match poller.next(ctx, ec2, place, &ids).await {
            Poll::States(views) => views,
            Poll::Unavailable => continue,
            end => {
                let why = if end == Poll::Cancelled {
                    format!("shiftd is shutting down: {action} was requested but not confirmed")
                } else {
                    format!(
                        "did not reach {} within {}",
                        action.target_state(),
                        humantime::format_duration(ctx.opts.verify_timeout)
                    )
                };
                for (id, (t, _, last)) in std::mem::take(&mut pending) {
                    report.push(place.outcome(
                        action,
                        t.rules,
                        Some(id),
                        ResultKind::Failed,
                        format!("{why} (last seen: {last})"),
                    ));
                }
                return;
            }
        };
        for v in views {
            let Some((t, left, last)) = pending.get_mut(&v.id) else {
                continue;
            };
            if v.state != t.state {
                *left = true;
            }
            *last = v.state.clone();
            let initial_reason = t.state_reason.clone();
            let (result, reason) =
                match planner::progress(action, &v, *left, initial_reason.as_deref()) {
                    Progress::Waiting => continue,
                    Progress::Reached => (
                        ResultKind::Ok,
                        format!(
                            "{} after {}s{}",
                            action.target_state(),
                            ctx.clock.monotonic().duration_since(started).as_secs(),
                            t.note.as_ref().map_or(String::new(), |n| format!(" ({n})"))
                        ),
                    ),
                    Progress::Failed(why) => (ResultKind::Failed, why),
                };
            let (t, _, _) = pending.remove(&v.id).expect("present");
            report.push(place.outcome(action, t.rules, Some(v.id), result, reason));
            reported += 1;
            if reported.is_multiple_of(YIELD_EVERY_RESULTS) {
                tokio::task::yield_now().await;
            }
        }
    }
}
