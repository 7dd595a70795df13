//! Unattended operation, in-process on paused time: enforce, catch-up windows, override tags and
//! hibernation. Rows of the README's failure-behaviour table, like `scenarios`.

use std::time::Duration;

use shiftd::aws::fake::{self, FakeAws};
use shiftd::config::Action;
use shiftd::outcome::{ResultKind, Trigger};

use crate::sim::{REGION, Sim, TARGET, config, rule_with_tags};

const MINUTE: Duration = Duration::from_secs(60);

/// An office-hours rule on tagged instances (08:00 start, 20:00 stop, UTC) with `extra` keys.
fn office(name: &str, tag: &str, extra: &str) -> String {
    rule_with_tags(
        name,
        &[("Schedule", tag)],
        &format!("start = \"0 8 * * *\"\nstop = \"0 20 * * *\"\n{extra}"),
    )
}

fn tagged(sim: &Sim, n: usize, state: &str, tag: &str) -> Vec<String> {
    sim.aws
        .add_instances(TARGET, REGION, n, state, &[("Schedule", tag)])
}

#[tokio::test(start_paused = true)]
async fn enforce_restarts_an_instance_stopped_by_hand_with_one_describe_per_pass() {
    let sim = Sim::new("2026-12-01T10:00:00Z");
    let office_ids = tagged(&sim, 2, "running", "office");
    let lab_ids = tagged(&sim, 1, "running", "lab");
    sim.write_config(&config(
        r#"enforce_every = "5m""#,
        &(office("office", "office", "enforce = true") + &office("lab", "lab", "enforce = true")),
    ));
    let daemon = sim.start();
    sim.advance(MINUTE).await;
    assert!(
        sim.outcomes().is_empty(),
        "instances already in their desired state are neither acted on nor logged: {:#?}",
        sim.outcomes()
    );
    // Someone stops one by hand at 10:01.
    sim.aws.set_state(&office_ids[0], "stopped");
    sim.aws.set_state(&lab_ids[0], "stopped");
    let describes_before = sim.aws.calls_of(fake::DESCRIBE).len();
    sim.advance(5 * MINUTE).await;
    let started = sim.assert_one_each(
        &[office_ids[0].clone(), lab_ids[0].clone()],
        Action::Start,
        ResultKind::Ok,
    );
    for o in &started {
        assert_eq!(o.trigger, Trigger::Enforce, "{o:?}");
        assert_eq!(o.why(), "enforce", "SHIFTD_REASON=enforce");
        assert!(o.reason.starts_with("running after"), "{}", o.reason);
    }
    assert!(sim.outcomes_for(&office_ids[1]).is_empty());
    // One pass at 10:05 (and following the started instances): two rules, one account and region,
    // one DescribeInstances for the pass itself.
    let pass_describes: Vec<_> = sim.aws.calls_of(fake::DESCRIBE)[describes_before..]
        .iter()
        .filter(|c| c.ids.is_empty())
        .cloned()
        .collect();
    assert_eq!(pass_describes.len(), 1, "{pass_describes:#?}");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn without_enforce_a_change_by_hand_is_respected_until_the_next_occurrence() {
    let sim = Sim::new("2026-12-01T10:00:00Z");
    let ids = tagged(&sim, 1, "running", "office");
    sim.write_config(&config("", &office("office", "office", "")));
    let daemon = sim.start();
    sim.advance(MINUTE).await;
    sim.aws.set_state(&ids[0], "stopped");
    sim.advance(60 * MINUTE).await;
    assert!(sim.aws.calls_of(fake::START).is_empty());
    assert!(sim.outcomes().is_empty(), "{:#?}", sim.outcomes());
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn enforce_at_start_up_brings_instances_to_the_state_of_the_latest_occurrence() {
    // shiftd starts at 21:00: the 20:00 stop was not seen; enforce stops what still runs.
    let sim = Sim::new("2026-12-01T21:00:00Z");
    let ids = tagged(&sim, 2, "running", "office");
    sim.aws.set_state(&ids[1], "stopped");
    sim.write_config(&config("", &office("office", "office", "enforce = true")));
    let daemon = sim.start();
    sim.advance(MINUTE).await;
    let got = sim.assert_one_each(&ids[..1], Action::Stop, ResultKind::Ok);
    assert_eq!(got[0].trigger, Trigger::Enforce);
    assert!(sim.outcomes_for(&ids[1]).is_empty());
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn enforce_leaves_instances_in_transition_alone() {
    let sim = Sim::new("2026-12-01T10:00:00Z");
    sim.aws
        .set_transition_times(Duration::from_secs(600), Duration::from_secs(600));
    let ids = tagged(&sim, 1, "running", "office");
    sim.write_config(&config(
        r#"enforce_every = "10s""#,
        &office("office", "office", "enforce = true"),
    ));
    let daemon = sim.start();
    sim.advance(MINUTE).await;
    // Someone is stopping it (10 minutes): enforce does not fight the transition...
    sim.aws.set_state(&ids[0], "stopping");
    sim.advance(5 * MINUTE).await;
    assert!(sim.aws.calls_of(fake::START).is_empty());
    // ... and starts it once it is stopped.
    sim.advance(10 * MINUTE).await;
    assert_eq!(sim.aws.calls_of(fake::START).len(), 1);
    sim.advance(15 * MINUTE).await;
    sim.assert_one_each(&ids, Action::Start, ResultKind::Ok);
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn enforce_does_not_race_the_occurrence_itself() {
    let sim = Sim::new("2026-12-01T19:59:00Z");
    let ids = tagged(&sim, 3, "running", "office");
    sim.write_config(&config(
        r#"enforce_every = "10s""#,
        &office("office", "office", "enforce = true"),
    ));
    let daemon = sim.start();
    sim.advance(15 * MINUTE).await;
    let got = sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    assert!(
        got.iter().all(|o| o.trigger == Trigger::Schedule),
        "{got:#?}"
    );
    assert_eq!(
        sim.aws.calls_of(fake::STOP).len(),
        1,
        "one StopInstances for the three"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn catch_up_is_per_rule_a_long_window_acts_late_the_default_reports_missed() {
    let sim = Sim::new("2026-12-01T07:50:00Z");
    let patient = tagged(&sim, 1, "stopped", "patient");
    let strict = tagged(&sim, 1, "stopped", "strict");
    sim.write_config(&config(
        "",
        &(office("patient", "patient", r#"catch_up = "2h""#) + &office("strict", "strict", "")),
    ));
    let daemon = sim.start();
    sim.advance(MINUTE).await;
    daemon.kill().await;
    // Down from 07:51 to 09:30: the 08:00 start is 90 minutes late.
    sim.advance_to("2026-12-01T09:30:00Z").await;
    let daemon = sim.start();
    sim.advance(2 * MINUTE).await;
    sim.assert_one_each(&patient, Action::Start, ResultKind::Ok);
    assert!(sim.outcomes_for(&strict[0]).is_empty());
    let missed: Vec<_> = sim
        .outcomes()
        .into_iter()
        .filter(|o| o.result == ResultKind::Missed)
        .collect();
    assert_eq!(missed.len(), 1, "{missed:#?}");
    assert_eq!(missed[0].rules, ["strict"]);
    assert!(
        missed[0].reason.contains("catch_up = 5m"),
        "{}",
        missed[0].reason
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn override_tags_leave_instances_alone_and_say_which_tag() {
    let sim = Sim::new("2026-12-01T19:59:00Z");
    let ids = tagged(&sim, 5, "running", "office");
    let set = |id: &String, k: &str, v: &str| {
        sim.aws.modify(id, |i| {
            i.tags.insert(k.to_string(), v.to_string());
        })
    };
    set(&ids[0], "shiftd:skip-until", "2026-12-04T00:00:00+09:00");
    set(&ids[1], "shiftd:skip", "true");
    set(&ids[2], "shiftd:skip-until", "next friday");
    set(&ids[3], "shiftd:skip-until", "2026-11-30");
    // ids[4] carries no override.
    sim.write_config(&config("", &office("office", "office", "")));
    let daemon = sim.start();
    sim.advance(5 * MINUTE).await;
    let held = sim.assert_one_each(&ids[..3], Action::Stop, ResultKind::Skipped);
    assert!(
        held[0]
            .reason
            .contains("shiftd:skip-until=2026-12-04T00:00:00+09:00"),
        "{}",
        held[0].reason
    );
    assert!(
        held[1].reason.contains("shiftd:skip=true"),
        "{}",
        held[1].reason
    );
    assert!(
        held[2].reason.contains("does not parse"),
        "{}",
        held[2].reason
    );
    // A skip-until in the past is ignored; so is no tag.
    sim.assert_one_each(&ids[3..], Action::Stop, ResultKind::Ok);
    let logs = sim.logs.text();
    assert!(
        logs.contains(&ids[2]) && logs.contains("next friday") && logs.contains("WARN"),
        "a warning names the instance and the value:\n{logs}"
    );
    let stop_calls = sim.aws.calls_of(fake::STOP);
    assert!(
        stop_calls
            .iter()
            .all(|c| !c.ids.iter().any(|i| ids[..3].contains(i))),
        "held instances are not in any StopInstances call: {stop_calls:#?}"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_skip_until_date_is_read_in_the_rules_zone_and_ignored_afterwards() {
    // Tokyo: 20:00 local = 11:00 UTC. skip-until 2026-12-03 = 2026-12-02T15:00Z.
    let sim = Sim::new("2026-12-01T10:59:00Z");
    let ids = tagged(&sim, 1, "running", "office");
    sim.aws.modify(&ids[0], |i| {
        i.tags
            .insert("shiftd:skip-until".into(), "2026-12-03".into());
    });
    sim.write_config(&config(
        "",
        &rule_with_tags(
            "evening",
            &[("Schedule", "office")],
            "stop = \"0 20 * * *\"\ntimezone = \"Asia/Tokyo\"",
        ),
    ));
    let daemon = sim.start();
    // 12-01 20:00 JST: held.
    sim.advance(5 * MINUTE).await;
    let got = sim.assert_one_each(&ids, Action::Stop, ResultKind::Skipped);
    assert!(
        got[0].reason.contains("2026-12-02T15:00:00+00:00"),
        "{}",
        got[0].reason
    );
    // 12-02 20:00 JST (11:00 UTC): still before 12-03 00:00 JST, held; someone started it again
    // meanwhile. 12-03 20:00 JST: the tag has expired; stopped.
    sim.advance_to("2026-12-02T00:00:00Z").await;
    sim.aws.set_state(&ids[0], "running");
    sim.advance_to("2026-12-03T11:05:00Z").await;
    let stops: Vec<_> = sim
        .outcomes_for(&ids[0])
        .into_iter()
        .filter(|o| o.action == Action::Stop)
        .collect();
    assert_eq!(stops.len(), 3, "{stops:#?}");
    assert_eq!(
        stops[1].result,
        ResultKind::Skipped,
        "12-02 20:00 JST is before the tag's date ends? {stops:#?}"
    );
    assert_eq!(stops[2].result, ResultKind::Ok, "{stops:#?}");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn hibernate_uses_hibernate_where_configured_and_falls_back_to_a_plain_stop() {
    let sim = Sim::new("2026-12-01T19:59:00Z");
    let ids = tagged(&sim, 2, "running", "office");
    sim.aws.modify(&ids[0], |i| i.hibernation_configured = true);
    sim.write_config(&config(
        "",
        &office("office", "office", r#"stop_mode = "hibernate""#),
    ));
    // On the first evening EC2 refuses to hibernate it (as after a configuration change).
    sim.aws.fault(
        fake::STOP,
        1,
        FakeAws::error(
            fake::STOP,
            "UnsupportedHibernationConfiguration",
            "The instance does not have hibernation configured.",
        ),
    );
    let daemon = sim.start();
    sim.advance(5 * MINUTE).await;
    let got = sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    assert!(
        got[0].reason.contains("fall-back") && got[0].reason.contains("refused"),
        "{}",
        got[0].reason
    );
    assert!(
        got[1].reason.contains("not configured for hibernation"),
        "{}",
        got[1].reason
    );
    let calls = sim.aws.calls_of(fake::STOP);
    assert!(
        calls
            .iter()
            .filter(|c| c.hibernate)
            .all(|c| c.ids == [ids[0].clone()]),
        "only the configured instance is asked to hibernate: {calls:#?}"
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| !c.hibernate && c.ids.contains(&ids[0]))
            .count(),
        1
    );
    // The next evening it hibernates.
    sim.advance_to("2026-12-02T20:05:00Z").await;
    let stops: Vec<_> = sim
        .outcomes_for(&ids[0])
        .into_iter()
        .filter(|o| o.action == Action::Stop)
        .collect();
    assert_eq!(stops.len(), 2, "{stops:#?}");
    assert!(
        stops[1].reason.contains("(hibernated)"),
        "{}",
        stops[1].reason
    );
    let last = sim
        .aws
        .calls_of(fake::STOP)
        .into_iter()
        .rfind(|c| c.ids.contains(&ids[0]))
        .unwrap();
    assert!(last.hibernate && last.ids == [ids[0].clone()], "{last:?}");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn enforce_says_a_held_or_failing_instance_once_not_at_every_pass() {
    let sim = Sim::new("2026-12-01T10:00:00Z");
    let ids = tagged(&sim, 3, "stopped", "office");
    sim.aws.modify(&ids[0], |i| {
        i.tags.insert("shiftd:skip".into(), "true".into());
    });
    sim.aws.modify(&ids[1], |i| i.no_capacity = true);
    sim.write_config(&config(
        r#"enforce_every = "1m""#,
        &office("office", "office", "enforce = true"),
    ));
    let daemon = sim.start();
    sim.advance(30 * MINUTE).await;
    let held = sim.assert_one_each(&ids[..1], Action::Start, ResultKind::Skipped);
    assert!(held[0].reason.contains("shiftd:skip=true"), "{:?}", held[0]);
    sim.assert_one_each(&ids[1..2], Action::Start, ResultKind::Failed);
    sim.assert_one_each(&ids[2..], Action::Start, ResultKind::Ok);
    assert!(
        sim.aws.calls_of(fake::START).len() >= 20,
        "enforce kept trying the instance without capacity"
    );
    // Once the tag is gone, the instance is started (and said so).
    sim.aws.modify(&ids[0], |i| {
        i.tags.remove("shiftd:skip");
    });
    sim.advance(5 * MINUTE).await;
    let got = sim.outcomes_for(&ids[0]);
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[1].result, ResultKind::Ok);
    daemon.stop().await;
}
