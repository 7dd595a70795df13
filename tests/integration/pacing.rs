//! Pacing (README "Pacing"): the daemon in-process against the in-memory AWS throttling like EC2 (its
//! default token buckets per account and region), on paused time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shiftd::aws::fake::{self, FakeAws};
use shiftd::config::Action;
use shiftd::outcome::ResultKind;
use shiftd::pacing::{Ec2Limits, Rate};

use crate::sim::{REGION, Sim, TARGET, config, rule, rule_with_tags, t};

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

/// The 12 digits of the `n`th account of a many-account configuration.
fn account_id(n: usize) -> String {
    format!("{}", 200_000_000_000u64 + n as u64)
}

/// `accounts` accounts `a0`, `a1`, ..., each with one rule `r<n>` on the tag `Schedule = s<n>` and
/// `schedule` (e.g. `stop = "0 20 * * *"`).
fn many_accounts(defaults: &str, accounts: usize, schedule: &str) -> String {
    let mut text = format!("[defaults]\n{defaults}\n\n");
    for n in 0..accounts {
        text += &format!(
            "[accounts.a{n}]\nrole_arn = \"arn:aws:iam::{}:role/shiftd\"\nregions = [\"{REGION}\"]\n\n\
             [[rules]]\nname = \"r{n}\"\naccount = \"a{n}\"\ntags = {{ Schedule = \"s{n}\" }}\n{schedule}\n\n",
            account_id(n)
        );
    }
    text
}

/// The world of `many_accounts`: EC2 throttling as EC2 does, calls of 200 ms, 10 s transitions, and
/// running instances tagged for each account's rule: `big` in `a0`, 5 in each other. Returns them all.
fn running_in_many_accounts(sim: &Sim, accounts: usize, big: usize) -> Vec<String> {
    sim.aws.throttle_like_ec2();
    sim.aws.set_call_latency(Duration::from_millis(200));
    sim.aws.set_transition_times(10 * SECOND, 10 * SECOND);
    let mut ids = Vec::new();
    for n in 0..accounts {
        let count = if n == 0 { big } else { 5 };
        let tag = format!("s{n}");
        ids.extend(sim.aws.add_instances(
            &account_id(n),
            REGION,
            count,
            "running",
            &[("Schedule", &tag)],
        ));
    }
    ids
}

/// The instant each call of `operation` for `account` was made.
fn call_times(aws: &FakeAws, operation: &str, account: &str) -> Vec<DateTime<Utc>> {
    aws.calls_of(operation)
        .into_iter()
        .filter(|c| c.account == account)
        .map(|c| c.at)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn five_thousand_starts_in_one_account_go_as_fast_as_the_buckets_allow_and_all_succeed() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    sim.aws.throttle_like_ec2();
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 5000, "stopped", &[("Schedule", "burst")]);
    // The default catch_up (5m) does not cut the 35-minute batch short.
    sim.write_config(&config(
        "verify_timeout = \"10m\"",
        &rule_with_tags("burst", &[("Schedule", "burst")], r#"start = "0 8 * * *""#),
    ));
    let daemon = sim.start();
    let sent = |sim: &Sim| -> usize {
        sim.aws
            .calls_of(fake::START)
            .iter()
            .map(|c| c.ids.len())
            .sum()
    };
    // The resource bucket's 1,000 at once (less the half token in hand; the fake refuses nothing)...
    sim.advance_to("2026-12-01T08:00:05Z").await;
    assert!((999..=1000).contains(&sent(&sim)), "{}", sim.logs.text());
    assert!(
        sim.logs.text().contains("paced to EC2's rate limits"),
        "{}",
        sim.logs.text()
    );
    // ... then 2 per second (in calls of 20 every 10 s).
    sim.advance_to("2026-12-01T08:10:05Z").await;
    let by_then = sent(&sim);
    assert!((2180..=2220).contains(&by_then), "{by_then}");
    // 1,000 + 4,000 / 2 per second = 2,000 s, then the last ones reach running.
    sim.advance_to("2026-12-01T08:34:00Z").await;
    sim.assert_one_each(&ids, Action::Start, ResultKind::Ok);
    let calls = sim.aws.calls_of(fake::START);
    assert_eq!(
        sent(&sim),
        5000,
        "every instance in exactly one call (none in two)"
    );
    assert_eq!(sim.aws.throttled_answers(), 0, "EC2 refused nothing");
    // 10 calls of 100, then 200 of 20.
    assert!(calls.len() <= 215, "{} calls", calls.len());
    let last = calls.last().unwrap().at;
    assert!(
        last <= t("2026-12-01T08:33:30Z"),
        "the last call at {last}: as soon as the bucket allowed"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn many_accounts_at_once_stay_under_the_cap_and_a_big_account_does_not_starve_the_small_ones()
{
    let sim = Sim::new("2026-12-01T19:58:00Z");
    // a0 is big (1,500 instances), a1..a100 are small (5 each).
    let ids = running_in_many_accounts(&sim, 101, 1500);
    sim.write_config(&many_accounts(
        "catch_up = \"30m\"",
        101,
        "stop = \"0 20 * * *\"",
    ));
    let daemon = sim.start();
    sim.advance_to("2026-12-01T20:05:00Z").await;
    sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    assert_eq!(sim.aws.throttled_answers(), 0);
    let most = sim.aws.max_in_flight();
    assert!(
        (32..=64).contains(&most),
        "at most 64 calls in flight (and the cap was reached): {most}"
    );
    assert!(sim.aws.max_in_flight_for(&account_id(0)) <= 8);
    // The big account's stops take a while (1,000 at once, then 20 per second)...
    let big = call_times(&sim.aws, fake::STOP, &account_id(0));
    assert!(
        *big.last().unwrap() >= t("2026-12-01T20:00:20Z"),
        "{:?}",
        big.last()
    );
    // ... while every small account's stop went out within seconds of the instant.
    for n in 1..101 {
        let small = call_times(&sim.aws, fake::STOP, &account_id(n));
        assert_eq!(small.len(), 1, "a{n}");
        assert!(
            small[0] <= t("2026-12-01T20:00:05Z"),
            "a{n} stopped at {}",
            small[0]
        );
    }
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn assume_role_calls_are_spread_at_start_up_and_renewals_do_not_line_up() {
    let sim = Sim::new("2026-12-01T12:00:00Z");
    sim.aws.set_call_latency(Duration::from_millis(50));
    sim.write_config(&many_accounts("", 300, "stop = \"0 20 * * *\""));
    let daemon = sim.start();
    sim.advance(30 * SECOND).await;
    let start_up: Vec<DateTime<Utc>> = sim
        .aws
        .calls_of(fake::ASSUME_ROLE)
        .iter()
        .map(|c| c.at)
        .collect();
    assert_eq!(start_up.len(), 300);
    let first = start_up[0];
    let per_second = |times: &[DateTime<Utc>], from: DateTime<Utc>| {
        times
            .iter()
            .filter(|at| **at >= from && **at < from + chrono::Duration::seconds(1))
            .count()
    };
    // A burst of 50, then 50 per second: 300 over about 5 s, never 300 at once.
    assert!(
        per_second(&start_up, first) <= 100,
        "{}",
        per_second(&start_up, first)
    );
    let spread = (*start_up.last().unwrap() - first).num_milliseconds();
    assert!((4000..=6500).contains(&spread), "{spread} ms");

    // An hour later (1h sessions renewed 10m before expiry, earlier by up to 5m), the renewals are
    // spread over minutes.
    sim.advance(60 * MINUTE).await;
    let renewals: Vec<DateTime<Utc>> = sim
        .aws
        .calls_of(fake::ASSUME_ROLE)
        .iter()
        .skip(300)
        .map(|c| c.at)
        .collect();
    assert_eq!(renewals.len(), 300);
    let span = (*renewals.last().unwrap() - renewals[0]).num_seconds();
    assert!(span >= 200, "renewals within {span} s");
    let busiest = renewals
        .iter()
        .map(|at| per_second(&renewals, *at))
        .max()
        .unwrap();
    assert!(busiest <= 15, "{busiest} renewals in one second");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_throttled_start_is_retried_whole_after_a_pause_not_one_by_one_nor_failed() {
    let sim = Sim::new("2026-12-01T07:59:30Z");
    let ids = sim.aws.add_instances(TARGET, REGION, 10, "stopped", &[]);
    sim.aws.fault(
        fake::START,
        2,
        FakeAws::error(
            fake::START,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        ),
    );
    sim.write_config(&config(
        "",
        &rule("morning", &ids, r#"start = "0 8 * * *""#),
    ));
    let daemon = sim.start();
    sim.advance(3 * MINUTE).await;
    sim.assert_one_each(&ids, Action::Start, ResultKind::Ok);
    let calls = sim.aws.calls_of(fake::START);
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert!(
        calls.iter().all(|c| c.ids.len() == 10),
        "the same call again, not one by one: {calls:#?}"
    );
    for pair in calls.windows(2) {
        let gap = (pair[1].at - pair[0].at).num_milliseconds();
        assert!(gap >= 500, "retried after {gap} ms");
    }
    assert!(
        sim.logs.text().contains("throttled by EC2"),
        "{}",
        sim.logs.text()
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_start_still_throttled_when_its_window_ends_is_reported_failed_as_throttled() {
    let sim = Sim::new("2026-12-01T07:59:30Z");
    let ids = sim.aws.add_instances(TARGET, REGION, 3, "stopped", &[]);
    sim.aws.fault(
        fake::START,
        1000,
        FakeAws::error(
            fake::START,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        ),
    );
    // The window is the rule's next occurrence (08:03), not catch_up (1m, which only bounds how late
    // the occurrence may start).
    sim.write_config(&config(
        "catch_up = \"1m\"",
        &rule(
            "morning",
            &ids,
            "start = \"0 8 * * *\"\nstop = \"3 8 * * *\"",
        ),
    ));
    let daemon = sim.start();
    sim.advance(5 * MINUTE).await;
    let mut got = Vec::new();
    for id in &ids {
        let starts: Vec<_> = sim
            .outcomes_for(id)
            .into_iter()
            .filter(|o| o.action == Action::Start)
            .collect();
        assert_eq!(starts.len(), 1, "{id}: {starts:?}");
        assert_eq!(starts[0].result, ResultKind::Failed, "{starts:?}");
        got.extend(starts);
    }
    assert!(
        got[0].reason.contains("throttled") && got[0].reason.contains("next occurrence"),
        "{}",
        got[0].reason
    );
    let calls = sim.aws.calls_of(fake::START);
    assert!(
        (5..=14).contains(&calls.len()),
        "backing off, not hammering: {} calls in 3 minutes",
        calls.len()
    );
    assert!(calls.iter().all(|c| c.ids.len() == 3), "{calls:#?}");
    assert!(
        calls.last().unwrap().at <= t("2026-12-01T08:03:00Z"),
        "nothing sent after the window"
    );
    assert!(
        calls.last().unwrap().at > t("2026-12-01T08:01:30Z"),
        "still trying after catch_up"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_throttled_describe_is_retried_after_a_pause() {
    let sim = Sim::new("2026-12-01T07:59:30Z");
    let ids = sim.aws.add_instances(TARGET, REGION, 2, "stopped", &[]);
    sim.write_config(&config(
        "",
        &rule("morning", &ids, r#"start = "0 8 * * *""#),
    ));
    let daemon = sim.start();
    sim.advance(20 * SECOND).await;
    sim.aws.fault(
        fake::DESCRIBE,
        2,
        FakeAws::error(
            fake::DESCRIBE,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        ),
    );
    sim.advance(3 * MINUTE).await;
    sim.assert_one_each(&ids, Action::Start, ResultKind::Ok);
    daemon.stop().await;
}

/// `resolve_ahead` is held back per account, not for the whole process: while account1's
/// 5,000-instance start is still being paced (over half an hour), account2's stop at 08:10 is described
/// ahead and its call leaves at the instant; account1's own occurrence at 08:10 (in its other region)
/// is resolved at the instant itself, after the earlier one's effects.
#[tokio::test(start_paused = true)]
async fn an_account_with_a_long_batch_open_holds_back_no_other_account_at_the_next_instant() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    sim.aws.throttle_like_ec2();
    sim.aws.set_call_latency(SECOND);
    const OTHER_REGION: &str = "us-east-1";
    let account2 = account_id(2);
    sim.aws
        .add_instances(TARGET, REGION, 5000, "stopped", &[("Schedule", "burst")]);
    let a_evening = sim.aws.add_instances(
        TARGET,
        OTHER_REGION,
        3,
        "running",
        &[("Schedule", "evening")],
    );
    let b_evening =
        sim.aws
            .add_instances(&account2, REGION, 3, "running", &[("Schedule", "evening")]);
    sim.write_config(&format!(
        r#"
[accounts.account1]
role_arn = "arn:aws:iam::{TARGET}:role/shiftd"
regions = ["{REGION}", "{OTHER_REGION}"]

[accounts.account2]
role_arn = "arn:aws:iam::{account2}:role/shiftd"
regions = ["{REGION}"]

[[rules]]
name = "burst"
account = "account1"
regions = ["{REGION}"]
tags = {{ Schedule = "burst" }}
start = "0 8 * * *"

[[rules]]
name = "a-evening"
account = "account1"
regions = ["{OTHER_REGION}"]
tags = {{ Schedule = "evening" }}
stop = "10 8 * * *"

[[rules]]
name = "b-evening"
account = "account2"
tags = {{ Schedule = "evening" }}
stop = "10 8 * * *"
"#
    ));
    let daemon = sim.start();
    sim.advance_to("2026-12-01T08:11:00Z").await;
    let instant = t("2026-12-01T08:10:00Z");
    let calls = sim.aws.calls();
    // When the first such call left (the fake records a call as it answers, a second later).
    let left = |operation: &str, account: &str, region: &str| {
        calls
            .iter()
            .find(|c| c.operation == operation && c.account == account && c.region == region)
            .map(|c| c.at - chrono::Duration::seconds(1))
            .unwrap_or_else(|| panic!("no {operation} in {account}/{region}"))
    };
    assert!(
        call_times(&sim.aws, fake::START, TARGET)
            .last()
            .is_some_and(|at| *at > instant + chrono::Duration::seconds(30)),
        "account1's start is still being paced after 08:10"
    );
    // account2: described 5 s ahead, its call at the instant.
    assert_eq!(
        left(fake::DESCRIBE, &account2, REGION),
        instant - chrono::Duration::seconds(5)
    );
    assert_eq!(left(fake::STOP, &account2, REGION), instant);
    // account1: resolved at the instant, its call once the describe has answered.
    assert_eq!(left(fake::DESCRIBE, TARGET, OTHER_REGION), instant);
    assert_eq!(
        left(fake::STOP, TARGET, OTHER_REGION),
        instant + chrono::Duration::seconds(1)
    );
    sim.assert_one_each(&b_evening, Action::Stop, ResultKind::Ok);
    sim.assert_one_each(&a_evening, Action::Stop, ResultKind::Ok);
    daemon.stop().await;
}

/// EC2's default buckets with StartInstances' resource bucket raised to 2,000 instances at 10 a
/// second, as AWS raises an account's limits on request.
fn start_instances_raised() -> Ec2Limits {
    Ec2Limits {
        start_instances: Rate {
            capacity: 2000.0,
            per_second: 10.0,
        },
        ..Ec2Limits::DEFAULT
    }
}

/// The same, as `[pacing.ec2]` or `[pacing.accounts.NAME]` write it.
const START_INSTANCES_RAISED: &str = "start_instances = { burst = 2000, refill_per_second = 10 }";

/// The total of instance IDs in the calls of `operation` for `account`.
fn ids_sent(aws: &FakeAws, operation: &str, account: &str) -> usize {
    aws.calls_of(operation)
        .iter()
        .filter(|c| c.account == account)
        .map(|c| c.ids.len())
        .sum()
}

#[tokio::test(start_paused = true)]
async fn with_raised_limits_configured_a_big_start_goes_as_fast_as_they_allow_and_is_never_throttled()
 {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    sim.aws.throttle_like_ec2_with(start_instances_raised());
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 5000, "stopped", &[("Schedule", "burst")]);
    sim.write_config(&format!(
        "{}\n[pacing.ec2]\n{START_INSTANCES_RAISED}\n",
        config(
            "",
            &rule_with_tags("burst", &[("Schedule", "burst")], r#"start = "0 8 * * *""#),
        )
    ));
    let daemon = sim.start();
    sim.advance(SECOND).await;
    assert!(
        sim.logs.text().contains(
            "pacing (not the defaults): ec2.start_instances: burst 2000, refill 10/s (EC2's default \
             burst 1000, refill 2/s)"
        ),
        "{}",
        sim.logs.text()
    );
    // The raised bucket's 2,000 at once...
    sim.advance_to("2026-12-01T08:00:05Z").await;
    let at_once = ids_sent(&sim.aws, fake::START, TARGET);
    assert!((1990..=2000).contains(&at_once), "{at_once}");
    // ... then 10 per second (calls of 100 every 10 s): 2,000 + 3,000 / 10 per second = 300 s, where
    // EC2's defaults take 2,000 s (`five_thousand_starts_in_one_account_...`).
    sim.advance_to("2026-12-01T08:02:05Z").await;
    let by_then = ids_sent(&sim.aws, fake::START, TARGET);
    assert!((3150..=3250).contains(&by_then), "{by_then}");
    sim.advance_to("2026-12-01T08:07:00Z").await;
    sim.assert_one_each(&ids, Action::Start, ResultKind::Ok);
    assert_eq!(ids_sent(&sim.aws, fake::START, TARGET), 5000);
    assert_eq!(sim.aws.throttled_answers(), 0, "EC2 refused nothing");
    let last = sim.aws.calls_of(fake::START).last().unwrap().at;
    assert!(
        (t("2026-12-01T08:04:50Z")..=t("2026-12-01T08:05:30Z")).contains(&last),
        "the last call at {last}: as soon as the raised bucket allowed, not sooner"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_account_with_raised_limits_is_paced_to_them_and_the_others_to_the_defaults() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    let account2 = account_id(2);
    sim.aws.throttle_like_ec2();
    sim.aws.raise_ec2_limits(TARGET, start_instances_raised());
    let mut ids = Vec::new();
    for account in [TARGET, account2.as_str()] {
        ids.extend(sim.aws.add_instances(
            account,
            REGION,
            3000,
            "stopped",
            &[("Schedule", "burst")],
        ));
    }
    sim.write_config(&format!(
        r#"
[defaults]
verify_timeout = "10m"

[accounts.account1]
role_arn = "arn:aws:iam::{TARGET}:role/shiftd"
regions = ["{REGION}"]

[accounts.account2]
role_arn = "arn:aws:iam::{account2}:role/shiftd"
regions = ["{REGION}"]

[[rules]]
name = "burst"
accounts = ["account1", "account2"]
tags = {{ Schedule = "burst" }}
start = "0 8 * * *"

[pacing.accounts.account1]
{START_INSTANCES_RAISED}
"#
    ));
    let daemon = sim.start();
    sim.advance_to("2026-12-01T08:18:00Z").await;
    sim.assert_one_each(&ids, Action::Start, ResultKind::Ok);
    assert_eq!(sim.aws.throttled_answers(), 0, "EC2 refused nothing");
    // account1: 2,000 at once, then 1,000 at 10 per second.
    let raised = call_times(&sim.aws, fake::START, TARGET);
    let last = *raised.last().unwrap();
    assert!(
        (t("2026-12-01T08:01:30Z")..=t("2026-12-01T08:02:00Z")).contains(&last),
        "account1's last call at {last}"
    );
    // account2, at EC2's defaults: 1,000 at once, then 2,000 at 2 per second.
    let default = call_times(&sim.aws, fake::START, &account2);
    let last = *default.last().unwrap();
    assert!(
        (t("2026-12-01T08:16:30Z")..=t("2026-12-01T08:17:00Z")).contains(&last),
        "account2's last call at {last}"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_lower_max_in_flight_bounds_the_calls_in_flight_in_all_and_per_account() {
    let sim = Sim::new("2026-12-01T19:58:00Z");
    // a0 is big (1,000 instances: ten calls of 100 at once), a1..a29 are small (5 each).
    let ids = running_in_many_accounts(&sim, 30, 1000);
    sim.write_config(&format!(
        "{}\n[pacing]\nmax_in_flight = 6\nmax_in_flight_per_account = 2\n",
        many_accounts("", 30, "stop = \"0 20 * * *\"")
    ));
    let daemon = sim.start();
    sim.advance_to("2026-12-01T20:03:00Z").await;
    sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    assert_eq!(sim.aws.throttled_answers(), 0);
    assert_eq!(
        sim.aws.max_in_flight(),
        6,
        "at most 6 calls in flight (and the cap was reached)"
    );
    assert_eq!(sim.aws.max_in_flight_for(&account_id(0)), 2);
    // The big account's ten calls went two at a time, each 200 ms: at least a second from first to last.
    let big = call_times(&sim.aws, fake::STOP, &account_id(0));
    assert_eq!(big.len(), 10);
    assert!(
        (big[9] - big[0]).num_milliseconds() >= 800,
        "{:?}",
        (big[0], big[9])
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn limits_raised_on_reload_speed_up_a_start_already_being_paced() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    // AWS raised the limits; shiftd is told two minutes into a 5,000-instance start.
    sim.aws.throttle_like_ec2_with(start_instances_raised());
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 5000, "stopped", &[("Schedule", "burst")]);
    let written = config(
        "",
        &rule_with_tags("burst", &[("Schedule", "burst")], r#"start = "0 8 * * *""#),
    );
    sim.write_config(&written);
    let daemon = sim.start();
    sim.advance_to("2026-12-01T08:02:00Z").await;
    let before = ids_sent(&sim.aws, fake::START, TARGET);
    assert!((1200..=1260).contains(&before), "EC2's defaults: {before}");
    sim.write_config(&format!(
        "{written}\n[pacing.ec2]\n{START_INSTANCES_RAISED}\n"
    ));
    daemon.reload();
    sim.advance(SECOND).await;
    assert!(
        sim.logs.text().contains(
            "[pacing] changed, applied at once (calls already in flight finish; under a lower cap, \
             new calls wait until those in flight are under it): ec2.start_instances: burst 2000, \
             refill 10/s (EC2's default burst 1000, refill 2/s)"
        ),
        "{}",
        sim.logs.text()
    );
    // The rest, about 3,760, at 10 per second: about 6 minutes more, where 2 per second would take 31.
    sim.advance_to("2026-12-01T08:10:00Z").await;
    sim.assert_one_each(&ids, Action::Start, ResultKind::Ok);
    assert_eq!(sim.aws.throttled_answers(), 0, "EC2 refused nothing");
    let last = sim.aws.calls_of(fake::START).last().unwrap().at;
    assert!(last <= t("2026-12-01T08:08:40Z"), "the last call at {last}");
    daemon.stop().await;
}
