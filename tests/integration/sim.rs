//! The in-process scenario harness: `daemon::run` against the in-memory AWS (`shiftd::aws::fake`) on a
//! simulated clock that follows tokio's paused time, with a recording outcome sink and captured logs.
//! Hours of schedule run in milliseconds, and nothing depends on how busy the machine is.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shiftd::aws::fake::FakeAws;
use shiftd::clock::{Clock, SimulatedClock};
use shiftd::config::Action;
use shiftd::daemon::{self, RunError};
use shiftd::outcome::{Outcome, OutcomeSink, RecordingSink, ResultKind};
use shiftd::state::StateFile;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub const TARGET: &str = "111111111111";
pub const DELEGATE: &str = "123456789012";
pub const REGION: &str = "ap-northeast-1";

pub fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A config with the target account and `rules`; `defaults` go into `[defaults]`.
pub fn config(defaults: &str, rules: &str) -> String {
    format!(
        r#"[defaults]
{defaults}

[accounts.account1]
role_arn = "arn:aws:iam::{TARGET}:role/account1-role-ec2"
regions = ["{REGION}"]

{rules}
"#
    )
}

/// One rule on listed instances.
pub fn rule(name: &str, ids: &[String], schedule: &str) -> String {
    format!(
        r#"
[[rules]]
name = "{name}"
account = "account1"
instances = {ids:?}
{schedule}
"#
    )
}

/// One rule on the instances carrying `tags` (as `FakeAws::add_instances` takes them).
pub fn rule_with_tags(name: &str, tags: &[(&str, &str)], schedule: &str) -> String {
    let tags = tags
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[[rules]]
name = "{name}"
account = "account1"
tags = {{ {tags} }}
{schedule}
"#
    )
}

/// Log lines captured from the daemon's tracing events (message and fields).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One simulated world: clock, AWS, a directory for the config and the state, the outcomes and logs.
pub struct Sim {
    pub clock: Arc<SimulatedClock>,
    pub aws: FakeAws,
    pub sink: Arc<RecordingSink>,
    pub logs: Logs,
    pub dir: tempfile::TempDir,
    _log_guard: tracing::subscriber::DefaultGuard,
}

/// A running daemon.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    reload: mpsc::UnboundedSender<()>,
    task: JoinHandle<Result<(), RunError>>,
}

impl Sim {
    /// A world whose wall clock reads `start`. Call from a `#[tokio::test(start_paused = true)]`.
    pub fn new(start: &str) -> Self {
        let clock = Arc::new(SimulatedClock::starting_at(t(start)));
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            aws: FakeAws::new(clock.clone()),
            sink: Arc::new(RecordingSink::with_clock(clock.clone())),
            clock,
            logs,
            dir: tempfile::tempdir().unwrap(),
            _log_guard: guard,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("shiftd.toml")
    }

    pub fn write_config(&self, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(self.config_path(), text).unwrap();
        std::fs::set_permissions(self.config_path(), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Starts `daemon::run` (state kept in the world's directory, as the binary keeps it).
    pub fn start(&self) -> Running {
        self.start_with(self.sink.clone())
    }

    /// Another delegate of a cluster: its own state directory (a fresh one: its name, under the world's
    /// directory) and its own clock, `skew_seconds` off the world's; same AWS, claims and outcomes.
    pub fn start_delegate(&self, name: &str, skew_seconds: i64) -> Running {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SkewedClock {
            inner: self.clock.clone(),
            skew: chrono::Duration::seconds(skew_seconds),
        });
        self.start_full(self.sink.clone(), clock, &dir)
    }

    /// As `start`, with outcomes going to `sink` (e.g. alerts wrapped around the recording sink).
    pub fn start_with(&self, sink: Arc<dyn OutcomeSink>) -> Running {
        self.start_full(sink, self.clock.clone(), self.dir.path())
    }

    fn start_full(
        &self,
        sink: Arc<dyn OutcomeSink>,
        clock: Arc<dyn Clock>,
        state_dir: &std::path::Path,
    ) -> Running {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (reload_tx, reload_rx) = mpsc::unbounded_channel();
        let settings = daemon::Settings {
            config_path: self.config_path(),
            dry_run: false,
        };
        let deps = daemon::Deps {
            clock,
            aws: self.aws.connector(),
            outcomes: sink,
            record: Arc::new(StateFile::in_dir(state_dir)),
            reload: reload_rx,
            metrics: None,
        };
        let task = tokio::spawn(daemon::run(settings, deps, async {
            let _ = stop_rx.await;
        }));
        Running {
            stop: Some(stop_tx),
            reload: reload_tx,
            task,
        }
    }

    /// Lets simulated time pass.
    pub async fn advance(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// Lets simulated time pass until the wall clock reads `at`.
    pub async fn advance_to(&self, at: &str) {
        let wait = (t(at) - self.now()).to_std().expect("a later instant");
        tokio::time::sleep(wait).await;
    }

    pub fn outcomes(&self) -> Vec<Outcome> {
        self.sink.outcomes()
    }

    /// Outcomes for one instance.
    pub fn outcomes_for(&self, id: &str) -> Vec<Outcome> {
        self.outcomes()
            .into_iter()
            .filter(|o| o.instance_id.as_deref() == Some(id))
            .collect()
    }

    /// Asserts that each instance has exactly one outcome, of `action` with `result`, and returns them.
    pub fn assert_one_each(
        &self,
        ids: &[String],
        action: Action,
        result: ResultKind,
    ) -> Vec<Outcome> {
        ids.iter()
            .map(|id| {
                let got = self.outcomes_for(id);
                assert_eq!(
                    got.len(),
                    1,
                    "exactly one outcome for {id}: {got:#?}\nlogs:\n{}",
                    self.logs.text()
                );
                assert_eq!(got[0].action, action, "{got:?}");
                assert_eq!(
                    got[0].result,
                    result,
                    "{got:?}\nlogs:\n{}",
                    self.logs.text()
                );
                got[0].clone()
            })
            .collect()
    }
}

impl Running {
    /// A graceful stop (SIGTERM): waits for the daemon to finish draining.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }

    /// A crash (SIGKILL): the daemon stops where it is, nothing more is written or logged.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// SIGHUP.
    pub fn reload(&self) {
        self.reload.send(()).unwrap();
    }

    /// The daemon's result when it ends by itself (e.g. an invalid config at start).
    pub async fn result(self) -> Result<(), RunError> {
        self.task.await.unwrap()
    }
}

/// A delegate's clock, off the world's by `skew`.
struct SkewedClock {
    inner: Arc<SimulatedClock>,
    skew: chrono::Duration,
}

impl Clock for SkewedClock {
    fn now(&self) -> DateTime<Utc> {
        self.inner.now() + self.skew
    }
    fn monotonic(&self) -> tokio::time::Instant {
        self.inner.monotonic()
    }
}
