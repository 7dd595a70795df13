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
    let (pid, started) = (daemon.pid(), daemon.started);
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
    for e in journal_entries(pid, started) {
        for (k, v) in &e {
            assert!(
                !v.contains("ASIA") && !v.contains("AKIA"),
                "key material in {k}: {v}"
            );
        }
    }
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
