//! What shiftd remembers across restarts: the instant up to which every occurrence has been handled
//! (dispatched, or reported as missed). After a restart (a crash, an upgrade, a reboot of the delegate
//! instance) the occurrences it slept through are then caught up when they are at most
//! `planner::LATE_TOLERANCE` late, and reported as missed otherwise, instead of passing unnoticed.
//!
//! The file is `<state dir>/state.json`, `{"version": 1, "checked_until": "<RFC 3339>"}`, replaced
//! atomically. It holds no secrets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where `shiftd run` keeps its state unless told otherwise (the unit's `StateDirectory=shiftd`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/shiftd";

/// The longest outage whose occurrences are reported one by one after a restart; older ones are
/// summarised in one warning.
pub const MAX_LOOKBACK: Duration = Duration::from_secs(7 * 24 * 3600);

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a shiftd state file ({reason}); it will be replaced")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    version: u32,
    /// RFC 3339, UTC.
    checked_until: String,
}

/// `<dir>/state.json`.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join("state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved instant, or `None` when there is no state yet.
    pub fn load(&self) -> Result<Option<DateTime<Utc>>, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let invalid = |reason: String| StateError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let doc: StateDoc = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if doc.version != FORMAT_VERSION {
            return Err(invalid(format!("format version {}", doc.version)));
        }
        let at = DateTime::parse_from_rfc3339(&doc.checked_until)
            .map_err(|e| invalid(format!("checked_until: {e}")))?;
        Ok(Some(at.with_timezone(&Utc)))
    }

    /// Replaces the file atomically (write a sibling, sync, rename).
    pub fn save(&self, checked_until: DateTime<Utc>) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let doc = StateDoc {
            version: FORMAT_VERSION,
            checked_until: checked_until.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(
            serde_json::to_string(&doc)
                .expect("serialisable")
                .as_bytes(),
        )
        .map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
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

    #[test]
    fn saves_and_loads_and_refuses_what_it_did_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(dir.path());
        assert_eq!(file.load().unwrap(), None, "no state yet");
        let at = t("2026-12-01T20:00:05.123456789Z");
        file.save(at).unwrap();
        assert_eq!(file.load().unwrap(), Some(at));
        assert!(
            !dir.path().join("state.json.tmp").exists(),
            "the temporary file is renamed"
        );
        std::fs::write(file.path(), "{\"checked_until\": 5}").unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(err.contains("not a shiftd state file"), "{err}");
        std::fs::write(
            file.path(),
            "{\"version\": 2, \"checked_until\": \"2026-12-01T20:00:05Z\"}",
        )
        .unwrap();
        assert!(file.load().is_err(), "an unknown format version is refused");
    }
}
