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
    let mut tag_statements: Vec<Value> = Vec::new();
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
            let sid: String = rule
                .name
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect();
            tag_statements.push(json!({
                "Sid": format!("ShiftdRule{sid}"),
                "Effect": "Allow",
                "Action": iam_actions,
                "Resource": resources,
                // StringLike: tag values may use EC2 filter wildcards (* and ?), which IAM shares.
                "Condition": { "StringLike": Value::Object(conditions) },
            }));
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
    statements.extend(tag_statements);
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

/// The delegate instance role's permission policy: AssumeRole on exactly the configured roles.
pub fn delegate_policy(accounts: &[&Account]) -> Document {
    let roles: BTreeSet<&str> = accounts.iter().map(|a| a.role_arn.as_str()).collect();
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
    out.push(delegate_policy(&accounts));
    out
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
