//! Alerts in-process: the daemon against the in-memory AWS on paused time, with `[notify]` delivering
//! to a recording destination (or the fake SNS). Back-off, rate limits and hanging destinations run in
//! milliseconds.

use std::sync::Arc;
use std::time::Duration;

use shiftd::alerts::{
    self, AlertMessage, AlertTransport, Alerts, DELIVERY, RecordingTransport, Scripted, Transports,
};
use shiftd::aws::fake::{self, FakeAws};
use shiftd::clock::Clock;
use shiftd::config::Action;
use shiftd::outcome::ResultKind;

use crate::sim::{DELEGATE, REGION, Sim, TARGET, config, rule};

const MINUTE: Duration = Duration::from_secs(60);

/// A `[notify]` table: the URL is not called (the recording destination stands in for it).
fn notify(on: &str) -> String {
    format!("\n[notify]\nwebhook_url = \"https://hooks.example.com/services/T/B/SECRET\"\n{on}\n")
}

/// Alerts around the world's recording sink, delivering to a recording destination.
fn alerting(sim: &Sim) -> (Arc<Alerts>, Arc<RecordingTransport>) {
    let transport = RecordingTransport::new(sim.clock.clone());
    let t = transport.clone();
    let transports: Transports = Arc::new(move |_, _| vec![t.clone() as Arc<dyn AlertTransport>]);
    let alerts = Arc::new(Alerts::new(
        sim.sink.clone(),
        transports,
        sim.clock.clone(),
        DELIVERY,
    ));
    (alerts, transport)
}

fn messages(t: &RecordingTransport) -> Vec<AlertMessage> {
    t.delivered().into_iter().map(|(_, m)| m).collect()
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_sends_one_alert_listing_the_failed_instances_and_an_ok_batch_none() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    let ids = sim.aws.add_instances(TARGET, REGION, 3, "stopped", &[]);
    sim.aws.modify(&ids[1], |i| i.no_capacity = true);
    sim.write_config(&format!(
        "{}{}",
        config(
            "",
            &rule(
                "office",
                &ids,
                "start = \"0 8 * * *\"\nstop = \"0 9 * * *\""
            )
        ),
        notify("")
    ));
    let (alerts, transport) = alerting(&sim);
    let daemon = sim.start_with(alerts.clone());
    sim.advance_to("2026-12-01T08:05:00Z").await;
    sim.assert_one_each(&ids[1..2], Action::Start, ResultKind::Failed);
    let sent = messages(&transport);
    assert_eq!(sent.len(), 1, "one alert for the batch: {sent:#?}");
    let m = &sent[0];
    assert_eq!(m.instances.len(), 1, "only the failed instance: {m:#?}");
    let failed = &m.instances[0];
    assert_eq!(failed.instance.as_deref(), Some(ids[1].as_str()));
    assert_eq!(
        (
            failed.rule.as_str(),
            failed.account.as_str(),
            failed.region.as_str()
        ),
        ("office", "account1", REGION)
    );
    assert_eq!(failed.action, Action::Start);
    assert!(
        failed.reason.contains("InsufficientInstanceCapacity"),
        "{}",
        failed.reason
    );
    assert!(
        m.text
            .starts_with("shiftd: 1 failed, 2 ok - start office in account1/"),
        "{}",
        m.text
    );
    assert!(m.text.contains(&ids[1]), "{}", m.text);

    // 09:00: the stop goes well (two stopped, one already stopped): nothing to say.
    sim.advance_to("2026-12-01T09:05:00Z").await;
    assert_eq!(
        sim.outcomes()
            .iter()
            .filter(|o| o.action == Action::Stop)
            .count(),
        3
    );
    assert_eq!(
        messages(&transport).len(),
        1,
        "no alert for a batch that went well"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn on_ok_reports_batches_that_went_well_too() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    let ids = sim.aws.add_instances(TARGET, REGION, 2, "running", &[]);
    sim.write_config(&format!(
        "{}{}",
        config("", &rule("evening", &ids, "stop = \"0 8 * * *\"")),
        notify("on = [\"failed\", \"ok\"]")
    ));
    let (alerts, transport) = alerting(&sim);
    let daemon = sim.start_with(alerts.clone());
    sim.advance_to("2026-12-01T08:05:00Z").await;
    let sent = messages(&transport);
    assert_eq!(sent.len(), 1, "{sent:#?}");
    let mut listed: Vec<&str> = sent[0]
        .instances
        .iter()
        .map(|i| i.instance.as_deref().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(sent[0].instances.iter().all(|i| i.result == ResultKind::Ok));
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_delivery_failing_twice_is_retried_with_back_off_and_delivered_once() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    let gone = "i-0000000000000dead".to_string();
    sim.write_config(&format!(
        "{}{}",
        config("", &rule("morning", &[gone], "start = \"0 8 * * *\"")),
        notify("")
    ));
    let (alerts, transport) = alerting(&sim);
    transport.script(2, Scripted::Fail);
    let daemon = sim.start_with(alerts.clone());
    sim.advance_to("2026-12-01T08:05:00Z").await;
    let attempts = transport.attempts();
    assert_eq!(attempts.len(), 3, "{attempts:?}\n{}", sim.logs.text());
    // 10 s, then 30 s apart.
    assert_eq!((attempts[1] - attempts[0]).num_seconds(), 10);
    assert_eq!((attempts[2] - attempts[1]).num_seconds(), 30);
    assert_eq!(messages(&transport).len(), 1, "delivered once");
    let logs = sim.logs.text();
    assert!(
        logs.contains("alert to recording failed (attempt 1 of 5, retrying in 10s): HTTP 503"),
        "{logs}"
    );
    assert!(logs.contains("alert delivered to recording"), "{logs}");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_delivery_refused_for_good_is_logged_and_not_retried() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    let gone = "i-0000000000000dead".to_string();
    sim.write_config(&format!(
        "{}{}",
        config("", &rule("morning", &[gone], "start = \"0 8 * * *\"")),
        notify("")
    ));
    let (alerts, transport) = alerting(&sim);
    transport.script(1, Scripted::Reject);
    let daemon = sim.start_with(alerts.clone());
    sim.advance_to("2026-12-01T08:10:00Z").await;
    assert_eq!(transport.attempts().len(), 1);
    assert!(messages(&transport).is_empty());
    let logs = sim.logs.text();
    assert!(
        logs.contains("alert to recording not delivered after 1 attempt(s): HTTP 404"),
        "{logs}"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_failing_batches_is_rate_limited_summarised_and_nothing_is_lost() {
    let sim = Sim::new("2026-12-01T07:59:59Z");
    let gone = "i-0000000000000dead".to_string();
    // A failing batch every 2 s: 30 a minute, three times the limit.
    sim.write_config(&format!(
        "{}{}",
        config("", &rule("flood", &[gone], "start = \"*/2 * * * * *\"")),
        notify("")
    ));
    let (alerts, transport) = alerting(&sim);
    let daemon = sim.start_with(alerts.clone());
    sim.advance(3 * MINUTE).await;
    daemon.stop().await;
    alerts.flush(5 * MINUTE).await;
    let failed_batches = sim
        .outcomes()
        .iter()
        .filter(|o| o.result == ResultKind::Failed)
        .count() as u64;
    assert!(failed_batches >= 80, "{failed_batches}");
    let sent = transport.delivered();
    // At most 10 in any minute.
    for (i, (at, _)) in sent.iter().enumerate() {
        let within = sent[i..]
            .iter()
            .take_while(|(t, _)| *t - *at < chrono::Duration::seconds(60))
            .count();
        assert!(within <= 10, "{within} alerts in the minute from {at}");
    }
    // 10 one by one, then one summary a minute.
    assert!(
        (11..=15).contains(&sent.len()),
        "{} alerts for {failed_batches} batches",
        sent.len()
    );
    let summaries: Vec<&AlertMessage> = sent
        .iter()
        .map(|(_, m)| m)
        .filter(|m| m.batches > 1)
        .collect();
    assert!(!summaries.is_empty());
    assert!(
        summaries[0].text.contains("more batches with failures: "),
        "{}",
        summaries[0].text
    );
    assert_eq!(
        sent.iter().map(|(_, m)| m.batches).sum::<u64>(),
        failed_batches,
        "every failing batch is in exactly one alert"
    );
    assert!(
        sim.logs
            .text()
            .contains("more than 10 a minute; the next ones are summarised, one message a minute")
    );
}

#[tokio::test(start_paused = true)]
async fn a_hanging_alert_destination_delays_no_action() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    let gone = "i-0000000000000dead".to_string();
    let ids = sim.aws.add_instances(TARGET, REGION, 1, "running", &[]);
    sim.write_config(&format!(
        "{}{}{}",
        config("", &rule("morning", &[gone], "start = \"0 8 * * *\"")),
        rule("soon-after", &ids, "stop = \"30 0 8 * * *\""),
        notify("")
    ));
    let (alerts, transport) = alerting(&sim);
    transport.script(100, Scripted::Hang);
    let daemon = sim.start_with(alerts.clone());
    sim.advance_to("2026-12-01T08:10:00Z").await;
    let stops = sim.aws.calls_of(fake::STOP);
    assert_eq!(stops.len(), 1);
    assert_eq!(
        stops[0].at,
        crate::sim::t("2026-12-01T08:00:30Z"),
        "on time"
    );
    sim.assert_one_each(&ids, Action::Stop, ResultKind::Ok);
    // Each attempt was abandoned after 30 s; after 5 the failure was logged.
    assert_eq!(transport.attempts().len(), 5);
    assert!(
        sim.logs
            .text()
            .contains("alert to recording not delivered after 5 attempt(s): no answer within 30s"),
        "{}",
        sim.logs.text()
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn sns_alerts_are_published_with_the_delegates_credentials_and_retried_when_throttled() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    let gone = "i-0000000000000dead".to_string();
    let topic = format!("arn:aws:sns:{REGION}:{DELEGATE}:shiftd-alerts");
    sim.write_config(&format!(
        "{}\n[notify]\nsns_topic_arn = \"{topic}\"\n",
        config(
            "",
            &rule(
                "morning",
                std::slice::from_ref(&gone),
                "start = \"0 8 * * *\""
            )
        )
    ));
    sim.aws.fault(
        fake::PUBLISH,
        1,
        FakeAws::error(fake::PUBLISH, "Throttling", "Rate exceeded"),
    );
    let alerts = Arc::new(Alerts::new(
        sim.sink.clone(),
        alerts::transports(sim.aws.connector()),
        sim.clock.clone() as Arc<dyn Clock>,
        DELIVERY,
    ));
    let daemon = sim.start_with(alerts.clone());
    sim.advance_to("2026-12-01T08:05:00Z").await;
    let calls: Vec<_> = sim
        .aws
        .calls()
        .into_iter()
        .filter(|c| c.operation == fake::PUBLISH)
        .collect();
    assert_eq!(calls.len(), 2, "throttled once, then published: {calls:?}");
    assert_eq!(
        calls[1].account, DELEGATE,
        "with the delegate's own credentials"
    );
    assert_eq!(calls[1].region, REGION, "in the topic's region");
    let published = sim.aws.published();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].topic_arn, topic);
    assert!(published[0].subject.starts_with("shiftd: 1 failed"));
    let body: serde_json::Value = serde_json::from_str(&published[0].message).unwrap();
    assert_eq!(body["instances"][0]["instance"], gone.as_str());
    assert_eq!(body["instances"][0]["rule"], "morning");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_applies_a_changed_notify_and_warns_that_metrics_need_a_restart() {
    let sim = Sim::new("2026-12-01T07:59:00Z");
    let gone = "i-0000000000000dead".to_string();
    let base = config(
        "",
        &rule(
            "hourly",
            std::slice::from_ref(&gone),
            "start = \"0 * * * *\"",
        ),
    );
    sim.write_config(&base);
    let (alerts, transport) = alerting(&sim);
    let daemon = sim.start_with(alerts.clone());
    sim.advance_to("2026-12-01T08:05:00Z").await;
    assert!(transport.attempts().is_empty(), "no [notify]: no alert");
    sim.write_config(&format!(
        "{base}{}\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
        notify("")
    ));
    daemon.reload();
    sim.advance_to("2026-12-01T09:05:00Z").await;
    let sent = messages(&transport);
    assert_eq!(sent.len(), 1, "the 09:00 failure, after the reload");
    assert_eq!(
        sent[0].instances[0].instance.as_deref(),
        Some(gone.as_str())
    );
    let logs = sim.logs.text();
    assert!(
        logs.contains(
            "[metrics] changed: the metrics endpoint keeps its address until shiftd is restarted"
        ),
        "{logs}"
    );
    assert!(
        logs.contains(
            "alerts: one message per batch with a result in [failed, missed], to recording"
        ),
        "{logs}"
    );
    daemon.stop().await;
}
