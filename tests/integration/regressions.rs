//! Regressions found by a hostile review of unattended operation (issue 10): each failed on the code
//! as reviewed. In-process on paused time, but for `apply`, which runs the real binary.

use std::sync::Arc;
use std::time::Duration;

use shiftd::aws::fake::{self, Fault};
use shiftd::daemon;
use shiftd::metrics::Metrics;
use shiftd::outcome::{ResultKind, Trigger};
use shiftd::state::StateFile;
use tokio::sync::{mpsc, oneshot};

use crate::sim::{REGION, Sim, TARGET, config, rule_with_tags};

const MINUTE: Duration = Duration::from_secs(60);

fn office(extra: &str) -> String {
    rule_with_tags(
        "office",
        &[("Schedule", "office")],
        &format!("start = \"0 8 * * *\"\nstop = \"0 20 * * *\"\n{extra}"),
    )
}

/// Was: with `dry_run`, an enforce pass "would start" the same instance at every pass: one
/// dry-run entry per instance per `enforce_every` (288 a day at the default, 8,640 at 10s), each also
/// counted in shiftd_actions_total and alerted when `on` has "dry-run". The README says an instance
/// an enforce pass cannot act on is logged once, and again only when the reason changes.
#[tokio::test(start_paused = true)]
async fn enforce_in_dry_run_says_the_same_would_start_at_every_pass() {
    let sim = Sim::new("2026-12-01T10:00:00Z");
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 1, "stopped", &[("Schedule", "office")]);
    sim.write_config(&config(
        "enforce_every = \"10s\"\ndry_run = true",
        &office("enforce = true"),
    ));
    let daemon = sim.start();
    sim.advance(10 * MINUTE).await;
    let dry: Vec<_> = sim
        .outcomes_for(&ids[0])
        .into_iter()
        .filter(|o| o.result == ResultKind::DryRun && o.trigger == Trigger::Enforce)
        .collect();
    daemon.stop().await;
    assert!(
        dry.len() <= 2,
        "the same 'would start' logged {} times in 10 minutes (one per 10s pass)",
        dry.len()
    );
}

/// Was: an unreadable `shiftd:skip-until` on an instance enforce would act on: the outcome is
/// said once (QuietRepeats), but the WARN line "... does not parse: it is left alone" is logged again
/// at every enforce pass (executor::plan logs it before the outcome reaches QuietRepeats).
#[tokio::test(start_paused = true)]
async fn an_unreadable_override_tag_is_warned_about_at_every_enforce_pass() {
    let sim = Sim::new("2026-12-01T10:00:00Z");
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 1, "stopped", &[("Schedule", "office")]);
    sim.aws.modify(&ids[0], |i| {
        i.tags
            .insert("shiftd:skip-until".into(), "next friday".into());
    });
    sim.write_config(&config(
        "enforce_every = \"10s\"",
        &office("enforce = true"),
    ));
    let daemon = sim.start();
    sim.advance(10 * MINUTE).await;
    daemon.stop().await;
    let logs = sim.logs.text();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("does not parse"))
        .count();
    assert_eq!(
        sim.outcomes_for(&ids[0]).len(),
        1,
        "the outcome itself is said once"
    );
    assert!(
        warnings <= 2,
        "the unreadable tag was warned about {warnings} times in 10 minutes"
    );
}

/// Was: shiftd_credentials_expiry_timestamp_seconds{account} is never removed. After a reload
/// that removes (or renames) an account, the old account's gauge stays at its last expiry forever, so
/// the README's own alert `shiftd_credentials_expiry_timestamp_seconds - time() < 300` ("renewal is
/// failing") fires for an account shiftd no longer has.
#[tokio::test(start_paused = true)]
async fn a_removed_account_leaves_no_credentials_expiry_gauge_behind() {
    let sim = Sim::new("2026-12-01T10:00:00Z");
    sim.aws
        .add_instances(TARGET, REGION, 1, "running", &[("Schedule", "office")]);
    sim.write_config(&config("", &office("")));
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (reload_tx, reload_rx) = mpsc::unbounded_channel();
    let deps = daemon::Deps {
        clock: sim.clock.clone(),
        aws: sim.aws.connector(),
        outcomes: sim.sink.clone(),
        record: Arc::new(StateFile::in_dir(sim.dir.path())),
        reload: reload_rx,
        metrics: Some(metrics.clone()),
    };
    let settings = daemon::Settings {
        config_path: sim.config_path(),
        dry_run: false,
    };
    let task = tokio::spawn(daemon::run(settings, deps, async {
        let _ = stop_rx.await;
    }));
    sim.advance(MINUTE).await;
    assert!(
        metrics
            .render()
            .contains("shiftd_credentials_expiry_timestamp_seconds{account=\"account1\"}"),
        "{}",
        metrics.render()
    );
    // account1 renamed to prod.
    let renamed = config("", &office(""))
        .replace("[accounts.account1]", "[accounts.prod]")
        .replace("account = \"account1\"", "account = \"prod\"");
    sim.write_config(&renamed);
    reload_tx.send(()).unwrap();
    sim.advance(3 * 60 * MINUTE).await;
    let text = metrics.render();
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
    assert!(
        text.contains("account=\"prod\""),
        "the new account is there: {text}"
    );
    assert!(
        !text.contains("shiftd_credentials_expiry_timestamp_seconds{account=\"account1\"}"),
        "3h after the reload, the removed account's expiry (long past) is still exported, so \
         `shiftd_credentials_expiry_timestamp_seconds - time() < 300` fires:\n{text}"
    );
}

/// Was: `shiftd apply` acts on EC2 with a configuration that `check`, `run` and `reload` refuse as
/// unsafe (writable by group and others): main.rs's apply loads it with `Config::load`, not
/// `Config::load_strict`. The README: "shiftd refuses (exit 78) a configuration that is writable by
/// group or others"; `apply`'s help: "78 for an invalid configuration".
#[test]
fn apply_refuses_a_world_writable_configuration_as_check_does() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shiftd.toml");
    std::fs::write(&path, config("", &office(""))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_shiftd"))
            .args(args)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_MAX_ATTEMPTS", "1")
            .output()
            .unwrap()
    };
    let p = path.to_str().unwrap();
    let check = run(&["check", "--config", p]);
    assert_eq!(check.status.code(), Some(78), "check refuses it");
    let apply = run(&["apply", "--config", p, "office", "stop", "--dry-run"]);
    assert_eq!(
        apply.status.code(),
        Some(78),
        "apply went ahead with a world-writable config:\n{}{}",
        String::from_utf8_lossy(&apply.stdout),
        String::from_utf8_lossy(&apply.stderr)
    );
}
/// Was: an enforce pass decides on the desired state when it starts and acts on it whenever the
/// describe answers. A describe that is slow across the rule's 20:00 stop makes the pass START an
/// instance after 20:00, when the desired state is already `stopped` (the scheduled stop then waits
/// for it to finish pending and stops it again).
#[tokio::test(start_paused = true)]
async fn enforce_does_not_start_an_instance_after_the_stop_instant() {
    let sim = Sim::new("2026-12-01T19:59:00Z");
    let ids = sim
        .aws
        .add_instances(TARGET, REGION, 1, "running", &[("Schedule", "office")]);
    sim.write_config(&config(
        "enforce_every = \"10s\"",
        &office("enforce = true"),
    ));
    let daemon = sim.start();
    sim.advance_to("2026-12-01T19:59:45Z").await;
    // Stopped by hand; the next pass's describe takes 20 s (a large fleet, throttling retries).
    sim.aws.set_state(&ids[0], "stopped");
    sim.aws
        .fault(fake::DESCRIBE, 1, Fault::Delay(Duration::from_secs(20)));
    sim.advance_to("2026-12-01T20:10:00Z").await;
    daemon.stop().await;
    let stop_at = crate::sim::t("2026-12-01T20:00:00Z");
    let late_starts: Vec<_> = sim
        .aws
        .calls_of(fake::START)
        .into_iter()
        .filter(|c| c.at >= stop_at)
        .collect();
    assert!(
        late_starts.is_empty(),
        "StartInstances after the 20:00 stop (desired state: stopped): {late_starts:#?}\n{:#?}",
        sim.outcomes_for(&ids[0])
    );
}
