//! What shiftd remembers across restarts, so that nothing due is lost and nothing is done twice:
//! - `checked_until`: the instant up to which every occurrence has been handled (dispatched, or reported
//!   as missed). After a restart (a crash, an upgrade, a reboot of the delegate instance) the
//!   occurrences it slept through are caught up when at most their rule's `catch_up` late, and
//!   reported as missed otherwise, instead of passing unnoticed.
//! - every occurrence in progress, as `due` (recorded before anything is done for it) then `dispatched`
//!   (just before its first Start/Stop call); it leaves the record once every instance's result is
//!   logged. After a restart, each one still there is resumed (idempotent: instances already in the
//!   wanted state are reported skipped) or, past its window, reported failed.
//! - the occurrences recently done, so that a wall clock stepped back does not repeat them.
//!
//! [`OccurrenceRecord`] is the interface; [`StateFile`] keeps it in `<state dir>/state.json`, a
//! snapshot replaced atomically (write, fsync, rename), and `state.<N>.log`, the changes made since
//! that snapshot, one JSON line each, appended and synced at every change. The snapshot is rewritten
//! (and the log started afresh) when the log has grown, so a change costs its own size, not the size of
//! everything in progress: a 40,000-instance action records each result once, instead of rewriting
//! every result so far at each step. It holds no secrets. [`MemoryRecord`] keeps it in memory only (no
//! state directory).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Action;

/// Where `shiftd run` keeps its state unless told otherwise (the unit's `StateDirectory=shiftd`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/shiftd";

/// The longest outage whose occurrences are reported one by one after a restart; older ones are
/// summarised in one warning.
pub const MAX_LOOKBACK: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long done occurrences are remembered (against a wall clock stepped back).
pub const REMEMBER_DONE: Duration = Duration::from_secs(6 * 3600);
/// At most this many done occurrences are remembered.
const REMEMBER_DONE_MAX: usize = 2_000;

/// 3: the snapshot names its log (`log`). 1 and 2 (no log) are still read.
const FORMAT_VERSION: u32 = 3;
/// The log is folded into a new snapshot once it is this long...
const COMPACT_LOG_BYTES: u64 = 4 << 20;
/// ...or, when nothing is in progress (the snapshot is small then), this long.
const COMPACT_IDLE_LOG_BYTES: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a shiftd state file ({reason}); it will be replaced")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "another shiftd is running with the state directory {dir}{holder}: two daemons on one state \
         directory would act twice; stop the other one (systemctl stop shiftd) or give this one its own \
         --state-dir"
    )]
    Locked { dir: PathBuf, holder: String },
}

/// One occurrence of one rule's action, for one account.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OccurrenceKey {
    pub rule: String,
    #[serde(with = "action_name")]
    pub action: Action,
    #[serde(with = "rfc3339")]
    pub at: DateTime<Utc>,
    pub account: String,
}

mod action_name {
    use crate::config::Action;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Action, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(a.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
        match String::deserialize(d)?.as_str() {
            "start" => Ok(Action::Start),
            "stop" => Ok(Action::Stop),
            other => Err(serde::de::Error::custom(format!(
                "unknown action {other:?}"
            ))),
        }
    }
}

mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for OccurrenceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} due at {} for account {}",
            self.rule,
            self.action,
            self.at.to_rfc3339(),
            self.account
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Recorded before anything was done for it.
    Due,
    /// Its first Start/Stop call was about to be made.
    Dispatched,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Due => "due",
            Phase::Dispatched => "dispatched",
        }
    }
}

/// Everything the record holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub checked_until: Option<DateTime<Utc>>,
    pub open: BTreeMap<OccurrenceKey, Phase>,
    /// Per open occurrence, what already has its result logged (instance IDs, or a selection's name).
    pub reported: BTreeMap<OccurrenceKey, BTreeSet<String>>,
    pub done: BTreeSet<OccurrenceKey>,
}

/// The durable record of occurrences. Every method returns once the change is durable.
pub trait OccurrenceRecord: Send + Sync {
    /// What was recorded (by an earlier process, after a restart).
    fn load(&self) -> Result<Snapshot, StateError>;
    /// Advances `checked_until` and records `due` occurrences, in one durable write, before acting.
    fn begin(&self, checked_until: DateTime<Utc>, due: &[OccurrenceKey]) -> Result<(), StateError>;
    fn dispatched(&self, keys: &[OccurrenceKey]) -> Result<(), StateError>;
    /// These results of the occurrences are logged: a resumed occurrence does not report them again.
    fn reported(&self, keys: &[OccurrenceKey], targets: &[String]) -> Result<(), StateError>;
    /// Every instance's result is logged: the occurrences leave the record (and are remembered as done).
    fn done(&self, keys: &[OccurrenceKey]) -> Result<(), StateError>;
    /// Moves `checked_until` back (the wall clock was stepped back), and forgets the occurrences done
    /// after it: they were acted on early, by a clock that was ahead, and come round again at their
    /// real instant (acting again is idempotent). Open occurrences after `keep_open_until` are
    /// forgotten too; those up to it stay (batches still at work on them).
    fn rewind(
        &self,
        checked_until: DateTime<Utc>,
        keep_open_until: DateTime<Utc>,
    ) -> Result<(), StateError>;
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    version: u32,
    /// RFC 3339, UTC.
    checked_until: String,
    #[serde(default)]
    occurrences: Vec<OpenDoc>,
    #[serde(default)]
    done: Vec<OccurrenceKey>,
    /// The generation of the log that continues this snapshot: `state.<log>.log`.
    #[serde(default)]
    log: u64,
}

/// One change, as a line of the log.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum LogEntry {
    Begin {
        checked_until: String,
        due: Vec<OccurrenceKey>,
    },
    Dispatched {
        keys: Vec<OccurrenceKey>,
    },
    Reported {
        keys: Vec<OccurrenceKey>,
        targets: Vec<String>,
    },
    Done {
        keys: Vec<OccurrenceKey>,
    },
    Rewind {
        checked_until: String,
        #[serde(default)]
        keep_open_until: Option<String>,
    },
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn apply_entry(s: &mut Snapshot, entry: LogEntry) -> Result<(), String> {
    let time = |t: &str| {
        DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("checked_until: {e}"))
    };
    match entry {
        LogEntry::Begin { checked_until, due } => {
            apply_begin(s, time(&checked_until)?, &due);
        }
        LogEntry::Dispatched { keys } => {
            apply_dispatched(s, &keys);
        }
        LogEntry::Reported { keys, targets } => {
            apply_reported(s, &keys, &targets);
        }
        LogEntry::Done { keys } => apply_done(s, &keys),
        LogEntry::Rewind {
            checked_until,
            keep_open_until,
        } => {
            let until = time(&checked_until)?;
            let keep = match keep_open_until {
                Some(k) => time(&k)?,
                None => until,
            };
            apply_rewind(s, until, keep);
        }
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenDoc {
    #[serde(flatten)]
    key: OccurrenceKey,
    phase: Phase,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    reported: Vec<String>,
}

fn apply_begin(s: &mut Snapshot, checked_until: DateTime<Utc>, due: &[OccurrenceKey]) -> bool {
    let before = (s.checked_until, s.open.len());
    s.checked_until = Some(
        s.checked_until
            .map_or(checked_until, |c| c.max(checked_until)),
    );
    for k in due {
        s.open.entry(k.clone()).or_insert(Phase::Due);
    }
    before != (s.checked_until, s.open.len())
}

fn apply_dispatched(s: &mut Snapshot, keys: &[OccurrenceKey]) -> bool {
    let mut changed = false;
    for k in keys {
        if let Some(p) = s.open.get_mut(k)
            && *p != Phase::Dispatched
        {
            *p = Phase::Dispatched;
            changed = true;
        }
    }
    changed
}

fn apply_rewind(s: &mut Snapshot, checked_until: DateTime<Utc>, keep_open_until: DateTime<Utc>) {
    s.checked_until = Some(checked_until);
    s.done.retain(|k| k.at <= checked_until);
    // Occurrences in progress stay: their batches go on (resolved ahead, or following their
    // instances), and a crash must still find them, with what they already reported.
    s.open.retain(|k, _| k.at <= keep_open_until);
    s.reported.retain(|k, _| k.at <= keep_open_until);
}

fn apply_reported(s: &mut Snapshot, keys: &[OccurrenceKey], targets: &[String]) -> bool {
    let mut changed = false;
    for k in keys.iter().filter(|k| s.open.contains_key(*k)) {
        let set = s.reported.entry(k.clone()).or_default();
        for t in targets {
            changed |= set.insert(t.clone());
        }
    }
    changed
}

fn apply_done(s: &mut Snapshot, keys: &[OccurrenceKey]) {
    for k in keys {
        s.open.remove(k);
        s.reported.remove(k);
        s.done.insert(k.clone());
    }
    // Forget what is old, and keep the set bounded.
    if let Some(latest) = s.done.iter().map(|k| k.at).max() {
        let horizon = latest - crate::clock::chrono_duration(REMEMBER_DONE);
        s.done.retain(|k| k.at >= horizon);
    }
    while s.done.len() > REMEMBER_DONE_MAX {
        let oldest = s
            .done
            .iter()
            .min_by_key(|k| k.at)
            .cloned()
            .expect("not empty");
        s.done.remove(&oldest);
    }
}

/// The record in memory only: `shiftd run` without a usable state directory.
#[derive(Default)]
pub struct MemoryRecord {
    snapshot: Mutex<Snapshot>,
}

impl OccurrenceRecord for MemoryRecord {
    fn load(&self) -> Result<Snapshot, StateError> {
        Ok(self.snapshot.lock().expect("record lock").clone())
    }

    fn begin(&self, checked_until: DateTime<Utc>, due: &[OccurrenceKey]) -> Result<(), StateError> {
        apply_begin(
            &mut self.snapshot.lock().expect("record lock"),
            checked_until,
            due,
        );
        Ok(())
    }

    fn dispatched(&self, keys: &[OccurrenceKey]) -> Result<(), StateError> {
        apply_dispatched(&mut self.snapshot.lock().expect("record lock"), keys);
        Ok(())
    }

    fn reported(&self, keys: &[OccurrenceKey], targets: &[String]) -> Result<(), StateError> {
        apply_reported(
            &mut self.snapshot.lock().expect("record lock"),
            keys,
            targets,
        );
        Ok(())
    }

    fn done(&self, keys: &[OccurrenceKey]) -> Result<(), StateError> {
        apply_done(&mut self.snapshot.lock().expect("record lock"), keys);
        Ok(())
    }

    fn rewind(
        &self,
        checked_until: DateTime<Utc>,
        keep_open_until: DateTime<Utc>,
    ) -> Result<(), StateError> {
        apply_rewind(
            &mut self.snapshot.lock().expect("record lock"),
            checked_until,
            keep_open_until,
        );
        Ok(())
    }
}

/// `<dir>/state.json` and its log.
pub struct StateFile {
    path: PathBuf,
    inner: Mutex<Option<Loaded>>,
}

/// The record as last read or written, and the log it is continued in.
struct Loaded {
    snapshot: Snapshot,
    generation: u64,
    /// The open log (created at the first change after a snapshot) and its length.
    log: Option<File>,
    log_bytes: u64,
}

impl Loaded {
    /// Nothing recorded (or nothing readable): the first change writes a snapshot.
    fn fresh() -> Self {
        Self {
            snapshot: Snapshot::default(),
            generation: 0,
            log: None,
            log_bytes: u64::MAX,
        }
    }
}

impl StateFile {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join("state.json"),
            inner: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn log_path(&self, generation: u64) -> PathBuf {
        self.path.with_file_name(format!("state.{generation}.log"))
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> StateError {
        let path = path.to_path_buf();
        move |source| StateError::Io {
            path: path.clone(),
            source,
        }
    }

    /// The snapshot and its log replayed. A last line cut short (a crash while appending) is dropped
    /// (and cut off the file, so that what is appended next starts a line); any other line that does
    /// not read makes the record invalid.
    fn read(&self) -> Result<Loaded, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::fresh()),
            Err(source) => return Err(self.io(&self.path)(source)),
        };
        let invalid = |path: &Path, reason: String| StateError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let doc: StateDoc =
            serde_json::from_str(&text).map_err(|e| invalid(&self.path, e.to_string()))?;
        if !(1..=FORMAT_VERSION).contains(&doc.version) {
            return Err(invalid(
                &self.path,
                format!("format version {}", doc.version),
            ));
        }
        let at = DateTime::parse_from_rfc3339(&doc.checked_until)
            .map_err(|e| invalid(&self.path, format!("checked_until: {e}")))?;
        let mut snapshot = Snapshot {
            checked_until: Some(at.with_timezone(&Utc)),
            open: doc
                .occurrences
                .iter()
                .map(|o| (o.key.clone(), o.phase))
                .collect(),
            reported: doc
                .occurrences
                .into_iter()
                .filter(|o| !o.reported.is_empty())
                .map(|o| (o.key, o.reported.into_iter().collect()))
                .collect(),
            done: doc.done.into_iter().collect(),
        };
        let generation = doc.log;
        let log_path = self.log_path(generation);
        let log_text = match std::fs::read(&log_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(self.io(&log_path)(source)),
        };
        // Up to the end of the last line that reads.
        let mut good = 0usize;
        let mut lines = log_text.split_inclusive(|b| *b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let last = lines.peek().is_none();
            let parsed = std::str::from_utf8(line)
                .map_err(|e| e.to_string())
                .and_then(|l| serde_json::from_str::<LogEntry>(l).map_err(|e| e.to_string()))
                .and_then(|entry| apply_entry(&mut snapshot, entry));
            match parsed {
                Ok(()) if line.ends_with(b"\n") => good += line.len(),
                Ok(()) | Err(_) if last => break,
                Err(reason) => {
                    return Err(invalid(
                        &log_path,
                        format!(
                            "line {}: {reason}",
                            log_text[..good].split(|b| *b == b'\n').count()
                        ),
                    ));
                }
                Ok(()) => unreachable!("only the last line lacks a newline"),
            }
        }
        let log = if log_text.is_empty() {
            None
        } else {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(&log_path)
                .map_err(self.io(&log_path))?;
            if good < log_text.len() {
                f.set_len(good as u64).map_err(self.io(&log_path))?;
                f.sync_all().map_err(self.io(&log_path))?;
            }
            Some(f)
        };
        Ok(Loaded {
            snapshot,
            generation,
            log,
            log_bytes: good as u64,
        })
    }

    /// Replaces the snapshot atomically (write a sibling, sync, rename, sync the directory), naming
    /// `generation`'s log as its continuation; then removes the log it replaces.
    fn write_snapshot(&self, s: &Snapshot, generation: u64) -> Result<(), StateError> {
        let io = self.io(&self.path);
        let Some(checked_until) = s.checked_until else {
            return Ok(());
        };
        let doc = StateDoc {
            version: FORMAT_VERSION,
            checked_until: rfc3339(checked_until),
            occurrences: s
                .open
                .iter()
                .map(|(k, p)| OpenDoc {
                    key: k.clone(),
                    phase: *p,
                    reported: s
                        .reported
                        .get(k)
                        .map(|r| r.iter().cloned().collect())
                        .unwrap_or_default(),
                })
                .collect(),
            done: s.done.iter().cloned().collect(),
            log: generation,
        };
        // The log this snapshot names starts empty: one left from an earlier run with the same
        // generation (a record lost or unreadable since) must not be replayed over it.
        match std::fs::remove_file(self.log_path(generation)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(self.io(&self.log_path(generation))(e));
            }
            _ => {}
        }
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(&io)?;
        f.write_all(
            serde_json::to_string(&doc)
                .expect("serialisable")
                .as_bytes(),
        )
        .map_err(&io)?;
        f.sync_all().map_err(&io)?;
        std::fs::rename(&tmp, &self.path).map_err(&io)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        // The log the snapshot now includes; a crash before this leaves a file nothing reads.
        if generation > 0 {
            let _ = std::fs::remove_file(self.log_path(generation - 1));
        }
        Ok(())
    }

    /// Applies `change` to the record; when it says it changed anything, makes that durable: `entry`
    /// appended to the log, or a new snapshot when the log has grown.
    fn update(
        &self,
        change: impl FnOnce(&mut Snapshot) -> bool,
        entry: impl FnOnce() -> LogEntry,
    ) -> Result<(), StateError> {
        let mut guard = self.inner.lock().expect("state lock");
        if guard.is_none() {
            // Unreadable: replaced by the next snapshot (the error was reported by `load`).
            *guard = Some(self.read().unwrap_or_else(|_| Loaded::fresh()));
        }
        let loaded = guard.as_mut().expect("loaded");
        if !change(&mut loaded.snapshot) {
            return Ok(());
        }
        let limit = if loaded.snapshot.open.is_empty() {
            COMPACT_IDLE_LOG_BYTES
        } else {
            COMPACT_LOG_BYTES
        };
        if loaded.snapshot.checked_until.is_none() {
            return Ok(());
        }
        if loaded.log_bytes >= limit {
            let next = loaded.generation + 1;
            self.write_snapshot(&loaded.snapshot, next)?;
            loaded.generation = next;
            loaded.log = None;
            loaded.log_bytes = 0;
            return Ok(());
        }
        let log_path = self.log_path(loaded.generation);
        if loaded.log.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(self.io(&log_path))?;
            loaded.log = Some(f);
        }
        let mut line = serde_json::to_vec(&entry()).expect("serialisable");
        line.push(b'\n');
        let log = loaded.log.as_mut().expect("opened");
        let appended = log.write_all(&line).and_then(|()| log.sync_data());
        if let Err(e) = appended {
            // Part of the line may be in the file: nothing more is appended after it. The next change
            // writes a whole snapshot (with what this one changed) and starts a new log.
            loaded.log = None;
            loaded.log_bytes = u64::MAX;
            return Err(self.io(&log_path)(e));
        }
        loaded.log_bytes += line.len() as u64;
        Ok(())
    }
}

impl OccurrenceRecord for StateFile {
    fn load(&self) -> Result<Snapshot, StateError> {
        let loaded = self.read()?;
        let s = loaded.snapshot.clone();
        *self.inner.lock().expect("state lock") = Some(loaded);
        Ok(s)
    }

    fn begin(&self, checked_until: DateTime<Utc>, due: &[OccurrenceKey]) -> Result<(), StateError> {
        self.update(
            |s| apply_begin(s, checked_until, due),
            || LogEntry::Begin {
                checked_until: rfc3339(checked_until),
                due: due.to_vec(),
            },
        )
    }

    fn dispatched(&self, keys: &[OccurrenceKey]) -> Result<(), StateError> {
        self.update(
            |s| apply_dispatched(s, keys),
            || LogEntry::Dispatched {
                keys: keys.to_vec(),
            },
        )
    }

    fn reported(&self, keys: &[OccurrenceKey], targets: &[String]) -> Result<(), StateError> {
        self.update(
            |s| apply_reported(s, keys, targets),
            || LogEntry::Reported {
                keys: keys.to_vec(),
                targets: targets.to_vec(),
            },
        )
    }

    fn done(&self, keys: &[OccurrenceKey]) -> Result<(), StateError> {
        self.update(
            |s| {
                apply_done(s, keys);
                true
            },
            || LogEntry::Done {
                keys: keys.to_vec(),
            },
        )
    }

    fn rewind(
        &self,
        checked_until: DateTime<Utc>,
        keep_open_until: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.update(
            |s| {
                apply_rewind(s, checked_until, keep_open_until);
                true
            },
            || LogEntry::Rewind {
                checked_until: rfc3339(checked_until),
                keep_open_until: Some(rfc3339(keep_open_until)),
            },
        )
    }
}

/// An exclusive lock on a state directory, held for the life of the process (released on exit, even
/// on SIGKILL: it is a `flock`).
pub struct DirLock {
    _file: File,
}

/// Takes the state directory's lock, or says who holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, StateError> {
    let path = dir.join("lock");
    let io = |source| StateError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {
            let _ = file.set_len(0);
            let _ = writeln!(file, "{}", std::process::id());
            Ok(DirLock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .map_or(String::new(), |p| format!(" (PID {p})"));
            Err(StateError::Locked {
                dir: dir.to_path_buf(),
                holder,
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Where the scheduling loop resumes: from the saved instant when there is one, so the occurrences in
/// between are handled; from `now` on a first start or when the saved instant is in the future (the
/// clock was set back). An outage longer than `max_lookback` is resumed from `now - max_lookback`,
/// and the second value says what is not reported.
pub fn resume_from(
    saved: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    max_lookback: Duration,
) -> (DateTime<Utc>, Option<String>) {
    let Some(saved) = saved else {
        return (now, None);
    };
    if saved > now {
        return (
            now,
            Some(format!(
                "the saved state ({}) is later than now ({}): the clock was set back; resuming from now",
                saved.to_rfc3339(),
                now.to_rfc3339()
            )),
        );
    }
    let lookback = chrono::Duration::from_std(max_lookback).unwrap_or(chrono::Duration::MAX);
    let earliest = now - lookback;
    if saved < earliest {
        return (
            earliest,
            Some(format!(
                "shiftd last ran at {}; occurrences before {} ({} ago) are not reported one by one",
                saved.to_rfc3339(),
                earliest.to_rfc3339(),
                humantime::format_duration(max_lookback)
            )),
        );
    }
    (saved, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn resume_from_table() {
        let now = t("2026-12-01T20:00:00Z");
        let week = Duration::from_secs(7 * 24 * 3600);
        // (saved, expected resume point, a note is given)
        let cases = [
            (None, now, false),
            (
                Some(t("2026-12-01T19:58:00Z")),
                t("2026-12-01T19:58:00Z"),
                false,
            ),
            (Some(now), now, false),
            (Some(t("2026-12-01T21:00:00Z")), now, true),
            (
                Some(t("2026-11-20T00:00:00Z")),
                t("2026-11-24T20:00:00Z"),
                true,
            ),
        ];
        for (saved, want, noted) in cases {
            let (got, note) = resume_from(saved, now, week);
            assert_eq!(got, want, "{saved:?}");
            assert_eq!(note.is_some(), noted, "{saved:?}: {note:?}");
        }
    }

    fn key(rule: &str, at: &str) -> OccurrenceKey {
        OccurrenceKey {
            rule: rule.into(),
            action: Action::Stop,
            at: t(at),
            account: "a1".into(),
        }
    }

    #[test]
    fn records_occurrences_durably_and_refuses_what_it_did_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(dir.path());
        assert_eq!(file.load().unwrap(), Snapshot::default(), "no state yet");
        let at = t("2026-12-01T20:00:05.123456789Z");
        let (k1, k2) = (
            key("r1", "2026-12-01T20:00:00Z"),
            key("r2", "2026-12-01T20:00:00Z"),
        );
        file.begin(at, &[k1.clone(), k2.clone()]).unwrap();
        file.dispatched(std::slice::from_ref(&k1)).unwrap();
        file.reported(std::slice::from_ref(&k1), &["i-1".to_string()])
            .unwrap();
        // A new process reads what the first one wrote.
        let again = StateFile::in_dir(dir.path()).load().unwrap();
        assert!(
            again.reported[&k1].contains("i-1"),
            "what was reported is kept"
        );
        assert_eq!(again.checked_until, Some(at));
        assert_eq!(again.open[&k1], Phase::Dispatched);
        assert_eq!(again.open[&k2], Phase::Due);
        file.done(std::slice::from_ref(&k1)).unwrap();
        let again = StateFile::in_dir(dir.path()).load().unwrap();
        assert!(!again.open.contains_key(&k1));
        assert!(again.done.contains(&k1), "remembered as done");
        assert!(
            !dir.path().join("state.json.tmp").exists(),
            "the temporary file is renamed"
        );
        std::fs::write(file.path(), "{\"checked_until\": 5}").unwrap();
        let err = StateFile::in_dir(dir.path())
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a shiftd state file"), "{err}");
        std::fs::write(
            file.path(),
            "{\"version\": 4, \"checked_until\": \"2026-12-01T20:00:05Z\"}",
        )
        .unwrap();
        assert!(
            StateFile::in_dir(dir.path()).load().is_err(),
            "an unknown format version is refused"
        );
        // Version 1 (checked_until only) is still read.
        std::fs::write(
            file.path(),
            "{\"version\": 1, \"checked_until\": \"2026-12-01T20:00:05Z\"}",
        )
        .unwrap();
        let v1 = StateFile::in_dir(dir.path()).load().unwrap();
        assert_eq!(v1.checked_until, Some(t("2026-12-01T20:00:05Z")));
    }

    #[test]
    fn changes_go_to_the_log_and_are_folded_into_the_snapshot_once_it_has_grown() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(dir.path());
        let at = t("2026-12-01T20:00:05Z");
        let keys: Vec<OccurrenceKey> = (0..200)
            .map(|i| key(&format!("r{i}"), "2026-12-01T20:00:00Z"))
            .collect();
        file.begin(at, &keys).unwrap();
        let snapshot_len = std::fs::metadata(file.path()).unwrap().len();
        // 200 x 1,000 results: the snapshot is not rewritten for each (it would be megabytes each time).
        let mut written = 0;
        for k in &keys {
            let ids: Vec<String> = (0..1000).map(|i| format!("i-{i:017x}")).collect();
            file.reported(std::slice::from_ref(k), &ids).unwrap();
            written += ids.len();
        }
        let logs: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".log"))
            .collect();
        assert_eq!(logs.len(), 1, "one log at a time: {logs:?}");
        let again = StateFile::in_dir(dir.path()).load().unwrap();
        let kept: usize = again.reported.values().map(BTreeSet::len).sum();
        assert_eq!(
            kept, written,
            "every result survives, snapshot and log together"
        );
        assert!(
            std::fs::metadata(file.path()).unwrap().len() > snapshot_len,
            "the log was folded into the snapshot once it passed its limit"
        );
        file.done(&keys).unwrap();
        let again = StateFile::in_dir(dir.path()).load().unwrap();
        assert!(again.open.is_empty() && again.reported.is_empty());
        assert_eq!(again.done.len(), 200);
    }

    #[test]
    fn a_log_line_cut_short_by_a_crash_is_dropped_and_the_next_change_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(dir.path());
        let k = key("r1", "2026-12-01T20:00:00Z");
        file.begin(t("2026-12-01T20:00:05Z"), std::slice::from_ref(&k))
            .unwrap();
        file.reported(std::slice::from_ref(&k), &["i-1".to_string()])
            .unwrap();
        let log = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .expect("a log");
        // A crash in the middle of the next append.
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(br#"{"op":"reported","keys":[{"ru"#).unwrap();
        drop(f);
        let after_crash = StateFile::in_dir(dir.path());
        let s = after_crash.load().unwrap();
        assert_eq!(s.reported[&k].len(), 1, "the complete line is kept");
        after_crash
            .reported(std::slice::from_ref(&k), &["i-2".to_string()])
            .unwrap();
        let s = StateFile::in_dir(dir.path()).load().unwrap();
        assert_eq!(
            s.reported[&k].iter().collect::<Vec<_>>(),
            ["i-1", "i-2"],
            "the change after the crash reads back"
        );
        // A damaged line that is not the last is not silently skipped.
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, format!("garbage\n{text}")).unwrap();
        let err = StateFile::in_dir(dir.path())
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    /// A log left from an earlier life with the generation a fresh snapshot takes is removed, not
    /// replayed over it.
    #[test]
    fn a_stale_log_of_the_new_generation_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let old = key("old", "2026-11-30T20:00:00Z");
        std::fs::write(
            dir.path().join("state.1.log"),
            format!(
                "{}\n",
                serde_json::to_string(&LogEntry::Begin {
                    checked_until: "2026-11-30T20:00:05Z".to_string(),
                    due: vec![old.clone()],
                })
                .unwrap()
            ),
        )
        .unwrap();
        // No (or an unreadable) state.json: a fresh record.
        let file = StateFile::in_dir(dir.path());
        let _ = file.load();
        let k = key("new", "2026-12-01T20:00:00Z");
        file.begin(t("2026-12-01T20:00:05Z"), std::slice::from_ref(&k))
            .unwrap();
        file.dispatched(std::slice::from_ref(&k)).unwrap();
        let s = StateFile::in_dir(dir.path()).load().unwrap();
        assert!(
            !s.open.contains_key(&old),
            "a yesterday's occurrence came back as open: {:?}",
            s.open
        );
    }

    /// An unreadable record (a damaged log line) is replaced by the next snapshot, as the error
    /// says, not kept unreadable.
    #[test]
    fn an_unreadable_record_is_replaced_by_the_next_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(dir.path());
        let k = key("r1", "2026-12-01T20:00:00Z");
        file.begin(t("2026-12-01T20:00:05Z"), std::slice::from_ref(&k))
            .unwrap();
        file.dispatched(std::slice::from_ref(&k)).unwrap();
        let log = dir.path().join("state.1.log");
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, format!("garbage\n{text}")).unwrap();
        // The next start: load fails (reported, carries on), then the daemon records a new pass.
        let next = StateFile::in_dir(dir.path());
        assert!(next.load().is_err());
        let k2 = key("r1", "2026-12-02T20:00:00Z");
        next.begin(t("2026-12-02T20:00:05Z"), std::slice::from_ref(&k2))
            .unwrap();
        next.dispatched(std::slice::from_ref(&k2)).unwrap();
        let again = StateFile::in_dir(dir.path()).load();
        assert!(
            again.is_ok(),
            "still unreadable after a fresh snapshot: {:?}",
            again.err().map(|e| e.to_string())
        );
    }

    #[test]
    fn a_second_process_cannot_take_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path()).unwrap();
        let err = lock_dir(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("another shiftd is running"), "{err}");
        assert!(
            err.contains(&format!("PID {}", std::process::id())),
            "{err}"
        );
        drop(held);
        lock_dir(dir.path()).expect("free again once released");
    }
}
