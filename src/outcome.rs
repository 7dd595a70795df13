//! What happened to each instance action, and how it is logged: one entry per instance action, with
//! structured fields that journald stores as `SHIFTD_ACTION`, `SHIFTD_RULE`, `SHIFTD_ACCOUNT`,
//! `SHIFTD_REGION`, `SHIFTD_INSTANCE_ID`, `SHIFTD_RESULT`, `SHIFTD_REASON`, `SHIFTD_TRIGGER` and
//! `SHIFTD_DETAIL`.
//!
//! `SHIFTD_REASON` says why: for a scheduled action, what happened (`running after 41s`); for an
//! action taken to enforce a rule's state or by hand, exactly `enforce` or `manual` (so that
//! `journalctl -u shiftd SHIFTD_REASON=enforce` finds them), with what happened in `SHIFTD_DETAIL`.
//! `SHIFTD_DETAIL` always holds what happened; `SHIFTD_TRIGGER` is `schedule`, `enforce` or `manual`.

use std::fmt;

use crate::config::Action;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResultKind {
    Ok,
    Skipped,
    Failed,
    /// An occurrence that was not acted on because shiftd was not running (or the machine was
    /// suspended) at its instant, and it was past its catch-up window when noticed.
    Missed,
    DryRun,
}

impl ResultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultKind::Ok => "ok",
            ResultKind::Skipped => "skipped",
            ResultKind::Failed => "failed",
            ResultKind::Missed => "missed",
            ResultKind::DryRun => "dry-run",
        }
    }
}

/// What made shiftd act.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// An occurrence of a rule's schedule (or its catch-up after downtime).
    #[default]
    Schedule,
    /// A rule with `enforce = true` found an instance out of its desired state.
    Enforce,
    /// `shiftd apply`.
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Enforce => "enforce",
            Trigger::Manual => "manual",
        }
    }
}

impl fmt::Display for ResultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: Action,
    /// The rules that asked for it (several when rules due together selected the same instance).
    pub rules: Vec<String>,
    pub account: String,
    pub region: String,
    /// Absent only when the selection could not be resolved into instances (e.g. a tag selection while
    /// the account had no credentials) or the occurrence was missed.
    pub instance_id: Option<String>,
    pub result: ResultKind,
    /// What happened: `running after 41s`, `already stopped`, the error.
    pub reason: String,
    /// What made shiftd act.
    pub trigger: Trigger,
}

impl Outcome {
    /// `SHIFTD_REASON`: what happened for a scheduled action, else the trigger (`enforce`, `manual`).
    pub fn why(&self) -> &str {
        match self.trigger {
            Trigger::Schedule => &self.reason,
            other => other.as_str(),
        }
    }

    /// Writes the outcome to the log: info for ok/skipped/dry-run, error for failed and missed.
    pub fn log(&self) {
        let rule = self.rules.join(",");
        let target = self.instance_id.as_deref().unwrap_or("(selection)");
        let by = match self.trigger {
            Trigger::Schedule => String::new(),
            other => format!(" [{other}]", other = other.as_str()),
        };
        let message = format!(
            "{} {} in {}/{} ({}){by}: {}: {}",
            self.action, target, self.account, self.region, rule, self.result, self.reason
        );
        macro_rules! emit {
            ($level:ident) => {
                match &self.instance_id {
                    Some(id) => tracing::$level!(
                        action = self.action.as_str(),
                        rule = %rule,
                        account = %self.account,
                        region = %self.region,
                        instance_id = %id,
                        result = self.result.as_str(),
                        reason = %self.why(),
                        trigger = self.trigger.as_str(),
                        detail = %self.reason,
                        "{message}"
                    ),
                    None => tracing::$level!(
                        action = self.action.as_str(),
                        rule = %rule,
                        account = %self.account,
                        region = %self.region,
                        result = self.result.as_str(),
                        reason = %self.why(),
                        trigger = self.trigger.as_str(),
                        detail = %self.reason,
                        "{message}"
                    ),
                }
            };
        }
        match self.result {
            ResultKind::Failed | ResultKind::Missed => emit!(error),
            _ => emit!(info),
        }
    }
}

/// Where outcomes go: the journal in the daemon, a recording in the scenario tests.
pub trait OutcomeSink: Send + Sync {
    /// One instance action's outcome (or a selection's, or a missed occurrence's), as it happens.
    fn record(&self, outcome: &Outcome);
    /// Called once a batch is over, with every outcome it recorded (missed occurrences noticed in one
    /// pass count as one batch): where alerts are sent from.
    fn batch_done(&self, _outcomes: &[Outcome]) {}
    /// Called with the configuration in force: once at start, and again after each reload (where
    /// alerts go is part of it). Wrapping sinks pass it on.
    fn configured(&self, _config: &crate::config::Config) {}
}

/// Logs each outcome (journald or stderr, whichever logging was set up).
pub struct LogSink;

impl OutcomeSink for LogSink {
    fn record(&self, outcome: &Outcome) {
        outcome.log();
    }
}

/// Logs each outcome and keeps a copy (with the wall time it was recorded, when given a clock), for
/// tests to assert on.
#[derive(Default)]
pub struct RecordingSink {
    clock: Option<std::sync::Arc<dyn crate::clock::Clock>>,
    outcomes: std::sync::Mutex<Vec<(Option<chrono::DateTime<chrono::Utc>>, Outcome)>>,
}

impl RecordingSink {
    /// A sink that also notes when each outcome was recorded, on `clock`.
    pub fn with_clock(clock: std::sync::Arc<dyn crate::clock::Clock>) -> Self {
        Self {
            clock: Some(clock),
            outcomes: Default::default(),
        }
    }

    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes
            .lock()
            .expect("sink lock")
            .iter()
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Each outcome with the time it was recorded (the epoch without a clock).
    pub fn outcomes_at(&self) -> Vec<(chrono::DateTime<chrono::Utc>, Outcome)> {
        self.outcomes
            .lock()
            .expect("sink lock")
            .iter()
            .map(|(t, o)| (t.unwrap_or_default(), o.clone()))
            .collect()
    }
}

impl OutcomeSink for RecordingSink {
    fn record(&self, outcome: &Outcome) {
        outcome.log();
        let at = self.clock.as_ref().map(|c| c.now());
        self.outcomes
            .lock()
            .expect("sink lock")
            .push((at, outcome.clone()));
    }
}
