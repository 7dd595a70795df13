//! The action planner: which rules are due, how their work is grouped, what to do with each instance,
//! and how to read an instance's state while following it. Pure: no I/O, no clock reads, no SDK types.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{Action, Config, Selection};

/// A due action may still be carried out this long after its instant (e.g. after a suspend or a slow
/// start); older occurrences are reported as missed instead of acted on late.
pub const LATE_TOLERANCE: Duration = Duration::from_secs(300);

/// One occurrence of one rule's action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firing {
    pub rule: String,
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

/// What became due in `(after, now]`: per rule and action, the latest occurrence is `due` (acted on if it
/// is at most [`LATE_TOLERANCE`] old) and every other occurrence is `missed`. Each occurrence appears in
/// exactly one of the lists, so walking time forward in adjacent windows handles each exactly once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DueWork {
    pub due: Vec<Firing>,
    pub missed: Vec<Firing>,
}

pub fn due_between(config: &Config, after: DateTime<Utc>, now: DateTime<Utc>) -> DueWork {
    let mut work = DueWork::default();
    if now <= after {
        return work;
    }
    let tolerance = chrono::Duration::from_std(LATE_TOLERANCE).expect("small constant");
    for rule in &config.rules {
        for action in [Action::Start, Action::Stop] {
            // Latest occurrence of any of this action's expressions; several expressions that fire at the
            // same instant count once.
            let mut instants: BTreeSet<DateTime<Utc>> = BTreeSet::new();
            for s in rule.schedules(action) {
                // A rule firing every second over a long outage is bounded: only the count matters then.
                instants.extend(s.firings_between(after, now, rule.timezone, 10_000));
            }
            let Some(latest) = instants.pop_last() else {
                continue;
            };
            let firing = |at| Firing {
                rule: rule.name.clone(),
                action,
                at,
            };
            if now - latest <= tolerance {
                work.due.push(firing(latest));
            } else {
                work.missed.push(firing(latest));
            }
            work.missed.extend(instants.into_iter().map(firing));
        }
    }
    work.missed.sort_by_key(|f| f.at);
    work
}

/// What one rule asks of one account: an action on a selection, in some regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub rule: String,
    pub action: Action,
    pub regions: Vec<String>,
    pub selection: Selection,
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

/// Groups due firings by account. Firings of rules no longer in `config` are dropped.
pub fn batches(config: &Config, due: &[Firing], at: DateTime<Utc>) -> Vec<AccountBatch> {
    let mut by_account: BTreeMap<&str, Vec<Request>> = BTreeMap::new();
    for f in due {
        let Some(rule) = config.rules.iter().find(|r| r.name == f.rule) else {
            continue;
        };
        by_account.entry(&rule.account).or_default().push(Request {
            rule: rule.name.clone(),
            action: f.action,
            regions: rule.regions.clone(),
            selection: rule.selection.clone(),
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceView {
    pub id: String,
    /// EC2 state name: pending, running, stopping, stopped, shutting-down, terminated.
    pub state: String,
    /// EC2's state reason, when it gives one (e.g. `Client.InternalError: ...`).
    pub state_reason: Option<String>,
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
    fn due_between_table() {
        let c = config();
        let f = |rule: &str, action, at| Firing {
            rule: rule.into(),
            action,
            at: utc(at),
        };
        // (after, now, due, missed)
        let cases: Vec<(&str, &str, Vec<Firing>, Vec<Firing>)> = vec![
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
                    f("nightly", Action::Stop, "2026-11-30T11:00:00Z"),
                    f("eu", Action::Stop, "2026-11-30T11:00:00Z"),
                    f("office", Action::Stop, "2026-11-30T11:00:00Z"),
                ],
                vec![],
            ),
            // Two minutes late: still acted on.
            (
                "2026-11-29T10:00:00Z",
                "2026-11-29T11:02:00Z",
                vec![
                    f("nightly", Action::Stop, "2026-11-29T11:00:00Z"),
                    f("eu", Action::Stop, "2026-11-29T11:00:00Z"),
                ],
                vec![],
            ),
            // An hour late: missed, reported, not acted on.
            (
                "2026-11-29T10:00:00Z",
                "2026-11-29T12:00:00Z",
                vec![],
                vec![
                    f("nightly", Action::Stop, "2026-11-29T11:00:00Z"),
                    f("eu", Action::Stop, "2026-11-29T11:00:00Z"),
                ],
            ),
            // Asleep over two days: the older occurrences are missed, the latest (on time) is due.
            (
                "2026-11-27T10:30:00Z",
                "2026-11-29T11:00:30Z",
                vec![
                    f("nightly", Action::Stop, "2026-11-29T11:00:00Z"),
                    f("eu", Action::Stop, "2026-11-29T11:00:00Z"),
                ],
                vec![
                    f("office", Action::Stop, "2026-11-27T11:00:00Z"),
                    f("nightly", Action::Stop, "2026-11-27T11:00:00Z"),
                    f("eu", Action::Stop, "2026-11-27T11:00:00Z"),
                    f("nightly", Action::Stop, "2026-11-28T11:00:00Z"),
                    f("eu", Action::Stop, "2026-11-28T11:00:00Z"),
                ],
            ),
        ];
        for (after, now, due, missed) in cases {
            let got = due_between(&c, utc(after), utc(now));
            let sorted = |mut v: Vec<Firing>| {
                v.sort_by(|a, b| (a.at, &a.rule).cmp(&(b.at, &b.rule)));
                v
            };
            assert_eq!(sorted(got.due), sorted(due), "due in ({after}, {now}]");
            assert_eq!(
                sorted(got.missed),
                sorted(missed),
                "missed in ({after}, {now}]"
            );
        }
    }

    #[test]
    fn batches_merge_rules_of_one_account() {
        let c = config();
        let at = utc("2026-11-30T11:00:00Z");
        let due = vec![
            Firing {
                rule: "nightly".into(),
                action: Action::Stop,
                at,
            },
            Firing {
                rule: "eu".into(),
                action: Action::Stop,
                at,
            },
            Firing {
                rule: "office".into(),
                action: Action::Stop,
                at,
            },
            Firing {
                rule: "removed-by-reload".into(),
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
    fn decide_table() {
        use Decision::*;
        let sel = |state: &str, by: &[(&str, Action)]| Selected {
            instance: InstanceView {
                id: "i-1".into(),
                state: state.into(),
                state_reason: None,
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
