//! What happened to each instance action, and how it is logged: one entry per instance action, with
//! structured fields that journald stores as `SHIFTD_ACTION`, `SHIFTD_RULE`, `SHIFTD_ACCOUNT`,
//! `SHIFTD_REGION`, `SHIFTD_INSTANCE_ID`, `SHIFTD_RESULT` and `SHIFTD_REASON`.

use std::fmt;

use crate::config::Action;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResultKind {
    Ok,
    Skipped,
    Failed,
    DryRun,
}

impl ResultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultKind::Ok => "ok",
            ResultKind::Skipped => "skipped",
            ResultKind::Failed => "failed",
            ResultKind::DryRun => "dry-run",
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
    pub reason: String,
}

impl Outcome {
    /// Writes the outcome to the log: info for ok/skipped/dry-run, error for failed.
    pub fn log(&self) {
        let rule = self.rules.join(",");
        let target = self.instance_id.as_deref().unwrap_or("(selection)");
        let message = format!(
            "{} {} in {}/{} ({}): {}: {}",
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
                        reason = %self.reason,
                        "{message}"
                    ),
                    None => tracing::$level!(
                        action = self.action.as_str(),
                        rule = %rule,
                        account = %self.account,
                        region = %self.region,
                        result = self.result.as_str(),
                        reason = %self.reason,
                        "{message}"
                    ),
                }
            };
        }
        match self.result {
            ResultKind::Failed => emit!(error),
            _ => emit!(info),
        }
    }
}

/// Where outcomes go: the journal in the daemon, a recording in the scenario tests.
pub trait OutcomeSink: Send + Sync {
    fn record(&self, outcome: &Outcome);
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
