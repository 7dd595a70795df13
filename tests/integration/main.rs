//! shiftd's integration tests, in one test binary:
//! - `scenarios`, `pacing`, `unattended`: the daemon in-process against the in-memory AWS on paused time
//!   (helpers in `sim`);
//! - the rest: the real binary against moto server, shiftd's fake IMDS and a real systemd-journald
//!   (helpers in `harness`), and the operator commands. Fixtures in `tests/fixtures`.

mod alerts;
// The end-to-end layer runs the real binary in real time: it reads the wall clock itself.
#[allow(clippy::disallowed_methods)]
mod being_told;
#[allow(clippy::disallowed_methods)]
mod check;
mod cluster;
#[allow(clippy::disallowed_methods)]
mod daemon;
#[allow(clippy::disallowed_methods)]
mod faults;
#[allow(clippy::disallowed_methods)]
mod ha;
#[allow(clippy::disallowed_methods)]
mod harness;
#[allow(clippy::disallowed_methods)]
mod lifecycle;
#[allow(clippy::disallowed_methods)]
mod operator;
#[allow(clippy::disallowed_methods)]
mod org_e2e;
mod organization;
mod pacing;
mod regressions;
mod scenarios;
#[allow(clippy::disallowed_methods)]
mod secrets;
mod sim;
mod unattended;
