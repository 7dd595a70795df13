//! The scheduling loop's pure work at fleet scale, against targets.
//!
//! `cargo bench --bench scheduling` (release build, shared with the tests and packages) prints one line
//! per measurement and exits non-zero when a target is missed. Under `cargo test --all-targets` it runs
//! each measurement once, as a smoke test, without checking targets.
//!
//! The fleet: 50 accounts, 1,000 rules (20 per account) in four time zones (one with a 30-minute DST
//! shift), each rule with one start and two stop expressions; 10,000 selected instances.
//!
//! Targets, and why:
//! - one wake of the loop (next due instant + what is due since the last wake) under 20 ms: the loop
//!   also pings the systemd watchdog, and a rule due at an instant should be dispatched within it (the
//!   next due instant alone, scanned and remembered between wakes, has the same target);
//! - loading the configuration under 100 ms: `ExecStartPre=shiftd check` and every reload pay it;
//! - catching up after an 8-day outage with 25 rules firing every second (what was missed, what is
//!   due now) under 100 ms: the same loop does it, once, on its first wake after the outage;
//! - deciding for 10,000 instances under 20 ms;
//! - peak resident memory of this process under 64 MiB.

// A benchmark measures real time: the clock ban (clippy.toml) does not apply here.
#![allow(clippy::disallowed_methods)]

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use shiftd::config::{Action, Config};
use shiftd::planner::{self, InstanceView, Selected};

const ZONES: [&str; 4] = [
    "Asia/Tokyo",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
];

fn fleet_config() -> String {
    let mut text = String::from("[defaults]\ntimezone = \"UTC\"\n\n");
    for a in 0..50 {
        let _ = writeln!(
            text,
            "[accounts.acct{a}]\nrole_arn = \"arn:aws:iam::{:012}:role/shiftd\"\nregions = [\"ap-northeast-1\", \"us-east-1\"]\n",
            100_000_000_000u64 + a
        );
    }
    for a in 0..50 {
        for r in 0..20 {
            let minute = (a * 7 + r * 3) % 60;
            let _ = writeln!(
                text,
                "[[rules]]\nname = \"acct{a}-rule{r}\"\naccount = \"acct{a}\"\ntags = {{ Schedule = \"s{r}\", Env = [\"dev\", \"stg\"] }}\n\
                 start = \"{minute} {} * * Mon-Fri\"\nstop = [\"{minute} {} * * 1-5\", \"0 */6 * * 0,6\"]\ntimezone = \"{}\"\n",
                6 + r % 4,
                18 + r % 5,
                ZONES[(a + r) % ZONES.len()]
            );
        }
    }
    text
}

/// `n` rules starting their instance every second, in the fleet's zones.
fn every_second_config(n: usize) -> String {
    let mut text = String::from(
        "[accounts.acct0]\nrole_arn = \"arn:aws:iam::100000000000:role/shiftd\"\nregions = [\"us-east-1\"]\n\n",
    );
    for r in 0..n {
        let _ = writeln!(
            text,
            "[[rules]]\nname = \"every-second{r}\"\naccount = \"acct0\"\ninstances = [\"i-{r:017x}\"]\n\
             start = \"* * * * * *\"\ntimezone = \"{}\"\n",
            ZONES[r % ZONES.len()]
        );
    }
    text
}

fn selected(n: usize) -> Vec<Selected> {
    (0..n)
        .map(|i| Selected {
            instance: InstanceView {
                id: format!("i-{i:017x}"),
                state: ["running", "stopped", "pending", "stopping"][i % 4].to_string(),
                state_reason: None,
                ..Default::default()
            },
            by: vec![(format!("rule{}", i % 20), Action::Stop)],
        })
        .collect()
}

/// Median wall time of `f` over `runs` runs.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let runs = if bench { 21 } else { 1 };
    let mut missed = Vec::new();
    let mut report = |what: &str, took: Duration, target: Duration| {
        let verdict = if took <= target { "ok" } else { "MISSED" };
        println!("{what:<58} {took:>12.3?}  (target {target:?}) {verdict}");
        if bench && took > target {
            missed.push(what.to_string());
        }
    };

    let text = fleet_config();
    let path = Path::new("fleet.toml");
    let mut config: Option<Config> = None;
    let took = median(runs, || {
        config = Some(Config::parse(path, &text).expect("valid"))
    });
    let config = config.expect("parsed");
    report(
        "load a 1,000-rule configuration",
        took,
        Duration::from_millis(100),
    );

    // Wakes spread over a week, including a DST change in Berlin and New York.
    let start: DateTime<Utc> = "2027-03-08T00:00:00Z".parse().expect("instant");
    let wakes: Vec<DateTime<Utc>> = (0..runs as i64)
        .map(|i| start + chrono::Duration::minutes(i * 487))
        .collect();
    let mut i = 0;
    let took = median(runs, || {
        let now = wakes[i % wakes.len()];
        i += 1;
        let next = planner::next_due(&config, now).expect("fires");
        let work = planner::due_between(&config, now - chrono::Duration::seconds(60), now);
        std::hint::black_box((next, work));
    });
    report(
        "one wake: next due + due in the last minute (1,000 rules)",
        took,
        Duration::from_millis(20),
    );

    // The next due instant, as the loop asks for it at every wake (for its pass, then for its sleep;
    // batches ending wake it once each): found by scanning every rule's next occurrence, and remembered
    // from the previous wake (until that instant is taken in, or the configuration changes).
    let mut i = 0;
    let took = median(runs, || {
        let now = wakes[i % wakes.len()];
        i += 1;
        std::hint::black_box(planner::next_due(&config, now).expect("fires"));
    });
    report(
        "next due instant, every rule scanned (1,000 rules)",
        took,
        Duration::from_millis(20),
    );
    let mut remembered = planner::NextDue::default();
    let first = remembered.get(&config, start).expect("fires");
    let mut i = 0;
    let took = median(runs, || {
        // A wake before that instant: a batch ending, a status refresh.
        let now = start + (first - start) * (i % 10) / 10;
        i += 1;
        std::hint::black_box(remembered.get(&config, now).expect("fires"));
    });
    report(
        "next due instant, remembered from the last wake",
        took,
        Duration::from_millis(20),
    );

    // Catching up after an 8-day outage with 25 rules firing every second: ~17 million occurrences,
    // each rule's latest one due now.
    let text = every_second_config(25);
    let every_second = Config::parse(path, &text).expect("valid");
    let now: DateTime<Utc> = "2027-03-30T12:00:00.5Z".parse().expect("instant");
    let after = now - chrono::Duration::days(8);
    let took = median(runs, || {
        let work = planner::due_between(&every_second, after, now);
        std::hint::black_box(work);
    });
    report(
        "catch up an 8-day outage (25 every-second rules)",
        took,
        Duration::from_millis(100),
    );

    let instances = selected(10_000);
    let took = median(runs, || {
        std::hint::black_box(planner::decide(&instances));
    });
    report(
        "decide for 10,000 selected instances",
        took,
        Duration::from_millis(20),
    );

    if let Some(kib) = peak_rss_kib() {
        let mib = kib as f64 / 1024.0;
        let verdict = if mib <= 64.0 { "ok" } else { "MISSED" };
        println!(
            "{:<58} {mib:>9.1} MiB  (target 64 MiB) {verdict}",
            "peak resident memory"
        );
        if bench && mib > 64.0 {
            missed.push("peak resident memory".into());
        }
    }
    if !missed.is_empty() {
        eprintln!("targets missed: {}", missed.join(", "));
        std::process::exit(1);
    }
}
