//! Being told, end to end: the real binary's alerts to a local HTTP receiver and to moto's SNS, and
//! its /metrics scraped over HTTP and parsed by the Prometheus Python client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// One request a [`receiver`] got: its target (path and query) and its body.
struct Received {
    target: String,
    content_type: String,
    body: String,
}

/// A webhook receiver on a loopback port: answers the requests with `statuses` in turn (then 200), and
/// hands each request over. It lives as long as the test process.
fn receiver(statuses: Vec<u16>) -> (u16, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let target = line.split(' ').nth(1).unwrap_or_default().to_string();
            let (mut length, mut content_type) = (0, String::new());
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                let (name, value) = header.split_once(':').unwrap_or_default();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "content-type" => content_type = value.trim().to_string(),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let status = statuses.next().unwrap_or(200);
            let _ = stream.write_all(
                format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    .as_bytes(),
            );
            let _ = tx.send(Received {
                target,
                content_type,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
    });
    (port, rx)
}

#[test]
fn a_failed_batch_is_posted_to_the_webhook_retried_and_its_token_never_logged() {
    let fake = FakeAws::start();
    let running = fake.seed(TARGET_ACCOUNT, 1, &[], false);
    let gone = "i-0000000000000dead";
    // The first delivery meets a 500: shiftd logs the retry (naming the webhook), then delivers.
    let (port, requests) = receiver(vec![500]);
    let secret_path = "/services/T000/B000/SECRETTOKEN123";
    let secret_query = "sig=QUERYSECRET456";
    let config = format!(
        "{}\n[notify]\nwebhook_url = \"http://127.0.0.1:{port}{secret_path}?{secret_query}\"\n",
        one_rule_config(
            "nightly",
            "stop",
            &[running[0].clone(), gone.to_string()],
            &once_in(3)
        )
    );
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    let first = requests
        .recv_timeout(Duration::from_secs(60))
        .expect("a first POST");
    let second = requests
        .recv_timeout(Duration::from_secs(40))
        .expect("a retried POST (10 s after the 500)");
    daemon.wait_for_messages("alert delivered to webhook", 1, Duration::from_secs(10));
    let entries = daemon.entries();
    assert!(daemon.stop().success());

    assert_eq!(first.body, second.body, "the same message, again");
    assert_eq!(second.target, format!("{secret_path}?{secret_query}"));
    assert_eq!(second.content_type, "application/json");
    let body: Value = serde_json::from_str(&second.body).unwrap();
    let text = body["text"].as_str().unwrap();
    assert!(
        text.starts_with("shiftd: 1 failed, 1 ok - stop nightly in account1/ap-northeast-1"),
        "{text}"
    );
    assert!(text.contains(gone), "{text}");
    let instances = body["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "only the failed instance: {body:#}");
    let failed = &instances[0];
    assert_eq!(failed["instance"], gone);
    assert_eq!(failed["rule"], "nightly");
    assert_eq!(failed["account"], "account1");
    assert_eq!(failed["region"], REGION);
    assert_eq!(failed["action"], "stop");
    assert_eq!(failed["result"], "failed");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("instance not found"),
        "{failed}"
    );

    // The journal names the webhook by its host only, in every field of every entry.
    let shown = format!("webhook http://127.0.0.1:{port}/…");
    assert!(
        entries.iter().any(|e| field(e, "MESSAGE").contains(&format!(
            "alert to {shown} failed (attempt 1 of 5, retrying in 10s): the webhook answered HTTP 500"
        ))),
        "{entries:#?}"
    );
    for e in &entries {
        for (k, v) in e {
            assert!(
                !v.contains("SECRETTOKEN123") && !v.contains("QUERYSECRET456"),
                "the webhook's token in {k}: {v}"
            );
        }
    }
}

#[test]
fn a_failed_batch_is_published_to_the_sns_topic_with_the_delegates_credentials() {
    let fake = FakeAws::start();
    let topic = fake.helper(&["sns-topic", "--name", "shiftd-alerts"]);
    let (topic_arn, queue_url) = (
        topic["topic_arn"].as_str().unwrap().to_string(),
        topic["queue_url"].as_str().unwrap().to_string(),
    );
    assert!(
        topic_arn.contains(&format!(":{BASE_ACCOUNT}:")),
        "{topic_arn}"
    );
    let gone = "i-0000000000000dead";
    let config = format!(
        "{}\n[notify]\nsns_topic_arn = \"{topic_arn}\"\n",
        one_rule_config("nightly", "stop", &[gone.to_string()], &once_in(3))
    );
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    daemon.wait_for_messages(
        &format!("alert delivered to SNS topic {topic_arn}"),
        1,
        Duration::from_secs(60),
    );
    assert!(daemon.stop().success());
    let messages = fake.helper(&["sqs-messages", "--queue-url", &queue_url]);
    let messages = messages.as_array().unwrap();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let envelope = &messages[0];
    assert_eq!(envelope["TopicArn"], topic_arn.as_str());
    assert!(
        envelope["Subject"]
            .as_str()
            .unwrap()
            .starts_with("shiftd: 1 failed - stop nightly"),
        "{envelope:#}"
    );
    let body: Value = serde_json::from_str(envelope["Message"].as_str().unwrap()).unwrap();
    assert_eq!(body["instances"][0]["instance"], gone);
    assert_eq!(body["instances"][0]["action"], "stop");
    assert!(body["text"].as_str().unwrap().contains(gone));
}

#[test]
fn metrics_are_served_on_loopback_and_parse_as_prometheus_text() {
    let fake = FakeAws::start();
    let running = fake.seed(TARGET_ACCOUNT, 1, &[], false);
    let port = free_port();
    let config = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        one_rule_config("nightly", "stop", &running, &once_in(3))
    );
    let started = chrono::Utc::now().timestamp() as f64;
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    daemon.wait_for_messages(
        "batch done for account account1",
        1,
        Duration::from_secs(60),
    );
    // Scraped and parsed as Prometheus does, by the Prometheus Python client's own parser.
    let scrape = std::process::Command::new(venv().join("bin/python"))
        .args([
            "-c",
            r#"
import json, sys, urllib.error, urllib.request
from prometheus_client.parser import text_string_to_metric_families
r = urllib.request.urlopen(sys.argv[1])
samples = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(r.read().decode()) for s in f.samples]
try:
    other = urllib.request.urlopen(sys.argv[2]).status
except urllib.error.HTTPError as e:
    other = e.code
print(json.dumps({"content_type": r.headers["Content-Type"], "samples": samples, "other": other}))
"#,
            &format!("http://127.0.0.1:{port}/metrics"),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .unwrap();
    assert!(daemon.stop().success());
    assert!(
        scrape.status.success(),
        "{}",
        String::from_utf8_lossy(&scrape.stderr)
    );
    let out: Value = serde_json::from_slice(&scrape.stdout).unwrap();
    assert_eq!(out["other"], 404);
    assert!(
        out["content_type"]
            .as_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{out}"
    );
    let samples = out["samples"].as_array().unwrap();
    let value = |name: &str, labels: Value| -> Option<f64> {
        samples
            .iter()
            .find(|s| s[0] == name && s[1] == labels)
            .map(|s| s[2].as_f64().unwrap())
    };
    assert_eq!(
        value(
            "shiftd_actions_total",
            serde_json::json!({"rule": "nightly", "account": "account1", "region": REGION,
                               "action": "stop", "result": "ok"})
        ),
        Some(1.0),
        "{samples:#?}"
    );
    assert_eq!(
        value(
            "shiftd_build_info",
            serde_json::json!({"version": env!("CARGO_PKG_VERSION")})
        ),
        Some(1.0)
    );
    let expiry = value(
        "shiftd_credentials_expiry_timestamp_seconds",
        serde_json::json!({"account": "account1"}),
    )
    .expect("the account's credentials expiry");
    assert!(expiry > started + 600.0, "{expiry}");
    let last_batch = value("shiftd_last_batch_timestamp_seconds", serde_json::json!({}))
        .expect("the last batch's time");
    assert!(last_batch >= started, "{last_batch} vs {started}");
    let next = value(
        "shiftd_next_action_timestamp_seconds",
        serde_json::json!({"rule": "nightly", "action": "stop"}),
    )
    .expect("the rule's next action");
    assert!(next > started + 3600.0, "tomorrow's: {next}");
}
