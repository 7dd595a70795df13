//! Prometheus metrics (`[metrics] listen`): what shiftd did, what it will do next, and how its
//! credentials are, served as `GET /metrics` in the Prometheus text format (0.0.4).
//!
//! - `shiftd_actions_total{rule,account,region,action,result}`: instance actions by result (`rule` as in
//!   `SHIFTD_RULE`: comma-separated when merged rules selected the instance);
//! - `shiftd_missed_total{rule,action}`: missed-occurrence reports (a long outage's summary counts once);
//! - `shiftd_next_action_timestamp_seconds{rule,action}`: each rule's next occurrence;
//! - `shiftd_credentials_expiry_timestamp_seconds{account}`: when the account's session expires (this
//!   machine's clock);
//! - `shiftd_credential_renewal_failures_total{account}`: failed AssumeRole calls;
//! - `shiftd_last_batch_timestamp_seconds`: when the last batch finished;
//! - `shiftd_build_info{version}`: 1.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::clock::Clock;
use crate::config::{Action, Config};
use crate::credentials::CredentialsObserver;
use crate::outcome::{Outcome, OutcomeSink, ResultKind};

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// At most this many scrapes are served at once; more connections are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// A connection is closed after this long, whatever it is doing (a scrape takes milliseconds).
const CONNECTION_BOUND: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} for [metrics]: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// shiftd's metrics. Shared: the sink, the credential renewals and the scheduling loop feed it.
pub struct Metrics {
    registry: Registry,
    actions: IntCounterVec,
    missed: IntCounterVec,
    next_action: GaugeVec,
    next_keys: Mutex<BTreeSet<(String, &'static str)>>,
    credentials_expiry: GaugeVec,
    renewal_failures: IntCounterVec,
    last_batch: Gauge,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    registry
        .register(Box::new(m.clone()))
        .expect("metric names are unique and valid");
    m
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let actions = counter(
            "shiftd_actions_total",
            "Instance actions by result (ok, skipped, failed, missed, dry-run).",
            &["rule", "account", "region", "action", "result"],
        );
        let missed = counter(
            "shiftd_missed_total",
            "Occurrences reported missed (shiftd was not running at their instant).",
            &["rule", "action"],
        );
        let next_action = gauge(
            "shiftd_next_action_timestamp_seconds",
            "When each rule's next action is due (Unix time).",
            &["rule", "action"],
        );
        let credentials_expiry = gauge(
            "shiftd_credentials_expiry_timestamp_seconds",
            "When the account's assumed-role credentials expire (Unix time, this machine's clock).",
            &["account"],
        );
        let renewal_failures = counter(
            "shiftd_credential_renewal_failures_total",
            "Failed AssumeRole calls renewing the account's credentials.",
            &["account"],
        );
        let last_batch = register(
            &registry,
            Gauge::new(
                "shiftd_last_batch_timestamp_seconds",
                "When the last batch of actions finished (Unix time).",
            )
            .expect("valid metric"),
        );
        let build = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("shiftd_build_info", "shiftd's version; always 1."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Arc::new(Self {
            registry,
            actions,
            missed,
            next_action,
            next_keys: Mutex::default(),
            credentials_expiry,
            renewal_failures,
            last_batch,
        })
    }

    /// Counts one outcome.
    pub fn record(&self, o: &Outcome) {
        let rule = o.rules.join(",");
        self.actions
            .with_label_values(&[
                rule.as_str(),
                &o.account,
                &o.region,
                o.action.as_str(),
                o.result.as_str(),
            ])
            .inc();
        if o.result == ResultKind::Missed {
            self.missed
                .with_label_values(&[rule.as_str(), o.action.as_str()])
                .inc();
        }
    }

    /// A batch finished at `at`.
    pub fn batch_done(&self, at: DateTime<Utc>) {
        self.last_batch.set(unix_seconds(at));
    }

    /// Sets each rule's next occurrence after `now` (rules and actions without one are removed).
    pub fn set_next_actions(&self, config: &Config, now: DateTime<Utc>) {
        let mut keys = BTreeSet::new();
        for rule in &config.rules {
            for action in [Action::Start, Action::Stop] {
                let next = rule
                    .schedules(action)
                    .iter()
                    .filter_map(|s| s.next_after(now, rule.timezone))
                    .min();
                if let Some(next) = next {
                    self.next_action
                        .with_label_values(&[rule.name.as_str(), action.as_str()])
                        .set(unix_seconds(next));
                    keys.insert((rule.name.clone(), action.as_str()));
                }
            }
        }
        let mut previous = self.next_keys.lock().expect("metrics lock");
        for (rule, action) in previous.difference(&keys) {
            let _ = self
                .next_action
                .remove_label_values(&[rule.as_str(), action]);
        }
        *previous = keys;
    }

    /// Drops the per-account series of accounts the configuration no longer has (a stale expiry would
    /// fire an expiry alert forever), and starts each configured account's failure counter and each
    /// rule's missed counter at 0, so that `increase()` sees their first event.
    pub fn forget_accounts_not_in(&self, config: &Config) {
        for family in self.registry.gather() {
            let name = family.name();
            if name != "shiftd_credentials_expiry_timestamp_seconds"
                && name != "shiftd_credential_renewal_failures_total"
            {
                continue;
            }
            for m in family.get_metric() {
                let Some(account) = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "account")
                    .map(|l| l.value().to_string())
                else {
                    continue;
                };
                if !config.accounts.contains_key(&account) {
                    let _ = self.credentials_expiry.remove_label_values(&[&account]);
                    let _ = self.renewal_failures.remove_label_values(&[&account]);
                }
            }
        }
        for account in config.accounts.keys() {
            self.renewal_failures.with_label_values(&[account.as_str()]);
        }
        // And each rule's missed counter, so that `increase()` sees the first miss too.
        for rule in &config.rules {
            for action in [Action::Start, Action::Stop] {
                if !rule.schedules(action).is_empty() {
                    self.missed
                        .with_label_values(&[rule.name.as_str(), action.as_str()]);
                }
            }
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding the metrics failed: {e}\n"))
    }
}

impl CredentialsObserver for Metrics {
    fn renewed(&self, account: &str, local_expiry: SystemTime) {
        self.credentials_expiry
            .with_label_values(&[account])
            .set(unix_seconds(local_expiry.into()));
    }

    fn renewal_failed(&self, account: &str) {
        self.renewal_failures.with_label_values(&[account]).inc();
    }
}

fn unix_seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// An outcome sink that counts outcomes and batches in `metrics`, then passes them on to `inner`.
pub struct MetricsSink {
    pub inner: Arc<dyn OutcomeSink>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
}

impl OutcomeSink for MetricsSink {
    fn record(&self, outcome: &Outcome) {
        self.metrics.record(outcome);
        self.inner.record(outcome);
    }

    fn batch_done(&self, outcomes: &[Outcome]) {
        self.metrics.batch_done(self.clock.now());
        self.inner.batch_done(outcomes);
    }

    fn configured(&self, config: &Config) {
        self.metrics.forget_accounts_not_in(config);
        self.inner.configured(config);
    }
}

/// Binds the metrics address (before the daemon starts: a taken port is reported at once).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` on `listener` until the task is dropped; anything else is 404 (405 for
/// another method on /metrics).
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!("metrics endpoint: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_BOUND, connection).await;
            drop(permit);
        });
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, metrics.render()),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Trigger;

    fn outcome(result: ResultKind) -> Outcome {
        Outcome {
            action: Action::Stop,
            rules: vec!["office".into()],
            account: "account1".into(),
            region: "ap-northeast-1".into(),
            instance_id: Some("i-0123456789abcdef0".into()),
            result,
            reason: String::new(),
            trigger: Trigger::Schedule,
        }
    }

    #[test]
    fn outcomes_renewals_and_the_build_show_in_the_text_format() {
        let m = Metrics::new();
        m.record(&outcome(ResultKind::Ok));
        m.record(&outcome(ResultKind::Ok));
        m.record(&outcome(ResultKind::Missed));
        m.renewal_failed("account1");
        m.renewed(
            "account1",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        );
        let text = m.render();
        for line in [
            r#"shiftd_actions_total{account="account1",action="stop",region="ap-northeast-1",result="ok",rule="office"} 2"#,
            r#"shiftd_missed_total{action="stop",rule="office"} 1"#,
            r#"shiftd_credential_renewal_failures_total{account="account1"} 1"#,
            r#"shiftd_credentials_expiry_timestamp_seconds{account="account1"} 1800000000"#,
            "# TYPE shiftd_actions_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\nin:\n{text}");
        }
        assert!(
            text.contains(&format!(
                "shiftd_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }

    #[test]
    fn next_actions_follow_the_rules_and_drop_removed_ones() {
        let text = |rules: &str| {
            format!(
                "[accounts.a]\nrole_arn = \"arn:aws:iam::111111111111:role/r\"\nregions = [\"eu-west-1\"]\n{rules}"
            )
        };
        let rule = |name: &str| {
            format!(
                "[[rules]]\nname = \"{name}\"\naccount = \"a\"\ninstances = [\"i-0123456789abcdef0\"]\nstart = \"0 8 * * *\"\n"
            )
        };
        let path = std::path::Path::new("t.toml");
        let now = DateTime::parse_from_rfc3339("2026-12-01T07:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let m = Metrics::new();
        let two = Config::parse(path, &text(&(rule("one") + &rule("two")))).unwrap();
        m.set_next_actions(&two, now);
        let eight = "1796112000"; // 2026-12-01T08:00:00Z
        let shown = m.render();
        assert!(
            shown.contains(&format!(
                "shiftd_next_action_timestamp_seconds{{action=\"start\",rule=\"two\"}} {eight}"
            )),
            "{shown}"
        );
        let one = Config::parse(path, &text(&rule("one"))).unwrap();
        m.set_next_actions(&one, now);
        let shown = m.render();
        assert!(!shown.contains("rule=\"two\""), "{shown}");
        assert!(shown.contains("rule=\"one\""), "{shown}");
    }
}
