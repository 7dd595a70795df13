//! The action planner: which rules are due, how their work is grouped, what to do with each instance,
//! and how to read an instance's state while following it. Pure: no I/O, no clock reads, no SDK types.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use chrono_tz::Tz;

use crate::config::{Action, Config, Rule, Selection, StopMode};

/// One occurrence of one rule's action in one account (a rule over several accounts has one occurrence
/// per account).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firing {
    pub rule: String,
    pub account: String,
    pub action: Action,
    pub at: DateTime<Utc>,
}

/// The earliest instant strictly after `after` at which any rule fires.
pub fn next_due(config: &Config, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    config
        .rules
        .iter()
        .flat_map(|r| {
            [Action::Start, Action::Stop]
                .into_iter()
                .flat_map(move |a| r.schedules(a).iter().map(move |s| (s, r.timezone)))
        })
        .filter_map(|(s, zone)| s.next_after(after, zone))
        .min()
}

/// [`next_due`], remembered: its answer for `after` holds for any later point before that answer (no
/// rule fires in between), so the scheduling loop scans every rule's next occurrence once per instant
/// rather than at every wake (batches ending wake it a thousand times at a big instant). `forget` it
/// when the configuration changes.
#[derive(Clone, Debug, Default)]
pub struct NextDue {
    /// The last question and its answer.
    known: Option<(DateTime<Utc>, Option<DateTime<Utc>>)>,
}

impl NextDue {
    /// `next_due(config, after)`, scanning the rules only when `after` is outside what is known.
    pub fn get(&mut self, config: &Config, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if let Some((from, next)) = self.known
            && from <= after
            && next.is_none_or(|n| after < n)
        {
            return next;
        }
        let next = next_due(config, after);
        self.known = Some((after, next));
        next
    }

    /// For a new configuration.
    pub fn forget(&mut self) {
        self.known = None;
    }
}

/// The state a rule with `enforce` wants at `now`: the action of its latest occurrence at or before
/// `now`, and that occurrence's instant. `None` when it never fired yet, or when a start and a stop
/// fire at that very instant (there is no telling which it wants).
pub fn desired_action(rule: &Rule, now: DateTime<Utc>) -> Option<(Action, DateTime<Utc>)> {
    let latest = |action: Action| {
        rule.schedules(action)
            .iter()
            .filter_map(|s| s.prev_at_or_before(now, rule.timezone))
            .max()
    };
    match (latest(Action::Start), latest(Action::Stop)) {
        (Some(start), Some(stop)) if start == stop => None,
        (Some(start), Some(stop)) if start > stop => Some((Action::Start, start)),
        (_, Some(stop)) => Some((Action::Stop, stop)),
        (Some(start), None) => Some((Action::Start, start)),
        (None, None) => None,
    }
}

/// Missed occurrences are counted up to this many per rule and action, so that catching up after a
/// long outage costs a bounded time whatever the rules (a rule firing every second misses 86,400 a day).
pub const MISSED_COUNT_CAP: u64 = 10_000;

/// Occurrences of one rule's action that came and went, more than the rule's `catch_up` ago, without
/// being acted on (shiftd was not running, or the machine was suspended).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missed {
    pub rule: String,
    pub account: String,
    pub action: Action,
    /// How many, counting once the instants at which several of the action's expressions fire together.
    /// Exact up to [`MISSED_COUNT_CAP`]; beyond that, `count` is the cap and `count_is_lower_bound` set.
    pub count: u64,
    pub count_is_lower_bound: bool,
    /// The earliest and the latest (equal when `count` is 1).
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
}

/// What became due in `(after, now]`. Per rule and action, the latest occurrence is in `due` when it is at
/// most the rule's `catch_up` old; every other occurrence, and the latest one when it is older, is counted
/// in one [`Missed`] entry. Each occurrence is in exactly one of the two, so walking time forward in
/// adjacent windows handles each exactly once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DueWork {
    /// At most one per rule and action, in configuration order.
    pub due: Vec<Firing>,
    /// At most one per rule and action, by earliest occurrence.
    pub missed: Vec<Missed>,
}

/// Costs a few time zone conversions per rule and action for a short window, and at most
/// [`MISSED_COUNT_CAP`] steps of counting per rule and action whatever the window: the latest occurrence
/// is found searching back from `now`, not forward from `after`.
pub fn due_between(config: &Config, after: DateTime<Utc>, now: DateTime<Utc>) -> DueWork {
    due_ahead(config, after, now, now)
}

/// As [`due_between`] over `(after, until]`, with `until` at or after `now`: occurrences after `now`
/// (at most `until`, a little ahead) are due, so that their selection is resolved before their instant.
/// How late an occurrence is, against its `catch_up`, is always measured from `now`.
pub fn due_ahead(
    config: &Config,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> DueWork {
    let mut work = DueWork::default();
    let until = until.max(now);
    if until <= after {
        return work;
    }
    for rule in &config.rules {
        let zone = rule.timezone;
        let tolerance = crate::clock::chrono_duration(rule.catch_up);
        for action in [Action::Start, Action::Stop] {
            let schedules = rule.schedules(action);
            // The latest of any of this action's expressions, so several firing together count once.
            let latest_in = |until| {
                schedules
                    .iter()
                    .filter_map(|s| s.latest_in(Some(after), until, zone))
                    .max()
            };
            let Some(latest) = latest_in(until) else {
                continue;
            };
            let last_missed = if now - latest <= tolerance {
                work.due.push(Firing {
                    rule: rule.name.clone(),
                    account: rule.account.clone(),
                    action,
                    at: latest,
                });
                latest_in(latest - chrono::Duration::nanoseconds(1))
            } else {
                Some(latest)
            };
            let Some(last) = last_missed else {
                continue;
            };
            // `last` is among the firings counted; should the two searches ever disagree, it is still
            // reported.
            let (first, count, count_is_lower_bound) = count_firings(
                schedules
                    .iter()
                    .map(|s| s.firings_after(after, Some(last), zone)),
                MISSED_COUNT_CAP,
            )
            .unwrap_or((last, 1, false));
            work.missed.push(Missed {
                rule: rule.name.clone(),
                account: rule.account.clone(),
                action,
                count,
                count_is_lower_bound,
                first,
                last,
            });
        }
    }
    work.missed.sort_by_key(|m| m.first);
    work
}

/// The first of the distinct instants the (ordered) iterators yield together, and how many there are,
/// counted up to `cap`: `(first, count, whether there are more than cap)`. `None` if there are none.
fn count_firings(
    iterators: impl Iterator<Item = impl Iterator<Item = DateTime<Utc>>>,
    cap: u64,
) -> Option<(DateTime<Utc>, u64, bool)> {
    let mut iterators: Vec<_> = iterators.map(Iterator::peekable).collect();
    let mut next = || {
        let earliest = iterators
            .iter_mut()
            .filter_map(|i| i.peek().copied())
            .min()?;
        for i in &mut iterators {
            i.next_if_eq(&earliest);
        }
        Some(earliest)
    };
    let first = next()?;
    let mut count = 1;
    while count < cap {
        if next().is_none() {
            return Some((first, count, false));
        }
        count += 1;
    }
    Some((first, count, next().is_some()))
}

/// What one rule asks of one account: an action on a selection, in some regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub rule: String,
    pub action: Action,
    pub regions: Vec<String>,
    pub selection: Selection,
    /// The rule's time zone: a `shiftd:skip-until` date is read in it.
    pub timezone: Tz,
    pub stop_mode: StopMode,
    /// How late it may still be acted on (the end of its claim's window, with `[cluster]`).
    pub catch_up: std::time::Duration,
    /// The rule's next occurrence (of either action) after this one, from which the desired state may
    /// differ: an enforce pass acts on nothing decided after it, and a batch paced by EC2's limits
    /// sends nothing after it (the rest is reported failed as throttled).
    pub valid_until: Option<DateTime<Utc>>,
}

impl Request {
    /// What `rule` asks for `action`.
    pub fn new(rule: &Rule, action: Action) -> Self {
        Request {
            rule: rule.name.clone(),
            action,
            regions: rule.regions.clone(),
            selection: rule.selection.clone(),
            timezone: rule.timezone,
            stop_mode: rule.stop_mode,
            catch_up: rule.catch_up,
            valid_until: None,
        }
    }
}

/// Everything due for one account at one instant: rules due together for the same account are merged so
/// that each region is described and acted on once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountBatch {
    pub account: String,
    pub at: DateTime<Utc>,
    pub requests: Vec<Request>,
}

impl AccountBatch {
    pub fn regions(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.requests.iter().flat_map(|r| &r.regions).collect();
        set.into_iter().cloned().collect()
    }
}

/// Groups due firings by account. Firings of rules (in that account) no longer in `config` are dropped.
pub fn batches(config: &Config, due: &[Firing], at: DateTime<Utc>) -> Vec<AccountBatch> {
    let mut by_account: BTreeMap<&str, Vec<Request>> = BTreeMap::new();
    for f in due {
        let Some(rule) = config
            .rules
            .iter()
            .find(|r| r.name == f.rule && r.account == f.account)
        else {
            continue;
        };
        let next = [Action::Start, Action::Stop]
            .into_iter()
            .flat_map(|a| rule.schedules(a))
            .filter_map(|s| s.next_after(f.at, rule.timezone))
            .min();
        by_account.entry(&rule.account).or_default().push(Request {
            valid_until: next,
            ..Request::new(rule, f.action)
        });
    }
    by_account
        .into_iter()
        .map(|(account, requests)| AccountBatch {
            account: account.to_string(),
            at,
            requests,
        })
        .collect()
}

/// An instance as the planner sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceView {
    pub id: String,
    /// EC2 state name: pending, running, stopping, stopped, shutting-down, terminated.
    pub state: String,
    /// EC2's state reason, when it gives one (e.g. `Client.InternalError: ...`).
    pub state_reason: Option<String>,
    /// Its tags (the override tags `shiftd:skip` and `shiftd:skip-until` among them).
    pub tags: BTreeMap<String, String>,
    /// `HibernationOptions.Configured`: a stop may hibernate it.
    pub hibernation_configured: bool,
}

/// An instance one region's describe calls found, with the requests that selected it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    pub instance: InstanceView,
    /// (rule, action) pairs that selected this instance.
    pub by: Vec<(String, Action)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Call Start/Stop for it.
    Act,
    /// Already on its way to the target state: no call, but follow it there and report the result.
    Follow(String),
    /// In the opposite transition (a stop due while it is `pending`, a start while `stopping`): wait for
    /// the transition to end, then decide again. Not interrupted, not skipped.
    AwaitTransition(String),
    /// Nothing to do (already there, terminated).
    Skip(String),
    /// Not acted on, and that is a problem the operator must see.
    Fail(String),
}

/// The planned fate of one instance in one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub instance_id: String,
    pub action: Action,
    pub rules: Vec<String>,
    pub decision: Decision,
}

/// Decides, per selected instance, whether to act. An instance selected by rules that want opposite
/// actions at the same instant is not touched: that is a configuration conflict, reported as failed.
pub fn decide(selected: &[Selected]) -> Vec<Planned> {
    selected
        .iter()
        .map(|s| {
            let actions: BTreeSet<Action> = s.by.iter().map(|(_, a)| *a).collect();
            let mut rules: Vec<String> = s.by.iter().map(|(r, _)| r.clone()).collect();
            rules.sort();
            rules.dedup();
            let action = *actions
                .iter()
                .next()
                .expect("selected by at least one request");
            if actions.len() > 1 {
                return Planned {
                    instance_id: s.instance.id.clone(),
                    action,
                    rules: rules.clone(),
                    decision: Decision::Fail(format!(
                        "conflicting rules: {} want start and stop at the same instant; left as {}",
                        rules.join(", "),
                        s.instance.state
                    )),
                };
            }
            Planned {
                instance_id: s.instance.id.clone(),
                action,
                rules,
                decision: decide_one(action, &s.instance.state),
            }
        })
        .collect()
}

fn decide_one(action: Action, state: &str) -> Decision {
    use Action::*;
    match (action, state) {
        (Start, "stopped") | (Stop, "running") => Decision::Act,
        (Start, "running") | (Stop, "stopped") => Decision::Skip(format!("already {state}")),
        (Start, "pending") => Decision::Follow("already starting (pending)".into()),
        (Stop, "stopping") => Decision::Follow("already stopping".into()),
        (Start, "stopping") | (Stop, "pending") => {
            Decision::AwaitTransition(format!("in transition ({state})"))
        }
        (_, "shutting-down" | "terminated") => Decision::Skip(format!("instance is {state}")),
        (_, other) => Decision::Fail(format!("unexpected instance state {other:?}")),
    }
}

/// The tag that leaves an instance alone for good when it is `true`.
pub const SKIP_TAG: &str = "shiftd:skip";
/// The tag that leaves an instance alone until the time (RFC 3339) or date (in the rule's zone) it holds.
pub const SKIP_UNTIL_TAG: &str = "shiftd:skip-until";

/// An override tag that holds an instance: shiftd leaves it alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The tag and its value, as found on the instance.
    pub tag: &'static str,
    pub value: String,
    /// Until when (`None`: for good, or unreadable).
    pub until: Option<DateTime<Utc>>,
    /// The value does not parse: the instance is protected all the same, and that deserves a warning.
    pub unreadable: bool,
}

impl Held {
    /// Why the instance is left alone, for its outcome.
    pub fn reason(&self) -> String {
        let Held {
            tag, value, until, ..
        } = self;
        match (until, self.unreadable) {
            (_, true) => format!(
                "left alone: tag {tag}={value:?} does not parse (expected {}); the instance is \
                 protected until it is fixed or removed",
                if *tag == SKIP_TAG {
                    "\"true\" or \"false\""
                } else {
                    "an RFC 3339 time or a YYYY-MM-DD date"
                }
            ),
            (Some(until), _) => format!(
                "left alone: tag {tag}={value} (until {})",
                until.to_rfc3339()
            ),
            (None, _) => format!("left alone: tag {tag}={value} (opted out)"),
        }
    }
}

/// The override in force on an instance with `tags` at `now`, if any. `shiftd:skip = "true"` holds it
/// for good (`"false"` not at all); `shiftd:skip-until` holds it until the time it names, a date meaning
/// 00:00 of that date in `zone`, and is ignored afterwards. A value that does not parse holds it.
pub fn override_in_force(
    tags: &BTreeMap<String, String>,
    now: DateTime<Utc>,
    zone: Tz,
) -> Option<Held> {
    if let Some(value) = tags.get(SKIP_TAG) {
        let held = |unreadable| Held {
            tag: SKIP_TAG,
            value: value.clone(),
            until: None,
            unreadable,
        };
        match value.trim().to_ascii_lowercase().as_str() {
            "true" => return Some(held(false)),
            "false" => {}
            _ => return Some(held(true)),
        }
    }
    let value = tags.get(SKIP_UNTIL_TAG)?;
    match parse_skip_until(value.trim(), zone) {
        Some(until) if until > now => Some(Held {
            tag: SKIP_UNTIL_TAG,
            value: value.clone(),
            until: Some(until),
            unreadable: false,
        }),
        Some(_) => None,
        None => Some(Held {
            tag: SKIP_UNTIL_TAG,
            value: value.clone(),
            until: None,
            unreadable: true,
        }),
    }
}

/// A `shiftd:skip-until` value: an RFC 3339 time, or a date (00:00 in `zone`; the first valid time of
/// that day when 00:00 does not exist there).
fn parse_skip_until(value: &str, zone: Tz) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Some(t.with_timezone(&Utc));
    }
    let date = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").ok()?;
    if value.len() != 10 {
        return None;
    }
    (0..=24 * 60).find_map(|minute| {
        let local = date.and_hms_opt(0, 0, 0)? + chrono::Duration::minutes(minute);
        local
            .and_local_timezone(zone)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
    })
}

/// Where an instance stands while it is followed after a Start/Stop call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    Reached,
    Waiting,
    Failed(String),
}

/// Reads one observation of an instance that was asked to `action`. `left_initial_state` says whether an
/// earlier observation already showed it move away from where it was (describe is eventually consistent:
/// right after StartInstances, a `stopped` can simply be stale).
pub fn progress(
    action: Action,
    view: &InstanceView,
    left_initial_state: bool,
    initial_reason: Option<&str>,
) -> Progress {
    let reason = || {
        view.state_reason
            .clone()
            .map_or(String::new(), |r| format!(": {r}"))
    };
    match (action, view.state.as_str()) {
        (Action::Start, "running") | (Action::Stop, "stopped") => Progress::Reached,
        (Action::Start, "stopped" | "stopping") => {
            // The classic case: an encrypted EBS volume whose KMS key grant is missing. EC2 gives a
            // Client.* or Server.* state reason. A stopped instance already carries one from its last
            // stop (Client.UserInitiatedShutdown), and DescribeInstances may still show that view
            // right after the call: only a reason the instance did not have before counts.
            let has_new_error_reason = view.state_reason.as_deref().is_some_and(|r| {
                (r.starts_with("Client.") || r.starts_with("Server.")) && Some(r) != initial_reason
            });
            if left_initial_state || has_new_error_reason {
                Progress::Failed(format!(
                    "fell back to {} after start{}",
                    view.state,
                    reason()
                ))
            } else {
                Progress::Waiting
            }
        }
        (_, "shutting-down" | "terminated") => {
            Progress::Failed(format!("instance is {}{}", view.state, reason()))
        }
        _ => Progress::Waiting,
    }
}

/// Pause between two observations while following instances: quick at first, then every 15 s.
pub fn poll_interval(attempt: u32) -> Duration {
    Duration::from_secs(match attempt {
        0 => 1,
        1 => 2,
        2 => 5,
        3 => 10,
        _ => 15,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const CONFIG: &str = r#"
[accounts.a1]
role_arn = "arn:aws:iam::111111111111:role/r"
regions = ["ap-northeast-1", "us-east-1"]
[accounts.a2]
role_arn = "arn:aws:iam::222222222222:role/r"
regions = ["eu-west-1"]

[[rules]]
name = "office"
account = "a1"
regions = ["ap-northeast-1"]
tags = { Schedule = "office" }
start = "0 8 * * Mon-Fri"
stop = "0 20 * * Mon-Fri"
timezone = "Asia/Tokyo"

[[rules]]
name = "nightly"
account = "a1"
instances = ["i-0123456789abcdef0"]
stop = ["0 11 * * *", "0 11 * * 1"]

[[rules]]
name = "eu"
account = "a2"
instances = ["i-01234567"]
stop = "0 11 * * *"
"#;

    fn config() -> Config {
        Config::parse(Path::new("t.toml"), CONFIG).unwrap()
    }

    #[test]
    fn next_due_is_the_earliest_rule() {
        let c = config();
        // Sunday 2026-11-29 10:00Z: nightly/eu stop at 11:00Z; office starts Monday 08:00 JST = Sun 23:00Z.
        assert_eq!(
            next_due(&c, utc("2026-11-29T10:00:00Z")),
            Some(utc("2026-11-29T11:00:00Z"))
        );
        assert_eq!(
            next_due(&c, utc("2026-11-29T11:00:00Z")),
            Some(utc("2026-11-29T23:00:00Z"))
        );
    }

    #[test]
    fn next_due_remembered_answers_as_next_due_and_scans_again_only_past_its_answer() {
        let c = config();
        let mut next = NextDue::default();
        let eleven = utc("2026-11-29T11:00:00Z");
        let office = utc("2026-11-29T23:00:00Z");
        assert_eq!(next.get(&c, utc("2026-11-29T10:00:00Z")), Some(eleven));
        // Later, still before the answer: the same answer, without a scan (an empty configuration
        // would say None).
        let empty = Config::parse(Path::new("t.toml"), "").unwrap();
        assert_eq!(next.get(&empty, utc("2026-11-29T10:59:59Z")), Some(eleven));
        // At the answer or earlier than the question (a clock stepped back): scanned again.
        assert_eq!(next.get(&c, eleven), Some(office));
        assert_eq!(next.get(&c, utc("2026-11-29T10:00:00Z")), Some(eleven));
        // Forgotten with the configuration.
        next.forget();
        assert_eq!(next.get(&empty, utc("2026-11-29T10:30:00Z")), None);
        assert_eq!(
            next.get(&c, utc("2026-11-30T10:30:00Z")),
            None,
            "None holds too"
        );
        next.forget();
        for at in [
            "2026-11-29T10:00:00Z",
            "2026-11-29T12:00:00Z",
            "2026-11-30T12:00:00Z",
        ] {
            assert_eq!(next.get(&c, utc(at)), next_due(&c, utc(at)), "{at}");
        }
    }

    /// The account of the test configurations' rules.
    fn account_of(rule: &str) -> String {
        if rule == "eu" { "a2" } else { "a1" }.to_string()
    }

    fn firing(rule: &str, action: Action, at: &str) -> Firing {
        Firing {
            rule: rule.into(),
            account: account_of(rule),
            action,
            at: utc(at),
        }
    }

    fn missed(rule: &str, action: Action, count: u64, first: &str, last: &str) -> Missed {
        Missed {
            rule: rule.into(),
            account: account_of(rule),
            action,
            count,
            count_is_lower_bound: false,
            first: utc(first),
            last: utc(last),
        }
    }

    fn sorted_due(mut v: Vec<Firing>) -> Vec<Firing> {
        v.sort_by(|a, b| (a.at, &a.rule, a.action).cmp(&(b.at, &b.rule, b.action)));
        v
    }

    fn sorted_missed(mut v: Vec<Missed>) -> Vec<Missed> {
        v.sort_by(|a, b| (a.first, &a.rule, a.action).cmp(&(b.first, &b.rule, b.action)));
        v
    }

    #[test]
    fn due_between_table() {
        let c = config();
        use Action::Stop;
        // (after, now, due, missed)
        let cases: Vec<(&str, &str, Vec<Firing>, Vec<Missed>)> = vec![
            (
                "2026-11-29T10:00:00Z",
                "2026-11-29T10:59:59Z",
                vec![],
                vec![],
            ),
            // On time (Monday): every rule stopping at 11:00Z (20:00 JST) is due; two expressions of one
            // rule firing at the same instant count once.
            (
                "2026-11-30T10:00:00Z",
                "2026-11-30T11:00:00Z",
                vec![
                    firing("nightly", Stop, "2026-11-30T11:00:00Z"),
                    firing("eu", Stop, "2026-11-30T11:00:00Z"),
                    firing("office", Stop, "2026-11-30T11:00:00Z"),
                ],
                vec![],
            ),
            // Two minutes late: still acted on.
            (
                "2026-11-29T10:00:00Z",
                "2026-11-29T11:02:00Z",
                vec![
                    firing("nightly", Stop, "2026-11-29T11:00:00Z"),
                    firing("eu", Stop, "2026-11-29T11:00:00Z"),
                ],
                vec![],
            ),
            // An hour late: missed, reported, not acted on.
            (
                "2026-11-29T10:00:00Z",
                "2026-11-29T12:00:00Z",
                vec![],
                vec![
                    missed(
                        "nightly",
                        Stop,
                        1,
                        "2026-11-29T11:00:00Z",
                        "2026-11-29T11:00:00Z",
                    ),
                    missed(
                        "eu",
                        Stop,
                        1,
                        "2026-11-29T11:00:00Z",
                        "2026-11-29T11:00:00Z",
                    ),
                ],
            ),
            // Asleep over two days: the older occurrences are missed, the latest (on time) is due.
            (
                "2026-11-27T10:30:00Z",
                "2026-11-29T11:00:30Z",
                vec![
                    firing("nightly", Stop, "2026-11-29T11:00:00Z"),
                    firing("eu", Stop, "2026-11-29T11:00:00Z"),
                ],
                vec![
                    missed(
                        "office",
                        Stop,
                        1,
                        "2026-11-27T11:00:00Z",
                        "2026-11-27T11:00:00Z",
                    ),
                    missed(
                        "nightly",
                        Stop,
                        2,
                        "2026-11-27T11:00:00Z",
                        "2026-11-28T11:00:00Z",
                    ),
                    missed(
                        "eu",
                        Stop,
                        2,
                        "2026-11-27T11:00:00Z",
                        "2026-11-28T11:00:00Z",
                    ),
                ],
            ),
            // Asleep over a week, waking late: the latest is missed too. Mondays count once for the
            // nightly rule's two expressions.
            (
                "2026-11-22T12:00:00Z",
                "2026-11-30T12:00:00Z",
                vec![],
                vec![
                    // 08:00 JST is 23:00Z the day before: Monday 23 to Friday 27, and Monday 30.
                    missed(
                        "office",
                        Action::Start,
                        6,
                        "2026-11-22T23:00:00Z",
                        "2026-11-29T23:00:00Z",
                    ),
                    missed(
                        "office",
                        Stop,
                        6,
                        "2026-11-23T11:00:00Z",
                        "2026-11-30T11:00:00Z",
                    ),
                    missed(
                        "nightly",
                        Stop,
                        8,
                        "2026-11-23T11:00:00Z",
                        "2026-11-30T11:00:00Z",
                    ),
                    missed(
                        "eu",
                        Stop,
                        8,
                        "2026-11-23T11:00:00Z",
                        "2026-11-30T11:00:00Z",
                    ),
                ],
            ),
        ];
        for (after, now, due, missed) in cases {
            let got = due_between(&c, utc(after), utc(now));
            assert_eq!(
                sorted_due(got.due),
                sorted_due(due),
                "due in ({after}, {now}]"
            );
            assert_eq!(
                sorted_missed(got.missed),
                sorted_missed(missed),
                "missed in ({after}, {now}]"
            );
        }
    }

    const FREQUENT: &str = r#"
[accounts.a1]
role_arn = "arn:aws:iam::111111111111:role/r"
regions = ["eu-west-1"]

[[rules]]
name = "every-second"
account = "a1"
instances = ["i-01234567"]
start = "* * * * * *"
timezone = "Europe/Berlin"

[[rules]]
name = "minutes"
account = "a1"
instances = ["i-01234567"]
stop = ["*/2 * * * *", "*/3 * * * *"]
timezone = "Europe/Berlin"

[[rules]]
name = "hourly"
account = "a1"
instances = ["i-01234567"]
start = "0 * * * *"
stop = "*/30 * * * *"
timezone = "America/New_York"
"#;

    fn frequent() -> Config {
        Config::parse(Path::new("t.toml"), FREQUENT).unwrap()
    }

    #[test]
    fn due_between_finds_the_latest_occurrence_after_any_outage() {
        use Action::{Start, Stop};
        let c = frequent();
        let lower_bound = |mut m: Missed| {
            m.count_is_lower_bound = true;
            m
        };
        // (after, now, due, missed)
        let cases: Vec<(&str, &str, Vec<Firing>, Vec<Missed>)> = vec![
            // Eight days asleep: what is due is this second's, not one 10,000 seconds after waking;
            // the missed ones are counted up to the cap, from the first to the one just before.
            (
                "2027-03-22T12:00:00.5Z",
                "2027-03-30T12:00:00.5Z",
                vec![
                    firing("every-second", Start, "2027-03-30T12:00:00Z"),
                    firing("minutes", Stop, "2027-03-30T12:00:00Z"),
                    firing("hourly", Start, "2027-03-30T12:00:00Z"),
                    firing("hourly", Stop, "2027-03-30T12:00:00Z"),
                ],
                vec![
                    lower_bound(missed(
                        "every-second",
                        Start,
                        MISSED_COUNT_CAP,
                        "2027-03-22T12:00:01Z",
                        "2027-03-30T11:59:59Z",
                    )),
                    // Every 2 or 3 minutes: 40 an hour (30 + 20, less the 10 of both), the latest
                    // due. Berlin springs forward meanwhile: the marks from 02:00 to 02:58 fire at
                    // 03:00 with 03:00's, once, so every real hour still has 40.
                    missed(
                        "minutes",
                        Stop,
                        8 * 24 * 40 - 1,
                        "2027-03-22T12:02:00Z",
                        "2027-03-30T11:58:00Z",
                    ),
                    missed(
                        "hourly",
                        Start,
                        8 * 24 - 1,
                        "2027-03-22T13:00:00Z",
                        "2027-03-30T11:00:00Z",
                    ),
                    missed(
                        "hourly",
                        Stop,
                        8 * 48 - 1,
                        "2027-03-22T12:30:00Z",
                        "2027-03-30T11:30:00Z",
                    ),
                ],
            ),
            // An hour: 2- and 3-minute marks, those of 6 minutes counted once (30 + 20 - 10).
            (
                "2026-11-29T10:00:00Z",
                "2026-11-29T11:00:30Z",
                vec![
                    firing("every-second", Start, "2026-11-29T11:00:30Z"),
                    firing("minutes", Stop, "2026-11-29T11:00:00Z"),
                    firing("hourly", Start, "2026-11-29T11:00:00Z"),
                    firing("hourly", Stop, "2026-11-29T11:00:00Z"),
                ],
                vec![
                    missed(
                        "every-second",
                        Start,
                        3600 + 30 - 1,
                        "2026-11-29T10:00:01Z",
                        "2026-11-29T11:00:29Z",
                    ),
                    missed(
                        "minutes",
                        Stop,
                        39,
                        "2026-11-29T10:02:00Z",
                        "2026-11-29T10:58:00Z",
                    ),
                    missed(
                        "hourly",
                        Stop,
                        1,
                        "2026-11-29T10:30:00Z",
                        "2026-11-29T10:30:00Z",
                    ),
                ],
            ),
            // Berlin springs forward at 02:00 local (01:00Z): no second of the gap fires; the minute
            // marks from 02:00 to 02:58 fire at 03:00 with 03:00's, once. New York, a few minutes late.
            (
                "2027-03-28T00:40:00Z",
                "2027-03-28T01:03:00Z",
                vec![
                    firing("every-second", Start, "2027-03-28T01:03:00Z"),
                    firing("minutes", Stop, "2027-03-28T01:03:00Z"),
                    firing("hourly", Start, "2027-03-28T01:00:00Z"),
                    firing("hourly", Stop, "2027-03-28T01:00:00Z"),
                ],
                vec![
                    missed(
                        "every-second",
                        Start,
                        23 * 60 - 1,
                        "2027-03-28T00:40:01Z",
                        "2027-03-28T01:02:59Z",
                    ),
                    // 01:41 to 01:59 local: 12; 02:00 to 03:00 local: 1; 03:02.
                    missed(
                        "minutes",
                        Stop,
                        12 + 1 + 1,
                        "2027-03-28T00:42:00Z",
                        "2027-03-28T01:02:00Z",
                    ),
                ],
            ),
            // New York falls back at 02:00 local (06:00Z): the repeated hour fires once.
            (
                "2026-11-01T04:20:00Z",
                "2026-11-01T07:00:05Z",
                vec![
                    firing("every-second", Start, "2026-11-01T07:00:05Z"),
                    firing("minutes", Stop, "2026-11-01T07:00:00Z"),
                    firing("hourly", Start, "2026-11-01T07:00:00Z"),
                    firing("hourly", Stop, "2026-11-01T07:00:00Z"),
                ],
                vec![
                    // Berlin changed a week before: every second fires.
                    missed(
                        "every-second",
                        Start,
                        9605 - 1,
                        "2026-11-01T04:20:01Z",
                        "2026-11-01T07:00:04Z",
                    ),
                    // 04:21 to 04:59: 26; 40 in each of the next two hours.
                    missed(
                        "minutes",
                        Stop,
                        26 + 40 + 40,
                        "2026-11-01T04:21:00Z",
                        "2026-11-01T06:58:00Z",
                    ),
                    // 01:00 EDT only (05:00Z), not 01:00 EST (06:00Z).
                    missed(
                        "hourly",
                        Start,
                        1,
                        "2026-11-01T05:00:00Z",
                        "2026-11-01T05:00:00Z",
                    ),
                    // 00:30, 01:00, 01:30 EDT, not their repetitions in EST.
                    missed(
                        "hourly",
                        Stop,
                        3,
                        "2026-11-01T04:30:00Z",
                        "2026-11-01T05:30:00Z",
                    ),
                ],
            ),
        ];
        for (after, now, due, missed) in cases {
            let got = due_between(&c, utc(after), utc(now));
            assert_eq!(
                sorted_due(got.due),
                sorted_due(due),
                "due in ({after}, {now}]"
            );
            assert_eq!(
                sorted_missed(got.missed),
                sorted_missed(missed),
                "missed in ({after}, {now}]"
            );
        }
    }

    #[test]
    fn count_firings_merges_and_caps() {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(s, 0).unwrap();
        // (the iterators' instants, cap, (first, count, more than cap))
        type Case<'a> = (&'a [&'a [i64]], u64, Option<(i64, u64, bool)>);
        let cases: &[Case] = &[
            (&[], 10, None),
            (&[&[], &[]], 10, None),
            (&[&[1, 3, 5], &[3, 4]], 10, Some((1, 4, false))),
            (&[&[1, 3, 5], &[3, 4]], 4, Some((1, 4, false))),
            (&[&[1, 3, 5], &[3, 4]], 3, Some((1, 3, true))),
            (&[&[2], &[1, 2], &[2, 9]], 10, Some((1, 3, false))),
            (&[&[7]], 1, Some((7, 1, false))),
        ];
        for (instants, cap, want) in cases {
            let iterators = instants.iter().map(|v| v.iter().map(|s| t(*s)));
            let got = count_firings(iterators, *cap);
            assert_eq!(
                got,
                want.map(|(first, n, more)| (t(first), n, more)),
                "{instants:?} capped at {cap}"
            );
        }
    }

    /// Occurrences in `(after, now]` of each rule and action, counting once those of several expressions
    /// at one instant.
    fn occurrences(c: &Config, after: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
        let mut total = 0;
        for rule in &c.rules {
            for action in [Action::Start, Action::Stop] {
                let instants: BTreeSet<DateTime<Utc>> = rule
                    .schedules(action)
                    .iter()
                    .flat_map(|s| s.firings_between(after, now, rule.timezone, usize::MAX))
                    .collect();
                total += instants.len() as u64;
            }
        }
        total
    }

    #[test]
    fn adjacent_windows_handle_each_occurrence_once() {
        // (configuration, instants where the daemon woke; the first is where it resumed)
        let cases: Vec<(Config, Vec<&str>)> = vec![
            (
                config(),
                vec![
                    "2026-11-22T12:00:00Z",
                    "2026-11-24T09:17:03Z",
                    "2026-11-24T11:00:00Z",
                    "2026-11-24T11:04:59Z",
                    "2026-11-27T23:00:00.250Z",
                    "2026-11-30T12:00:00Z",
                ],
            ),
            (
                frequent(),
                vec![
                    "2026-11-01T04:00:00Z",
                    "2026-11-01T04:20:00.5Z",
                    "2026-11-01T05:00:00Z",
                    "2026-11-01T05:59:59Z",
                    "2026-11-01T06:30:00Z",
                    "2026-11-01T06:30:00.001Z",
                    "2026-11-01T06:30:01Z",
                    "2026-11-01T06:41:00Z",
                ],
            ),
            (
                frequent(),
                vec![
                    "2027-03-28T00:10:00Z",
                    "2027-03-28T00:59:59Z",
                    "2027-03-28T01:00:00Z",
                    "2027-03-28T01:00:01Z",
                    "2027-03-28T02:00:00Z",
                ],
            ),
        ];
        for (c, wakes) in cases {
            let wakes: Vec<DateTime<Utc>> = wakes.into_iter().map(utc).collect();
            let (start, end) = (wakes[0], *wakes.last().unwrap());
            let handled = |work: &DueWork| {
                work.due.len() as u64 + work.missed.iter().map(|m| m.count).sum::<u64>()
            };
            let whole = due_between(&c, start, end);
            assert!(whole.missed.iter().all(|m| !m.count_is_lower_bound));
            let mut walked = 0;
            for pair in wakes.windows(2) {
                let (after, now) = (pair[0], pair[1]);
                let work = due_between(&c, after, now);
                // Nothing outside the window.
                for f in &work.due {
                    assert!(after < f.at && f.at <= now, "{f:?} in ({after}, {now}]");
                }
                for m in &work.missed {
                    assert!(
                        after < m.first && m.first <= m.last && m.last <= now,
                        "{m:?}"
                    );
                }
                assert_eq!(
                    handled(&work),
                    occurrences(&c, after, now),
                    "({after}, {now}]"
                );
                walked += handled(&work);
            }
            assert_eq!(walked, handled(&whole), "walking from {start} to {end}");
            assert_eq!(walked, occurrences(&c, start, end), "from {start} to {end}");
        }
    }

    #[test]
    fn batches_merge_rules_of_one_account() {
        let c = config();
        let at = utc("2026-11-30T11:00:00Z");
        let due = vec![
            Firing {
                rule: "nightly".into(),
                account: "a1".into(),
                action: Action::Stop,
                at,
            },
            Firing {
                rule: "eu".into(),
                account: "a2".into(),
                action: Action::Stop,
                at,
            },
            Firing {
                rule: "office".into(),
                account: "a1".into(),
                action: Action::Stop,
                at,
            },
            Firing {
                rule: "removed-by-reload".into(),
                account: "a1".into(),
                action: Action::Stop,
                at,
            },
        ];
        let b = batches(&c, &due, at);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].account, "a1");
        assert_eq!(b[0].requests.len(), 2);
        assert_eq!(b[0].regions(), vec!["ap-northeast-1", "us-east-1"]);
        assert_eq!(b[1].account, "a2");
        assert_eq!(b[1].requests[0].selection.instance_ids, vec!["i-01234567"]);
    }

    #[test]
    fn override_table() {
        let now = "2026-12-01T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let tokyo = chrono_tz::Asia::Tokyo;
        let tags = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        // (tags, zone, held until (RFC 3339) / "forever" / "unreadable" / none)
        let cases: &[(BTreeMap<String, String>, Tz, Option<&str>)] = &[
            (BTreeMap::new(), Tz::UTC, None),
            (tags(SKIP_TAG, "true"), Tz::UTC, Some("forever")),
            (tags(SKIP_TAG, "TRUE"), Tz::UTC, Some("forever")),
            (tags(SKIP_TAG, "false"), Tz::UTC, None),
            (tags(SKIP_TAG, "yes please"), Tz::UTC, Some("unreadable")),
            (
                tags(SKIP_UNTIL_TAG, "2026-12-04T09:00:00+09:00"),
                Tz::UTC,
                Some("2026-12-04T00:00:00+00:00"),
            ),
            (tags(SKIP_UNTIL_TAG, "2026-12-01T11:59:59Z"), Tz::UTC, None),
            (
                tags(SKIP_UNTIL_TAG, "2026-12-02"),
                tokyo,
                Some("2026-12-01T15:00:00+00:00"),
            ),
            (
                tags(SKIP_UNTIL_TAG, "2026-12-02"),
                Tz::UTC,
                Some("2026-12-02T00:00:00+00:00"),
            ),
            (tags(SKIP_UNTIL_TAG, "2026-12-01"), Tz::UTC, None),
            (
                tags(SKIP_UNTIL_TAG, "2026-12-1"),
                Tz::UTC,
                Some("unreadable"),
            ),
            (tags(SKIP_UNTIL_TAG, "friday"), Tz::UTC, Some("unreadable")),
            (tags(SKIP_UNTIL_TAG, ""), Tz::UTC, Some("unreadable")),
        ];
        for (tags, zone, want) in cases {
            let got = override_in_force(tags, now, *zone);
            let got = got.as_ref().map(|h| match (h.unreadable, h.until) {
                (true, _) => "unreadable".to_string(),
                (false, Some(t)) => t.to_rfc3339(),
                (false, None) => "forever".to_string(),
            });
            assert_eq!(got.as_deref(), *want, "{tags:?} in {zone}");
        }
        // A date whose midnight does not exist (Santiago springs forward at 00:00): the first valid time.
        let santiago = chrono_tz::America::Santiago;
        let h = override_in_force(
            &tags(SKIP_UNTIL_TAG, "2026-09-06"),
            now - chrono::Duration::days(200),
            santiago,
        )
        .unwrap();
        assert_eq!(h.until.unwrap().to_rfc3339(), "2026-09-06T04:00:00+00:00");
        assert!(
            h.reason().contains("shiftd:skip-until=2026-09-06"),
            "{}",
            h.reason()
        );
    }

    #[test]
    fn desired_action_is_that_of_the_latest_occurrence() {
        let config = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            r#"
[accounts.a]
role_arn = "arn:aws:iam::111111111111:role/r"
regions = ["us-east-1"]
[[rules]]
name = "office"
account = "a"
instances = ["i-0123456789abcdef0"]
start = "0 8 * * Mon-Fri"
stop = "0 20 * * Mon-Fri"
enforce = true
"#,
        )
        .unwrap();
        let rule = &config.rules[0];
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        // 2026-12-04 is a Friday.
        for (now, want) in [
            (
                "2026-12-04T07:59:59Z",
                (Action::Stop, "2026-12-03T20:00:00Z"),
            ),
            (
                "2026-12-04T08:00:00Z",
                (Action::Start, "2026-12-04T08:00:00Z"),
            ),
            (
                "2026-12-04T19:00:00Z",
                (Action::Start, "2026-12-04T08:00:00Z"),
            ),
            (
                "2026-12-06T12:00:00Z",
                (Action::Stop, "2026-12-04T20:00:00Z"),
            ),
        ] {
            assert_eq!(
                desired_action(rule, at(now)),
                Some((want.0, at(want.1))),
                "{now}"
            );
        }
    }

    #[test]
    fn decide_table() {
        use Decision::*;
        let sel = |state: &str, by: &[(&str, Action)]| Selected {
            instance: InstanceView {
                id: "i-1".into(),
                state: state.into(),
                state_reason: None,
                ..Default::default()
            },
            by: by.iter().map(|(r, a)| (r.to_string(), *a)).collect(),
        };
        let cases: Vec<(Selected, Decision)> = vec![
            (sel("stopped", &[("r", Action::Start)]), Act),
            (sel("running", &[("r", Action::Stop)]), Act),
            (sel("running", &[("r", Action::Start)]), Skip("already running".into())),
            (sel("stopped", &[("r", Action::Stop)]), Skip("already stopped".into())),
            (sel("pending", &[("r", Action::Start)]), Follow("already starting (pending)".into())),
            (sel("stopping", &[("r", Action::Stop)]), Follow("already stopping".into())),
            (sel("stopping", &[("r", Action::Start)]), AwaitTransition("in transition (stopping)".into())),
            (sel("pending", &[("r", Action::Stop)]), AwaitTransition("in transition (pending)".into())),
            (sel("terminated", &[("r", Action::Stop)]), Skip("instance is terminated".into())),
            // The same action from two rules merges into one.
            (sel("running", &[("a", Action::Stop), ("b", Action::Stop)]), Act),
            (
                sel("running", &[("b", Action::Start), ("a", Action::Stop)]),
                Fail("conflicting rules: a, b want start and stop at the same instant; left as running".into()),
            ),
        ];
        for (s, want) in cases {
            let got = decide(std::slice::from_ref(&s));
            assert_eq!(got[0].decision, want, "{s:?}");
        }
        let merged = decide(&[sel("running", &[("b", Action::Stop), ("a", Action::Stop)])]);
        assert_eq!(merged[0].rules, vec!["a", "b"]);
    }

    #[test]
    fn progress_table() {
        let v = |state: &str, reason: Option<&str>| InstanceView {
            id: "i-1".into(),
            state: state.into(),
            state_reason: reason.map(String::from),
            ..Default::default()
        };
        let kms = "Client.InternalError: Client error on launch";
        let user = "Client.UserInitiatedShutdown: User initiated shutdown";
        // (action, observed, left the initial state, initial state reason, expected)
        let cases = [
            (
                Action::Start,
                v("running", None),
                false,
                None,
                Progress::Reached,
            ),
            (
                Action::Start,
                v("pending", None),
                false,
                None,
                Progress::Waiting,
            ),
            // Right after the call a stale `stopped` is not a failure, even with the reason of the
            // stop that preceded it...
            (
                Action::Start,
                v("stopped", None),
                false,
                None,
                Progress::Waiting,
            ),
            (
                Action::Start,
                v("stopped", Some(user)),
                false,
                Some(user),
                Progress::Waiting,
            ),
            // ...but after pending, or with a new error reason, it is.
            (
                Action::Start,
                v("stopped", Some(user)),
                true,
                Some(user),
                Progress::Failed(format!("fell back to stopped after start: {user}")),
            ),
            (
                Action::Start,
                v("stopped", None),
                true,
                None,
                Progress::Failed("fell back to stopped after start".into()),
            ),
            (
                Action::Start,
                v("stopped", Some(kms)),
                false,
                Some(user),
                Progress::Failed(format!("fell back to stopped after start: {kms}")),
            ),
            (
                Action::Start,
                v("stopping", Some(kms)),
                true,
                None,
                Progress::Failed(format!("fell back to stopping after start: {kms}")),
            ),
            (
                Action::Stop,
                v("stopping", None),
                true,
                None,
                Progress::Waiting,
            ),
            (
                Action::Stop,
                v("stopped", Some(user)),
                true,
                None,
                Progress::Reached,
            ),
            (
                Action::Stop,
                v("terminated", None),
                true,
                None,
                Progress::Failed("instance is terminated".into()),
            ),
        ];
        for (action, view, left, initial_reason, want) in cases {
            assert_eq!(
                progress(action, &view, left, initial_reason),
                want,
                "{action} {view:?} {left} {initial_reason:?}"
            );
        }
    }
}
