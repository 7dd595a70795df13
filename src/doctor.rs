//! `shiftd doctor`: live checks of the cross-account setup, in the order things depend on each other,
//! each printed as ok / warn / FAIL with what to do about a failure. Acts on nothing: Start/Stop are
//! only tried with `DryRun`.

use std::collections::BTreeSet;
use std::fmt::Write;

use std::sync::Arc;

use crate::aws::{Aws, ConnectAws, Ec2};
use crate::clock::Clock;
use crate::config::{Account, Action, Config, CredentialSource, Rule};
use crate::credentials::{self, AccountCredentials, SessionSpec};
use crate::policy::{self, Delegate};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Default)]
pub struct Report {
    text: String,
    failures: usize,
    warnings: usize,
    /// The accounts whose role could not be assumed.
    role_missing: Vec<String>,
}

impl Report {
    fn line(&mut self, verdict: Verdict, what: impl AsRef<str>, fix: Option<String>) {
        let tag = match verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => {
                self.warnings += 1;
                "warn"
            }
            Verdict::Fail => {
                self.failures += 1;
                "FAIL"
            }
        };
        let _ = writeln!(self.text, "{tag}  {}", what.as_ref());
        if let Some(fix) = fix {
            for l in fix.lines() {
                let _ = writeln!(self.text, "      {l}");
            }
        }
        // Shown as it goes: some checks wait on the network.
        // A reader that went away (`shiftd doctor | head`) is not a reason to panic.
        let mut out = std::io::stdout().lock();
        let _ = std::io::Write::write_all(&mut out, std::mem::take(&mut self.text).as_bytes())
            .and_then(|()| std::io::Write::flush(&mut out));
    }

    /// The accounts whose role could not be assumed (with `[organization]`, a summary line names them).
    pub fn role_missing(&self) -> &[String] {
        &self.role_missing
    }

    pub fn failures(&self) -> usize {
        self.failures
    }

    pub fn warnings(&self) -> usize {
        self.warnings
    }
}

/// Runs every check and prints each as it completes.
pub async fn run(config: &Config, connect: ConnectAws, clock: Arc<dyn Clock>) -> Report {
    let mut report = Report::default();
    check_calendars(&mut report, config, clock.now().date_naive());
    let first_region = crate::daemon::first_region(config);
    let aws = connect(&config.credentials, first_region);
    if !check_base_credentials(&mut report, config, aws.as_ref()).await {
        return report;
    }
    let delegate = check_identity(&mut report, aws.as_ref(), first_region).await;
    check_claim_table(&mut report, config, aws.as_ref(), &clock).await;
    let expanded = check_organization(&mut report, config, aws.as_ref(), &clock).await;
    let config = &expanded;
    let session_name = credentials::session_name(&aws.delegate_name().await);
    for account in config.accounts.values() {
        let spec = SessionSpec::new(
            account,
            &session_name,
            config.defaults.session_duration,
            config.defaults.refresh_before_expiry,
        );
        let Some(store) = check_assume_role(
            &mut report,
            aws.as_ref(),
            account,
            &spec,
            delegate.as_ref(),
            &clock,
        )
        .await
        else {
            report.role_missing.push(account.name.clone());
            continue;
        };
        for region in &account.regions {
            let ec2 = aws.ec2(region, Arc::new(store.clone())).await;
            let place = format!("{}/{region}", account.name);
            if !check_instance_status(&mut report, ec2.as_ref(), account, &place).await {
                continue;
            }
            for rule in config
                .rules
                .iter()
                .filter(|r| r.account == account.name && r.regions.contains(region))
            {
                let ids =
                    check_selection(&mut report, ec2.as_ref(), rule, &place, clock.now()).await;
                if !ids.is_empty() {
                    check_permissions(&mut report, ec2.as_ref(), account, rule, &place, &ids).await;
                }
            }
        }
    }
    if config.organization.is_some() && !report.role_missing.is_empty() {
        let missing = report.role_missing.join(", ");
        report.line(
            Verdict::Fail,
            format!(
                "the role cannot be assumed in {} account(s): {missing}",
                report.role_missing.len(),
            ),
            Some(
                "deploy the target role there: `shiftd policy --stackset --delegate-account ID` \
                 prints a CloudFormation template for a service-managed StackSet"
                    .to_string(),
            ),
        );
    }
    report
}

/// With `[organization]`: lists the organization's accounts as the daemon does. Returns the
/// configuration with them (`org::expand`): the configured accounts only when listing fails.
async fn check_organization(
    report: &mut Report,
    config: &Config,
    aws: &dyn Aws,
    clock: &Arc<dyn Clock>,
) -> Config {
    match crate::org::discover_now(config, aws, clock).await {
        Ok(None) => crate::org::expand(config, &[]),
        Ok(Some(d)) => {
            report.line(Verdict::Ok, format!("organization: {d}"), None);
            crate::org::expand(config, &d.accounts)
        }
        Err(e) => {
            report.line(
                Verdict::Fail,
                e,
                Some(
                    "the org-reader role must trust the delegate and allow the Organizations calls \
                     `shiftd policy --org` prints"
                        .to_string(),
                ),
            );
            crate::org::expand(config, &[])
        }
    }
}

/// Check 1: the delegate's own credentials: IMDSv2 and its instance profile, or the configured profile.
async fn check_base_credentials(report: &mut Report, config: &Config, aws: &dyn Aws) -> bool {
    match &config.credentials {
        CredentialSource::Imds => match aws.instance_profile_role().await {
            Ok(Some(role)) => report.line(Verdict::Ok, format!("IMDSv2 reachable; instance profile role: {role}"), None),
            Ok(None) => report.line(
                Verdict::Fail,
                "IMDSv2 answers, but no instance profile role is attached to this instance",
                Some("attach an instance profile whose role may call sts:AssumeRole on the target roles \
                      (`shiftd policy` prints that policy)".into()),
            ),
            Err(e) => report.line(
                Verdict::Fail,
                format!("IMDSv2 not reachable: {e}"),
                Some("shiftd must run on an EC2 instance with IMDSv2 enabled (and a hop limit of 2 or more \
                      inside a container), or use [credentials] source = \"profile\"".into()),
            ),
        },
        // The profile's chain is checked by resolving its credentials, below.
        CredentialSource::Profile(_) => {}
    }
    if let Err(e) = aws.check_base_credentials().await {
        let what = match &config.credentials {
            CredentialSource::Imds => "instance profile credentials".to_string(),
            CredentialSource::Profile(p) => format!("credentials of AWS profile {p:?}"),
        };
        report.line(
            Verdict::Fail,
            format!("{what} could not be loaded: {e}"),
            Some("nothing below can work without them".into()),
        );
        return false;
    }
    if let CredentialSource::Profile(p) = &config.credentials {
        report.line(
            Verdict::Ok,
            format!("credentials of AWS profile {p:?} resolve"),
            None,
        );
    }
    true
}

/// Check 2: who the delegate is (GetCallerIdentity), as a trust policy principal.
async fn check_identity(report: &mut Report, aws: &dyn Aws, region: &str) -> Option<Delegate> {
    match aws.sts(region).await.caller_identity().await {
        Ok((account, arn)) => {
            report.line(
                Verdict::Ok,
                format!("delegate identity: account {account}, {arn}"),
                None,
            );
            Some(delegate_from_identity(&account, &arn))
        }
        Err(e) => {
            report.line(
                Verdict::Fail,
                format!("sts:GetCallerIdentity failed: {e}"),
                Some("the base credentials are not accepted by STS".into()),
            );
            None
        }
    }
}

/// Check 3: AssumeRole into one target account: its credentials, or what to fix on which side.
async fn check_assume_role(
    report: &mut Report,
    aws: &dyn Aws,
    account: &Account,
    spec: &SessionSpec,
    delegate: Option<&Delegate>,
    clock: &Arc<dyn Clock>,
) -> Option<AccountCredentials> {
    let sts = aws.sts(&account.regions[0]).await;
    match sts.assume_role(&spec.request()).await {
        Ok(creds) => {
            report.line(
                Verdict::Ok,
                format!(
                    "{}: AssumeRole {} as session {}",
                    account.name, account.role_arn, spec.session_name
                ),
                None,
            );
            let store = AccountCredentials::new(&account.name, clock.clone());
            let expiry = creds.expiry;
            store.publish(creds, expiry);
            Some(store)
        }
        Err(e) => {
            let fix = assume_role_fix(account, delegate, e.code());
            report.line(
                Verdict::Fail,
                format!(
                    "{}: AssumeRole {} failed: {e}",
                    account.name, account.role_arn
                ),
                Some(fix),
            );
            None
        }
    }
}

/// Check 4: the walkthrough's final check: DescribeInstanceStatus in one region.
async fn check_instance_status(
    report: &mut Report,
    ec2: &dyn Ec2,
    account: &Account,
    place: &str,
) -> bool {
    match ec2.count_instance_status().await {
        Ok(n) => {
            report.line(
                Verdict::Ok,
                format!("{place}: DescribeInstanceStatus lists {n} instance(s)"),
                None,
            );
            true
        }
        Err(e) => {
            report.line(
                Verdict::Fail,
                format!("{place}: DescribeInstanceStatus failed: {e}"),
                Some(format!("the role needs ec2:DescribeInstanceStatus and ec2:DescribeInstances (`shiftd policy --account {}`)", account.name)),
            );
            false
        }
    }
}

/// Check 5: a rule's selection in one region: listed instances found, tags matching something. Returns the
/// IDs it selects there.
async fn check_selection(
    report: &mut Report,
    ec2: &dyn Ec2,
    rule: &Rule,
    place: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<String> {
    let found = match ec2.describe_selection(&rule.selection).await {
        Ok(v) => v,
        Err(e) => {
            report.line(
                Verdict::Fail,
                format!("{place}: rule {}: DescribeInstances failed: {e}", rule.name),
                None,
            );
            return Vec::new();
        }
    };
    let ids: Vec<String> = found.iter().map(|v| v.id.clone()).collect();
    check_overrides(report, rule, place, &found, now);
    if !rule.selection.instance_ids.is_empty() {
        let present: BTreeSet<&String> = ids.iter().collect();
        let missing: Vec<&str> = rule
            .selection
            .instance_ids
            .iter()
            .filter(|i| !present.contains(i))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            report.line(
                Verdict::Ok,
                format!(
                    "{place}: rule {}: all {} listed instance(s) found",
                    rule.name,
                    rule.selection.instance_ids.len()
                ),
                None,
            );
        } else {
            // With several regions, an ID lives in one of them: a warning per region, not a failure.
            let verdict = if rule.regions.len() > 1 {
                Verdict::Warn
            } else {
                Verdict::Fail
            };
            report.line(
                verdict,
                format!(
                    "{place}: rule {}: not found here{}: {}",
                    rule.name,
                    if rule.selection.tags.is_empty() {
                        ""
                    } else {
                        " (or without the rule's tags)"
                    },
                    missing.join(", ")
                ),
                Some("check the IDs, the account and the regions of the rule".into()),
            );
        }
    }
    if !rule.selection.tags.is_empty() {
        let verdict = if ids.is_empty() {
            Verdict::Warn
        } else {
            Verdict::Ok
        };
        report.line(
            verdict,
            format!(
                "{place}: rule {}: selection {} matches {} instance(s)",
                rule.name,
                rule.selection,
                ids.len()
            ),
            None,
        );
    }
    ids
}

/// The override tags in force on the selected instances: each instance shiftd leaves alone, and why; a
/// value that does not parse is a warning.
fn check_overrides(
    report: &mut Report,
    rule: &Rule,
    place: &str,
    found: &[crate::planner::InstanceView],
    now: chrono::DateTime<chrono::Utc>,
) {
    for v in found {
        let Some(held) = crate::planner::override_in_force(&v.tags, now, rule.timezone) else {
            continue;
        };
        let (verdict, fix) = if held.unreadable {
            (
                Verdict::Warn,
                Some(format!(
                    "fix or remove the tag: {} takes {}",
                    held.tag,
                    if held.tag == crate::planner::SKIP_TAG {
                        "\"true\""
                    } else {
                        "an RFC 3339 time or a YYYY-MM-DD date"
                    }
                )),
            )
        } else {
            (Verdict::Ok, None)
        };
        report.line(
            verdict,
            format!("{place}: rule {}: {} {}", rule.name, v.id, held.reason()),
            fix,
        );
    }
}

/// `[cluster]`: the claim table exists with the right key and takes a conditional write (one made to
/// fail its condition on a key that does not exist: it proves the permission and writes nothing).
async fn check_claim_table(
    report: &mut Report,
    config: &Config,
    aws: &dyn Aws,
    clock: &Arc<dyn Clock>,
) {
    use crate::cluster::{ClaimKey, TableSetup};
    let Some(cluster) = &config.cluster else {
        return;
    };
    let place = format!("cluster table {} in {}", cluster.table, cluster.region);
    let table = aws.claim_table(&cluster.table, &cluster.region).await;
    match table.check_table().await {
        Ok(TableSetup::Exists | TableSetup::Created) => {}
        Ok(TableSetup::Missing) => {
            report.line(
                Verdict::Fail,
                format!("{place}: does not exist"),
                Some("create it: shiftd cluster init --config FILE".into()),
            );
            return;
        }
        Ok(TableSetup::WrongSchema(why)) => {
            report.line(
                Verdict::Fail,
                format!("{place}: {why}"),
                Some(
                    "name another table in [cluster], and create it with shiftd cluster init"
                        .into(),
                ),
            );
            return;
        }
        Err(e) => {
            report.line(
                Verdict::Fail,
                format!("{place}: DescribeTable failed: {e}"),
                Some("`shiftd policy` prints the delegate's DynamoDB statement".into()),
            );
            return;
        }
    }
    let probe = ClaimKey {
        rule: "shiftd-doctor-probe".into(),
        action: "probe".into(),
        at: clock.now(),
        account: "-".into(),
        region: cluster.region.clone(),
    };
    match table.extend(&probe, "shiftd-doctor", clock.now()).await {
        Ok(false) => report.line(
            Verdict::Ok,
            format!("{place}: exists with the right key and takes conditional writes"),
            None,
        ),
        Ok(true) => report.line(
            Verdict::Warn,
            format!("{place}: a conditional write that should have failed its condition succeeded"),
            None,
        ),
        Err(e) => report.line(
            Verdict::Fail,
            format!("{place}: a conditional UpdateItem failed: {e}"),
            Some("`shiftd policy` prints the delegate's DynamoDB statement".into()),
        ),
    }
}

/// Calendars with no date in the coming 365 days: usually a holiday file nobody renewed, so that the
/// rules skipping it act on next year's holidays.
fn check_calendars(report: &mut Report, config: &Config, today: chrono::NaiveDate) {
    let horizon = today + chrono::Duration::days(365);
    for calendar in config.calendars.values() {
        if calendar.dates.range(today..=horizon).next().is_none() {
            let last = calendar
                .dates
                .iter()
                .next_back()
                .map_or("none".to_string(), |d| d.to_string());
            report.line(
                Verdict::Warn,
                format!(
                    "calendar {}: no date in the next 365 days (last date: {last})",
                    calendar.name
                ),
                Some("add next year's dates (a stale holiday file?)".into()),
            );
        }
    }
}

/// Check 6: permission to act, without acting: Start/Stop with DryRun for the rule's actions.
async fn check_permissions(
    report: &mut Report,
    ec2: &dyn Ec2,
    account: &Account,
    rule: &Rule,
    place: &str,
    ids: &[String],
) {
    for action in [Action::Start, Action::Stop] {
        if rule.schedules(action).is_empty() {
            continue;
        }
        let api = if action == Action::Start {
            "StartInstances"
        } else {
            "StopInstances"
        };
        match ec2.change_state(action, ids, true, false).await {
            Ok(()) => report.line(Verdict::Ok, format!("{place}: rule {}: {api} allowed on {} instance(s) (DryRun)", rule.name, ids.len()), None),
            Err(e) => report.line(
                Verdict::Fail,
                format!("{place}: rule {}: {api} (DryRun) refused: {e}", rule.name),
                Some(format!("the target role needs ec2:{api} on these instances: `shiftd policy --account {}` prints the statement", account.name)),
            ),
        }
    }
}

/// The delegate as a trust policy principal: its role ARN when the identity is an assumed role.
fn delegate_from_identity(account: &str, arn: &str) -> Delegate {
    // arn:aws:sts::123456789012:assumed-role/ROLE/SESSION -> arn:aws:iam::123456789012:role/ROLE
    let parts: Vec<&str> = arn.split(':').collect();
    if parts.len() == 6
        && parts[2] == "sts"
        && let Some(rest) = parts[5].strip_prefix("assumed-role/")
        && let Some((role, _session)) = rest.rsplit_once('/')
    {
        return Delegate::Role(format!("arn:{}:iam::{}:role/{role}", parts[1], parts[4]));
    }
    Delegate::Account(account.to_string())
}

/// What to do about a failed AssumeRole, with the exact statements each side needs.
fn assume_role_fix(account: &Account, delegate: Option<&Delegate>, code: Option<&str>) -> String {
    let delegate_side =
        serde_json::to_string_pretty(&policy::delegate_policy(&[account]).json).expect("json");
    let mut fix = String::new();
    if code == Some("AccessDenied") {
        let _ = writeln!(
            fix,
            "AccessDenied has two possible causes; check both sides:"
        );
    }
    match delegate {
        Some(d) => {
            let trust =
                serde_json::to_string_pretty(&policy::trust_policy(account, d).json).expect("json");
            let _ = writeln!(
                fix,
                "1. the target role's trust policy (in account {}) must allow the delegate:\n{trust}",
                account.account_id
            );
        }
        None => {
            let _ = writeln!(
                fix,
                "1. the target role's trust policy (in account {}) must allow the delegate account",
                account.account_id
            );
        }
    }
    let _ = writeln!(
        fix,
        "2. the delegate's instance role must be allowed sts:AssumeRole on the role:\n{delegate_side}"
    );
    if account.external_id.is_some() {
        let _ = writeln!(
            fix,
            "3. the external_id in shiftd.toml must equal the trust policy's sts:ExternalId"
        );
    }
    fix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_denied_names_both_sides_with_their_statements() {
        let account = crate::config::Account {
            name: "account1".into(),
            role_arn: "arn:aws:iam::111111111111:role/account1-role-ec2".into(),
            account_id: "111111111111".into(),
            external_id: Some("xid-123".into()),
            regions: vec!["ap-northeast-1".into()],
        };
        let delegate = Delegate::Role("arn:aws:iam::123456789012:role/shiftd-delegate".into());
        let fix = assume_role_fix(&account, Some(&delegate), Some("AccessDenied"));
        assert!(
            fix.starts_with("AccessDenied has two possible causes"),
            "{fix}"
        );
        assert!(
            fix.contains("trust policy (in account 111111111111)"),
            "{fix}"
        );
        assert!(
            fix.contains("\"AWS\": \"arn:aws:iam::123456789012:role/shiftd-delegate\""),
            "{fix}"
        );
        assert!(fix.contains("\"sts:ExternalId\": \"xid-123\""), "{fix}");
        assert!(
            fix.contains(
                "\"Resource\": [\n        \"arn:aws:iam::111111111111:role/account1-role-ec2\""
            ),
            "{fix}"
        );
        assert!(
            fix.contains("external_id in shiftd.toml must equal"),
            "{fix}"
        );
    }

    #[test]
    fn delegate_principal_from_caller_identity() {
        let cases = [
            (
                "arn:aws:sts::123456789012:assumed-role/shiftd-delegate/i-0123456789abcdef0",
                Delegate::Role("arn:aws:iam::123456789012:role/shiftd-delegate".into()),
            ),
            (
                "arn:aws-cn:sts::123456789012:assumed-role/r/s",
                Delegate::Role("arn:aws-cn:iam::123456789012:role/r".into()),
            ),
            (
                "arn:aws:iam::123456789012:user/alice",
                Delegate::Account("123456789012".into()),
            ),
        ];
        for (arn, want) in cases {
            assert_eq!(delegate_from_identity("123456789012", arn), want, "{arn}");
        }
    }
}
