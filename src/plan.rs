//! `shiftd plan`: the actions the configuration schedules in a window, in time order, and the command
//! line's time arguments (`--from`, `--until`). Reads only the
//! configuration and uses the daemon's schedule code, so DST days show exactly what will happen.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::config::{Action, Config, Rule};
use crate::schedule::CronSchedule;

/// One scheduled action. Its JSON form is the documented, stable output of `shiftd plan --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Upcoming {
    /// RFC 3339 in the rule's time zone, with its offset.
    pub at: String,
    /// RFC 3339 in UTC.
    pub at_utc: String,
    pub action: &'static str,
    pub rule: String,
    pub account: String,
    pub account_id: String,
    pub regions: Vec<String>,
    pub timezone: String,
    pub instance_ids: Vec<String>,
    pub tags: std::collections::BTreeMap<String, Vec<String>>,
    /// The cron expression that fires (the first in the configuration, when several fire at once).
    pub schedule: String,
    /// With `--show-skipped`, on an occurrence the rule's calendars leave out: which one ("calendar
    /// NAME" for a `skip` calendar holding the date, "not in calendar NAME" for `only`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// With `--instances`: what the selection matches now, described live.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<LiveInstance>>,
    #[serde(skip)]
    pub instant: DateTime<Utc>,
    #[serde(skip)]
    pub local: String,
}

/// The actions in `(from, until]`, in time order (then by rule name), at most `limit`. The second value
/// says whether the list was cut at the limit.
pub fn upcoming(
    config: &Config,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: usize,
) -> (Vec<Upcoming>, bool) {
    occurrences(config, from, until, limit, false)
}

/// [`upcoming`], and with `show_skipped` the occurrences the rules' calendars leave out too, each with
/// `skipped` saying which calendar; `limit` counts both.
pub fn occurrences(
    config: &Config,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: usize,
    show_skipped: bool,
) -> (Vec<Upcoming>, bool) {
    let mut out = Vec::new();
    let per_schedule = limit.saturating_add(1);
    for rule in &config.rules {
        let account_id = config
            .account(&rule.account)
            .map(|a| a.account_id.clone())
            .unwrap_or_default();
        for action in [Action::Start, Action::Stop] {
            // Several expressions of one rule firing at the same instant are one action, as in the daemon;
            // the first of them is the one shown.
            let mut instants: BTreeMap<DateTime<Utc>, (&CronSchedule, Option<String>)> =
                BTreeMap::new();
            for s in rule.schedules(action) {
                for t in s.firings_between(from, until, rule.timezone, per_schedule) {
                    instants.entry(t).or_insert((s, None));
                }
            }
            let schedules = rule.schedules(action);
            if show_skipped && schedules.iter().any(|s| s.days().is_some()) {
                for s in schedules {
                    let all = s.without_days();
                    for t in all.firings_between(from, until, rule.timezone, per_schedule) {
                        instants
                            .entry(t)
                            .or_insert_with(|| (s, Some(skipped_by(config, rule, t))));
                    }
                }
            }
            for (t, (schedule, skipped)) in instants {
                let local = t.with_timezone(&rule.timezone);
                out.push(Upcoming {
                    at: local.to_rfc3339(),
                    at_utc: t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    action: action.as_str(),
                    rule: rule.name.clone(),
                    // A rule with `accounts` not expanded (`plan` without `--accounts`): its list.
                    account: rule.accounts_text(),
                    account_id: account_id.clone(),
                    regions: rule.regions.clone(),
                    timezone: rule.timezone.name().to_string(),
                    instance_ids: rule.selection.instance_ids.clone(),
                    tags: rule.selection.tags.clone(),
                    schedule: schedule.source().to_string(),
                    skipped,
                    instances: None,
                    instant: t,
                    local: local.format("%Y-%m-%d %H:%M:%S %Z").to_string(),
                });
            }
        }
    }
    out.sort_by(|a, b| (a.instant, &a.rule, a.action).cmp(&(b.instant, &b.rule, b.action)));
    let truncated = out.len() > limit;
    out.truncate(limit);
    (out, truncated)
}

/// Which of the rule's calendars leaves out its occurrence at `t`: the first `skip` calendar holding
/// the date ("calendar NAME"), or else the `only` calendars not holding it ("not in calendar NAME",
/// "not in calendars A, B"). The date is the occurrence's local date, or the day before for a time in
/// a DST gap across midnight, which fires on the next date.
fn skipped_by(config: &Config, rule: &Rule, t: DateTime<Utc>) -> String {
    let date = t.with_timezone(&rule.timezone).date_naive();
    let holds = |name: &String, date: NaiveDate| {
        config
            .calendars
            .get(name)
            .is_some_and(|c| c.dates.contains(&date))
    };
    for date in [Some(date), date.pred_opt()].into_iter().flatten() {
        if let Some(name) = rule.skip.iter().find(|name| holds(name, date)) {
            return format!("calendar {name}");
        }
        if !rule.only.is_empty() && !rule.only.iter().any(|name| holds(name, date)) {
            return match rule.only.as_slice() {
                [one] => format!("not in calendar {one}"),
                names => format!("not in calendars {}", names.join(", ")),
            };
        }
    }
    "calendar".to_string()
}

/// An instance a rule's selection matches now (`plan --instances`), or why a region could not be
/// described.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LiveInstance {
    pub region: String,
    /// The instance ID; absent when `error` says why the region could not be described.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The override tag in force (`shiftd:skip`, `shiftd:skip-until`): why shiftd leaves it alone.
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    pub override_in_force: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Fills each item's `instances`: per rule, its selection described live in each of its regions
/// (one AssumeRole per account, one describe per rule and region), with the overrides in force.
pub async fn describe_live(
    config: &Config,
    items: &mut [Upcoming],
    connect: crate::aws::ConnectAws,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
) {
    use std::sync::Arc;
    let rules: BTreeSet<&str> = items.iter().map(|i| i.rule.as_str()).collect();
    let aws = connect(&config.credentials, crate::daemon::first_region(config));
    let now = clock.now();
    let mut stores = BTreeMap::new();
    let mut live: BTreeMap<&str, Vec<LiveInstance>> = BTreeMap::new();
    for rule in config
        .rules
        .iter()
        .filter(|r| rules.contains(r.name.as_str()))
    {
        let Some(account) = config.account(&rule.account) else {
            continue;
        };
        if !stores.contains_key(&account.name) {
            let store = crate::manual::assume(config, account, aws.as_ref(), &clock).await;
            stores.insert(account.name.clone(), store);
        }
        let store = &stores[&account.name];
        let mut found = Vec::new();
        for region in &rule.regions {
            let failed = |error: String| LiveInstance {
                region: region.clone(),
                instance_id: None,
                state: None,
                override_in_force: None,
                error: Some(error),
            };
            if let Some(e) = store.last_error().filter(|_| store.usable_now().is_none()) {
                found.push(failed(format!("cannot assume the role: {e}")));
                continue;
            }
            let ec2 = aws.ec2(region, Arc::new(store.clone())).await;
            match ec2.describe_selection(&rule.selection).await {
                Ok(views) => found.extend(views.into_iter().map(|v| {
                    LiveInstance {
                        region: region.clone(),
                        override_in_force: crate::planner::override_in_force(
                            &v.tags,
                            now,
                            rule.timezone,
                        )
                        .map(|h| h.reason()),
                        instance_id: Some(v.id),
                        state: Some(v.state),
                        error: None,
                    }
                })),
                Err(e) => found.push(failed(e.to_string())),
            }
        }
        live.insert(rule.name.as_str(), found);
    }
    for item in items.iter_mut() {
        item.instances = Some(live.get(item.rule.as_str()).cloned().unwrap_or_default());
    }
}

/// The human table of `shiftd plan`.
pub fn render_text(
    config: &Config,
    items: &[Upcoming],
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    truncated: bool,
) -> String {
    let mut out = String::new();
    let skipped = items.iter().filter(|u| u.skipped.is_some()).count();
    let _ = writeln!(
        out,
        "{} action(s){} from {} to {} (UTC){}",
        items.len() - skipped,
        if skipped > 0 {
            format!(" and {skipped} occurrence(s) skipped by calendars")
        } else {
            String::new()
        },
        from.format("%Y-%m-%d %H:%M"),
        until.format("%Y-%m-%d %H:%M"),
        if config.defaults.dry_run {
            "; dry_run = true: none would be carried out"
        } else {
            ""
        }
    );
    for u in items {
        let rule = config
            .rules
            .iter()
            .find(|r| r.name == u.rule)
            .expect("rule of this config");
        let _ = writeln!(
            out,
            "{}  ({})  {:<5}  {}  {} ({})  {}  {}{}",
            u.local,
            u.instant.format("%Y-%m-%d %H:%M:%S UTC"),
            u.action,
            u.rule,
            u.account,
            u.account_id,
            u.regions.join(","),
            rule.selection,
            u.skipped
                .as_ref()
                .map_or(String::new(), |why| format!("  skipped ({why})"))
        );
    }
    if truncated {
        let _ = writeln!(
            out,
            "... cut at {} actions: narrow the window with --until or --hours, or raise --limit",
            items.len()
        );
    }
    // Each listed rule's expressions, in plain language.
    let listed: BTreeSet<&str> = items.iter().map(|u| u.rule.as_str()).collect();
    let rules: Vec<_> = config
        .rules
        .iter()
        .filter(|r| listed.contains(r.name.as_str()))
        .collect();
    if !rules.is_empty() {
        let _ = writeln!(out, "\nschedules:");
    }
    for rule in rules {
        for action in [Action::Start, Action::Stop] {
            for s in rule.schedules(action) {
                let summary = s.describe();
                let _ = writeln!(
                    out,
                    "  {}  {:<5}  {}  {}({})",
                    rule.name,
                    action.as_str(),
                    s.source(),
                    if summary == s.source() {
                        String::new()
                    } else {
                        format!("{summary} ")
                    },
                    rule.timezone
                );
            }
        }
    }
    let mut shown = BTreeSet::new();
    for u in items {
        let Some(instances) = u.instances.as_ref().filter(|_| shown.insert(&u.rule)) else {
            continue;
        };
        let _ = writeln!(
            out,
            "\nrule {}: {} instance(s) selected now (described live)",
            u.rule,
            instances.iter().filter(|i| i.instance_id.is_some()).count()
        );
        for i in instances {
            let _ = match (&i.instance_id, &i.error) {
                (_, Some(e)) => writeln!(out, "  {}  cannot describe: {e}", i.region),
                (Some(id), None) => writeln!(
                    out,
                    "  {}  {id}  {}{}",
                    i.region,
                    i.state.as_deref().unwrap_or("?"),
                    i.override_in_force
                        .as_ref()
                        .map_or(String::new(), |o| format!("  {o}"))
                ),
                (None, None) => Ok(()),
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn plan_is_ordered_and_shows_dst_as_the_daemon_fires() {
        let config = Config::parse(
            Path::new("t.toml"),
            r#"
[accounts.a]
role_arn = "arn:aws:iam::111111111111:role/r"
regions = ["us-east-1"]
[[rules]]
name = "ny"
account = "a"
instances = ["i-01234567"]
start = "30 2 * * *"
stop = ["0 22 * * *", "0 22 * * Sun"]
timezone = "America/New_York"
"#,
        )
        .unwrap();
        // 2027-03-14: New York springs forward at 02:00; 02:30 fires at 03:00 EDT.
        let (items, cut) = upcoming(
            &config,
            utc("2027-03-13T12:00:00Z"),
            utc("2027-03-15T12:00:00Z"),
            100,
        );
        assert!(!cut);
        let got: Vec<(&str, &str)> = items.iter().map(|u| (u.at.as_str(), u.action)).collect();
        assert_eq!(
            got,
            vec![
                ("2027-03-13T22:00:00-05:00", "stop"),
                ("2027-03-14T03:00:00-04:00", "start"),
                // Sunday: two stop expressions at the same instant are one action.
                ("2027-03-14T22:00:00-04:00", "stop"),
                ("2027-03-15T02:30:00-04:00", "start"),
            ]
        );
        assert_eq!(items[1].at_utc, "2027-03-14T07:00:00Z");
        let (items, cut) = upcoming(
            &config,
            utc("2027-03-13T12:00:00Z"),
            utc("2027-03-15T12:00:00Z"),
            2,
        );
        assert!(cut);
        assert_eq!(items.len(), 2);
        // No limit at all: `limit + 1` wrapped to 0 (a panic in debug builds) and listed nothing.
        let (items, cut) = upcoming(
            &config,
            utc("2027-03-13T12:00:00Z"),
            utc("2027-03-15T12:00:00Z"),
            usize::MAX,
        );
        assert!(!cut);
        assert_eq!(items.len(), 4);
    }

    #[test]
    fn show_skipped_lists_what_the_calendars_leave_out_and_says_which() {
        let config = Config::parse(
            Path::new("t.toml"),
            r#"
[accounts.a]
role_arn = "arn:aws:iam::111111111111:role/r"
regions = ["ap-northeast-1"]
[calendars.holidays]
dates = ["2027-01-12"]
[calendars.patch-days]
dates = ["2027-01-12", "2027-01-13", "2027-01-15"]
[[rules]]
name = "patch"
account = "a"
instances = ["i-01234567"]
start = ["cron(0 8 ? * MON-FRI *)", "0 8 * * 1-5"]
timezone = "Asia/Tokyo"
skip = "holidays"
only = "patch-days"
"#,
        )
        .unwrap();
        // Monday 2027-01-11 to Friday the 15th, 08:00 in Tokyo.
        let (from, until) = (utc("2027-01-10T00:00:00Z"), utc("2027-01-15T12:00:00Z"));
        let shown = |items: &[Upcoming]| -> Vec<(String, Option<String>)> {
            items
                .iter()
                .map(|u| (u.at[..10].to_string(), u.skipped.clone()))
                .collect()
        };
        let (items, _) = upcoming(&config, from, until, 100);
        assert_eq!(
            shown(&items),
            vec![("2027-01-13".into(), None), ("2027-01-15".into(), None)]
        );
        let (items, cut) = occurrences(&config, from, until, 100, true);
        assert!(!cut);
        let not_patch = Some("not in calendar patch-days".to_string());
        assert_eq!(
            shown(&items),
            vec![
                ("2027-01-11".into(), not_patch.clone()),
                // In both: the skip calendar is the one that removes it.
                ("2027-01-12".into(), Some("calendar holidays".into())),
                ("2027-01-13".into(), None),
                ("2027-01-14".into(), not_patch),
                ("2027-01-15".into(), None),
            ]
        );
        // The two expressions fire together: one occurrence, shown with the first of them.
        assert!(
            items
                .iter()
                .all(|u| u.schedule == "cron(0 8 ? * MON-FRI *)")
        );
        let text = render_text(&config, &items, from, until, false);
        assert!(
            text.starts_with("2 action(s) and 3 occurrence(s) skipped by calendars from"),
            "{text}"
        );
        assert!(
            text.contains("start  patch  a (111111111111)  ap-northeast-1  ids [i-01234567]  skipped (calendar holidays)\n"),
            "{text}"
        );
        assert!(
            text.contains("\nschedules:\n  patch  start  cron(0 8 ? * MON-FRI *)  08:00 Mon\u{2013}Fri (Asia/Tokyo)\n  patch  start  0 8 * * 1-5  08:00 Mon\u{2013}Fri (Asia/Tokyo)\n"),
            "{text}"
        );
        let json = serde_json::to_value(&items).unwrap();
        assert_eq!(json[1]["skipped"], "calendar holidays");
        assert!(json[2].get("skipped").is_none(), "{json:#}");
        assert_eq!(json[2]["schedule"], "cron(0 8 ? * MON-FRI *)");
    }
}

/// Reads a `--from`/`--until` value: RFC 3339 (`2026-12-01T08:00:00+09:00`), or a UTC date
/// (`2026-12-01`) or date and time (`2026-12-01T08:00`, `2026-12-01 08:00`), from 1970 to 9999 (UTC):
/// times near the ends of what the calendar code can represent would overflow it.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    let t = parse_any_time(s)?;
    let (first, last) = (
        DateTime::UNIX_EPOCH,
        chrono::NaiveDate::from_ymd_opt(9999, 12, 31)
            .and_then(|d| d.and_hms_opt(23, 59, 59))
            .expect("a valid date")
            .and_utc(),
    );
    if !(first..=last).contains(&t) {
        return Err(format!(
            "{s:?} is out of range: expected a time from 1970-01-01 to 9999-12-31 (UTC)"
        ));
    }
    Ok(t)
}

fn parse_any_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    Err(format!(
        "{s:?} is not a time: expected RFC 3339 (2026-12-01T08:00:00+09:00) or a UTC date/time (2026-12-01, 2026-12-01T08:00)"
    ))
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn time_arguments() {
        let want = DateTime::parse_from_rfc3339("2026-11-30T23:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_time("2026-12-01T08:00:00+09:00").unwrap(), want);
        assert_eq!(parse_time("2026-11-30T23:00").unwrap(), want);
        assert_eq!(parse_time("2026-11-30 23:00").unwrap(), want);
        assert_eq!(
            parse_time("2026-12-01").unwrap().to_rfc3339(),
            "2026-12-01T00:00:00+00:00"
        );
        assert!(parse_time("tomorrow").unwrap_err().contains("not a time"));
    }

    #[test]
    fn times_far_outside_the_calendar_are_refused() {
        let in_range = [
            "1970-01-01",
            "1970-01-01T09:00:00+09:00",
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59",
        ];
        for s in in_range {
            assert!(parse_time(s).is_ok(), "{s}");
        }
        // -262143-01-01 is the calendar's first day: a schedule searched from it overflowed.
        let out_of_range = [
            "-262143-01-01",
            "0000-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "1970-01-01T08:59:59+09:00",
            "9999-12-31T23:59:59-23:59",
        ];
        for s in out_of_range {
            let err = parse_time(s).unwrap_err();
            assert!(
                err.contains("out of range: expected a time from 1970-01-01 to 9999-12-31"),
                "{s}: {err}"
            );
        }
    }
}
