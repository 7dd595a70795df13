//! Accounts discovered from AWS Organizations (`[organization]`), and rules over many accounts.
//!
//! - [`discover`] walks the organization (or the `include_ous`) through the [`Organizations`] trait,
//!   recursing into child OUs, and keeps the ACTIVE accounts less `exclude_accounts`.
//! - [`expand`] turns a configuration as written into the one the daemon runs: discovered accounts
//!   become accounts (role `arn:aws:iam::<id>:role/<target_role_name>`), and each rule with
//!   `accounts = [...]` becomes one rule per selected account, under the same name (occurrences are
//!   keyed by rule *and* account, so each account's is its own).
//! - [`diff`] tells which accounts appeared and which disappeared between two discoveries.
//!
//! All of it is pure but [`discover`] (which only calls the trait), and none of it reads the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::aws::{AwsError, OrgUnit, Organizations};
use crate::config::{Account, AccountSelector, Config, OrganizationConfig, Rule};

/// A discovered account: ACTIVE, not excluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgAccount {
    pub id: String,
    pub name: String,
    /// The OUs it is in, outermost first: the root (or the `include_ous` entry it was found under)
    /// down to its parent.
    pub path: Vec<OrgUnit>,
}

impl OrgAccount {
    /// Its OU path for people: `Root/dev/team-a` (IDs where no name is known).
    pub fn path_text(&self) -> String {
        let parts: Vec<&str> = self
            .path
            .iter()
            .map(|u| if u.name.is_empty() { &u.id } else { &u.name })
            .map(String::as_str)
            .collect();
        parts.join("/")
    }

    /// Whether it lies in OU (or root) `ou`, at any depth.
    pub fn is_under(&self, ou: &str) -> bool {
        self.path.iter().any(|u| u.id == ou)
    }
}

/// What one discovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    /// By account ID.
    pub accounts: Vec<OrgAccount>,
    /// Accounts left out because they are not ACTIVE: (ID, status).
    pub inactive: Vec<(String, String)>,
    /// Accounts left out by `exclude_accounts`.
    pub excluded: Vec<String>,
}

impl fmt::Display for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} active account(s)", self.accounts.len())?;
        if !self.inactive.is_empty() {
            let ids: Vec<String> = self
                .inactive
                .iter()
                .map(|(id, s)| format!("{id} {s}"))
                .collect();
            write!(f, "; not active, left out: {}", ids.join(", "))?;
        }
        if !self.excluded.is_empty() {
            write!(f, "; excluded: {}", self.excluded.join(", "))?;
        }
        Ok(())
    }
}

/// Organizations' only endpoint region in the partition of the org-reader role.
pub fn endpoint_region(org: &OrganizationConfig) -> &'static str {
    match org.partition() {
        "aws-cn" => "cn-northwest-1",
        "aws-us-gov" => "us-gov-west-1",
        _ => "us-east-1",
    }
}

/// Lists the accounts of the organization, or of `include_ous`, recursing into child OUs: one
/// ListAccountsForParent and one ListOrganizationalUnitsForParent per OU (all pages), and ListRoots
/// when no `include_ous` are given. Any failed call fails the discovery (a partial list is never
/// taken for the whole).
pub async fn discover(
    org: &dyn Organizations,
    config: &OrganizationConfig,
) -> Result<Discovery, AwsError> {
    let starts: Vec<OrgUnit> = if config.include_ous.is_empty() {
        org.list_roots().await?
    } else {
        config
            .include_ous
            .iter()
            .map(|id| OrgUnit {
                id: id.clone(),
                name: String::new(),
            })
            .collect()
    };
    let excluded: BTreeSet<&str> = config.exclude_accounts.iter().map(String::as_str).collect();
    let mut out = Discovery::default();
    let mut seen_accounts = BTreeSet::new();
    let mut seen_ous = BTreeSet::new();
    // Depth first, each OU once (overlapping include_ous are walked once).
    let mut stack: Vec<Vec<OrgUnit>> = starts.into_iter().rev().map(|u| vec![u]).collect();
    while let Some(path) = stack.pop() {
        let parent = path.last().expect("a path holds its OU").id.clone();
        if !seen_ous.insert(parent.clone()) {
            continue;
        }
        for a in org.list_accounts_for_parent(&parent).await? {
            if !seen_accounts.insert(a.id.clone()) {
                continue;
            }
            if excluded.contains(a.id.as_str()) {
                out.excluded.push(a.id);
            } else if a.status != "ACTIVE" {
                out.inactive.push((a.id, a.status));
            } else {
                out.accounts.push(OrgAccount {
                    id: a.id,
                    name: a.name,
                    path: path.clone(),
                });
            }
        }
        let mut children = org.list_ous_for_parent(&parent).await?;
        children.reverse();
        for child in children {
            let mut p = path.clone();
            p.push(child);
            stack.push(p);
        }
    }
    out.accounts.sort_by(|a, b| a.id.cmp(&b.id));
    out.inactive.sort();
    out.excluded.sort();
    Ok(out)
}

/// Accounts that appeared in `new` and disappeared from `old`, by ID.
pub fn diff<'a>(
    old: &'a [OrgAccount],
    new: &'a [OrgAccount],
) -> (Vec<&'a OrgAccount>, Vec<&'a OrgAccount>) {
    let old_ids: BTreeSet<&str> = old.iter().map(|a| a.id.as_str()).collect();
    let new_ids: BTreeSet<&str> = new.iter().map(|a| a.id.as_str()).collect();
    let added = new
        .iter()
        .filter(|a| !old_ids.contains(a.id.as_str()))
        .collect();
    let removed = old
        .iter()
        .filter(|a| !new_ids.contains(a.id.as_str()))
        .collect();
    (added, removed)
}

/// Where an account comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountSource {
    /// An `[accounts.NAME]` table; with its OU path when discovery found it too.
    Configured(Option<String>),
    /// Discovered, with its OU path.
    Discovered(String),
}

impl fmt::Display for AccountSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountSource::Configured(None) => f.write_str("configured"),
            AccountSource::Configured(Some(path)) => write!(f, "configured (organization: {path})"),
            AccountSource::Discovered(path) => write!(f, "organization: {path}"),
        }
    }
}

/// Every account of a configuration with what discovery found: the configured ones (by name), then
/// the discovered ones that are not configured, named by their ID. A discovered account whose ID is a
/// configured account's is that account (its role, regions and external ID are the configured ones).
pub fn accounts(config: &Config, discovered: &[OrgAccount]) -> Vec<(Account, AccountSource)> {
    let by_id: BTreeMap<&str, &OrgAccount> =
        discovered.iter().map(|a| (a.id.as_str(), a)).collect();
    let mut out: Vec<(Account, AccountSource)> = config
        .accounts
        .values()
        .map(|a| {
            let path = by_id.get(a.account_id.as_str()).map(|d| d.path_text());
            (a.clone(), AccountSource::Configured(path))
        })
        .collect();
    let Some(org) = &config.organization else {
        return out;
    };
    let configured_ids: BTreeSet<&str> = config
        .accounts
        .values()
        .map(|a| a.account_id.as_str())
        .collect();
    for d in discovered {
        if configured_ids.contains(d.id.as_str()) || config.accounts.contains_key(&d.id) {
            continue;
        }
        out.push((
            Account {
                name: d.id.clone(),
                role_arn: org.target_role_arn(&d.id),
                account_id: d.id.clone(),
                external_id: org.external_id.clone(),
                regions: org.regions.clone(),
            },
            AccountSource::Discovered(d.path_text()),
        ));
    }
    out
}

/// The names (in [`accounts`]) of the accounts `rule` selects, in name order, without repetitions.
pub fn selected(rule: &Rule, config: &Config, discovered: &[OrgAccount]) -> Vec<String> {
    if !rule.is_multi_account() {
        return vec![rule.account.clone()];
    }
    // The name each account ID goes by: a configured account's name, else the ID itself.
    let mut name_of: BTreeMap<&str, &str> = BTreeMap::new();
    for d in discovered {
        name_of.insert(&d.id, &d.id);
    }
    for a in config.accounts.values() {
        name_of.insert(&a.account_id, &a.name);
    }
    let discovered_names = || discovered.iter().map(|d| name_of[d.id.as_str()]);
    let mut out = BTreeSet::new();
    for s in &rule.accounts {
        match s {
            AccountSelector::Name(n) => {
                out.insert(n.as_str());
            }
            AccountSelector::Id(id) => {
                if let Some(n) = name_of.get(id.as_str()) {
                    out.insert(n);
                }
            }
            AccountSelector::Organization => out.extend(discovered_names()),
            AccountSelector::Ou(ou) => out.extend(
                discovered
                    .iter()
                    .filter(|d| d.is_under(ou))
                    .map(|d| name_of[d.id.as_str()]),
            ),
        }
    }
    out.into_iter().map(String::from).collect()
}

/// The configuration the daemon runs: `config` with the discovered accounts that some rule selects
/// added (see [`accounts`]; the others get no credentials) and each rule with `accounts` replaced by one rule per selected account (see [`selected`]), acting
/// in the rule's regions among that account's (all of them when the rule names none). A rule that
/// selects no account (yet) has no occurrence.
pub fn expand(config: &Config, discovered: &[OrgAccount]) -> Config {
    let all: BTreeMap<String, Account> = accounts(config, discovered)
        .into_iter()
        .map(|(a, _)| (a.name.clone(), a))
        .collect();
    let mut used: BTreeMap<String, Account> = config.accounts.clone();
    let mut rules = Vec::with_capacity(config.rules.len());
    for rule in &config.rules {
        if !rule.is_multi_account() {
            rules.push(rule.clone());
            continue;
        }
        for name in selected(rule, config, discovered) {
            let Some(account) = all.get(&name) else {
                continue;
            };
            let regions: Vec<String> = if rule.regions.is_empty() {
                account.regions.clone()
            } else {
                rule.regions
                    .iter()
                    .filter(|r| account.regions.contains(r))
                    .cloned()
                    .collect()
            };
            if regions.is_empty() {
                continue;
            }
            used.insert(name.clone(), account.clone());
            rules.push(Rule {
                account: name,
                regions,
                ..rule.clone()
            });
        }
    }
    Config {
        accounts: used,
        rules,
        ..config.clone()
    }
}

// ---------------------------------------------------------------------------------------------------------
// For the commands: `shiftd accounts`, `doctor`, `plan --accounts`
// ---------------------------------------------------------------------------------------------------------

/// Assumes `[organization]`'s org-reader role (as the daemon does, with its session name) and lists
/// the organization's accounts once. `Ok(None)` without `[organization]`.
pub async fn discover_now(
    config: &Config,
    aws: &dyn crate::aws::Aws,
    clock: &std::sync::Arc<dyn crate::clock::Clock>,
) -> Result<Option<Discovery>, String> {
    use crate::credentials::{self, AccountCredentials, SessionSpec};
    let Some(org) = &config.organization else {
        return Ok(None);
    };
    let region = endpoint_region(org);
    let spec = SessionSpec {
        role_arn: org.role_arn.clone(),
        external_id: org.external_id.clone(),
        session_name: credentials::session_name(&aws.delegate_name().await),
        duration: config.defaults.session_duration,
        refresh_before_expiry: config.defaults.refresh_before_expiry,
    };
    let store = AccountCredentials::new("organization", clock.clone());
    let sts = aws.sts(region).await;
    credentials::renew_once(sts.as_ref(), &spec, &store)
        .await
        .map_err(|e| format!("cannot assume the org-reader role {}: {e}", org.role_arn))?;
    let client = aws.organizations(region, std::sync::Arc::new(store)).await;
    discover(client.as_ref(), org)
        .await
        .map(Some)
        .map_err(|e| format!("cannot list the organization's accounts: {e}"))
}

/// `config` expanded over the organization's accounts listed now (`plan --accounts`).
pub async fn expand_live(
    config: &Config,
    connect: crate::aws::ConnectAws,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
) -> Result<Config, String> {
    let aws = connect(&config.credentials, crate::daemon::first_region(config));
    let discovered = discover_now(config, aws.as_ref(), &clock).await?;
    Ok(expand(config, &discovered.unwrap_or_default().accounts))
}

/// One account `shiftd accounts` lists: the documented, stable JSON of `--json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AccountRow {
    /// The name shiftd logs it under: the configured name, or the ID of a discovered account.
    pub name: String,
    pub account_id: String,
    /// `configured`, `configured (organization: Root/dev)` or `organization: Root/dev/team`.
    pub source: String,
    pub role_arn: String,
    pub regions: Vec<String>,
    /// The rules that act in it.
    pub rules: Vec<String>,
    /// With `--check`: whether the role could be assumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assumable: Option<bool>,
    /// With `--check`, when it could not: AssumeRole's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every account shiftd would act in (configured ones, and discovered ones some rule selects), with
/// its source, regions and rules.
pub fn rows(config: &Config, discovered: &[OrgAccount]) -> Vec<AccountRow> {
    let expanded = expand(config, discovered);
    let sources: BTreeMap<String, AccountSource> = accounts(config, discovered)
        .into_iter()
        .map(|(a, s)| (a.name, s))
        .collect();
    expanded
        .accounts
        .values()
        .map(|a| {
            let mut rules: Vec<String> = expanded
                .rules
                .iter()
                .filter(|r| r.account == a.name)
                .map(|r| r.name.clone())
                .collect();
            rules.dedup();
            AccountRow {
                name: a.name.clone(),
                account_id: a.account_id.clone(),
                source: sources
                    .get(&a.name)
                    .map_or("configured".to_string(), ToString::to_string),
                role_arn: a.role_arn.clone(),
                regions: a.regions.clone(),
                rules,
                assumable: None,
                error: None,
            }
        })
        .collect()
}

/// `shiftd accounts`: the rows, with `check` AssumeRole into each (16 at a time); the discovery's
/// error when it failed (the rows are then the configured accounts only).
pub async fn listing(
    config: &Config,
    connect: crate::aws::ConnectAws,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    check: bool,
) -> (Vec<AccountRow>, Option<String>) {
    use futures::StreamExt;
    let aws = connect(&config.credentials, crate::daemon::first_region(config));
    let (discovered, error) = match discover_now(config, aws.as_ref(), &clock).await {
        Ok(d) => (d.unwrap_or_default().accounts, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let mut rows = rows(config, &discovered);
    if check {
        let expanded = expand(config, &discovered);
        let results: BTreeMap<String, Option<String>> =
            futures::stream::iter(expanded.accounts.values().map(|a| {
                let aws = aws.clone();
                let clock = clock.clone();
                let config = &expanded;
                async move {
                    let store = crate::manual::assume(config, a, aws.as_ref(), &clock).await;
                    (a.name.clone(), store.last_error())
                }
            }))
            .buffer_unordered(16)
            .collect()
            .await;
        for r in &mut rows {
            let e = results.get(&r.name).cloned().flatten();
            r.assumable = Some(e.is_none());
            r.error = e;
        }
    }
    (rows, error)
}

/// The rows as text: one line per account, then its role check.
pub fn render(rows: &[AccountRow]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for r in rows {
        let _ = writeln!(
            out,
            "{}  {}  {}  regions: {}  rules: {}",
            r.name,
            r.account_id,
            r.source,
            r.regions.join(", "),
            if r.rules.is_empty() {
                "none".to_string()
            } else {
                r.rules.join(", ")
            }
        );
        match (&r.assumable, &r.error) {
            (Some(true), _) => {
                let _ = writeln!(out, "    ok    role {} can be assumed", r.role_arn);
            }
            (Some(false), e) => {
                let _ = writeln!(
                    out,
                    "    FAIL  role {} cannot be assumed: {}",
                    r.role_arn,
                    e.as_deref().unwrap_or("unknown error")
                );
            }
            (None, _) => {}
        }
    }
    let _ = writeln!(out, "{} account(s)", rows.len());
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::aws::fake::{self, FakeAws};
    use crate::aws::{Aws, SigningCredentials};
    use crate::clock::{Clock, SimulatedClock};

    const CONFIG: &str = r#"
[organization]
role_arn = "arn:aws:iam::999999999999:role/shiftd-org-reader"
target_role_name = "shiftd-target"
regions = ["ap-northeast-1", "us-east-1"]
exclude_accounts = ["444444444444"]

[accounts.account1]
role_arn = "arn:aws:iam::111111111111:role/account1-role-ec2"
regions = ["ap-northeast-1"]

[[rules]]
name = "dev"
accounts = ["ou:ou-root-dev00000", "account1"]
tags = { Schedule = "dev" }
stop = "0 21 * * *"

[[rules]]
name = "all-tokyo"
accounts = ["org:*"]
regions = ["ap-northeast-1"]
tags = { Schedule = "all" }
stop = "0 22 * * *"

[[rules]]
name = "one"
account = "account1"
tags = { Schedule = "one" }
stop = "0 23 * * *"
"#;

    fn config() -> Config {
        Config::parse(Path::new("t.toml"), CONFIG).unwrap()
    }

    fn unit(id: &str, name: &str) -> OrgUnit {
        OrgUnit {
            id: id.into(),
            name: name.into(),
        }
    }

    /// Root r-root: 111111111111 (account1), OU dev (222222222222, and OU team with 333333333333,
    /// 444444444444 excluded, 555555555555 suspended), OU prod (666666666666).
    fn organization(aws: &FakeAws) {
        aws.org_create("r-root");
        aws.org_add_account("r-root", "111111111111", "account1");
        aws.org_add_ou("r-root", "ou-root-dev00000", "dev");
        aws.org_add_ou("ou-root-dev00000", "ou-root-team0000", "team");
        aws.org_add_ou("r-root", "ou-root-prod0000", "prod");
        aws.org_add_account("ou-root-dev00000", "222222222222", "dev-a");
        aws.org_add_account("ou-root-team0000", "333333333333", "team-a");
        aws.org_add_account("ou-root-team0000", "444444444444", "team-excluded");
        aws.org_add_account("ou-root-team0000", "555555555555", "team-suspended");
        aws.org_set_status("555555555555", "SUSPENDED");
        aws.org_add_account("ou-root-prod0000", "666666666666", "prod-a");
    }

    async fn reader(aws: &FakeAws, clock: &Arc<dyn Clock>) -> Arc<dyn Organizations> {
        let store = crate::credentials::AccountCredentials::new("organization", clock.clone());
        let spec = crate::credentials::SessionSpec {
            role_arn: "arn:aws:iam::999999999999:role/shiftd-org-reader".into(),
            external_id: None,
            session_name: "shiftd-test".into(),
            duration: std::time::Duration::from_secs(3600),
            refresh_before_expiry: std::time::Duration::from_secs(600),
        };
        let sts = aws.sts("us-east-1").await;
        crate::credentials::renew_once(sts.as_ref(), &spec, &store)
            .await
            .unwrap();
        let signing: Arc<dyn SigningCredentials> = Arc::new(store);
        aws.organizations("us-east-1", signing).await
    }

    fn ids(accounts: &[OrgAccount]) -> Vec<&str> {
        accounts.iter().map(|a| a.id.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn discovery_walks_nested_ous_and_keeps_active_accounts_less_the_excluded() {
        let clock: Arc<dyn Clock> = Arc::new(SimulatedClock::starting_at(
            "2026-12-01T00:00:00Z".parse().unwrap(),
        ));
        let aws = FakeAws::new(clock.clone());
        organization(&aws);
        let org = reader(&aws, &clock).await;
        let c = config();
        let d = discover(org.as_ref(), c.organization.as_ref().unwrap())
            .await
            .unwrap();
        assert_eq!(
            ids(&d.accounts),
            [
                "111111111111",
                "222222222222",
                "333333333333",
                "666666666666"
            ]
        );
        assert_eq!(d.excluded, ["444444444444"]);
        assert_eq!(
            d.inactive,
            [("555555555555".to_string(), "SUSPENDED".to_string())]
        );
        let team = d.accounts.iter().find(|a| a.id == "333333333333").unwrap();
        assert_eq!(team.path_text(), "Root/dev/team");
        assert!(team.is_under("ou-root-dev00000") && team.is_under("r-root"));
        // One call per OU, and the calls name the org-reader's account.
        assert_eq!(aws.calls_of(fake::LIST_ROOTS).len(), 1);
        assert_eq!(aws.calls_of(fake::LIST_ACCOUNTS_FOR_PARENT).len(), 4);
        assert_eq!(aws.calls_of(fake::LIST_OUS_FOR_PARENT).len(), 4);
        assert!(
            aws.calls_of(fake::LIST_ROOTS)
                .iter()
                .all(|c| c.account == "999999999999")
        );

        // include_ous: only below them, walked once however they overlap, without ListRoots.
        let mut only_dev = c.organization.clone().unwrap();
        only_dev.include_ous = vec!["ou-root-dev00000".into(), "ou-root-team0000".into()];
        let d = discover(org.as_ref(), &only_dev).await.unwrap();
        assert_eq!(ids(&d.accounts), ["222222222222", "333333333333"]);
        assert_eq!(
            d.accounts[1].path_text(),
            "ou-root-dev00000/team",
            "IDs where no name is known"
        );
        assert_eq!(aws.calls_of(fake::LIST_ROOTS).len(), 1);

        // Any failed call fails the whole discovery.
        aws.fault(
            fake::LIST_OUS_FOR_PARENT,
            1,
            FakeAws::error(
                fake::LIST_OUS_FOR_PARENT,
                "TooManyRequestsException",
                "slow down",
            ),
        );
        let e = discover(org.as_ref(), c.organization.as_ref().unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("TooManyRequestsException"));
    }

    fn found(id: &str, path: &[(&str, &str)]) -> OrgAccount {
        OrgAccount {
            id: id.into(),
            name: format!("name-{id}"),
            path: path.iter().map(|(i, n)| unit(i, n)).collect(),
        }
    }

    fn discovered() -> Vec<OrgAccount> {
        let root = ("r-root", "Root");
        let dev = ("ou-root-dev00000", "dev");
        vec![
            found("111111111111", &[root]),
            found("222222222222", &[root, dev]),
            found("333333333333", &[root, dev, ("ou-root-team0000", "team")]),
            found("666666666666", &[root, ("ou-root-prod0000", "prod")]),
        ]
    }

    #[test]
    fn a_multi_account_rule_becomes_one_rule_per_selected_account() {
        let c = config();
        let e = expand(&c, &discovered());
        // account1 is configured and discovered: it keeps its name and role. Only accounts some rule
        // selects are added.
        let names: Vec<&str> = e.accounts.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["222222222222", "333333333333", "666666666666", "account1"]
        );
        assert_eq!(
            e.accounts["333333333333"].role_arn,
            "arn:aws:iam::333333333333:role/shiftd-target"
        );
        assert_eq!(
            e.accounts["333333333333"].regions,
            ["ap-northeast-1", "us-east-1"]
        );
        assert_eq!(
            e.accounts["account1"].role_arn,
            "arn:aws:iam::111111111111:role/account1-role-ec2"
        );
        let rules: Vec<(&str, &str, Vec<String>)> = e
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.account.as_str(), r.regions.clone()))
            .collect();
        let both = || vec!["ap-northeast-1".to_string(), "us-east-1".to_string()];
        let tokyo = || vec!["ap-northeast-1".to_string()];
        assert_eq!(
            rules,
            [
                ("dev", "222222222222", both()),
                ("dev", "333333333333", both()),
                ("dev", "account1", tokyo()),
                ("all-tokyo", "222222222222", tokyo()),
                ("all-tokyo", "333333333333", tokyo()),
                ("all-tokyo", "666666666666", tokyo()),
                ("all-tokyo", "account1", tokyo()),
                ("one", "account1", tokyo()),
            ]
        );
        assert!(e.rules.iter().all(|r| !r.is_multi_account()));

        // Nothing discovered (yet): the multi-account rules act in their configured accounts only.
        let e = expand(&c, &[]);
        let rules: Vec<(&str, &str)> = e
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.account.as_str()))
            .collect();
        assert_eq!(rules, [("dev", "account1"), ("one", "account1")]);
        assert_eq!(e.accounts.len(), 1);
    }

    #[test]
    fn ids_select_configured_or_discovered_accounts() {
        let text = CONFIG.replace(
            "accounts = [\"ou:ou-root-dev00000\", \"account1\"]",
            "accounts = [\"111111111111\", \"666666666666\", \"777777777777\"]",
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let rule = &c.rules[0];
        assert_eq!(
            selected(rule, &c, &discovered()),
            ["666666666666", "account1"],
            "777777777777 is not in the organization"
        );
    }

    #[test]
    fn accounts_say_where_they_come_from() {
        let c = config();
        let rows = accounts(&c, &discovered());
        let shown: Vec<(String, String)> = rows
            .iter()
            .map(|(a, s)| (a.name.clone(), s.to_string()))
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "account1".to_string(),
                    "configured (organization: Root)".to_string()
                ),
                (
                    "222222222222".to_string(),
                    "organization: Root/dev".to_string()
                ),
                (
                    "333333333333".to_string(),
                    "organization: Root/dev/team".to_string()
                ),
                (
                    "666666666666".to_string(),
                    "organization: Root/prod".to_string()
                ),
            ]
        );
    }

    #[test]
    fn diff_tells_added_and_removed_accounts() {
        let old = discovered();
        let mut new = discovered();
        new.remove(1);
        new.push(found("777777777777", &[("r-root", "Root")]));
        let (added, removed) = diff(&old, &new);
        assert_eq!(
            added.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["777777777777"]
        );
        assert_eq!(
            removed.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["222222222222"]
        );
        let (added, removed) = diff(&old, &old);
        assert!(added.is_empty() && removed.is_empty());
    }
}
