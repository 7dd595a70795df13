//! `[organization]` end to end: the real binary against moto's Organizations (one organization per
//! management account; assumed-role credentials act in the role's account), nested OUs, an excluded
//! account, a closed (SUSPENDED) one, an account added while shiftd runs, and `shiftd accounts`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

const MANAGEMENT: &str = "999999999999";

fn org(fake: &FakeAws, op: &[&str]) -> Value {
    let mut args = vec!["org", "--account", MANAGEMENT];
    args.extend(op);
    fake.helper(&args)
}

fn created(fake: &FakeAws, op: &[&str]) -> String {
    org(fake, op).as_str().unwrap().to_string()
}

/// One running instance tagged Schedule=dev in `account`.
fn instance(fake: &FakeAws, account: &str) -> String {
    fake.seed(account, 1, &[("Schedule", "dev")], false)[0].clone()
}

fn state(fake: &FakeAws, account: &str, id: &str) -> String {
    fake.states(account)[id].clone()
}

fn config(dev: &str, excluded: &str) -> String {
    format!(
        r#"[organization]
role_arn = "arn:aws:iam::{MANAGEMENT}:role/shiftd-org-reader"
target_role_name = "shiftd-target"
regions = ["{REGION}"]
exclude_accounts = ["{excluded}"]
refresh = "10s"

[accounts.account1]
role_arn = "arn:aws:iam::{TARGET_ACCOUNT}:role/account1-role-ec2"
regions = ["{REGION}"]

[[rules]]
name = "dev-nights"
accounts = ["ou:{dev}", "account1"]
tags = {{ Schedule = "dev" }}
stop = "*/3 * * * * *"
"#
    )
}

fn accounts_command(fake: &FakeAws, config: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shiftd"))
        .args(["accounts", "--config"])
        .arg(config)
        .args(extra)
        .envs(fake.env())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[test]
fn a_rule_over_an_ou_acts_in_its_accounts_at_any_depth_and_picks_up_a_new_one() {
    let fake = FakeAws::start();
    let root = org(&fake, &["create"])["root"]
        .as_str()
        .unwrap()
        .to_string();
    let dev = created(&fake, &["ou", &root, "dev"]);
    let team = created(&fake, &["ou", &dev, "team"]);
    let prod = created(&fake, &["ou", &root, "prod"]);
    let dev_a = created(&fake, &["account", &dev, "dev-a"]);
    let team_a = created(&fake, &["account", &team, "team-a"]);
    let excluded = created(&fake, &["account", &team, "team-excluded"]);
    let closed = created(&fake, &["account", &team, "team-closed"]);
    let prod_a = created(&fake, &["account", &prod, "prod-a"]);
    org(&fake, &["close", &closed]);
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for a in [
        TARGET_ACCOUNT,
        &dev_a,
        &team_a,
        &excluded,
        &closed,
        &prod_a,
        BASE_ACCOUNT,
    ] {
        ids.insert(a.to_string(), instance(&fake, a));
    }

    let daemon = Shiftd::spawn(&fake, &config(&dev, &excluded), &[]);
    let selected = [TARGET_ACCOUNT, dev_a.as_str(), team_a.as_str()];
    wait_until(
        "the selected accounts' instances stop",
        Duration::from_secs(40),
        || {
            selected
                .iter()
                .all(|a| state(&fake, a, &ids[*a]) == "stopped")
        },
    );
    for a in [&excluded, &closed, &prod_a, BASE_ACCOUNT] {
        assert_eq!(state(&fake, a, &ids[a]), "running", "{a} is not selected");
    }

    // `shiftd accounts` lists what the daemon acts in, with the OU path.
    let (code, text) = accounts_command(&fake, &daemon.config, &["--json", "--check"]);
    assert_eq!(code, 0, "{text}");
    let rows: Vec<Value> = serde_json::from_str(&text).unwrap();
    let listed: BTreeMap<&str, &Value> = rows
        .iter()
        .map(|r| (r["account_id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(
        listed.keys().copied().collect::<Vec<_>>(),
        {
            let mut v = selected.to_vec();
            v.sort();
            v
        },
        "{text}"
    );
    assert_eq!(
        listed[team_a.as_str()]["source"],
        "organization: Root/dev/team"
    );
    assert_eq!(
        listed[team_a.as_str()]["role_arn"],
        format!("arn:aws:iam::{team_a}:role/shiftd-target")
    );
    assert_eq!(listed[TARGET_ACCOUNT]["source"], "configured");
    assert!(rows.iter().all(|r| r["assumable"] == true), "{text}");
    assert!(
        rows.iter()
            .all(|r| r["rules"] == serde_json::json!(["dev-nights"]))
    );

    // `plan --accounts` lists the rule once per account; plain `plan` once, with its list.
    let plan = |extra: &[&str]| -> Vec<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_shiftd"))
            .args([
                "plan", "--json", "--hours", "1", "--limit", "2000", "--config",
            ])
            .arg(&daemon.config)
            .args(extra)
            .envs(fake.env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first_instant = |items: &[Value]| -> Vec<String> {
        let at = items[0]["at_utc"].clone();
        let mut v: Vec<String> = items
            .iter()
            .filter(|i| i["at_utc"] == at)
            .map(|i| i["account_id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let mut want: Vec<String> = selected.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(first_instant(&plan(&["--accounts"])), want);
    let offline = plan(&[]);
    assert_eq!(offline[0]["account"], format!("[ou:{dev}, account1]"));

    // An account added to the team OU while shiftd runs is acted in after the next refresh.
    let late = created(&fake, &["account", &team, "team-late"]);
    let late_id = instance(&fake, &late);
    daemon.wait_for_messages(
        &format!("account {late} (team-late, Root/dev/team) appeared in the organization"),
        1,
        Duration::from_secs(40),
    );
    wait_until(
        "the new account's instance stops",
        Duration::from_secs(30),
        || state(&fake, &late, &late_id) == "stopped",
    );
    assert_eq!(state(&fake, &prod_a, &ids[&prod_a]), "running");

    // The journal names each account (its entries may reach the journal a little later).
    let wanted = [&ids[TARGET_ACCOUNT], &ids[&team_a], &late_id];
    let mut actions = Vec::new();
    wait_until("the journal entries", Duration::from_secs(20), || {
        actions = daemon.actions();
        wanted
            .iter()
            .all(|id| !entries_for(&actions, id).is_empty())
    });
    for (account, id) in [
        ("account1", &ids[TARGET_ACCOUNT]),
        (team_a.as_str(), &ids[&team_a]),
        (late.as_str(), &late_id),
    ] {
        let e = entries_for(&actions, id);
        assert!(!e.is_empty(), "{id}");
        assert!(
            e.iter().all(|e| field(e, "SHIFTD_ACCOUNT") == account
                && field(e, "SHIFTD_RULE") == "dev-nights"),
            "{e:#?}"
        );
    }
    assert!(daemon.stop().success());
}

#[test]
fn accounts_lists_the_configured_ones_and_exits_1_when_the_organization_cannot_be_listed() {
    let fake = FakeAws::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shiftd.toml");
    // No organization exists for the management account: the listing fails (exit 1); the configured
    // accounts are still listed.
    write_config(&path, &config("ou-abcd-efgh1234", "222222222222"));
    let started = Instant::now();
    let (code, text) = accounts_command(&fake, &path, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.starts_with("account1  111111111111  configured"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}
