//! The short human summary `shiftd check` prints: what the configuration schedules, and when next.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use crate::config::{Action, Config, CredentialSource};

/// Renders the summary of `config` with next firings computed from `now`.
pub fn render(config: &Config, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let d = &config.defaults;
    let _ = writeln!(out, "{}: valid", config.path.display());
    let source = match &config.credentials {
        CredentialSource::Imds => "instance profile (IMDSv2)".to_string(),
        CredentialSource::Profile(p) => format!("AWS profile {p:?}"),
    };
    let _ = writeln!(out, "credentials: {source}");
    let _ = writeln!(
        out,
        "sessions: {}, renewed {} before expiry{}",
        humantime::format_duration(d.session_duration),
        humantime::format_duration(d.refresh_before_expiry),
        if d.dry_run {
            "; DRY RUN: nothing will be started or stopped"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "accounts ({}):", config.accounts.len());
    for a in config.accounts.values() {
        let _ = writeln!(
            out,
            "  {}  {}{}  regions: {}",
            a.name,
            a.role_arn,
            if a.external_id.is_some() {
                " (external ID set)"
            } else {
                ""
            },
            a.regions.join(", ")
        );
    }
    if let Some(o) = &config.organization {
        let _ = writeln!(
            out,
            "organization: read through {}{}; accounts under {}{} assumed as role {}, regions: {}; \
             listed again every {}",
            o.role_arn,
            if o.external_id.is_some() {
                " (external ID set)"
            } else {
                ""
            },
            if o.include_ous.is_empty() {
                "the root".to_string()
            } else {
                o.include_ous.join(", ")
            },
            if o.exclude_accounts.is_empty() {
                String::new()
            } else {
                format!(" except {}", o.exclude_accounts.join(", "))
            },
            o.target_role_name,
            o.regions.join(", "),
            humantime::format_duration(o.refresh)
        );
    }
    if !config.calendars.is_empty() {
        let _ = writeln!(out, "calendars ({}):", config.calendars.len());
    }
    for c in config.calendars.values() {
        let span = match (c.dates.first(), c.dates.last()) {
            (Some(first), Some(last)) => format!(", first {first}, last {last}"),
            _ => String::new(),
        };
        let _ = writeln!(out, "  {}  {} date(s){span}", c.name, c.dates.len());
    }
    if let Some(n) = &config.notify {
        let mut to = Vec::new();
        if let Some(url) = &n.webhook_url {
            to.push(format!("webhook {url}"));
        }
        if let Some(topic) = &n.sns_topic_arn {
            to.push(format!("SNS {topic}"));
        }
        let _ = writeln!(out, "alerts: {}", to.join(", "));
    }
    if let Some(m) = &config.metrics {
        let _ = writeln!(out, "metrics: http://{}/metrics", m.listen);
    }
    if let Some(c) = &config.cluster {
        let _ = writeln!(
            out,
            "cluster: claim table {} in {} (lease {})",
            c.table,
            c.region,
            humantime::format_duration(c.lease)
        );
    }
    let pacing = config.pacing.differences();
    if !pacing.is_empty() {
        let _ = writeln!(out, "pacing (not the defaults):");
        for line in pacing {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(out, "rules ({}):", config.rules.len());
    for r in &config.rules {
        let _ = writeln!(
            out,
            "  {}  account{} {}, {}  {}",
            r.name,
            if r.is_multi_account() { "s" } else { "" },
            r.accounts_text(),
            if r.regions.is_empty() {
                "each account's regions".to_string()
            } else {
                r.regions.join(", ")
            },
            r.selection
        );
        if !r.skip.is_empty() {
            let _ = writeln!(out, "    skips the dates of {}", r.skip.join(", "));
        }
        if !r.only.is_empty() {
            let _ = writeln!(out, "    fires only on the dates of {}", r.only.join(", "));
        }
        let mut how = Vec::new();
        if r.enforce {
            how.push(format!(
                "enforces the latest occurrence's state every {}",
                humantime::format_duration(config.defaults.enforce_every)
            ));
        }
        if r.stop_mode == crate::config::StopMode::Hibernate {
            how.push("hibernates where it can".to_string());
        }
        how.push(format!(
            "catches up to {} late",
            humantime::format_duration(r.catch_up)
        ));
        let _ = writeln!(out, "    {}", how.join("; "));
        for action in [Action::Start, Action::Stop] {
            for s in r.schedules(action) {
                let next = s
                    .next_after(now, r.timezone)
                    .map_or("never".to_string(), |t| {
                        format!(
                            "{} ({})",
                            t.with_timezone(&r.timezone).format("%Y-%m-%d %H:%M:%S %Z"),
                            t.format("%Y-%m-%dT%H:%M:%SZ")
                        )
                    });
                // The summary beside the expression, unless it is the expression itself.
                let summary = s.describe();
                let summary = if summary == s.source() {
                    String::new()
                } else {
                    format!("  ({summary})")
                };
                let _ = writeln!(
                    out,
                    "    {:<5} {:<20}{summary}  {}  next: {next}",
                    action.as_str(),
                    s.source(),
                    r.timezone
                );
            }
        }
    }
    if config.rules.is_empty() {
        let _ = writeln!(
            out,
            "  (none: `shiftd run` refuses a configuration without rules)"
        );
    }
    out
}
