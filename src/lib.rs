//! shiftd: starts and stops EC2 instances in other AWS accounts on a cron schedule, through assumed roles.
//!
//! The daemon is a library (`daemon::run`) so that tests start it in-process; `main.rs` only parses the
//! command line, sets up logging and signals, and maps errors to exit codes.

pub mod aws;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod doctor;
pub mod executor;
pub mod logging;
pub mod notify;
pub mod outcome;
pub mod planner;
pub mod policy;
pub mod schedule;
pub mod state;
pub mod summary;
pub mod upcoming;
