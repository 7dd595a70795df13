//! `shiftd policy`: the IAM policy documents a configuration needs, derived from it (pure).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::config::{Account, Action, Config};

/// Who the delegate is, for the target roles' trust policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delegate {
    /// The delegate account: any principal of it that its own IAM allows (`arn:aws:iam::ID:root`).
    Account(String),
    /// The delegate instance's role: only it.
    Role(String),
}

impl Delegate {
    fn principal(&self) -> String {
        match self {
            Delegate::Account(id) => format!("arn:aws:iam::{id}:root"),
            Delegate::Role(arn) => arn.clone(),
        }
    }
}

/// A policy document with a one-line title saying where it goes.
#[derive(Clone, Debug)]
pub struct Document {
    pub title: String,
    pub json: Value,
    /// Things to know that a policy document cannot say.
    pub notes: Vec<String>,
}

fn doc(statements: Vec<Value>) -> Value {
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// The partition of an ARN (`aws`, `aws-cn`, `aws-us-gov`).
fn partition(role_arn: &str) -> &str {
    role_arn.split(':').nth(1).unwrap_or("aws")
}

/// The trust policy of `account`'s role: the delegate may assume it (with the external ID, if any).
pub fn trust_policy(account: &Account, delegate: &Delegate) -> Document {
    let mut statement = json!({
        "Sid": "ShiftdDelegateAssumesRole",
        "Effect": "Allow",
        "Principal": { "AWS": delegate.principal() },
        "Action": "sts:AssumeRole",
    });
    if let Some(x) = &account.external_id {
        statement["Condition"] = json!({ "StringEquals": { "sts:ExternalId": x } });
    }
    Document {
        title: format!("{}: trust policy of {}", account.name, account.role_arn),
        json: doc(vec![statement]),
        notes: Vec::new(),
    }
}

/// The least-privilege permission policy of `account`'s role for the rules that use it.
pub fn permission_policy(config: &Config, account: &Account) -> Document {
    let p = partition(&account.role_arn);
    let mut statements = vec![json!({
        "Sid": "ShiftdDescribe",
        "Effect": "Allow",
        // Describe calls do not support resource-level permissions.
        "Action": ["ec2:DescribeInstances", "ec2:DescribeInstanceStatus"],
        "Resource": "*",
    })];
    // Instance-ID selections: per action, the exact instance ARNs in the rules' regions.
    let mut by_id: BTreeMap<Action, BTreeSet<String>> = BTreeMap::new();
    let mut tag_statements: Vec<(&str, Value)> = Vec::new();
    for rule in config.rules.iter().filter(|r| r.account == account.name) {
        let actions: Vec<Action> = [Action::Start, Action::Stop]
            .into_iter()
            .filter(|a| !rule.schedules(*a).is_empty())
            .collect();
        let iam_actions: Vec<String> = actions
            .iter()
            .map(|a| match a {
                Action::Start => "ec2:StartInstances".to_string(),
                Action::Stop => "ec2:StopInstances".to_string(),
            })
            .collect();
        let arns = |id: &str| -> Vec<String> {
            rule.regions
                .iter()
                .map(|r| format!("arn:{p}:ec2:{r}:{}:instance/{id}", account.account_id))
                .collect()
        };
        if rule.selection.tags.is_empty() {
            for a in &actions {
                let set = by_id.entry(*a).or_default();
                for id in &rule.selection.instance_ids {
                    set.extend(arns(id));
                }
            }
        } else {
            let resources: Vec<String> = if rule.selection.instance_ids.is_empty() {
                arns("*")
            } else {
                rule.selection
                    .instance_ids
                    .iter()
                    .flat_map(|id| arns(id))
                    .collect()
            };
            let conditions: serde_json::Map<String, Value> = rule
                .selection
                .tags
                .iter()
                .map(|(k, v)| (format!("aws:ResourceTag/{k}"), json!(v)))
                .collect();
            tag_statements.push((
                rule.name.as_str(),
                json!({
                    "Effect": "Allow",
                    "Action": iam_actions,
                    "Resource": resources,
                    // StringLike: tag values may use EC2 filter wildcards (* and ?), which IAM shares.
                    "Condition": { "StringLike": Value::Object(conditions) },
                }),
            ));
        }
    }
    for (action, arns) in by_id {
        let (sid, iam) = match action {
            Action::Start => ("ShiftdStartListedInstances", "ec2:StartInstances"),
            Action::Stop => ("ShiftdStopListedInstances", "ec2:StopInstances"),
        };
        statements.push(json!({
            "Sid": sid,
            "Effect": "Allow",
            "Action": iam,
            "Resource": arns.into_iter().collect::<Vec<_>>(),
        }));
    }
    let names: Vec<&str> = tag_statements.iter().map(|(name, _)| *name).collect();
    let fixed: Vec<&str> = statements
        .iter()
        .filter_map(|st| st["Sid"].as_str())
        .collect();
    let sids = rule_sids(&names, &fixed);
    for ((_, mut statement), sid) in tag_statements.into_iter().zip(sids) {
        // The Sid first, as in the other statements.
        let mut with_sid = serde_json::Map::new();
        with_sid.insert("Sid".into(), json!(sid));
        with_sid.append(statement.as_object_mut().expect("a statement is an object"));
        statements.push(Value::Object(with_sid));
    }
    Document {
        title: format!(
            "{}: permission policy of {}",
            account.name, account.role_arn
        ),
        json: doc(statements),
        notes: vec![
            "instances whose EBS volumes are encrypted with a customer-managed KMS key also need \
             kms:CreateGrant on that key (with kms:GrantIsForAWSResource = true) for this role; \
             without it they fall back to stopped right after a start"
                .to_string(),
        ],
    }
}

/// The statement IDs of rules named `names` in one document that already has statements `taken`.
///
/// IAM wants a Sid of ASCII letters and digits, unique in its document. A rule's Sid is `ShiftdRule` and
/// its name's letters and digits, which can be the same for different names (`dev-a`, `dev.a`, `deva`).
/// Then every rule of the clash gets an 8-hex-digit hash of its full name appended, except one whose
/// name is all letters and digits (`deva`). The hash does not depend on the other rules, so a rule's
/// Sid only changes when a new clash appears. Sids are compared ignoring case; a counter settles any
/// clash left (a hash collision, or a name that happens to spell another rule's hashed Sid).
fn rule_sids(names: &[&str], taken: &[&str]) -> Vec<String> {
    /// Rule names are at most 64 characters; a longer one is cut (and counts as having lost some).
    const MAX_NAME: usize = 64;
    let kept = |name: &str| -> String {
        name.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(MAX_NAME)
            .collect()
    };
    let base = |name: &str| format!("ShiftdRule{}", kept(name));
    let mut clashes: BTreeMap<String, usize> = BTreeMap::new();
    for name in names {
        *clashes.entry(base(name).to_ascii_lowercase()).or_default() += 1;
    }
    // Among the names sharing a base, one that is its own letters and digits keeps the bare base,
    // unless another such name differs from it only in case.
    let mut exact: BTreeMap<String, usize> = BTreeMap::new();
    for name in names.iter().filter(|n| kept(n) == **n) {
        *exact.entry(base(name).to_ascii_lowercase()).or_default() += 1;
    }
    let mut used: BTreeSet<String> = taken.iter().map(|t| t.to_ascii_lowercase()).collect();
    names
        .iter()
        .map(|name| {
            let base = base(name);
            let key = base.to_ascii_lowercase();
            let alone = clashes[&key] == 1 && !used.contains(&key);
            let bare = alone || (kept(name) == *name && exact[&key] == 1 && !used.contains(&key));
            let candidate = if bare {
                base
            } else {
                format!("{base}{:08X}", fnv1a(name.as_bytes()))
            };
            let mut sid = candidate.clone();
            let mut n = 2;
            while used.contains(&sid.to_ascii_lowercase()) {
                sid = format!("{candidate}{n}");
                n += 1;
            }
            used.insert(sid.to_ascii_lowercase());
            sid
        })
        .collect()
}

/// 32-bit FNV-1a: a small hash whose value is fixed by its definition, so Sids are stable across
/// builds (the standard library's hashers may change).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// The delegate instance role's permission policy: AssumeRole on exactly the configured roles (and,
/// with `[organization]`, the org-reader role and the target role in every account).
pub fn delegate_policy(accounts: &[&Account]) -> Document {
    let roles: BTreeSet<&str> = accounts.iter().map(|a| a.role_arn.as_str()).collect();
    delegate_policy_for(roles.into_iter().map(String::from).collect())
}

fn delegate_policy_for(roles: BTreeSet<String>) -> Document {
    Document {
        title: "delegate: permission policy of the instance profile role that runs shiftd"
            .to_string(),
        json: doc(vec![json!({
            "Sid": "ShiftdAssumeTargetRoles",
            "Effect": "Allow",
            "Action": "sts:AssumeRole",
            "Resource": roles.into_iter().collect::<Vec<_>>(),
        })]),
        notes: Vec::new(),
    }
}

/// Every document for `config` (or one account of it), in the order the README explains them.
pub fn documents(
    config: &Config,
    only_account: Option<&str>,
    delegate: Option<&Delegate>,
) -> Vec<Document> {
    // Rules with `accounts` act in the configured accounts they name (discovered ones are the
    // StackSet's, see `stackset`).
    let expanded = crate::org::expand(config, &[]);
    let config = &expanded;
    let accounts: Vec<&Account> = config
        .accounts
        .values()
        .filter(|a| only_account.is_none_or(|n| a.name == n))
        .collect();
    let mut out = Vec::new();
    for a in &accounts {
        if let Some(d) = delegate {
            out.push(trust_policy(a, d));
        }
        out.push(permission_policy(config, a));
    }
    let mut roles: BTreeSet<String> = accounts.iter().map(|a| a.role_arn.clone()).collect();
    if let Some(org) = config
        .organization
        .as_ref()
        .filter(|_| only_account.is_none())
    {
        roles.insert(org.role_arn.clone());
        roles.insert(org.target_role_arn("*"));
    }
    let mut delegate = delegate_policy_for(roles);
    if let Some(statement) = sns_statement(config) {
        delegate.json["Statement"]
            .as_array_mut()
            .expect("a policy's statements")
            .push(statement);
    }
    if let Some(statement) = claim_table_statement(config) {
        delegate.json["Statement"]
            .as_array_mut()
            .expect("a policy's statements")
            .push(statement);
    }
    out.push(delegate);
    out
}

/// `[notify] sns_topic_arn`: the delegate publishes alerts to exactly that topic, with its own
/// credentials.
fn sns_statement(config: &Config) -> Option<Value> {
    let arn = config.notify.as_ref()?.sns_topic_arn.as_ref()?;
    Some(json!({
        "Sid": "ShiftdPublishAlerts",
        "Effect": "Allow",
        "Action": "sns:Publish",
        "Resource": arn,
    }))
}

/// `[cluster]`: the delegate claims occurrences in exactly that table (and `shiftd cluster init`
/// creates it), with its own credentials. The table is in the delegate's account, whatever its ID.
fn claim_table_statement(config: &Config) -> Option<Value> {
    let cluster = config.cluster.as_ref()?;
    Some(json!({
        "Sid": "ShiftdClaimTable",
        "Effect": "Allow",
        "Action": [
            "dynamodb:PutItem",
            "dynamodb:GetItem",
            "dynamodb:UpdateItem",
            "dynamodb:Scan",
            "dynamodb:DescribeTable",
            "dynamodb:CreateTable",
            "dynamodb:UpdateTimeToLive",
        ],
        "Resource": format!("arn:aws:dynamodb:{}:*:table/{}", cluster.region, cluster.table),
    }))
}

/// `--org`: the org-reader role's documents: its trust policy (with a delegate) and its permission
/// policy, the Organizations calls discovery makes. Empty without `[organization]`.
pub fn org_documents(config: &Config, delegate: Option<&Delegate>) -> Vec<Document> {
    let Some(org) = &config.organization else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(d) = delegate {
        let mut statement = json!({
            "Sid": "ShiftdDelegateAssumesRole",
            "Effect": "Allow",
            "Principal": { "AWS": d.principal() },
            "Action": "sts:AssumeRole",
        });
        if let Some(x) = &org.external_id {
            statement["Condition"] = json!({ "StringEquals": { "sts:ExternalId": x } });
        }
        out.push(Document {
            title: format!("organization: trust policy of {}", org.role_arn),
            json: doc(vec![statement]),
            notes: Vec::new(),
        });
    }
    out.push(Document {
        title: format!("organization: permission policy of {}", org.role_arn),
        json: doc(vec![json!({
            "Sid": "ShiftdListAccounts",
            "Effect": "Allow",
            // Organizations' list calls support no resource-level permissions.
            // ListRoots and the ...ForParent calls walk the organization (the whole of it, or
            // include_ous); ListAccounts is the whole organization's list in one call.
            "Action": [
                "organizations:ListAccounts",
                "organizations:ListRoots",
                "organizations:ListAccountsForParent",
                "organizations:ListOrganizationalUnitsForParent",
            ],
            "Resource": "*",
        })]),
        notes: vec![
            "the role lives in the management account or a delegated administrator account of the \
             organization"
                .to_string(),
        ],
    });
    out
}

/// The permission policy of the target role in the discovered accounts: what the rules with
/// `accounts` need in an account of the organization, with `${AWS::AccountId}` for its ID (for
/// CloudFormation's `Fn::Sub`). `None` without `[organization]`.
pub fn discovered_permission_policy(config: &Config) -> Option<Document> {
    use crate::config::AccountSelector;
    let org = config.organization.as_ref()?;
    let id = "${AWS::AccountId}";
    let account = Account {
        name: "discovered".to_string(),
        role_arn: org.target_role_arn(id),
        account_id: id.to_string(),
        external_id: org.external_id.clone(),
        regions: org.regions.clone(),
    };
    let rules = config
        .rules
        .iter()
        .filter(|r| {
            r.is_multi_account()
                && r.accounts.iter().any(|s| match s {
                    AccountSelector::Name(_) => false,
                    AccountSelector::Id(i) => !config.accounts.values().any(|a| a.account_id == *i),
                    _ => true,
                })
        })
        .filter_map(|r| {
            let regions: Vec<String> = if r.regions.is_empty() {
                org.regions.clone()
            } else {
                r.regions
                    .iter()
                    .filter(|x| org.regions.contains(x))
                    .cloned()
                    .collect()
            };
            (!regions.is_empty()).then(|| crate::config::Rule {
                account: account.name.clone(),
                regions,
                ..r.clone()
            })
        })
        .collect();
    let only = Config {
        rules,
        ..config.clone()
    };
    Some(permission_policy(&only, &account))
}

/// `--stackset`: a CloudFormation template (YAML) for the target role in every discovered account:
/// its name a parameter (default `target_role_name`), trusting only the delegate (with the external
/// ID, if any), with [`discovered_permission_policy`]. `None` without `[organization]`.
pub fn stackset(config: &Config, delegate: &Delegate) -> Option<String> {
    let org = config.organization.as_ref()?;
    let mut trust = json!({
        "Effect": "Allow",
        "Principal": { "AWS": delegate.principal() },
        "Action": "sts:AssumeRole",
    });
    if let Some(x) = &org.external_id {
        trust["Condition"] = json!({ "StringEquals": { "sts:ExternalId": x } });
    }
    let mut permissions = discovered_permission_policy(config)?.json;
    substitute_account_ids(&mut permissions);
    // JSON is YAML: each document goes in as a flow mapping, indented under its key.
    let indented = |v: &Value, by: usize| -> String {
        serde_json::to_string_pretty(v)
            .expect("serializable")
            .lines()
            .collect::<Vec<_>>()
            .join(&format!("\n{}", " ".repeat(by)))
    };
    Some(format!(
        r#"AWSTemplateFormatVersion: "2010-09-09"
Description: >-
  shiftd's target role, assumed by the delegate to start and stop EC2 instances on schedule.
  Deploy it with a service-managed StackSet to the organizational units shiftd acts in
  (made by `shiftd policy --stackset` from the configuration).
Parameters:
  RoleName:
    Type: String
    Default: {role}
    Description: The role's name; [organization] target_role_name in shiftd's configuration.
Resources:
  ShiftdTargetRole:
    Type: AWS::IAM::Role
    Properties:
      RoleName: !Ref RoleName
      Description: Assumed by shiftd (start and stop EC2 instances on schedule)
      AssumeRolePolicyDocument: {trust}
      Policies:
        - PolicyName: shiftd
          PolicyDocument: {permissions}
Outputs:
  RoleArn:
    Value: !GetAtt ShiftdTargetRole.Arn
"#,
        role = org.target_role_name,
        trust = indented(&doc(vec![trust]), 8),
        permissions = indented(&permissions, 12),
    ))
}

/// Replaces each string holding `${AWS::AccountId}` with `{"Fn::Sub": string}`.
fn substitute_account_ids(v: &mut Value) {
    match v {
        Value::String(s) if s.contains("${AWS::AccountId}") => {
            *v = json!({ "Fn::Sub": s.clone() });
        }
        Value::Array(items) => items.iter_mut().for_each(substitute_account_ids),
        Value::Object(map) => map.values_mut().for_each(substitute_account_ids),
        _ => {}
    }
}

/// Text form: each document after a `# title` line, notes as `# note:` lines.
pub fn render(documents: &[Document]) -> String {
    let mut out = String::new();
    for d in documents {
        out.push_str(&format!("# {}\n", d.title));
        for n in &d.notes {
            out.push_str(&format!("# note: {n}\n"));
        }
        out.push_str(&serde_json::to_string_pretty(&d.json).expect("serializable"));
        out.push_str("\n\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config_with_tag_rules(names: &[&str]) -> Config {
        let mut text = String::from(
            "[accounts.a]\nrole_arn = \"arn:aws:iam::111111111111:role/r\"\nregions = [\"eu-west-1\"]\n",
        );
        for name in names {
            text.push_str(&format!(
                "[[rules]]\nname = \"{name}\"\naccount = \"a\"\ntags = {{ Team = \"{name}\" }}\nstop = \"0 20 * * *\"\n"
            ));
        }
        Config::parse(Path::new("t.toml"), &text).unwrap()
    }

    /// The Sids of the rules' statements in account `a`'s permission policy, in rule order.
    fn rule_sids_of(config: &Config) -> Vec<String> {
        let doc = permission_policy(config, config.account("a").unwrap());
        let all: Vec<String> = doc.json["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["Sid"].as_str().unwrap().to_string())
            .collect();
        let lower: BTreeSet<String> = all.iter().map(|s| s.to_ascii_lowercase()).collect();
        assert_eq!(
            lower.len(),
            all.len(),
            "Sids unique in the document: {all:?}"
        );
        for sid in &all {
            assert!(
                !sid.is_empty() && sid.chars().all(|c| c.is_ascii_alphanumeric()),
                "{sid:?} is not a valid IAM Sid"
            );
        }
        all.into_iter()
            .filter(|s| s.starts_with("ShiftdRule"))
            .collect()
    }

    #[test]
    fn rule_sids_are_unique_valid_and_stable() {
        let long = format!("team-{}", "x".repeat(59));
        assert_eq!(long.len(), 64);
        // (rule names, expected Sids in the same order)
        let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
            (vec!["dev-nights"], vec!["ShiftdRuledevnights".into()]),
            (
                vec!["dev-a", "dev.a", "deva"],
                vec![
                    format!("ShiftdRuledeva{:08X}", fnv1a(b"dev-a")),
                    format!("ShiftdRuledeva{:08X}", fnv1a(b"dev.a")),
                    "ShiftdRuledeva".into(),
                ],
            ),
            // The Sids do not depend on the order of the rules.
            (
                vec!["deva", "dev.a", "dev-a"],
                vec![
                    "ShiftdRuledeva".into(),
                    format!("ShiftdRuledeva{:08X}", fnv1a(b"dev.a")),
                    format!("ShiftdRuledeva{:08X}", fnv1a(b"dev-a")),
                ],
            ),
            // Case-only differences clash too (IAM may compare Sids ignoring case).
            (
                vec!["DevA", "deva"],
                vec![
                    format!("ShiftdRuleDevA{:08X}", fnv1a(b"DevA")),
                    format!("ShiftdRuledeva{:08X}", fnv1a(b"deva")),
                ],
            ),
            (
                vec![long.as_str()],
                vec![format!("ShiftdRuleteam{}", "x".repeat(59))],
            ),
            // Nothing but punctuation: still a valid Sid.
            (
                vec!["-._", "_.-"],
                vec![
                    format!("ShiftdRule{:08X}", fnv1a(b"-._")),
                    format!("ShiftdRule{:08X}", fnv1a(b"_.-")),
                ],
            ),
        ];
        for (names, want) in cases {
            let config = config_with_tag_rules(&names);
            assert_eq!(rule_sids_of(&config), want, "{names:?}");
        }
    }

    #[test]
    fn a_sid_already_taken_is_never_given_again() {
        let hashed = format!("deva{:08X}", fnv1a(b"dev-a"));
        let names = ["dev-a", "deva", hashed.as_str()];
        let sids = rule_sids(&names, &["ShiftdDescribe"]);
        assert_eq!(sids[0], format!("ShiftdRule{hashed}"));
        assert_eq!(sids[1], "ShiftdRuledeva");
        assert_eq!(
            sids[2],
            format!("ShiftdRule{hashed}{:08X}", fnv1a(hashed.as_bytes()))
        );
        // Fixed statements' Sids are taken; when even the hashed Sid is, a counter follows.
        let taken = [
            "ShiftdRulexy".to_string(),
            format!("ShiftdRulexy{:08X}", fnv1a(b"x-y")),
        ];
        let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
        assert_eq!(
            rule_sids(&["x-y"], &taken),
            [format!("ShiftdRulexy{:08X}2", fnv1a(b"x-y"))]
        );
    }

    #[test]
    fn an_sns_topic_for_alerts_lets_the_delegate_publish_to_it_only() {
        let base = "[accounts.a]\nrole_arn = \"arn:aws:iam::111111111111:role/r\"\nregions = [\"eu-west-1\"]\n";
        let topic = "arn:aws:sns:eu-west-1:123456789012:shiftd-alerts";
        let with = Config::parse(
            Path::new("t.toml"),
            &format!("{base}[notify]\nsns_topic_arn = \"{topic}\"\n"),
        )
        .unwrap();
        let docs = documents(&with, None, None);
        let delegate = &docs.last().unwrap().json["Statement"];
        assert_eq!(delegate[1]["Action"], "sns:Publish");
        assert_eq!(delegate[1]["Resource"], topic);
        let without = Config::parse(Path::new("t.toml"), base).unwrap();
        let docs = documents(&without, None, None);
        assert_eq!(
            docs.last().unwrap().json["Statement"]
                .as_array()
                .unwrap()
                .len(),
            1,
            "no SNS permission without a topic"
        );
    }

    #[test]
    fn a_cluster_lets_the_delegate_use_its_claim_table_only() {
        let base = "[accounts.a]\nrole_arn = \"arn:aws:iam::111111111111:role/r\"\nregions = [\"eu-west-1\"]\n";
        let with = Config::parse(
            Path::new("t.toml"),
            &format!("{base}[cluster]\ntable = \"shiftd-claims\"\nregion = \"eu-west-1\"\n"),
        )
        .unwrap();
        let docs = documents(&with, None, None);
        let statements = &docs.last().unwrap().json["Statement"];
        assert_eq!(statements[1]["Sid"], "ShiftdClaimTable");
        assert_eq!(
            statements[1]["Resource"],
            "arn:aws:dynamodb:eu-west-1:*:table/shiftd-claims"
        );
        assert!(
            statements[1]["Action"]
                .as_array()
                .unwrap()
                .contains(&json!("dynamodb:PutItem"))
        );
    }

    #[test]
    fn the_policy_fixture_is_unchanged() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy");
        let config = Config::load(&dir.join("two-accounts.toml")).unwrap();
        let delegate = Delegate::Role("arn:aws:iam::123456789012:role/shiftd-delegate".into());
        let got = documents(&config, None, Some(&delegate));
        let want: Vec<Value> = serde_json::from_str(
            &std::fs::read_to_string(dir.join("two-accounts.expected.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.title, w["title"].as_str().unwrap());
            assert_eq!(g.json, w["document"], "{}", g.title);
        }
    }

    const ORG: &str = r#"
[organization]
role_arn = "arn:aws:iam::999999999999:role/shiftd-org-reader"
target_role_name = "shiftd-target"
external_id = "ext-123"
regions = ["ap-northeast-1", "us-east-1"]

[accounts.a]
role_arn = "arn:aws:iam::111111111111:role/r"
regions = ["ap-northeast-1"]

[[rules]]
name = "dev"
accounts = ["org:*", "a"]
regions = ["ap-northeast-1"]
tags = { Schedule = "dev" }
stop = "0 20 * * *"

[[rules]]
name = "only-a"
accounts = ["a"]
instances = ["i-0123456789abcdef0"]
start = "0 8 * * *"
"#;

    #[test]
    fn multi_account_rules_count_in_their_configured_accounts_and_the_stackset() {
        let c = Config::parse(Path::new("t.toml"), ORG).unwrap();
        let docs = documents(&c, None, Some(&Delegate::Account("123456789012".into())));
        let a = docs
            .iter()
            .find(|d| d.title.starts_with("a: permission policy"))
            .unwrap();
        let text = a.json.to_string();
        assert!(text.contains("ShiftdRuledev"), "{text}");
        assert!(
            text.contains("arn:aws:ec2:ap-northeast-1:111111111111:instance/i-0123456789abcdef0"),
            "{text}"
        );
        let delegate = docs.last().unwrap().json.to_string();
        assert!(
            delegate.contains("arn:aws:iam::*:role/shiftd-target")
                && delegate.contains("arn:aws:iam::999999999999:role/shiftd-org-reader"),
            "{delegate}"
        );

        let org = org_documents(
            &c,
            Some(&Delegate::Role("arn:aws:iam::123456789012:role/d".into())),
        );
        assert_eq!(org.len(), 2);
        let trust = org[0].json.to_string();
        assert!(trust.contains("arn:aws:iam::123456789012:role/d") && trust.contains("ext-123"));
        let perms = org[1].json.to_string();
        for call in [
            "ListAccounts",
            "ListRoots",
            "ListAccountsForParent",
            "ListOrganizationalUnitsForParent",
        ] {
            assert!(perms.contains(&format!("organizations:{call}")), "{perms}");
        }

        // Discovered accounts: only the rules reaching beyond the configured accounts, for any ID.
        let discovered = discovered_permission_policy(&c).unwrap().json.to_string();
        assert!(discovered.contains("ShiftdRuledev"), "{discovered}");
        assert!(!discovered.contains("i-0123456789abcdef0"), "{discovered}");
        assert!(
            discovered.contains("arn:aws:ec2:ap-northeast-1:${AWS::AccountId}:instance/*"),
            "{discovered}"
        );
        let yaml = stackset(&c, &Delegate::Account("123456789012".into())).unwrap();
        assert!(yaml.contains("Default: shiftd-target"), "{yaml}");
        assert!(yaml.contains("RoleName: !Ref RoleName"), "{yaml}");
        assert!(
            yaml.contains("\"AWS\": \"arn:aws:iam::123456789012:root\""),
            "{yaml}"
        );
        assert!(yaml.contains("\"sts:ExternalId\": \"ext-123\""), "{yaml}");
        assert!(
            yaml.contains(
                "\"Fn::Sub\": \"arn:aws:ec2:ap-northeast-1:${AWS::AccountId}:instance/*\""
            ),
            "{yaml}"
        );
        // Without [organization], none of it.
        let plain = Config::parse(
            Path::new("t.toml"),
            "[accounts.a]\nrole_arn = \"arn:aws:iam::111111111111:role/r\"\nregions = [\"eu-west-1\"]\n",
        )
        .unwrap();
        assert!(org_documents(&plain, None).is_empty());
        assert!(stackset(&plain, &Delegate::Account("123456789012".into())).is_none());
    }
}
