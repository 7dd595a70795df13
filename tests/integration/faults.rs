//! `shiftd run` against EC2 misbehaving the way the real one does, through the fault-injecting proxy
//! (tests/fakes/fault_proxy.py) in front of moto: throttling, capacity errors, an instance falling back
//! to stopped after a start, and DescribeInstances answering from a stale view.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

#[test]
fn throttled_and_capacity_refused_starts_are_each_reported_once() {
    let fake = FakeAws::start_with_faults();
    let ids = fake.seed(TARGET_ACCOUNT, 3, &[], true);
    let (a, b, short) = (&ids[0], &ids[1], &ids[2]);
    // The first StartInstances is throttled; every one naming `short` gets no capacity.
    fake.inject(
        "/_fault/error",
        json!({"action": "StartInstances", "status": 503, "code": "RequestLimitExceeded",
               "message": "Request limit exceeded.", "times": 1}),
    );
    fake.inject(
        "/_fault/error",
        json!({"action": "StartInstances", "instance": short, "status": 500,
               "code": "InsufficientInstanceCapacity",
               "message": "We currently do not have sufficient t3.micro capacity.", "times": -1}),
    );

    let entries = run_until_first_batch(
        &fake,
        &one_rule_config("morning", "start", &ids, &once_in(8)),
        Duration::from_secs(60),
    );

    for id in [a, b] {
        let e = entries_for(&entries, id);
        assert_eq!(e.len(), 1, "one entry for {id}: {e:#?}");
        assert_eq!(field(e[0], "SHIFTD_RESULT"), "ok", "{e:#?}");
    }
    let e = entries_for(&entries, short);
    assert_eq!(e.len(), 1, "one entry for {short}: {e:#?}");
    assert_eq!(field(e[0], "SHIFTD_ACTION"), "start");
    assert_eq!(field(e[0], "SHIFTD_RESULT"), "failed");
    assert_eq!(field(e[0], "PRIORITY"), "3");
    assert!(
        field(e[0], "SHIFTD_REASON").contains("InsufficientInstanceCapacity"),
        "the reason names EC2's error: {e:#?}"
    );

    let states = fake.states(TARGET_ACCOUNT);
    assert_eq!(states[a], "running");
    assert_eq!(states[b], "running");
    assert_eq!(states[short], "stopped");

    // The throttled call was retried; each startable instance reached moto in exactly one accepted
    // call, and the refused one in none.
    let starts: Vec<_> = fake
        .proxied_calls()
        .into_iter()
        .filter(|(action, _, _)| action == "StartInstances")
        .collect();
    assert_eq!(
        starts
            .iter()
            .filter(|(_, _, f)| f.as_deref() == Some("RequestLimitExceeded"))
            .count(),
        1,
        "{starts:?}"
    );
    for id in [a, b, short] {
        let accepted = starts
            .iter()
            .filter(|(_, called, f)| f.is_none() && called.contains(id))
            .count();
        assert_eq!(accepted, usize::from(id != short), "{id}: {starts:?}");
    }
}

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
        &one_rule_config("morning", "start", &ids, &once_in(8)),
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
    let config = one_rule_config("evening", "stop", &ids, &once_in(8));
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

#[test]
fn sigterm_while_following_confirms_what_it_can_and_reports_the_rest_once() {
    let fake = FakeAws::start_with_faults();
    let ids = fake.seed(TARGET_ACCOUNT, 2, &[], false);
    let (quick, slow) = (&ids[0], &ids[1]);
    // After the stop call, DescribeInstances shows `quick` running for 4 s more and `slow` for
    // longer than shiftd follows instances after a shutdown request.
    fake.inject("/_fault/stale", json!({"instance": quick, "seconds": 4}));
    fake.inject("/_fault/stale", json!({"instance": slow, "seconds": 120}));
    let config = one_rule_config("evening", "stop", &ids, &once_in(8));
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    // SIGTERM as soon as the stop call has been made.
    wait_until("a StopInstances call", Duration::from_secs(60), || {
        fake.proxied_calls()
            .iter()
            .any(|(action, _, fault)| action == "StopInstances" && fault.is_none())
    });
    let pid = daemon.pid();
    let started = std::time::Instant::now();
    assert!(
        daemon.stop().success(),
        "exit 0 after a shutdown with work in flight"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(15) && took < Duration::from_secs(40),
        "followed for the grace, then stopped: {took:?}"
    );

    let entries = journal_entries(pid);
    let e = entries_for(&entries, quick);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(
        field(e[0], "SHIFTD_RESULT"),
        "ok",
        "confirmed during the grace: {e:#?}"
    );
    let e = entries_for(&entries, slow);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(field(e[0], "SHIFTD_RESULT"), "failed");
    assert!(
        field(e[0], "SHIFTD_REASON").contains("requested but not confirmed (last seen: running)"),
        "{e:#?}"
    );
}
