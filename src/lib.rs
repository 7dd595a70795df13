pub mod config;
pub mod planner;
pub mod schedule;
