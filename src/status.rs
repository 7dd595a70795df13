//! The `STATUS=` line systemd shows for shiftd (`systemctl status shiftd`): the next action, dry run,
//! and any account waiting for credentials.

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::plan::upcoming;

/// The `STATUS=` line systemd shows: the next action, and any account waiting for credentials.
/// `waiting` lists (account, why) for accounts without usable credentials.
pub fn line(
    config: &Config,
    now: DateTime<Utc>,
    dry_run: bool,
    waiting: &[(String, String)],
) -> String {
    let mut parts = Vec::new();
    if dry_run {
        parts.push("DRY RUN".to_string());
    }
    if !waiting.is_empty() {
        let w: Vec<String> = waiting
            .iter()
            .map(|(a, why)| format!("{a} ({why})"))
            .collect();
        parts.push(format!("waiting for credentials: {}", w.join(", ")));
    }
    let next = crate::planner::next_due(config, now).map(|t| {
        let (items, _) = upcoming(config, t - chrono::Duration::seconds(1), t, 100);
        (t, items)
    });
    match next {
        Some((_, items)) if !items.is_empty() => {
            let u = &items[0];
            let rule = config
                .rules
                .iter()
                .find(|r| r.name == u.rule)
                .expect("rule of this config");
            let ids = rule.selection.instance_ids.len();
            let what = match (ids, rule.selection.tags.is_empty()) {
                (n, true) => format!("{n} instance{}", if n == 1 { "" } else { "s" }),
                (0, false) => rule.selection.to_string(),
                (_, false) => rule.selection.to_string(),
            };
            let more = if items.len() > 1 {
                format!(" and {} more", items.len() - 1)
            } else {
                String::new()
            };
            parts.push(format!(
                "next: {} {} ({what}, {}/{}) at {}{more}",
                u.action,
                u.rule,
                u.account,
                u.regions.join(","),
                u.local
            ));
        }
        _ => parts.push("no upcoming actions".to_string()),
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn status_names_the_next_action_and_credential_trouble() {
        let config = Config::parse(
            Path::new("t.toml"),
            r#"
[accounts.account1]
role_arn = "arn:aws:iam::111111111111:role/r"
regions = ["ap-northeast-1"]
[[rules]]
name = "office-hours"
account = "account1"
instances = ["i-0123456789abcdef0", "i-01234567"]
stop = "0 20 * * *"
timezone = "Asia/Tokyo"
[[rules]]
name = "tagged"
account = "account1"
tags = { Env = "dev" }
stop = "0 20 * * *"
timezone = "Asia/Tokyo"
"#,
        )
        .unwrap();
        let now = DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            line(&config, now, false, &[]),
            "next: stop office-hours (2 instances, account1/ap-northeast-1) at 2026-12-01 20:00:00 JST and 1 more"
        );
        assert_eq!(
            line(
                &config,
                now,
                true,
                &[("account1".into(), "AccessDenied".into())]
            ),
            "DRY RUN; waiting for credentials: account1 (AccessDenied); \
             next: stop office-hours (2 instances, account1/ap-northeast-1) at 2026-12-01 20:00:00 JST and 1 more"
        );
    }
}
