//! Operator commands: `shiftd plan`, `shiftd policy`, `shiftd doctor`.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

fn fixture(name: &str) -> String {
    project_root()
        .join("tests/fixtures")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn plan_lists_actions_in_time_order_across_a_dst_change() {
    let config = fixture("plan-new-york.toml");
    let out = shiftd(&[
        "plan",
        "--config",
        &config,
        "--from",
        "2027-03-13T12:00",
        "--hours",
        "48",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let got: Vec<(&str, &str, &str)> = items
        .iter()
        .map(|i| {
            (
                i["at"].as_str().unwrap(),
                i["at_utc"].as_str().unwrap(),
                i["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            // 02:30 does not exist on 2027-03-14: it fires at the end of the gap, 03:00 EDT.
            ("2027-03-14T03:00:00-04:00", "2027-03-14T07:00:00Z", "start"),
            ("2027-03-14T06:00:00-04:00", "2027-03-14T10:00:00Z", "stop"),
            ("2027-03-15T02:30:00-04:00", "2027-03-15T06:30:00Z", "start"),
            ("2027-03-15T06:00:00-04:00", "2027-03-15T10:00:00Z", "stop"),
        ]
    );
    let first = &items[0];
    assert_eq!(first["rule"], "batch-window");
    assert_eq!(first["account"], "us");
    assert_eq!(first["regions"], serde_json::json!(["us-east-1"]));
    assert_eq!(first["timezone"], "America/New_York");

    let text = shiftd(&[
        "plan",
        "--config",
        &config,
        "--from",
        "2027-03-13T12:00",
        "--until",
        "2027-03-14T12:00",
    ]);
    let text = stdout(&text);
    assert!(
        text.starts_with("2 action(s) from 2027-03-13 12:00 to 2027-03-14 12:00 (UTC)"),
        "{text}"
    );
    assert!(
        text.contains("2027-03-14 03:00:00 EDT  (2027-03-14 07:00:00 UTC)  start  batch-window"),
        "{text}"
    );
}

#[test]
fn plan_and_check_leave_out_calendar_dates_of_an_eventbridge_rule() {
    let config = fixture("plan-holidays.toml");
    let out = shiftd(&[
        "plan",
        "--config",
        &config,
        "--from",
        "2027-01-08T00:00",
        "--until",
        "2027-01-16T00:00",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let got: Vec<&str> = items.iter().map(|i| i["at"].as_str().unwrap()).collect();
    // Weekdays only (EventBridge's MON-FRI), without Monday the 11th (from the .ics file) and
    // Wednesday the 13th (from `dates`).
    assert_eq!(
        got,
        vec![
            "2027-01-12T08:00:00+09:00",
            "2027-01-14T08:00:00+09:00",
            "2027-01-15T08:00:00+09:00",
        ]
    );
    let out = shiftd(&["check", "--config", &config]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("jp-holidays  3 date(s), first 2027-01-11, last 2027-02-11"),
        "{text}"
    );
    assert!(text.contains("skips the dates of jp-holidays"), "{text}");
    assert!(text.contains("start cron(0 8 ? * MON-FRI *)"), "{text}");
}

/// (local time, action) of one rule's items; with `skipped`, the reason too.
fn rule_items(items: &[Value], rule: &str) -> Vec<(String, String, Option<String>)> {
    items
        .iter()
        .filter(|i| i["rule"] == rule)
        .map(|i| {
            (
                i["at"].as_str().unwrap().to_string(),
                i["action"].as_str().unwrap().to_string(),
                i.get("skipped").map(|s| s.as_str().unwrap().to_string()),
            )
        })
        .collect()
}

#[test]
fn check_and_plan_cover_every_schedule_construct_and_show_skipped_occurrences() {
    let config = fixture("plan-constructs.toml");
    let out = shiftd(&["check", "--config", &config]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    for want in [
        "start cron(0 8 ? * MON-FRI *)  (08:00 Mon\u{2013}Fri)  Asia/Tokyo  next: ",
        "stop  0 20 * * 1-5          (20:00 Mon\u{2013}Fri)  Asia/Tokyo",
        "start 30 18 L * ?           (18:30 on the last day of the month)",
        "stop  0 18 LW * ?           (18:00 on the last weekday of the month)",
        "start cron(0 9 ? * 3#2 *)   (09:00 on the second Tuesday of the month)",
        "start 0 9 15W * ?           (09:00 on the weekday nearest the 15th of the month)",
        "stop  @daily                (00:00 every day)",
        "jp-holidays  2 date(s), first 2027-01-11, last 2027-02-11",
        "skips the dates of jp-holidays",
        "fires only on the dates of patch-days",
    ] {
        assert!(text.contains(want), "want {want}\n{text}");
    }

    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--config",
            &config,
            "--from",
            "2027-01-01",
            "--until",
            "2027-02-01",
        ];
        args.extend_from_slice(extra);
        let out = shiftd(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout(&out)
    };
    let items: Vec<Value> = serde_json::from_str(&plan(&["--json"])).unwrap();
    let jst = |day: &str, time: &str, action: &str| {
        (format!("2027-{day}T{time}+09:00"), action.to_string(), None)
    };
    // L: Sunday the 31st; LW: Friday the 29th.
    assert_eq!(
        rule_items(&items, "month-end"),
        vec![
            jst("01-29", "18:00:00", "stop"),
            jst("01-31", "18:30:00", "start")
        ]
    );
    // Only on patch days: the second Tuesday (EventBridge's 3 is Tuesday) is one, the weekday nearest
    // the 15th (Friday) is not; @daily fires on the two patch days only.
    assert_eq!(
        rule_items(&items, "patch"),
        vec![
            jst("01-12", "00:00:00", "stop"),
            jst("01-12", "09:00:00", "start"),
            jst("01-26", "00:00:00", "stop"),
        ]
    );
    let office = rule_items(&items, "office-hours");
    let starts: Vec<&str> = office
        .iter()
        .filter(|(_, action, _)| action == "start")
        .map(|(at, _, _)| &at[5..10])
        .collect();
    // Weekdays at 08:00 but Monday the 11th (a holiday of the .ics file); Friday the 1st's is before
    // the window, Monday 1 February's within it (23:00 UTC).
    assert_eq!(
        starts,
        vec![
            "01-04", "01-05", "01-06", "01-07", "01-08", "01-12", "01-13", "01-14", "01-15",
            "01-18", "01-19", "01-20", "01-21", "01-22", "01-25", "01-26", "01-27", "01-28",
            "01-29", "02-01"
        ]
    );
    assert!(items.iter().all(|i| i.get("skipped").is_none()));
    assert!(
        items
            .iter()
            .filter(|i| i["rule"] == "patch" && i["action"] == "start")
            .all(|i| i["schedule"] == "cron(0 9 ? * 3#2 *)"),
        "{items:#?}"
    );

    let with_skipped: Vec<Value> =
        serde_json::from_str(&plan(&["--json", "--show-skipped"])).unwrap();
    // The same actions, and the skipped occurrences among them, in time order.
    let kept: Vec<&Value> = with_skipped
        .iter()
        .filter(|i| i.get("skipped").is_none())
        .collect();
    assert_eq!(kept, items.iter().collect::<Vec<_>>());
    let skipped = |rule: &str| -> Vec<(String, String, Option<String>)> {
        rule_items(&with_skipped, rule)
            .into_iter()
            .filter(|(_, _, why)| why.is_some())
            .collect()
    };
    let holiday = Some("calendar jp-holidays".to_string());
    assert_eq!(
        skipped("office-hours"),
        vec![
            (
                "2027-01-11T08:00:00+09:00".into(),
                "start".into(),
                holiday.clone()
            ),
            ("2027-01-11T20:00:00+09:00".into(), "stop".into(), holiday),
        ]
    );
    let patch = skipped("patch");
    let not_patch = Some("not in calendar patch-days".to_string());
    assert!(patch.contains(&(
        "2027-01-15T09:00:00+09:00".into(),
        "start".into(),
        not_patch.clone()
    )));
    // @daily on every day from the 2nd to 1 February but the two patch days.
    assert_eq!(
        patch
            .iter()
            .filter(|(_, a, why)| a == "stop" && *why == not_patch)
            .count(),
        29,
        "{patch:#?}"
    );
    assert!(skipped("month-end").is_empty());

    let text = plan(&["--show-skipped"]);
    assert!(
        text.starts_with(
            "45 action(s) and 32 occurrence(s) skipped by calendars from 2027-01-01 00:00"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "2027-01-11 08:00:00 JST  (2027-01-10 23:00:00 UTC)  start  office-hours  jp (111111111111)  \
             ap-northeast-1  ids [i-0123456789abcdef0]  skipped (calendar jp-holidays)\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("  patch  start  0 9 15W * ?  09:00 on the weekday nearest the 15th of the month (Asia/Tokyo)\n"),
        "{text}"
    );
}

#[test]
fn plan_refuses_an_invalid_config_and_a_bad_time() {
    let out = shiftd(&[
        "plan",
        "--config",
        &fixture("invalid/unknown-timezone.toml"),
    ]);
    assert_eq!(out.status.code(), Some(78));
    let out = shiftd(&[
        "plan",
        "--config",
        &fixture("plan-new-york.toml"),
        "--from",
        "next tuesday",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a time"));
}

#[test]
fn policy_documents_match_the_expected_json() {
    let out = shiftd(&[
        "policy",
        "--config",
        &fixture("policy/two-accounts.toml"),
        "--delegate-role",
        "arn:aws:iam::123456789012:role/shiftd-delegate",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let want: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture("policy/two-accounts.expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["title"], w["title"]);
        assert_eq!(g["document"], w["document"], "{}", w["title"]);
    }
    // The KMS note travels with each target permission policy.
    assert!(
        got[1]["notes"][0]
            .as_str()
            .unwrap()
            .contains("kms:CreateGrant")
    );
}

#[test]
fn policy_for_one_account_and_its_text_form_is_valid_json_per_document() {
    let out = shiftd(&[
        "policy",
        "--config",
        &fixture("policy/two-accounts.toml"),
        "--account",
        "prod",
        "--delegate-account",
        "123456789012",
    ]);
    assert!(out.status.success());
    let text = stdout(&out);
    let blocks: Vec<Value> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let json: String = b
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n");
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {b}"))
        })
        .collect();
    assert_eq!(blocks.len(), 3, "trust, permission, delegate: {text}");
    assert_eq!(
        blocks[0]["Statement"][0]["Principal"]["AWS"],
        "arn:aws:iam::123456789012:root"
    );
    assert_eq!(
        blocks[2]["Statement"][0]["Resource"],
        serde_json::json!(["arn:aws:iam::111111111111:role/shiftd-target"])
    );
}

fn doctor_config(ids: &[String]) -> String {
    config_with_rules(
        "",
        &format!(
            r#"
[[rules]]
name = "listed"
account = "account1"
instances = ["{}", "i-0000000000000dead"]
start = "0 8 * * *"
stop = "0 20 * * *"

[[rules]]
name = "tagged"
account = "account1"
tags = {{ Schedule = "office" }}
stop = "0 20 * * *"

[[rules]]
name = "nothing-tagged"
account = "account1"
tags = {{ Schedule = "nobody" }}
stop = "0 20 * * *"
"#,
            ids[0]
        ),
    )
}

fn run_doctor(fake: &FakeAws, config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shiftd.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shiftd"))
        .args(["doctor", "--config", path.to_str().unwrap()])
        .envs(fake.env())
        .output()
        .unwrap();
    (out.status.code(), stdout(&out))
}

#[test]
fn doctor_walks_the_setup_and_names_each_problem() {
    let fake = FakeAws::start();
    let ids = fake.seed(TARGET_ACCOUNT, 1, &[("Schedule", "office")], false);
    fake.reset_calls();
    let (code, out) = run_doctor(&fake, &doctor_config(&ids));
    assert_eq!(code, Some(1), "a listed ID is missing: {out}");
    for want in [
        "ok    IMDSv2 reachable; instance profile role: shiftd-delegate",
        "ok    delegate identity: account 123456789012",
        "ok    account1: AssumeRole arn:aws:iam::111111111111:role/account1-role-ec2",
        "ok    account1/ap-northeast-1: DescribeInstanceStatus lists 1 instance(s)",
        "FAIL  account1/ap-northeast-1: rule listed: not found here: i-0000000000000dead",
        "ok    account1/ap-northeast-1: rule tagged: selection tags Schedule=office matches 1 instance(s)",
        "warn  account1/ap-northeast-1: rule nothing-tagged: selection tags Schedule=nobody matches 0 instance(s)",
        "ok    account1/ap-northeast-1: rule listed: StartInstances allowed on 1 instance(s) (DryRun)",
        "ok    account1/ap-northeast-1: rule tagged: StopInstances allowed on 1 instance(s) (DryRun)",
        "1 failure(s), 1 warning(s)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // Acting was only tried: the instance is still running and every Start/Stop call was a DryRun.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fake.states(TARGET_ACCOUNT)[&ids[0]], "running");
}

#[test]
fn doctor_without_an_instance_profile_says_so_and_stops() {
    let fake = FakeAws::start_with_imds_args(&["--role", ""]);
    let (code, out) = run_doctor(&fake, &doctor_config(&["i-0123456789abcdef0".to_string()]));
    assert_eq!(code, Some(1));
    assert!(
        out.contains(
            "FAIL  IMDSv2 answers, but no instance profile role is attached to this instance"
        ),
        "{out}"
    );
    assert!(
        out.contains("instance profile credentials could not be loaded"),
        "{out}"
    );
    assert!(
        !out.contains("AssumeRole arn"),
        "no further checks without credentials: {out}"
    );
}

/// The JSON document doctor printed (indented, as a fix) right after the line containing `heading`.
fn json_after(out: &str, heading: &str) -> Value {
    let mut lines = out.lines().skip_while(|l| !l.contains(heading)).skip(1);
    let mut doc = String::new();
    for line in lines.by_ref() {
        doc.push_str(line.trim_start());
        doc.push('\n');
        if line == "      }" {
            break;
        }
    }
    serde_json::from_str(&doc)
        .unwrap_or_else(|e| panic!("{e}: no JSON after {heading:?} in:\n{out}"))
}

#[test]
fn doctor_on_access_denied_prints_both_sides_statements_and_on_unauthorized_stop_says_so() {
    let fake = FakeAws::start_with_faults();
    let ids = fake.seed(TARGET_ACCOUNT, 1, &[("Schedule", "office")], false);
    let role = format!("arn:aws:iam::{TARGET_ACCOUNT}:role/account1-role-ec2");
    // The target role refuses the delegate once (as IAM words it, whichever side is missing).
    fake.inject(
        "/_fault/error",
        serde_json::json!({"action": "AssumeRole", "status": 403, "code": "AccessDenied", "times": 1,
            "message": format!("User: arn:aws:sts::{BASE_ACCOUNT}:assumed-role/shiftd-delegate/\
                {DELEGATE_INSTANCE_ID} is not authorized to perform: sts:AssumeRole on resource: {role}")}),
    );
    let config = doctor_config(&ids);
    let (code, out) = run_doctor(&fake, &config);
    assert_eq!(code, Some(1), "{out}");
    let fail = format!("FAIL  account1: AssumeRole {role} failed: AccessDenied: User: ");
    assert!(out.contains(&fail), "missing {fail:?} in:\n{out}");
    assert!(
        out.contains("AccessDenied has two possible causes"),
        "{out}"
    );
    // Both statements, as IAM JSON: the trust policy names the delegate (moto's caller identity is
    // a user, so its account); the delegate's policy allows sts:AssumeRole on exactly this role.
    let trust = json_after(&out, "1. the target role's trust policy");
    assert_eq!(
        trust["Statement"][0]["Principal"]["AWS"],
        format!("arn:aws:iam::{BASE_ACCOUNT}:root")
    );
    assert_eq!(trust["Statement"][0]["Action"], "sts:AssumeRole");
    let delegate = json_after(&out, "2. the delegate's instance role");
    assert_eq!(delegate["Statement"][0]["Action"], "sts:AssumeRole");
    assert_eq!(
        delegate["Statement"][0]["Resource"],
        serde_json::json!([role])
    );
    assert!(
        !out.contains("DescribeInstanceStatus"),
        "no EC2 checks without the role: {out}"
    );

    // Now the role is assumed, but the target role may not stop instances.
    fake.inject(
        "/_fault/error",
        serde_json::json!({"action": "StopInstances", "status": 403, "code": "UnauthorizedOperation",
            "message": "You are not authorized to perform this operation.", "times": -1}),
    );
    let (code, out) = run_doctor(&fake, &config);
    assert_eq!(code, Some(1), "{out}");
    for want in [
        format!("ok    account1: AssumeRole {role}"),
        "ok    account1/ap-northeast-1: rule listed: StartInstances allowed on 1 instance(s) (DryRun)".to_string(),
        "FAIL  account1/ap-northeast-1: rule tagged: StopInstances (DryRun) refused: UnauthorizedOperation".to_string(),
        "the target role needs ec2:StopInstances on these instances".to_string(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(fake.states(TARGET_ACCOUNT)[&ids[0]], "running");
}

/// `shiftd plan … | head` used to panic on the closed pipe (exit 101).
#[test]
fn plan_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_shiftd"))
        .args([
            "plan",
            "--config",
            &fixture("plan-new-york.toml"),
            "--hours",
            "100000",
            "--limit",
            "100000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("action(s) from"), "{first}");
    // The reader goes away, as `head -1` does.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `shiftd policy ARGS`, run as the README shows it: from the project's top, with its relative paths.
fn policy_output(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shiftd"))
        .arg("policy")
        .args(args)
        .current_dir(project_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shiftd policy {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

/// The README's IAM documents are `shiftd policy`'s output for the example configuration, so that a
/// user who copies them gets what `shiftd doctor` checks (the README once lacked
/// `ec2:DescribeInstanceStatus`). A block follows a marker naming the arguments:
/// `<!-- policy: ARGS | TITLE -->` and a ```json block holding the document TITLE of the output, or
/// `<!-- policy: ARGS -->` and a ``` block holding `$ shiftd policy ARGS` and the whole output.
/// `scripts/readme-policies` rewrites them.
#[test]
fn readme_policies_are_shiftd_policy_output() {
    let readme = std::fs::read_to_string(project_root().join("README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let mut shown: Vec<(String, String)> = Vec::new(); // (args, title) of each document block
    let mut marked_blocks = 0;
    let mut unmarked = Vec::new();
    let mut next = 0;
    while let Some(i) = (next..lines.len()).find(|&i| lines[i].starts_with("```")) {
        // An opening fence: its block runs to the next ``` line.
        let end = i + 1 + lines[i + 1..].iter().position(|l| *l == "```").unwrap();
        next = end + 1;
        let body: String = lines[i + 1..end].iter().map(|l| format!("{l}\n")).collect();
        let marker = i
            .checked_sub(1)
            .and_then(|p| lines[p].strip_prefix("<!-- policy: "))
            .and_then(|m| m.strip_suffix(" -->"));
        let Some(marker) = marker else {
            if body.contains("\"2012-10-17\"") {
                unmarked.push(i + 1);
            }
            continue;
        };
        marked_blocks += 1;
        match marker.split_once(" | ") {
            Some((args, title)) => {
                let args: Vec<&str> = args.split_whitespace().collect();
                let output = policy_output(&args);
                let document = document_of(&output, title).unwrap_or_else(|| {
                    panic!(
                        "README.md:{i}: `shiftd policy {}` prints no document {title:?}: {output}",
                        args.join(" ")
                    )
                });
                assert_eq!(
                    body,
                    document,
                    "README.md:{}: the block differs from `shiftd policy {}` ({title}); run scripts/readme-policies",
                    i + 1,
                    args.join(" ")
                );
                shown.push((args.join(" "), title.to_string()));
            }
            None => {
                let args: Vec<&str> = marker.split_whitespace().collect();
                let want = format!(
                    "$ shiftd policy {}\n{}",
                    args.join(" "),
                    policy_output(&args).trim_end_matches('\n')
                ) + "\n";
                assert_eq!(
                    body,
                    want,
                    "README.md:{}: the block differs from `shiftd policy {}`; run scripts/readme-policies",
                    i + 1,
                    args.join(" ")
                );
            }
        }
    }
    assert!(
        unmarked.is_empty(),
        "README.md: IAM documents not made by `shiftd policy` (no marker) at lines {unmarked:?}"
    );
    assert!(
        shown.len() >= 3 && marked_blocks > shown.len(),
        "README.md: expected the IAM setup's documents and the `shiftd policy` example, found {shown:?}"
    );
    // The IAM setup shows every document the command prints: none left for the reader to guess.
    for args in shown.iter().map(|(a, _)| a) {
        let argv: Vec<&str> = args.split_whitespace().collect();
        for title in titles(&policy_output(&argv)) {
            assert!(
                shown.iter().any(|(a, t)| a == args && *t == title),
                "README.md: `shiftd policy {args}` prints {title:?}, which the README does not show"
            );
        }
    }
    // Nowhere else in the docs: the man pages and example configurations do not copy policies.
    for dir in ["packaging/man", "config"] {
        for entry in std::fs::read_dir(project_root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains("2012-10-17"),
                "{}: an IAM document not made by `shiftd policy`",
                path.display()
            );
        }
    }
}

/// `shiftd policy`'s text form: one section per document, `# TITLE`, `# note: …` lines, the JSON.
fn document_of(output: &str, title: &str) -> Option<String> {
    output.split("\n\n").find_map(|section| {
        let mut lines = section.trim_matches('\n').lines();
        (lines.next()? == format!("# {title}")).then(|| {
            lines
                .filter(|l| !l.starts_with("# "))
                .map(|l| format!("{l}\n"))
                .collect()
        })
    })
}

fn titles(output: &str) -> Vec<String> {
    output
        .split("\n\n")
        .filter_map(|s| s.trim_matches('\n').lines().next()?.strip_prefix("# "))
        .map(String::from)
        .collect()
}

/// The commands `shiftd --help` lists (clap's own `help` aside), and the long options of each as its
/// own `--help` lists them: what the generated man page and completions must cover.
fn commands_and_options() -> Vec<(String, Vec<String>)> {
    let help = stdout(&shiftd(&["--help"]));
    let commands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect();
    assert!(commands.len() >= 6, "{help}");
    commands
        .into_iter()
        .map(|c| {
            let help = stdout(&shiftd(&[&c, "--help"]));
            let options = help
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("--"))
                .map(|w| w.trim_end_matches([',', '.', ')', ']']))
                .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
                .map(|w| format!("--{w}"))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            (c, options)
        })
        .collect()
}

/// `shiftd generate-docs` (packaging/build.sh) writes shiftd(8) with every command and every option,
/// a page per command, and completions that offer them; none of them offer generate-docs itself.
#[test]
fn generated_man_pages_and_completions_cover_every_command_and_option() {
    let dir = tempfile::tempdir().unwrap();
    let out = shiftd(&[
        "generate-docs",
        "--out",
        dir.path().to_str().unwrap(),
        "--date",
        "2026-12-01",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // roff escapes '-'; read the page as a reader does.
    let read = |name: &str| {
        std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .replace("\\-", "-")
    };
    let page = read("shiftd.8");
    assert!(page.contains(".TH SHIFTD 8 2026-12-01"), "{page}");
    assert!(page.contains("--limit"), "shiftd(8) lacks plan --limit");
    let bash = read("completions/shiftd.bash");
    let zsh = read("completions/_shiftd");
    let fish = read("completions/shiftd.fish");
    for (command, options) in commands_and_options() {
        assert!(
            page.contains(&format!(".SS \"shiftd {command}\"")),
            "shiftd(8) lacks a section for {command}"
        );
        let own = read(&format!("shiftd-{command}.8"));
        for option in &options {
            let section = page
                .split(&format!(".SS \"shiftd {command}\""))
                .nth(1)
                .and_then(|s| s.split(".SS ").next())
                .unwrap();
            assert!(
                section.contains(option),
                "shiftd(8): {command} lacks {option}"
            );
            assert!(own.contains(option), "shiftd-{command}(8) lacks {option}");
            assert!(
                bash.contains(option),
                "bash completion: {command} lacks {option}"
            );
            assert!(
                zsh.contains(option),
                "zsh completion: {command} lacks {option}"
            );
            let long = option.trim_start_matches("--");
            assert!(
                fish.contains(&format!("__fish_shiftd_using_subcommand {command}"))
                    && fish.contains(&format!("-l {long}")),
                "fish completion: {command} lacks {option}"
            );
        }
    }
    for text in [&page, &bash, &zsh, &fish] {
        assert!(!text.contains("generate-docs"), "offers generate-docs");
    }
    // Exit code 2 (usage errors) is documented.
    assert!(page.contains(".B 2\nA usage error"), "{page}");

    // bash completes a command and an option, as a user pressing Tab would get them.
    let complete = |words: &str| {
        let script = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
             _shiftd shiftd \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; echo \"${{COMPREPLY[@]}}\"",
            dir.path().join("completions/shiftd.bash").display()
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(complete("shiftd pl"), "plan");
    assert_eq!(complete("shiftd plan --li"), "--limit");
}

/// Usage errors exit 2 (clap's convention, documented in the README and shiftd(8)), name the
/// problem, and print nothing on stdout.
#[test]
fn a_usage_error_exits_2() {
    let config = fixture("plan-new-york.toml");
    for (args, says) in [
        (vec!["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (
            vec!["plan", "--config", &config, "--limti", "3"],
            "unexpected argument '--limti'",
        ),
        (
            vec!["plan", "--config", &config, "--limit", "many"],
            "invalid value 'many' for '--limit <N>'",
        ),
        (
            vec![
                "plan",
                "--config",
                &config,
                "--until",
                "2027-01-01",
                "--hours",
                "3",
            ],
            "cannot be used with",
        ),
        (vec!["reload", "--config", &config], "--pid <PID>"),
        (
            vec![
                "plan",
                "--config",
                &config,
                "--from",
                "2027-01-02",
                "--until",
                "2027-01-01",
            ],
            "--until must be after --from",
        ),
        (
            vec!["policy", "--config", &config, "--account", "nope"],
            "account \"nope\" is not in",
        ),
        (vec![], "Usage: shiftd <COMMAND>"),
    ] {
        let out = shiftd(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "shiftd {}: {stderr}",
            args.join(" ")
        );
        assert!(stderr.contains(says), "shiftd {}: {stderr}", args.join(" "));
        assert!(out.stdout.is_empty(), "shiftd {}", args.join(" "));
    }
}

/// `shiftd apply` with the fake AWS: exit code, stderr, and the journal entries of the process.
fn run_apply(fake: &FakeAws, config: &str, args: &[&str]) -> (Option<i32>, String, Vec<Entry>) {
    ensure_journald();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shiftd.toml");
    std::fs::write(&path, config).unwrap();
    let started = std::time::SystemTime::now();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_shiftd"))
        .args(["apply", "--config", path.to_str().unwrap()])
        .args(args)
        .envs(fake.env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned() + &stdout(&out);
    let mut entries = Vec::new();
    wait_until("apply's journal entries", Duration::from_secs(10), || {
        entries = journal_entries(pid, started)
            .into_iter()
            .filter(|e| e.contains_key("SHIFTD_RESULT"))
            .collect();
        !entries.is_empty() || out.status.code() == Some(2)
    });
    (out.status.code(), stderr, entries)
}

#[test]
fn apply_acts_on_a_rules_selection_now_with_reason_manual() {
    let fake = FakeAws::start();
    let office = fake.seed(TARGET_ACCOUNT, 2, &[("Schedule", "office")], false);
    let other = fake.seed(TARGET_ACCOUNT, 1, &[("Schedule", "other")], false);
    let config = config_with_rules(
        "",
        r#"
[[rules]]
name = "office"
account = "account1"
tags = { Schedule = "office" }
start = "0 8 * * *"
stop = "0 20 * * *"
"#,
    );
    // A dry run says what it would do and touches nothing.
    let (code, text, entries) = run_apply(&fake, &config, &["office", "stop", "--dry-run"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(entries.len(), 2, "{entries:#?}");
    assert!(
        entries
            .iter()
            .all(|e| field(e, "SHIFTD_RESULT") == "dry-run")
    );
    assert!(fake.calls().iter().all(|c| c.action != "StopInstances"));
    // Then for real: the two instances stop, the other one is left alone.
    let (code, text, entries) = run_apply(&fake, &config, &["office", "stop"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("stop office: 2 ok, 0 skipped, 0 failed"),
        "{text}"
    );
    let states = fake.states(TARGET_ACCOUNT);
    for id in &office {
        assert_eq!(states[id], "stopped", "{states:?}");
        let e = entries_for(&entries, id);
        assert_eq!(e.len(), 1, "{entries:#?}");
        assert_eq!(field(e[0], "SHIFTD_REASON"), "manual");
        assert_eq!(field(e[0], "SHIFTD_TRIGGER"), "manual");
        assert_eq!(field(e[0], "SHIFTD_RESULT"), "ok");
        assert!(
            field(e[0], "SHIFTD_DETAIL").starts_with("stopped after"),
            "{e:?}"
        );
    }
    assert_eq!(states[&other[0]], "running");
    // Again: nothing to do, every instance skipped, still a success.
    let (code, text, _) = run_apply(&fake, &config, &["office", "stop"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("0 ok, 2 skipped"), "{text}");
    // An unknown rule is refused by name, with the known ones.
    let (code, text, _) = run_apply(&fake, &config, &["offices", "stop"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("no rule named \"offices\"") && text.contains("expected one of [office]"),
        "{text}"
    );
}

#[test]
fn apply_exits_1_when_an_instance_fails() {
    let fake = FakeAws::start();
    let ids = fake.seed(TARGET_ACCOUNT, 1, &[], true);
    let config = config_with_rules(
        "",
        &format!(
            r#"
[[rules]]
name = "listed"
account = "account1"
instances = ["{}", "i-0000000000000dead"]
start = "0 8 * * *"
"#,
            ids[0]
        ),
    );
    let (code, text, entries) = run_apply(&fake, &config, &["listed", "start"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("1 ok, 0 skipped, 1 failed"), "{text}");
    let dead = entries_for(&entries, "i-0000000000000dead");
    assert_eq!(field(dead[0], "SHIFTD_RESULT"), "failed");
    assert!(
        field(dead[0], "SHIFTD_DETAIL").contains("not found"),
        "{dead:?}"
    );
}

#[test]
fn doctor_shows_the_overrides_in_force_and_a_stale_calendar() {
    let fake = FakeAws::start();
    let held = fake.seed(
        TARGET_ACCOUNT,
        1,
        &[("Schedule", "office"), ("shiftd:skip-until", "2099-01-01")],
        false,
    );
    let odd = fake.seed(
        TARGET_ACCOUNT,
        1,
        &[("Schedule", "office"), ("shiftd:skip", "maybe")],
        false,
    );
    let config = config_with_rules(
        "",
        r#"
[calendars.old-holidays]
dates = ["2020-01-01", "2020-12-31"]

[[rules]]
name = "tagged"
account = "account1"
tags = { Schedule = "office" }
stop = "0 20 * * *"
skip = "old-holidays"
"#,
    );
    let (code, out) = run_doctor(&fake, &config);
    assert_eq!(code, Some(0), "{out}");
    for want in [
        "warn  calendar old-holidays: no date in the next 365 days (last date: 2020-12-31)"
            .to_string(),
        format!(
            "ok    account1/ap-northeast-1: rule tagged: {} left alone: tag shiftd:skip-until=2099-01-01 (until 2099-01-01T00:00:00+00:00)",
            held[0]
        ),
        format!(
            "warn  account1/ap-northeast-1: rule tagged: {} left alone: tag shiftd:skip=\"maybe\" does not parse",
            odd[0]
        ),
    ] {
        assert!(out.contains(&want), "want {want}\n{out}");
    }
}

#[test]
fn plan_with_instances_describes_the_selection_live_with_the_overrides_in_force() {
    let fake = FakeAws::start();
    let plain = fake.seed(TARGET_ACCOUNT, 1, &[("Schedule", "office")], false);
    let held = fake.seed(
        TARGET_ACCOUNT,
        1,
        &[("Schedule", "office"), ("shiftd:skip", "true")],
        true,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shiftd.toml");
    std::fs::write(
        &path,
        config_with_rules(
            "",
            r#"
[[rules]]
name = "tagged"
account = "account1"
tags = { Schedule = "office" }
stop = "0 20 * * *"
"#,
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_shiftd"))
            .args([
                "plan",
                "--config",
                path.to_str().unwrap(),
                "--hours",
                "24",
                "--instances",
            ])
            .args(extra)
            .envs(fake.env())
            .output()
            .unwrap()
    };
    let out = run(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let items: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(items.len(), 1, "{items:#?}");
    let instances = items[0]["instances"].as_array().unwrap();
    let by_id = |id: &str| {
        instances
            .iter()
            .find(|i| i["instance_id"] == id)
            .unwrap_or_else(|| panic!("{id} in {instances:#?}"))
    };
    assert_eq!(by_id(&plain[0])["state"], "running");
    assert!(by_id(&plain[0]).get("override").is_none());
    assert_eq!(by_id(&held[0])["state"], "stopped");
    assert_eq!(
        by_id(&held[0])["override"],
        "left alone: tag shiftd:skip=true (opted out)"
    );
    let text = stdout(&run(&[]));
    assert!(
        text.contains("rule tagged: 2 instance(s) selected now (described live)")
            && text.contains(&format!(
                "{}  stopped  left alone: tag shiftd:skip=true",
                held[0]
            )),
        "{text}"
    );
}
