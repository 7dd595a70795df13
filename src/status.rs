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
            let what = selection(&rule.selection);
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

/// `line` with the progress of the batches being paced first ("start: 1,357 of 5,000 instances in
/// account1/us-east-1 (paced to EC2's rate limits)").
pub fn with_progress(line: String, progress: &[crate::pacing::Progress]) -> String {
    if progress.is_empty() {
        return line;
    }
    let mut parts: Vec<String> = progress.iter().map(ToString::to_string).collect();
    parts.push(line);
    parts.join("; ")
}

/// The rule's selection in a few words: "2 instances", "tags Env=dev|stg Schedule=office-hours", or
/// "2 instances with tags Env=dev" (the listed instances that also carry the tags). Said here, not
/// by the selection's own Display, which lists every ID and once put a second "tags" in this line.
fn selection(selection: &crate::config::Selection) -> String {
    let n = selection.instance_ids.len();
    let instances = format!("{n} instance{}", if n == 1 { "" } else { "s" });
    let tags: Vec<String> = selection
        .tags
        .iter()
        .map(|(key, values)| format!("{key}={}", values.join("|")))
        .collect();
    match (n, tags.is_empty()) {
        (_, true) => instances,
        (0, false) => format!("tags {}", tags.join(" ")),
        (_, false) => format!("{instances} with tags {}", tags.join(" ")),
    }
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

    #[test]
    fn status_says_how_far_a_paced_batch_is() {
        let progress = [crate::pacing::Progress {
            action: crate::config::Action::Start,
            account: "account1".into(),
            region: "us-east-1".into(),
            sent: 1357,
            total: 5000,
        }];
        assert_eq!(
            with_progress("next: stop x at y".into(), &progress),
            "start: 1,357 of 5,000 instances in account1/us-east-1 (paced to EC2's rate limits); \
             next: stop x at y"
        );
        assert_eq!(
            with_progress("next: stop x at y".into(), &[]),
            "next: stop x at y"
        );
    }

    /// A tag selection is named once ("tags Env=dev", never "tags tags Env=dev"), and listed
    /// instances that must also carry tags are counted, not listed.
    #[test]
    fn status_names_a_tag_selection_once() {
        let config = Config::parse(
            Path::new("t.toml"),
            r#"
[accounts.account1]
role_arn = "arn:aws:iam::111111111111:role/r"
regions = ["ap-northeast-1", "us-east-1"]
[[rules]]
name = "tagged"
account = "account1"
regions = ["ap-northeast-1"]
tags = { Schedule = "office-hours", Env = ["dev", "stg"] }
stop = "0 20 * * *"
timezone = "Asia/Tokyo"
[[rules]]
name = "listed-and-tagged"
account = "account1"
instances = ["i-0123456789abcdef0", "i-01234567", "i-89abcdef"]
tags = { Env = "dev" }
start = "0 8 * * *"
timezone = "Asia/Tokyo"
"#,
        )
        .unwrap();
        let at = |t: &str| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc);
        assert_eq!(
            line(&config, at("2026-12-01T00:00:00Z"), false, &[]),
            "next: stop tagged (tags Env=dev|stg Schedule=office-hours, account1/ap-northeast-1) \
             at 2026-12-01 20:00:00 JST"
        );
        assert_eq!(
            line(&config, at("2026-12-01T12:00:00Z"), false, &[]),
            "next: start listed-and-tagged (3 instances with tags Env=dev, \
             account1/ap-northeast-1,us-east-1) at 2026-12-02 08:00:00 JST"
        );
    }
}
