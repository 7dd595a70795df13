//! `shiftd run` against EC2 misbehaving the way the real one does, through the fault-injecting proxy
//! (tests/fakes/fault_proxy.py) in front of moto: throttling, capacity errors, an instance falling back
//! to stopped after a start, and DescribeInstances answering from a stale view.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

#[test]
fn a_start_that_falls_back_to_stopped_fails_and_a_stale_view_does_not() {
    let fake = FakeAws::start_with_faults();
    let ids = fake.seed(TARGET_ACCOUNT, 2, &[], true);
    let (kms, lagging) = (&ids[0], &ids[1]);
    // `kms` stops again right after its start, with EC2's reason for a volume it cannot decrypt;
    // `lagging` starts, but DescribeInstances shows it stopped (with the reason of its last stop) for
    // a few seconds after the call.
    fake.inject("/_fault/fall-back", json!({"instance": kms}));
    fake.inject("/_fault/stale", json!({"instance": lagging, "seconds": 4}));

    let entries = run_until_first_batch(
        &fake,
        &one_rule_config("morning", "start", &ids, &once_in(2)),
        Duration::from_secs(60),
    );

    let e = entries_for(&entries, kms);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(field(e[0], "SHIFTD_RESULT"), "failed");
    let reason = field(e[0], "SHIFTD_REASON");
    assert!(
        reason.contains("fell back to") && reason.contains("Client.InternalError"),
        "{reason}"
    );

    let e = entries_for(&entries, lagging);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(
        field(e[0], "SHIFTD_RESULT"),
        "ok",
        "a stale stopped view is not a failure: {e:#?}"
    );
    assert_eq!(fake.states(TARGET_ACCOUNT)[lagging], "running");
}

#[test]
fn a_hung_stop_call_is_abandoned_retried_and_reported_once() {
    let fake = FakeAws::start_with_faults();
    let ids = fake.seed(TARGET_ACCOUNT, 1, &[], false);
    // The first StopInstances hangs past shiftd's 20 s attempt timeout (and then takes effect).
    fake.inject(
        "/_fault/error",
        json!({"action": "StopInstances", "delay": 25, "times": 1}),
    );
    let config = one_rule_config("evening", "stop", &ids, &once_in(2));
    let entries = run_until_first_batch(&fake, &config, Duration::from_secs(90));

    let e = entries_for(&entries, &ids[0]);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(field(e[0], "SHIFTD_ACTION"), "stop");
    assert_eq!(field(e[0], "SHIFTD_RESULT"), "ok", "{e:#?}");
    assert_eq!(fake.states(TARGET_ACCOUNT)[&ids[0]], "stopped");
    let stops: Vec<_> = fake
        .proxied_calls()
        .into_iter()
        .filter(|(action, _, _)| action == "StopInstances")
        .map(|(_, _, fault)| fault)
        .collect();
    assert_eq!(stops, vec![Some("delay".to_string()), None], "retried once");
}
