//! shiftd: starts and stops EC2 instances in other AWS accounts on a cron schedule, through assumed roles.
//!
//! The daemon is a library (`daemon::run(settings, deps, shutdown)`): the scenario tests start it
//! in-process with the in-memory AWS (`aws::fake`) on a simulated clock (`clock`); `main.rs` only parses
//! the command line, sets up logging and signals, passes the real AWS SDK (`aws::sdk`), the system
//! clock, the journal and the state directory, and maps errors to exit codes.

pub mod alerts;
pub mod aws;
pub mod calendar;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod doctor;
pub mod executor;
pub mod logging;
pub mod manual;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod org;
pub mod outcome;
pub mod pacing;
pub mod plan;
pub mod planner;
pub mod policy;
pub mod schedule;
pub mod state;
pub mod status;
