//! Carries out one account's batch: resolve selections, decide (planner), act, follow the instances to
//! their target state, and report every instance action exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::aws::Ec2Region;
use crate::config::{Account, Action};
use crate::credentials::AccountCredentials;
use crate::outcome::{Outcome, ResultKind};
use crate::planner::{self, AccountBatch, Decision, InstanceView, Progress, Request, Selected};

/// StartInstances/StopInstances calls carry at most this many IDs.
const IDS_PER_CALL: usize = 100;

/// One target account's clients: its credentials and an EC2 client per configured region.
pub struct AccountClients {
    pub account: Account,
    pub credentials: AccountCredentials,
    pub regions: BTreeMap<String, Ec2Region>,
}

#[derive(Clone, Debug)]
pub struct ExecOptions {
    pub dry_run: bool,
    pub verify_timeout: Duration,
    pub credentials_wait: Duration,
}

/// Collects outcomes and logs each as it is recorded.
#[derive(Default)]
struct Report {
    outcomes: Vec<Outcome>,
}

impl Report {
    fn push(&mut self, o: Outcome) {
        o.log();
        self.outcomes.push(o);
    }
}

fn outcome(
    account: &str,
    region: &str,
    action: Action,
    rules: Vec<String>,
    instance_id: Option<String>,
    result: ResultKind,
    reason: impl Into<String>,
) -> Outcome {
    Outcome {
        action,
        rules,
        account: account.to_string(),
        region: region.to_string(),
        instance_id,
        result,
        reason: reason.into(),
    }
}

/// Reports a request that could not be resolved into instances: one entry per listed instance, and one
/// for the tag selection when the request has no listed instances.
fn fail_request(report: &mut Report, account: &str, region: &str, req: &Request, reason: &str) {
    let rules = vec![req.rule.clone()];
    if req.selection.instance_ids.is_empty() {
        let reason = format!("{reason} (selection: {})", req.selection);
        report.push(outcome(
            account,
            region,
            req.action,
            rules,
            None,
            ResultKind::Failed,
            reason,
        ));
    } else {
        for id in &req.selection.instance_ids {
            report.push(outcome(
                account,
                region,
                req.action,
                rules.clone(),
                Some(id.clone()),
                ResultKind::Failed,
                reason,
            ));
        }
    }
}

/// Carries out `batch` and returns every outcome (each already logged).
pub async fn run_batch(
    clients: Arc<AccountClients>,
    batch: AccountBatch,
    opts: ExecOptions,
    cancel: watch::Receiver<bool>,
) -> Vec<Outcome> {
    let mut report = Report::default();
    let account = clients.account.name.clone();

    let mut shutdown = cancel.clone();
    let credentials = tokio::select! {
        r = clients.credentials.wait_usable(opts.credentials_wait) => r,
        Ok(_) = shutdown.wait_for(|c| *c) => {
            Err("shiftd is shutting down: no valid credentials came before the shutdown".to_string())
        }
    };
    if let Err(reason) = credentials {
        for req in &batch.requests {
            fail_request(&mut report, &account, &req.regions.join(","), req, &reason);
        }
        return report.outcomes;
    }

    let regions = batch.regions();
    let per_region = futures::future::join_all(regions.iter().map(|region| {
        let clients = clients.clone();
        let batch = &batch;
        let opts = opts.clone();
        let cancel = cancel.clone();
        async move { run_region(&clients, batch, region, &opts, cancel).await }
    }))
    .await;

    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unresolved: BTreeSet<String> = BTreeSet::new();
    for region_result in per_region {
        report.outcomes.extend(region_result.outcomes);
        for (rule, ids) in region_result.found {
            found.entry(rule).or_default().extend(ids);
        }
        unresolved.extend(region_result.unresolved);
    }

    // Listed instances found in none of the rule's regions: report them, act on the rest (EC2 would
    // reject a whole call for one unknown ID, which is why selections are resolved first).
    for req in &batch.requests {
        if unresolved.contains(&req.rule) {
            continue;
        }
        let seen = found.get(&req.rule);
        for id in &req.selection.instance_ids {
            if seen.is_none_or(|s| !s.contains(id)) {
                report.push(outcome(
                    &account,
                    &req.regions.join(","),
                    req.action,
                    vec![req.rule.clone()],
                    Some(id.clone()),
                    ResultKind::Failed,
                    format!(
                        "instance not found in account {} ({}), region(s) {}",
                        account,
                        clients.account.account_id,
                        req.regions.join(", ")
                    ),
                ));
            }
        }
    }
    report.outcomes
}

struct RegionResult {
    outcomes: Vec<Outcome>,
    /// Per rule, the listed instance IDs that exist in this region (matching or not).
    found: BTreeMap<String, BTreeSet<String>>,
    /// Rules whose selection could not be resolved here (already reported).
    unresolved: Vec<String>,
}

async fn run_region(
    clients: &AccountClients,
    batch: &AccountBatch,
    region: &str,
    opts: &ExecOptions,
    cancel: watch::Receiver<bool>,
) -> RegionResult {
    let account = clients.account.name.as_str();
    let mut report = Report::default();
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unresolved = Vec::new();
    let Some(ec2) = clients.regions.get(region) else {
        for req in batch
            .requests
            .iter()
            .filter(|r| r.regions.iter().any(|x| x == region))
        {
            fail_request(
                &mut report,
                account,
                region,
                req,
                "no EC2 client for this region",
            );
            unresolved.push(req.rule.clone());
        }
        return RegionResult {
            outcomes: report.outcomes,
            found,
            unresolved,
        };
    };

    // Resolve every request's selection in this region and merge by instance; act. Verification
    // happens after the lock is released.
    let guard = ec2.lock().await;
    let mut selected: BTreeMap<String, Selected> = BTreeMap::new();
    for req in batch
        .requests
        .iter()
        .filter(|r| r.regions.iter().any(|x| x == region))
    {
        let views = match ec2.describe(&req.selection, None).await {
            Ok(v) => v,
            Err(e) => {
                fail_request(
                    &mut report,
                    account,
                    region,
                    req,
                    &format!("could not list the selected instances: {e}"),
                );
                unresolved.push(req.rule.clone());
                continue;
            }
        };
        let matched: BTreeSet<String> = views.iter().map(|v| v.id.clone()).collect();
        let listed: BTreeSet<&String> = req.selection.instance_ids.iter().collect();
        let seen = found.entry(req.rule.clone()).or_default();
        seen.extend(matched.iter().filter(|id| listed.contains(id)).cloned());
        // Listed instances that exist but do not carry the rule's tags are left alone, and said so.
        let unmatched: Vec<String> = listed
            .iter()
            .filter(|id| !matched.contains(id.as_str()))
            .map(|id| id.to_string())
            .collect();
        if !req.selection.tags.is_empty() && !unmatched.is_empty() {
            match ec2.describe(&req.selection, Some(&unmatched)).await {
                Ok(existing) => {
                    for v in existing {
                        seen.insert(v.id.clone());
                        report.push(outcome(
                            account,
                            region,
                            req.action,
                            vec![req.rule.clone()],
                            Some(v.id),
                            ResultKind::Skipped,
                            "listed, but does not carry the rule's tags",
                        ));
                    }
                }
                Err(e) => {
                    for id in unmatched {
                        seen.insert(id.clone());
                        report.push(outcome(
                            account,
                            region,
                            req.action,
                            vec![req.rule.clone()],
                            Some(id),
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

    let selected: Vec<Selected> = selected.into_values().collect();
    let initial: BTreeMap<String, InstanceView> = selected
        .iter()
        .map(|s| (s.instance.id.clone(), s.instance.clone()))
        .collect();
    let mut to_act: BTreeMap<Action, Vec<(String, Vec<String>)>> = BTreeMap::new();
    for p in planner::decide(&selected) {
        let record = |result, reason: String| {
            outcome(
                account,
                region,
                p.action,
                p.rules.clone(),
                Some(p.instance_id.clone()),
                result,
                reason,
            )
        };
        match p.decision {
            Decision::Skip(why) => report.push(record(ResultKind::Skipped, why)),
            Decision::Fail(why) => report.push(record(ResultKind::Failed, why)),
            Decision::Act if opts.dry_run => report.push(record(
                ResultKind::DryRun,
                format!(
                    "would {} (currently {}); dry run, nothing called",
                    p.action, initial[&p.instance_id].state
                ),
            )),
            Decision::Act => to_act
                .entry(p.action)
                .or_default()
                .push((p.instance_id, p.rules)),
        }
    }

    let mut accepted = Vec::new();
    for (action, instances) in to_act {
        accepted.push((
            action,
            act(ec2, account, region, action, instances, &mut report).await,
        ));
    }
    drop(guard);
    for (action, instances) in accepted {
        if !instances.is_empty() {
            let cancel = cancel.clone();
            verify(
                ec2,
                account,
                region,
                action,
                instances,
                &initial,
                opts,
                cancel,
                &mut report,
            )
            .await;
        }
    }
    RegionResult {
        outcomes: report.outcomes,
        found,
        unresolved,
    }
}

/// Calls Start/Stop in chunks. A chunk EC2 rejects as a whole is retried one instance at a time, so
/// one bad instance (gone, wrong state, no capacity) does not sink the others. Returns what was accepted.
async fn act(
    ec2: &Ec2Region,
    account: &str,
    region: &str,
    action: Action,
    instances: Vec<(String, Vec<String>)>,
    report: &mut Report,
) -> Vec<(String, Vec<String>)> {
    let mut accepted = Vec::new();
    for chunk in instances.chunks(IDS_PER_CALL) {
        let ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
        match ec2.change_state(action, &ids).await {
            Ok(()) => accepted.extend(chunk.iter().cloned()),
            Err(e) if chunk.len() == 1 => {
                report.push(failed_call(account, region, action, &chunk[0], &e));
            }
            Err(e) => {
                tracing::warn!(
                    account, region, action = action.as_str(), error = %e,
                    "{action} call for {} instances rejected ({e}); retrying one by one", chunk.len()
                );
                for one in chunk {
                    match ec2.change_state(action, std::slice::from_ref(&one.0)).await {
                        Ok(()) => accepted.push(one.clone()),
                        Err(e) => report.push(failed_call(account, region, action, one, &e)),
                    }
                }
            }
        }
    }
    accepted
}

fn failed_call(
    account: &str,
    region: &str,
    action: Action,
    (id, rules): &(String, Vec<String>),
    e: &crate::aws::AwsError,
) -> Outcome {
    let reason = match e.code.as_deref() {
        Some(code) if code.starts_with("InvalidInstanceID") => {
            format!("instance no longer exists: {e}")
        }
        _ => format!("{action} call failed: {e}"),
    };
    outcome(
        account,
        region,
        action,
        rules.clone(),
        Some(id.clone()),
        ResultKind::Failed,
        reason,
    )
}

/// Follows accepted instances until each reaches the action's target state, fails, or the bound passes.
#[allow(clippy::too_many_arguments)]
async fn verify(
    ec2: &Ec2Region,
    account: &str,
    region: &str,
    action: Action,
    accepted: Vec<(String, Vec<String>)>,
    initial: &BTreeMap<String, InstanceView>,
    opts: &ExecOptions,
    mut cancel: watch::Receiver<bool>,
    report: &mut Report,
) {
    let started = Instant::now();
    let deadline = started + opts.verify_timeout;
    let mut pending: BTreeMap<String, (Vec<String>, String, bool)> = accepted
        .into_iter()
        .map(|(id, rules)| {
            let state = initial
                .get(&id)
                .map(|v| v.state.clone())
                .unwrap_or_default();
            (id, (rules, state, false))
        })
        .collect();
    let mut attempt = 0;
    while !pending.is_empty() {
        let now = Instant::now();
        let pause = planner::poll_interval(attempt).min(deadline.saturating_duration_since(now));
        attempt += 1;
        let cancelled = tokio::select! {
            _ = tokio::time::sleep(pause) => false,
            Ok(_) = cancel.wait_for(|c| *c) => true,
        };
        let out_of_time = Instant::now() >= deadline;
        if cancelled || (out_of_time && pause.is_zero()) {
            let why = if cancelled {
                format!("shiftd is shutting down: {action} was requested but not confirmed")
            } else {
                format!(
                    "did not reach {} within {}",
                    action.target_state(),
                    humantime::format_duration(opts.verify_timeout)
                )
            };
            for (id, (rules, last, _)) in std::mem::take(&mut pending) {
                report.push(outcome(
                    account,
                    region,
                    action,
                    rules,
                    Some(id),
                    ResultKind::Failed,
                    format!("{why} (last seen: {last})"),
                ));
            }
            return;
        }
        let ids: Vec<String> = pending.keys().cloned().collect();
        let views = match ec2.describe(&Default::default(), Some(&ids)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(account, region, error = %e, "could not check instance states: {e}");
                continue;
            }
        };
        for v in views {
            let Some((rules, last, left)) = pending.get_mut(&v.id) else {
                continue;
            };
            let before = initial.get(&v.id);
            if before.is_some_and(|b| b.state != v.state) {
                *left = true;
            }
            *last = v.state.clone();
            let initial_reason = before.and_then(|b| b.state_reason.as_deref());
            let (result, reason) = match planner::progress(action, &v, *left, initial_reason) {
                Progress::Waiting => continue,
                Progress::Reached => (
                    ResultKind::Ok,
                    format!(
                        "{} after {}s",
                        action.target_state(),
                        started.elapsed().as_secs()
                    ),
                ),
                Progress::Failed(why) => (ResultKind::Failed, why),
            };
            let rules = std::mem::take(rules);
            pending.remove(&v.id);
            report.push(outcome(
                account,
                region,
                action,
                rules,
                Some(v.id),
                result,
                reason,
            ));
        }
    }
}
