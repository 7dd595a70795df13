//! `[organization]` in-process, on paused time against the in-memory AWS: discovery at start and every
//! `refresh`, accounts that appear or disappear, a failed discovery, and one account's AssumeRole
//! trouble staying in that account.

use std::collections::BTreeMap;
use std::time::Duration;

use shiftd::aws::fake::{self, FakeAws};
use shiftd::config::Action;
use shiftd::outcome::ResultKind;

use crate::sim::{DELEGATE, REGION, Sim, TARGET};

const MINUTE: Duration = Duration::from_secs(60);

const ROOT: &str = "r-root";
const DEV: &str = "ou-root-dev00000";
const TEAM: &str = "ou-root-team0000";
const PROD: &str = "ou-root-prod0000";
const DEV_A: &str = "222222222222";
const TEAM_A: &str = "333333333333";
const EXCLUDED: &str = "444444444444";
const SUSPENDED: &str = "555555555555";
const PROD_A: &str = "666666666666";
const LATE: &str = "777777777777";
const READER: &str = "arn:aws:iam::999999999999:role/shiftd-org-reader";

/// Root: account1 (TARGET); OU dev: DEV_A, and OU team below it: TEAM_A, EXCLUDED, SUSPENDED; OU
/// prod: PROD_A.
fn organization(aws: &FakeAws) {
    aws.org_create(ROOT);
    aws.org_add_account(ROOT, TARGET, "account1");
    aws.org_add_ou(ROOT, DEV, "dev");
    aws.org_add_ou(DEV, TEAM, "team");
    aws.org_add_ou(ROOT, PROD, "prod");
    aws.org_add_account(DEV, DEV_A, "dev-a");
    aws.org_add_account(TEAM, TEAM_A, "team-a");
    aws.org_add_account(TEAM, EXCLUDED, "team-excluded");
    aws.org_add_account(TEAM, SUSPENDED, "team-suspended");
    aws.org_set_status(SUSPENDED, "SUSPENDED");
    aws.org_add_account(PROD, PROD_A, "prod-a");
}

fn org_config(defaults: &str, stop: &str) -> String {
    format!(
        r#"[defaults]
{defaults}

[organization]
role_arn = "{READER}"
target_role_name = "shiftd-target"
regions = ["{REGION}"]
exclude_accounts = ["{EXCLUDED}"]
refresh = "10m"

[accounts.account1]
role_arn = "arn:aws:iam::{TARGET}:role/account1-role-ec2"
regions = ["{REGION}"]

[[rules]]
name = "dev-nights"
accounts = ["ou:{DEV}", "account1"]
tags = {{ Schedule = "dev" }}
stop = {stop}
"#
    )
}

/// One running instance tagged Schedule=dev in each account; account ID -> instance ID.
fn instances(aws: &FakeAws, accounts: &[&str]) -> BTreeMap<String, String> {
    accounts
        .iter()
        .map(|a| {
            let id = aws.add_instances(a, REGION, 1, "running", &[("Schedule", "dev")]);
            (a.to_string(), id[0].clone())
        })
        .collect()
}

fn state(aws: &FakeAws, id: &str) -> String {
    aws.states(&[id.to_string()])[0].clone()
}

#[tokio::test(start_paused = true)]
async fn a_rule_over_an_ou_acts_in_every_selected_account_and_keeps_up_with_the_organization() {
    let sim = Sim::new("2026-12-01T07:55:00Z");
    organization(&sim.aws);
    let ids = instances(
        &sim.aws,
        &[TARGET, DEV_A, TEAM_A, EXCLUDED, SUSPENDED, PROD_A, DELEGATE],
    );
    sim.write_config(&org_config("", r#""0 8,9 * * *""#));
    let daemon = sim.start();

    sim.advance_to("2026-12-01T08:05:00Z").await;
    for a in [TARGET, DEV_A, TEAM_A] {
        assert_eq!(
            state(&sim.aws, &ids[a]),
            "stopped",
            "{a}\n{}",
            sim.logs.text()
        );
    }
    for a in [EXCLUDED, SUSPENDED, PROD_A, DELEGATE] {
        assert_eq!(state(&sim.aws, &ids[a]), "running", "{a} is not selected");
    }
    // Each account's outcome names it: the configured one by name, the discovered ones by ID.
    let by_account: BTreeMap<String, String> = sim
        .outcomes()
        .into_iter()
        .map(|o| (o.account.clone(), o.instance_id.clone().unwrap()))
        .collect();
    assert_eq!(
        by_account,
        BTreeMap::from([
            ("account1".to_string(), ids[TARGET].clone()),
            (DEV_A.to_string(), ids[DEV_A].clone()),
            (TEAM_A.to_string(), ids[TEAM_A].clone()),
        ])
    );
    assert!(sim.outcomes().iter().all(|o| o.rules == ["dev-nights"]
        && o.action == Action::Stop
        && o.result == ResultKind::Ok));
    // Discovered accounts are assumed as the target role.
    assert!(
        sim.aws
            .calls_of(fake::STOP)
            .iter()
            .all(|c| [TARGET, DEV_A, TEAM_A].contains(&c.account.as_str()))
    );

    // The organization changes: an account appears in team, dev-a leaves.
    let late = instances(&sim.aws, &[LATE]);
    sim.aws.org_add_account(TEAM, LATE, "late");
    sim.aws.org_remove_account(DEV_A);
    sim.aws.set_state(&ids[DEV_A], "running");
    let listings = sim.aws.calls_of(fake::LIST_ROOTS).len();
    assert_eq!(listings, 1, "one discovery at start");
    sim.advance_to("2026-12-01T08:30:00Z").await;
    let listings = sim.aws.calls_of(fake::LIST_ROOTS).len();
    assert!(
        (2..=4).contains(&listings),
        "a discovery every 10 minutes: {listings}"
    );
    let logs = sim.logs.text();
    assert!(
        logs.contains("account 777777777777 (late, Root/dev/team) appeared in the organization"),
        "{logs}"
    );
    assert!(
        logs.contains(
            "account 222222222222 (dev-a) is no longer among the organization's active accounts"
        ),
        "{logs}"
    );
    assert!(
        logs.contains("account 222222222222 is no longer in the configuration or the organization's selected accounts: its credentials are forgotten"),
        "{logs}"
    );

    sim.advance_to("2026-12-01T09:05:00Z").await;
    assert_eq!(
        state(&sim.aws, &late[LATE]),
        "stopped",
        "picked up at the refresh"
    );
    assert_eq!(state(&sim.aws, &ids[DEV_A]), "running", "dropped");
    assert_eq!(state(&sim.aws, &ids[PROD_A]), "running");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_discovery_keeps_the_last_list_and_a_due_occurrence_says_so() {
    let sim = Sim::new("2026-12-01T07:55:00Z");
    organization(&sim.aws);
    let ids = instances(&sim.aws, &[TARGET, DEV_A, TEAM_A]);
    sim.write_config(&org_config("", r#""10 8 * * *""#));
    let daemon = sim.start();
    sim.advance(MINUTE).await;
    // From now on Organizations refuses; an account added meanwhile is not seen.
    sim.aws.fault(
        fake::LIST_ROOTS,
        1000,
        FakeAws::error(fake::LIST_ROOTS, "AccessDeniedException", "not allowed"),
    );
    let late = instances(&sim.aws, &[LATE]);
    sim.aws.org_add_account(TEAM, LATE, "late");
    // The refresh at 08:05 fails; the stop at 08:10 acts on the list of 07:55.
    sim.advance_to("2026-12-01T08:15:00Z").await;
    for a in [TARGET, DEV_A, TEAM_A] {
        assert_eq!(
            state(&sim.aws, &ids[a]),
            "stopped",
            "{a}: the last good list is used"
        );
    }
    assert_eq!(state(&sim.aws, &late[LATE]), "running");
    let logs = sim.logs.text();
    assert!(
        logs.contains(
            "listing the organization's accounts failed (keeping the last good list of 4 account(s)"
        ),
        "{logs}"
    );
    assert!(
        logs.contains("stop dev-nights due at 2026-12-01T08:10:00+00:00 acts on the last good list of the organization's accounts (4 account(s)"),
        "{logs}"
    );
    assert!(logs.contains("AccessDeniedException"), "{logs}");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_role_missing_in_one_account_holds_up_no_other() {
    let sim = Sim::new("2026-12-01T07:59:30Z");
    organization(&sim.aws);
    let ids = instances(&sim.aws, &[TARGET, DEV_A, TEAM_A]);
    // The target role is deployed everywhere but in TEAM_A.
    sim.aws.allow_role(READER, None);
    sim.aws.allow_role(
        &format!("arn:aws:iam::{TARGET}:role/account1-role-ec2"),
        None,
    );
    sim.aws
        .allow_role(&format!("arn:aws:iam::{DEV_A}:role/shiftd-target"), None);
    sim.write_config(&org_config(r#"credentials_wait = "1m""#, r#""0 8 * * *""#));
    let daemon = sim.start();
    sim.advance_to("2026-12-01T08:00:20Z").await;
    assert_eq!(state(&sim.aws, &ids[TARGET]), "stopped");
    assert_eq!(
        state(&sim.aws, &ids[DEV_A]),
        "stopped",
        "{}",
        sim.logs.text()
    );
    sim.advance_to("2026-12-01T08:05:00Z").await;
    assert_eq!(state(&sim.aws, &ids[TEAM_A]), "running");
    let failed: Vec<_> = sim
        .outcomes()
        .into_iter()
        .filter(|o| o.result == ResultKind::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0].account, TEAM_A);
    assert!(failed[0].reason.contains("AccessDenied"), "{failed:#?}");
    // Retried with back-off all along, and said once (the retries failing the same way at debug).
    let logs = sim.logs.text();
    let warned = logs
        .lines()
        .filter(|l| {
            l.contains(&format!("AssumeRole for account {TEAM_A} failed")) && l.contains("WARN")
        })
        .count();
    assert_eq!(warned, 1, "{logs}");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn doctor_lists_the_accounts_where_the_role_is_missing() {
    let sim = Sim::new("2026-12-01T07:59:30Z");
    organization(&sim.aws);
    sim.aws.allow_role(READER, None);
    sim.aws.allow_role(
        &format!("arn:aws:iam::{TARGET}:role/account1-role-ec2"),
        None,
    );
    sim.aws
        .allow_role(&format!("arn:aws:iam::{DEV_A}:role/shiftd-target"), None);
    sim.write_config(&org_config("", r#""0 8 * * *""#));
    let config = shiftd::config::Config::load(&sim.config_path()).unwrap();
    let clock: std::sync::Arc<dyn shiftd::clock::Clock> = sim.clock.clone();
    let report = shiftd::doctor::run(&config, sim.aws.connector(), clock).await;
    assert_eq!(
        report.failures(),
        2,
        "AssumeRole into TEAM_A, and the summary naming it"
    );
    assert_eq!(report.role_missing(), [TEAM_A]);
}

#[tokio::test(start_paused = true)]
async fn a_reload_lists_the_organization_again_at_once() {
    let sim = Sim::new("2026-12-01T07:55:00Z");
    organization(&sim.aws);
    let ids = instances(&sim.aws, &[TARGET, DEV_A, TEAM_A]);
    sim.write_config(
        &org_config("", r#""10 8 * * *""#).replace(r#"refresh = "10m""#, r#"refresh = "1h""#),
    );
    let daemon = sim.start();
    sim.advance(MINUTE).await;
    let late = instances(&sim.aws, &[LATE]);
    sim.aws.org_add_account(DEV, LATE, "late");
    daemon.reload();
    sim.advance_to("2026-12-01T08:15:00Z").await;
    assert_eq!(
        sim.aws.calls_of(fake::LIST_ROOTS).len(),
        2,
        "at start and on reload"
    );
    for a in [TARGET, DEV_A, TEAM_A] {
        assert_eq!(state(&sim.aws, &ids[a]), "stopped", "{a}");
    }
    assert_eq!(
        state(&sim.aws, &late[LATE]),
        "stopped",
        "{}",
        sim.logs.text()
    );
    daemon.stop().await;
}

/// Scale: 300 accounts in 10 OUs cost one listing per refresh (one call per OU and list), and one
/// rule over all of them acts in each.
#[tokio::test(start_paused = true)]
async fn hundreds_of_accounts_cost_one_listing_per_refresh() {
    let sim = Sim::new("2026-12-01T07:55:00Z");
    sim.aws.org_create(ROOT);
    let mut ids = Vec::new();
    for ou in 0..10 {
        let ou_id = format!("ou-root-big{ou:05}");
        sim.aws.org_add_ou(ROOT, &ou_id, &format!("big{ou}"));
        for n in 0..30 {
            let account = format!("{:012}", 500_000_000_000u64 + ou * 100 + n);
            sim.aws.org_add_account(&ou_id, &account, &format!("a{n}"));
            ids.extend(sim.aws.add_instances(
                &account,
                REGION,
                1,
                "running",
                &[("Schedule", "dev")],
            ));
        }
    }
    sim.write_config(
        &org_config("", r#""0 8 * * *""#)
            .replace(&format!("\"ou:{DEV}\", \"account1\""), "\"org:*\""),
    );
    let daemon = sim.start();
    sim.advance_to("2026-12-01T08:30:00Z").await;
    // At start (07:55), 08:05, 08:15, 08:25: 4 listings of 11 parents each.
    assert_eq!(sim.aws.calls_of(fake::LIST_ROOTS).len(), 4);
    assert_eq!(sim.aws.calls_of(fake::LIST_ACCOUNTS_FOR_PARENT).len(), 44);
    assert_eq!(sim.aws.calls_of(fake::LIST_OUS_FOR_PARENT).len(), 44);
    assert_eq!(sim.aws.states(&ids), vec!["stopped"; 300]);
    assert_eq!(
        sim.outcomes()
            .iter()
            .filter(|o| o.result == ResultKind::Ok)
            .count(),
        300
    );
    daemon.stop().await;
}
