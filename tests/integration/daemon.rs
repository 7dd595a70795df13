//! `shiftd run` end to end: base credentials from the fake IMDS, AssumeRole into the target account on
//! moto, second-level rules, instance states in moto, and the journald entries shiftd wrote.

use std::time::Duration;

use crate::harness::*;

#[test]
fn starts_and_stops_in_the_target_account_and_never_touches_the_delegate_account() {
    let fake = FakeAws::start();
    let tagged = fake.seed(TARGET_ACCOUNT, 2, &[("Schedule", "office")], true);
    let by_id = fake.seed(TARGET_ACCOUNT, 1, &[], false);
    // Decoys in the delegate's own account: same tag, and a running instance. Never to be touched.
    let decoy_tagged = fake.seed(BASE_ACCOUNT, 1, &[("Schedule", "office")], true);
    let decoy_running = fake.seed(BASE_ACCOUNT, 1, &[], false);
    let gone = "i-0000000000000dead";
    fake.reset_calls();
    let config = config_with_rules(
        "timezone = \"Asia/Tokyo\"",
        &format!(
            r#"
[[rules]]
name = "office-start"
account = "account1"
tags = {{ Schedule = "office" }}
start = "*/3 * * * * *"

[[rules]]
name = "by-id"
account = "account1"
instances = ["{}", "{gone}"]
stop = "*/3 * * * * *"
"#,
            by_id[0]
        ),
    );
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    daemon.wait_for_messages(
        "batch done for account account1",
        1,
        Duration::from_secs(30),
    );
    let entries = daemon.entries();
    let pid = daemon.pid();
    assert!(daemon.stop().success(), "SIGTERM ends shiftd with exit 0");

    // The instances in the target account changed state; the delegate account's did not.
    let target = fake.states(TARGET_ACCOUNT);
    for id in &tagged {
        assert_eq!(target[id], "running", "{id} started");
    }
    assert_eq!(target[&by_id[0]], "stopped");
    let base = fake.states(BASE_ACCOUNT);
    assert_eq!(
        base[&decoy_tagged[0]], "stopped",
        "decoy with the same tag untouched"
    );
    assert_eq!(base[&decoy_running[0]], "running", "decoy untouched");

    // One AssumeRole for the one account, named after the delegate instance, on the configured role.
    let calls = fake.calls();
    let assumes: Vec<_> = calls
        .iter()
        .filter(|c| c.action == "AssumeRole" && c.session_name.as_deref() != Some("fakeaws-seed"))
        .collect();
    assert_eq!(assumes.len(), 1, "{calls:?}");
    assert_eq!(
        assumes[0].role_arn.as_deref(),
        Some("arn:aws:iam::111111111111:role/account1-role-ec2")
    );
    assert_eq!(
        assumes[0].session_name.as_deref(),
        Some(format!("shiftd-{DELEGATE_INSTANCE_ID}").as_str())
    );
    // Start/Stop calls named only target instances; the unknown ID never reached a Start/Stop call.
    for c in calls
        .iter()
        .filter(|c| c.action == "StartInstances" || c.action == "StopInstances")
    {
        for id in &c.instance_ids {
            assert!(
                tagged.contains(id) || by_id.contains(id),
                "{} called on {id}",
                c.action
            );
        }
    }

    // journald: one entry per instance action, with the structured fields.
    for id in &tagged {
        let e = entries_for(&entries, id);
        let ok: Vec<_> = e
            .iter()
            .filter(|e| field(e, "SHIFTD_RESULT") == "ok")
            .collect();
        assert_eq!(ok.len(), 1, "exactly one ok entry for {id}: {e:#?}");
        let ok = ok[0];
        assert_eq!(field(ok, "SHIFTD_ACTION"), "start");
        assert_eq!(field(ok, "SHIFTD_RULE"), "office-start");
        assert_eq!(field(ok, "SHIFTD_ACCOUNT"), "account1");
        assert_eq!(field(ok, "SHIFTD_REGION"), REGION);
        assert_eq!(field(ok, "SYSLOG_IDENTIFIER"), "shiftd");
        assert_eq!(field(ok, "PRIORITY"), "6");
        assert!(
            field(ok, "SHIFTD_REASON").starts_with("running after"),
            "{ok:?}"
        );
    }
    let stop = entries_for(&entries, &by_id[0]);
    assert_eq!(field(stop[0], "SHIFTD_ACTION"), "stop");
    assert_eq!(field(stop[0], "SHIFTD_RESULT"), "ok");
    let missing = entries_for(&entries, gone);
    assert_eq!(missing.len(), 1, "{missing:#?}");
    assert_eq!(field(missing[0], "SHIFTD_RESULT"), "failed");
    assert_eq!(
        field(missing[0], "PRIORITY"),
        "3",
        "failures are logged as errors"
    );
    assert!(
        field(missing[0], "SHIFTD_REASON").contains("instance not found"),
        "{missing:?}"
    );

    // No key material anywhere in what shiftd logged.
    for e in journal_entries(pid) {
        for (k, v) in &e {
            assert!(
                !v.contains("ASIA") && !v.contains("AKIA"),
                "key material in {k}: {v}"
            );
        }
    }
}

#[test]
fn dry_run_reports_what_would_be_done_and_calls_nothing() {
    let fake = FakeAws::start();
    let running = fake.seed(TARGET_ACCOUNT, 1, &[("Env", "dev")], false);
    fake.reset_calls();
    let config = config_with_rules(
        "",
        r#"
[[rules]]
name = "nightly"
account = "account1"
tags = { Env = ["dev", "stg"] }
stop = "*/2 * * * * *"
"#,
    );
    let daemon = Shiftd::spawn(&fake, &config, &["--dry-run"]);
    daemon.wait_for_messages(
        "batch done for account account1",
        1,
        Duration::from_secs(30),
    );
    let actions = daemon.actions();
    assert!(daemon.stop().success());
    let e = actions
        .iter()
        .find(|e| field(e, "SHIFTD_INSTANCE_ID") == running[0])
        .expect("an entry for the instance");
    assert_eq!(field(e, "SHIFTD_RESULT"), "dry-run");
    assert!(field(e, "SHIFTD_REASON").contains("would stop"), "{e:?}");
    assert_eq!(fake.states(TARGET_ACCOUNT)[&running[0]], "running");
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.action == "StopInstances" || c.action == "StartInstances"),
        "dry run made a Start/Stop call"
    );
}

#[test]
fn imds_outage_at_boot_is_retried_and_due_actions_wait_for_credentials() {
    let fake = FakeAws::start();
    let running = fake.seed(TARGET_ACCOUNT, 1, &[], false);
    fake.imds_control("/_fake/outage?seconds=6");
    let config = config_with_rules(
        "credentials_wait = \"60s\"",
        &format!(
            r#"
[[rules]]
name = "stopper"
account = "account1"
instances = ["{}"]
stop = "*/2 * * * * *"
"#,
            running[0]
        ),
    );
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    let entries = daemon.wait_for_messages("stop ", 1, Duration::from_secs(60));
    let entries = if entries.iter().any(|e| field(e, "SHIFTD_RESULT") == "ok") {
        entries
    } else {
        daemon.wait_for_messages(": ok:", 1, Duration::from_secs(30))
    };
    assert!(daemon.stop().success());
    let messages: Vec<&str> = entries.iter().map(|e| field(e, "MESSAGE")).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("AssumeRole for account account1 failed")),
        "the failed attempt is logged: {messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("assumed role for account account1"))
    );
    let acts = entries_for(&entries, &running[0]);
    assert_eq!(
        acts.iter()
            .filter(|e| field(e, "SHIFTD_RESULT") == "ok")
            .count(),
        1,
        "stopped once, once credentials came: {acts:#?}"
    );
    assert!(
        acts.iter().all(|e| field(e, "SHIFTD_RESULT") != "failed"),
        "no action failed while waiting: {acts:#?}"
    );
    assert_eq!(fake.states(TARGET_ACCOUNT)[&running[0]], "stopped");
}

#[test]
fn credentials_are_renewed_ahead_of_expiry_without_any_action_due() {
    let fake = FakeAws::start();
    // 15-minute sessions renewed 14 minutes early: renewal one minute after each AssumeRole.
    let config = config_with_rules(
        "session_duration = \"15m\"\nrefresh_before_expiry = \"14m\"",
        r#"
[[rules]]
name = "yearly"
account = "account1"
instances = ["i-0123456789abcdef0"]
stop = "0 0 1 1 *"
"#,
    );
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    let entries = daemon.wait_for_messages(
        "assumed role for account account1",
        2,
        Duration::from_secs(100),
    );
    assert!(daemon.stop().success());
    let renewals: Vec<&Entry> = entries
        .iter()
        .filter(|e| field(e, "MESSAGE").contains("assumed role for account account1"))
        .collect();
    assert_eq!(field(renewals[0], "SHIFTD_ACCOUNT"), "account1");
    assert!(
        !field(renewals[0], "SHIFTD_EXPIRES_AT").is_empty(),
        "new expiry logged"
    );
    assert_ne!(
        field(renewals[0], "SHIFTD_EXPIRES_AT"),
        field(renewals[1], "SHIFTD_EXPIRES_AT"),
        "the renewal brought a later expiry"
    );
    let assumes = fake
        .calls()
        .iter()
        .filter(|c| c.action == "AssumeRole" && c.session_name.as_deref() != Some("fakeaws-seed"))
        .count();
    assert_eq!(assumes, 2, "one AssumeRole at start, one renewal");
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_running_the_old_one_when_the_new_is_invalid() {
    let fake = FakeAws::start();
    let ids = fake.seed(TARGET_ACCOUNT, 1, &[], false);
    let rule = |name: &str, action: &str| {
        config_with_rules(
            "",
            &format!(
                "[[rules]]\nname = \"{name}\"\naccount = \"account1\"\ninstances = [\"{}\"]\n{action} = \"*/2 * * * * *\"\n",
                ids[0]
            ),
        )
    };
    let daemon = Shiftd::spawn(&fake, &rule("first", "stop"), &[]);
    daemon.wait_for_messages("batch done", 1, Duration::from_secs(30));

    daemon.rewrite_config("[defaults]\ntimezone = \"Mars/Olympus\"\n");
    daemon.signal("HUP");
    let entries =
        daemon.wait_for_messages("configuration reload failed", 1, Duration::from_secs(15));
    let failure = entries
        .iter()
        .find(|e| field(e, "MESSAGE").contains("configuration reload failed"))
        .unwrap();
    let location = format!("{}:2:12:", daemon.config.display());
    assert!(field(failure, "MESSAGE").contains(&location), "{failure:?}");
    // Still running the old schedule: another batch of rule "first" completes.
    let before = daemon
        .entries()
        .iter()
        .filter(|e| field(e, "MESSAGE").contains("batch done"))
        .count();
    daemon.wait_for_messages("batch done", before + 1, Duration::from_secs(15));

    daemon.rewrite_config(&rule("second", "start"));
    daemon.signal("HUP");
    daemon.wait_for_messages("configuration reloaded", 1, Duration::from_secs(15));
    daemon.wait_for_messages("(second): ", 1, Duration::from_secs(15));
    let actions = daemon.actions();
    assert!(daemon.stop().success());
    assert!(
        actions
            .iter()
            .any(|e| field(e, "SHIFTD_RULE") == "second" && field(e, "SHIFTD_ACTION") == "start"),
        "the new rule ran: {actions:#?}"
    );
    assert_eq!(fake.states(TARGET_ACCOUNT)[&ids[0]], "running");
}

#[test]
fn the_walkthrough_profile_with_credential_source_ec2_instance_metadata_works_as_written() {
    let fake = FakeAws::start();
    let stopped = fake.seed(TARGET_ACCOUNT, 1, &[("Schedule", "office")], true);
    fake.reset_calls();
    let dir = tempfile::tempdir().unwrap();
    let aws_config = dir.path().join("config");
    // The walkthrough's profile, as written (it uses the credentials file; either file works).
    std::fs::write(
        &aws_config,
        "[profile assume-role-ec2]\nrole_arn = arn:aws:iam::111111111111:role/account1-role-ec2\ncredential_source=Ec2InstanceMetadata\n",
    )
    .unwrap();
    let config = format!(
        "[credentials]\nsource = \"profile\"\nprofile = \"assume-role-ec2\"\n\n{}",
        config_with_rules(
            "",
            r#"
[[rules]]
name = "office-start"
account = "account1"
tags = { Schedule = "office" }
start = "*/2 * * * * *"
"#
        )
    );
    let daemon = Shiftd::spawn_with_env(
        &fake,
        &config,
        &[],
        &[("AWS_CONFIG_FILE", aws_config.to_str().unwrap())],
    );
    daemon.wait_for_messages(
        "batch done for account account1",
        1,
        Duration::from_secs(30),
    );
    assert!(daemon.stop().success());
    assert_eq!(fake.states(TARGET_ACCOUNT)[&stopped[0]], "running");
    let roles: Vec<Option<String>> = fake
        .calls()
        .into_iter()
        .filter(|c| c.action == "AssumeRole" && c.session_name.as_deref() != Some("fakeaws-seed"))
        .map(|c| c.role_arn)
        .collect();
    // The profile's own role chain, then shiftd's session for the account.
    assert_eq!(roles.len(), 2, "{roles:?}");
}

#[test]
fn a_large_selection_is_resolved_and_started_in_as_few_calls_as_ec2_allows() {
    let fake = FakeAws::start();
    // More IDs than one DescribeInstances filter (200) and than one StartInstances call (100) takes.
    let ids = fake.seed(TARGET_ACCOUNT, 230, &[], true);
    fake.reset_calls();
    let config = one_rule_config("fleet", "start", &ids, "*/5 * * * * *");
    let entries = run_until_first_batch(&fake, &config, Duration::from_secs(90));

    let states = fake.states(TARGET_ACCOUNT);
    let mut sizes = Vec::new();
    for c in fake.calls().iter().filter(|c| c.action == "StartInstances") {
        sizes.push(c.instance_ids.len());
    }
    sizes.sort_unstable();
    assert_eq!(sizes, vec![30, 100, 100], "StartInstances calls by size");
    for id in &ids {
        assert_eq!(states[id], "running", "{id}");
        let ok = entries_for(&entries, id)
            .into_iter()
            .filter(|e| field(e, "SHIFTD_ACTION") == "start")
            .filter(|e| field(e, "SHIFTD_RESULT") == "ok")
            .count();
        assert_eq!(ok, 1, "{id}: exactly one ok entry");
    }
}

#[test]
fn an_occurrence_slept_through_during_a_crash_is_caught_up_after_the_restart() {
    let fake = FakeAws::start();
    let ids = fake.seed(TARGET_ACCOUNT, 1, &[], false);
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let config = one_rule_config("evening", "stop", &ids, &once_in(10));
    let env = [("STATE_DIRECTORY", state_dir)];
    let first = Shiftd::spawn_with_env(&fake, &config, &[], &env);
    first.wait_for_messages("running 1 rule(s)", 1, Duration::from_secs(30));
    let state_file = state.path().join("state.json");
    wait_until("state saved", Duration::from_secs(10), || {
        state_file.exists()
    });
    // A crash (or an upgrade, a reboot) across the rule's instant.
    first.signal("KILL");
    drop(first);
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        fake.states(TARGET_ACCOUNT)[&ids[0]],
        "running",
        "nobody acted yet"
    );

    let second = Shiftd::spawn_with_env(&fake, &config, &[], &env);
    let entries = second.wait_for_messages(
        "batch done for account account1",
        1,
        Duration::from_secs(30),
    );
    assert!(second.stop().success());
    assert!(
        entries
            .iter()
            .any(|e| field(e, "MESSAGE").starts_with("resuming from ")),
        "the restart says where it resumes"
    );
    let e = entries_for(&entries, &ids[0]);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(field(e[0], "SHIFTD_ACTION"), "stop");
    assert_eq!(field(e[0], "SHIFTD_RESULT"), "ok");
    assert_eq!(fake.states(TARGET_ACCOUNT)[&ids[0]], "stopped");
}

#[test]
fn occurrences_missed_while_shiftd_was_down_are_reported_and_not_acted_on() {
    use chrono::Timelike;
    let fake = FakeAws::start();
    let running = fake.seed(TARGET_ACCOUNT, 1, &[], false);
    let stopped = fake.seed(TARGET_ACCOUNT, 1, &[], true);
    let now = chrono::Utc::now();
    let half_an_hour_ago = now - chrono::Duration::minutes(30);
    let config = config_with_rules(
        "",
        &format!(
            r#"
[[rules]]
name = "nightly"
account = "account1"
instances = {running:?}
stop = "{} {} * * *"

[[rules]]
name = "every-minute"
account = "account1"
instances = {stopped:?}
start = "* * * * *"
"#,
            half_an_hour_ago.minute(),
            half_an_hour_ago.hour()
        ),
    );
    // shiftd last ran an hour ago.
    let state = tempfile::tempdir().unwrap();
    let last_run = now - chrono::Duration::hours(1);
    std::fs::write(
        state.path().join("state.json"),
        format!(
            r#"{{"version": 1, "checked_until": "{}"}}"#,
            last_run.to_rfc3339()
        ),
    )
    .unwrap();
    let daemon = Shiftd::spawn_with_env(
        &fake,
        &config,
        &[],
        &[("STATE_DIRECTORY", state.path().to_str().unwrap())],
    );
    let entries = daemon.wait_for_messages(
        "batch done for account account1",
        1,
        Duration::from_secs(30),
    );
    assert!(daemon.stop().success());

    let failed = |rule: &str| -> Vec<&Entry> {
        entries
            .iter()
            .filter(|e| field(e, "SHIFTD_RULE") == rule && field(e, "SHIFTD_RESULT") == "failed")
            .collect()
    };
    // The nightly stop half an hour ago: one entry, at error priority, and the instance untouched.
    let nightly = failed("nightly");
    assert_eq!(nightly.len(), 1, "{nightly:#?}");
    assert_eq!(field(nightly[0], "SHIFTD_ACTION"), "stop");
    assert_eq!(field(nightly[0], "PRIORITY"), "3");
    let due = half_an_hour_ago
        .with_second(0)
        .unwrap()
        .with_nanosecond(0)
        .unwrap();
    assert!(
        field(nightly[0], "SHIFTD_REASON")
            .starts_with(&format!("missed: due at {}", due.to_rfc3339())),
        "{nightly:#?}"
    );
    assert_eq!(fake.states(TARGET_ACCOUNT)[&running[0]], "running");
    // The every-minute rule: its latest occurrence is on time and acted on; the ~59 before it are
    // reported, the latest ten one by one and the rest in one summary.
    let minutely = failed("every-minute");
    assert_eq!(minutely.len(), 11, "{minutely:#?}");
    // 60 minute marks in the hour (61 if a minute turned while shiftd started): all but the latest
    // missed, ten of them reported one by one.
    assert!(
        minutely.iter().any(|e| {
            let reason = field(e, "SHIFTD_REASON");
            reason.starts_with("missed 49 occurrence(s) from ")
                || reason.starts_with("missed 50 occurrence(s) from ")
        }),
        "{minutely:#?}"
    );
    let started = entries_for(&entries, &stopped[0]);
    assert_eq!(field(started[0], "SHIFTD_RESULT"), "ok", "{started:#?}");
}
