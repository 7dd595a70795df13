//! High availability, in-process on paused time: several delegates share one claim table (the fake's
//! in-memory one, with DynamoDB's conditional semantics) and act once per occurrence.

use std::collections::BTreeMap;
use std::time::Duration;

use shiftd::aws::fake::{self, Fault};
use shiftd::config::Action;
use shiftd::outcome::ResultKind;

use crate::sim::{REGION, Sim, TARGET, config, rule_with_tags};

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

const CLUSTER: &str = r#"
[cluster]
table = "shiftd-claims"
region = "ap-northeast-1"
lease = "60s"
"#;

fn evening(extra: &str) -> String {
    let rule = rule_with_tags(
        "evening",
        &[("Schedule", "office")],
        &format!("stop = \"0 20 * * *\"\n{extra}"),
    );
    format!("{CLUSTER}{rule}")
}

/// How many StopInstances calls named each instance.
fn stop_calls_per_instance(sim: &Sim) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for c in sim.aws.calls_of(fake::STOP) {
        for id in c.ids {
            *n.entry(id).or_default() += 1;
        }
    }
    n
}

fn assert_each_stopped_once(sim: &Sim, ids: &[String]) {
    let calls = stop_calls_per_instance(sim);
    for id in ids {
        assert_eq!(
            calls.get(id),
            Some(&1),
            "{id}: {calls:?}\n{}",
            sim.logs.text()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn three_delegates_one_config_act_once_per_occurrence() {
    let sim = Sim::new("2026-12-01T19:58:00Z");
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 6, "running", &[("Schedule", "office")]);
    sim.write_config(&config("", &evening("")));
    let a = sim.start_delegate("a", 0);
    let b = sim.start_delegate("b", 0);
    let c = sim.start_delegate("c", 0);
    sim.advance(5 * MINUTE).await;
    assert_each_stopped_once(&sim, &ids);
    sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    assert_eq!(sim.outcomes().len(), 6, "nothing but the holder's results");
    let claims = sim.aws.claims.claims();
    assert_eq!(
        claims.len(),
        1,
        "one claim per occurrence, account and region: {claims:#?}"
    );
    assert_eq!(claims[0].progress, shiftd::cluster::Progress::Done);
    assert_eq!(claims[0].results.len(), 6, "{claims:#?}");
    // Writes: create, dispatched, done (and a lease extension or two), never one per instance.
    assert!(sim.aws.claims.writes() <= 5, "{}", sim.aws.claims.writes());
    for d in [a, b, c] {
        d.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_holder_killed_mid_batch_is_taken_over_after_its_lease_by_a_delegate_started_later() {
    let sim = Sim::new("2026-12-01T19:59:00Z");
    sim.aws
        .set_transition_times(Duration::from_secs(10), Duration::from_secs(120));
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 3, "running", &[("Schedule", "office")]);
    sim.write_config(&config("", &evening("")));
    let holder = sim.start_delegate("holder", 0);
    sim.advance_to("2026-12-01T20:00:05Z").await;
    assert_eq!(
        sim.aws.calls_of(fake::STOP).len(),
        1,
        "the holder stopped them"
    );
    holder.kill().await;
    assert!(sim.outcomes().is_empty(), "killed before any result");
    // A delegate started after the instant, with no state of its own.
    let late = sim.start_delegate("late", 0);
    sim.advance(30 * SECOND).await;
    assert!(
        sim.outcomes().is_empty(),
        "the lease still holds: nobody acts"
    );
    sim.advance(5 * MINUTE).await;
    assert_each_stopped_once(&sim, &ids);
    sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    let logs = sim.logs.text();
    assert!(logs.contains("took over from"), "{logs}");
    late.stop().await;
}

#[tokio::test(start_paused = true)]
async fn without_the_claim_table_nothing_is_acted_on_and_each_occurrence_is_reported_not_claimed() {
    let sim = Sim::new("2026-12-01T19:59:00Z");
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 2, "running", &[("Schedule", "office")]);
    sim.write_config(&config("", &evening("")));
    sim.aws.claims.set_unreachable(true);
    let a = sim.start_delegate("a", 0);
    let b = sim.start_delegate("b", 0);
    sim.advance(10 * MINUTE).await;
    assert!(sim.aws.calls_of(fake::STOP).is_empty());
    let failed: Vec<_> = sim.outcomes();
    assert_eq!(failed.len(), 2, "one per delegate: {failed:#?}");
    for o in &failed {
        assert_eq!(o.result, ResultKind::Failed);
        assert!(
            o.reason.contains("not claimed: claim table unreachable"),
            "{}",
            o.reason
        );
    }
    assert_eq!(sim.aws.states(&ids), ["running"; 2]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_loses_the_table_makes_no_call_after_its_lease() {
    let sim = Sim::new("2026-12-01T19:59:00Z");
    sim.aws
        .set_transition_times(Duration::from_secs(300), Duration::from_secs(20));
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 1, "running", &[("Schedule", "office")]);
    // Someone started it at 19:59:30: at 20:00 it is pending for 5 minutes; the stop waits.
    sim.aws.set_state(&ids[0], "stopped");
    sim.write_config(&config("", &evening("")));
    let holder = sim.start_delegate("holder", 0);
    sim.advance(30 * SECOND).await;
    sim.aws.set_state(&ids[0], "pending");
    sim.advance_to("2026-12-01T20:00:10Z").await;
    assert_eq!(sim.aws.claims.claims().len(), 1, "claimed");
    // The table goes away: the lease cannot be extended.
    sim.aws.claims.set_unreachable(true);
    sim.advance(10 * MINUTE).await;
    assert!(
        sim.aws.calls_of(fake::STOP).is_empty(),
        "no call after the lease: {:#?}",
        sim.aws.calls_of(fake::STOP)
    );
    let got = sim.assert_one_each(&ids, Action::Stop, ResultKind::Failed);
    assert!(got[0].reason.contains("lease ran out"), "{}", got[0].reason);
    holder.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_ten_minute_verification_keeps_its_claim() {
    let sim = Sim::new("2026-12-01T19:59:00Z");
    sim.aws
        .set_transition_times(Duration::from_secs(10), Duration::from_secs(600));
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 2, "running", &[("Schedule", "office")]);
    sim.write_config(&config(r#"verify_timeout = "15m""#, &evening("")));
    let a = sim.start_delegate("a", 0);
    let b = sim.start_delegate("b", 0);
    sim.advance(15 * MINUTE).await;
    assert_each_stopped_once(&sim, &ids);
    sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    // The other delegate's window (catch_up 5m) closed while the holder was still following: it says
    // nothing (the holder reports), and reports no failure.
    let failed: Vec<_> = sim
        .outcomes()
        .into_iter()
        .filter(|o| o.result != ResultKind::Ok)
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(
        !sim.logs.text().contains("took over"),
        "{}",
        sim.logs.text()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn delegates_thirty_seconds_apart_still_act_once() {
    let sim = Sim::new("2026-12-01T19:58:00Z");
    sim.aws
        .set_transition_times(Duration::from_secs(10), Duration::from_secs(90));
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 4, "running", &[("Schedule", "office")]);
    sim.write_config(&config("", &evening("")));
    let fast = sim.start_delegate("fast", 30);
    let slow = sim.start_delegate("slow", -30);
    let on_time = sim.start_delegate("on-time", 0);
    sim.advance(10 * MINUTE).await;
    assert_each_stopped_once(&sim, &ids);
    sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    for d in [fast, slow, on_time] {
        d.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn two_delegates_enforcing_one_rule_act_once() {
    let sim = Sim::new("2026-12-01T10:00:00Z");
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 3, "running", &[("Schedule", "office")]);
    sim.write_config(&config(
        r#"enforce_every = "1m""#,
        &format!(
            r#"{CLUSTER}
[[rules]]
name = "office"
account = "account1"
tags = {{ Schedule = "office" }}
start = "0 8 * * *"
stop = "0 20 * * *"
enforce = true
"#
        ),
    ));
    let a = sim.start_delegate("a", 0);
    let b = sim.start_delegate("b", 0);
    sim.advance(2 * MINUTE).await;
    for id in &ids {
        sim.aws.set_state(id, "stopped");
    }
    // Both passes describe at once, and (EC2 being eventually consistent) both see them stopped.
    sim.aws.fault(fake::DESCRIBE, 2, Fault::Delay(2 * SECOND));
    sim.aws.set_stale_describes(10 * SECOND);
    sim.advance(5 * MINUTE).await;
    let starts: usize = sim
        .aws
        .calls_of(fake::START)
        .iter()
        .map(|c| c.ids.len())
        .sum();
    assert_eq!(starts, 3, "{:#?}", sim.aws.calls_of(fake::START));
    sim.assert_one_each(&ids, Action::Start, ResultKind::Ok);
    a.stop().await;
    b.stop().await;
}
