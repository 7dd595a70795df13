//! Alerts (`[notify]`): one message per batch that has a result operators asked to hear about (by
//! default `failed` or `missed`), POSTed to a webhook and/or published to an SNS topic.
//!
//! The scheduling loop only builds the message and puts it in a bounded queue per destination: it never
//! waits for a delivery. Each destination's worker delivers in order, retrying with back-off a bounded
//! number of times (each attempt bounded too), logs a delivery that failed for good, and sends at most
//! [`DeliveryPolicy::per_minute`] messages a minute: what comes on top (and what did not fit the queue)
//! is summarised in one message ("N more batches with failures: ...") once the minute allows.
//!
//! A webhook URL's path and query (and user info) often hold a token: [`WebhookUrl`] prints as
//! `scheme://host[:port]/…`, and every error about it is redacted before it is logged.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::aws::{Aws, ConnectAws};
use crate::clock::Clock;
use crate::config::{Action, Config, CredentialSource, NotifyConfig};
use crate::outcome::{Outcome, OutcomeSink, ResultKind};

// ---------------------------------------------------------------------------------------------------------
// The webhook URL, redacted
// ---------------------------------------------------------------------------------------------------------

/// A webhook URL. `Display` and `Debug` show only `scheme://host[:port]/…`.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    full: String,
    shown: String,
    /// What must never be printed: path, query, user info, fragment (longest first).
    secrets: Vec<String>,
}

/// What a redacted part of a URL is replaced with.
const REDACTED: &str = "…";

impl WebhookUrl {
    /// An absolute `https` URL, or `http` to a loopback host (`127.0.0.0/8`, `[::1]`, `localhost`): plain
    /// HTTP would carry the token in the clear. The error never repeats the path or the query.
    pub fn parse(s: &str) -> Result<WebhookUrl, String> {
        let url = url::Url::parse(s).map_err(|e| {
            format!(
                "not an absolute URL ({e}): expected https://HOST/PATH (the value is not repeated: \
                 a webhook URL often holds a token)"
            )
        })?;
        let Some(host) = url.host() else {
            return Err("no host: expected https://HOST/PATH".to_string());
        };
        let loopback = match &host {
            url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
            url::Host::Ipv4(ip) => ip.is_loopback(),
            url::Host::Ipv6(ip) => ip.is_loopback(),
        };
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        let shown = format!("{}://{host}{port}/{REDACTED}", url.scheme());
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(format!(
                    "{shown}: plain http is only accepted to a loopback host (127.0.0.1, [::1], \
                     localhost): expected https"
                ));
            }
            other => return Err(format!("scheme {other:?}: expected https")),
        }
        let mut secrets: Vec<String> = [
            Some(url.path().to_string()).filter(|p| p.len() > 1),
            url.query().map(String::from),
            url.fragment().map(String::from),
            url.password().map(String::from),
            Some(url.username().to_string()),
        ]
        .into_iter()
        .flatten()
        .filter(|p| !p.is_empty())
        .collect();
        secrets.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Ok(WebhookUrl {
            full: s.to_string(),
            shown,
            secrets,
        })
    }

    /// The whole URL, to send to. Never log it.
    pub fn expose(&self) -> &str {
        &self.full
    }

    /// `text` with the URL and every secret part of it replaced.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.replace(&self.full, &self.shown);
        for s in &self.secrets {
            out = out.replace(s.as_str(), REDACTED);
        }
        out
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({})", self.shown)
    }
}

// ---------------------------------------------------------------------------------------------------------
// The message
// ---------------------------------------------------------------------------------------------------------

/// At most this many instances are listed in a message's structured list.
pub const MAX_ITEMS: usize = 100;
/// At most this many instances are listed in its text.
const TEXT_ITEMS: usize = 20;
/// A reason longer than this is cut in the text (the structured list keeps it whole).
const TEXT_REASON: usize = 300;

/// One instance action (or selection, or missed occurrence) in an alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertItem {
    pub rule: String,
    pub account: String,
    pub region: String,
    /// Absent for a selection that could not be resolved, or a missed occurrence.
    pub instance: Option<String>,
    pub action: Action,
    pub result: ResultKind,
    pub reason: String,
}

/// One alert: a Slack-compatible `text`, a one-line `subject` (SNS), and the instances it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertMessage {
    pub subject: String,
    pub text: String,
    pub instances: Vec<AlertItem>,
    /// Instances left out of `instances` (past [`MAX_ITEMS`]).
    pub more_instances: usize,
    /// How many batches it reports (more than one for a summary).
    pub batches: u64,
    /// Results in the reported batches, by result.
    pub counts: BTreeMap<&'static str, usize>,
}

/// Results in the order messages list them.
const RESULT_ORDER: [ResultKind; 5] = [
    ResultKind::Failed,
    ResultKind::Missed,
    ResultKind::Ok,
    ResultKind::Skipped,
    ResultKind::DryRun,
];

fn counts_text(counts: &BTreeMap<&'static str, usize>) -> String {
    RESULT_ORDER
        .iter()
        .filter_map(|k| {
            counts
                .get(k.as_str())
                .map(|n| format!("{n} {}", k.as_str()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// SNS subjects: printable ASCII, no line break, at most 100 characters.
fn subject_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    out.truncate(100);
    out
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl AlertItem {
    fn line(&self) -> String {
        format!(
            "• {}: {} {} ({}, {}/{}): {}",
            self.result,
            self.action,
            self.instance.as_deref().unwrap_or("(selection)"),
            self.rule,
            self.account,
            self.region,
            cut(&self.reason, TEXT_REASON)
        )
    }
}

impl AlertMessage {
    /// The message for a finished batch: `None` unless one of its outcomes has a result in `on`. It
    /// lists those outcomes.
    pub fn for_batch(outcomes: &[Outcome], on: &[ResultKind]) -> Option<AlertMessage> {
        let items: Vec<AlertItem> = outcomes
            .iter()
            .filter(|o| on.contains(&o.result))
            .map(|o| AlertItem {
                rule: o.rules.join(","),
                account: o.account.clone(),
                region: o.region.clone(),
                instance: o.instance_id.clone(),
                action: o.action,
                result: o.result,
                reason: o.reason.clone(),
            })
            .collect();
        if items.is_empty() {
            return None;
        }
        let mut counts = BTreeMap::new();
        for o in outcomes {
            *counts.entry(o.result.as_str()).or_insert(0) += 1;
        }
        let mut what: Vec<String> = Vec::new();
        for o in outcomes {
            let w = format!(
                "{} {} in {}/{}",
                o.action,
                o.rules.join(","),
                o.account,
                o.region
            );
            if !what.contains(&w) {
                what.push(w);
            }
        }
        let head = format!("shiftd: {} - {}", counts_text(&counts), what.join("; "));
        let mut text = head.clone();
        for item in items.iter().take(TEXT_ITEMS) {
            text.push('\n');
            text.push_str(&item.line());
        }
        if items.len() > TEXT_ITEMS {
            text.push_str(&format!("\n… and {} more", items.len() - TEXT_ITEMS));
        }
        let more_instances = items.len().saturating_sub(MAX_ITEMS);
        Some(AlertMessage {
            subject: subject_line(&head),
            text,
            instances: items.into_iter().take(MAX_ITEMS).collect(),
            more_instances,
            batches: 1,
            counts,
        })
    }

    /// One message for several: those held back by the rate limit, plus `dropped` batches that did not
    /// fit the queue.
    pub fn summary(messages: Vec<AlertMessage>, dropped: u64, per_minute: usize) -> AlertMessage {
        let batches = messages.iter().map(|m| m.batches).sum::<u64>() + dropped;
        let mut counts = BTreeMap::new();
        let mut instances = Vec::new();
        let mut more_instances = 0;
        for m in &messages {
            for (k, n) in &m.counts {
                *counts.entry(*k).or_insert(0) += n;
            }
            more_instances += m.more_instances;
            for i in &m.instances {
                if instances.len() < MAX_ITEMS {
                    instances.push(i.clone());
                } else {
                    more_instances += 1;
                }
            }
        }
        let failures_only = counts
            .keys()
            .all(|k| *k == ResultKind::Failed.as_str() || *k == ResultKind::Missed.as_str());
        let with = if failures_only {
            "with failures"
        } else {
            "to report"
        };
        let head = format!(
            "shiftd: {batches} more batches {with}: {}",
            counts_text(&counts)
        );
        let mut text =
            format!("{head} (at most {per_minute} alerts a minute: these are summarised in one)");
        for m in messages.iter().take(TEXT_ITEMS) {
            text.push_str("\n• ");
            text.push_str(m.text.lines().next().unwrap_or_default());
        }
        if messages.len() > TEXT_ITEMS {
            text.push_str(&format!("\n… and {} more", messages.len() - TEXT_ITEMS));
        }
        if dropped > 0 {
            text.push_str(&format!(
                "\n{dropped} more batch(es) are counted but not listed: the alert queue was full"
            ));
        }
        AlertMessage {
            subject: subject_line(&head),
            text,
            instances,
            more_instances,
            batches,
            counts,
        }
    }

    /// The JSON body: Slack's `text`, and the structured list.
    pub fn json(&self) -> String {
        let instances: Vec<serde_json::Value> = self
            .instances
            .iter()
            .map(|i| {
                json!({
                    "rule": i.rule,
                    "account": i.account,
                    "region": i.region,
                    "instance": i.instance,
                    "action": i.action.as_str(),
                    "result": i.result.as_str(),
                    "reason": i.reason,
                })
            })
            .collect();
        json!({
            "text": self.text,
            "subject": self.subject,
            "source": "shiftd",
            "batches": self.batches,
            "counts": self.counts,
            "instances": instances,
            "more_instances": self.more_instances,
        })
        .to_string()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Destinations
// ---------------------------------------------------------------------------------------------------------

/// Why one delivery attempt failed, fit for logs (no secret in it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    pub message: String,
    /// Worth another attempt (a timeout, a 5xx, throttling); not a 404 or a refused permission.
    pub retryable: bool,
}

/// Where alerts go.
#[async_trait]
pub trait AlertTransport: Send + Sync {
    /// The destination, fit for logs (a webhook's path and query redacted).
    fn destination(&self) -> String;
    /// One attempt at delivering `message`.
    async fn send(&self, message: &AlertMessage) -> Result<(), DeliveryError>;
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// POSTs the JSON body to a webhook (Slack's incoming webhooks read its `text`).
pub struct WebhookTransport {
    url: WebhookUrl,
    client: HttpClient,
    /// Set when the system's root certificates could not be loaded (https then fails: this says why).
    roots_problem: Option<String>,
}

impl WebhookTransport {
    pub fn new(url: WebhookUrl) -> Self {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let (connector, roots_problem) =
            match builder.with_provider_and_native_roots(provider.clone()) {
                Ok(b) => (b.https_or_http().enable_http1().build(), None),
                Err(e) => {
                    // http to a loopback receiver still works; https says why it cannot.
                    let config = rustls::ClientConfig::builder_with_provider(provider)
                        .with_safe_default_protocol_versions()
                        .expect("the default provider supports the default versions")
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth();
                    (
                        hyper_rustls::HttpsConnectorBuilder::new()
                            .with_tls_config(config)
                            .https_or_http()
                            .enable_http1()
                            .build(),
                        Some(format!(
                            "the system's root certificates could not be loaded ({e}): install \
                             ca-certificates"
                        )),
                    )
                }
            };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Self {
            url,
            client,
            roots_problem,
        }
    }
}

/// An error and its causes on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = s.source();
    }
    cut(&parts.join(": "), 400)
}

#[async_trait]
impl AlertTransport for WebhookTransport {
    fn destination(&self) -> String {
        format!("webhook {}", self.url)
    }

    async fn send(&self, message: &AlertMessage) -> Result<(), DeliveryError> {
        let request = hyper::Request::post(self.url.expose())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("shiftd/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(message.json())))
            .map_err(|e| DeliveryError {
                message: self
                    .url
                    .redact(&format!("the request could not be built: {e}")),
                retryable: false,
            })?;
        let response = self.client.request(request).await.map_err(|e| {
            let mut why = error_chain(&e);
            if let Some(p) = &self.roots_problem {
                why = format!("{why} ({p})");
            }
            DeliveryError {
                message: self.url.redact(&why),
                retryable: true,
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // The body is not logged: a receiver may echo the request, token included.
        Err(DeliveryError {
            message: format!("the webhook answered HTTP {status}"),
            retryable: status.is_server_error()
                || status == hyper::StatusCode::TOO_MANY_REQUESTS
                || status == hyper::StatusCode::REQUEST_TIMEOUT,
        })
    }
}

/// Publishes to an SNS topic with the delegate's own credentials (subject: the message's first line;
/// message: the JSON body).
pub struct SnsTransport {
    aws: Arc<dyn Aws>,
    topic_arn: String,
    region: String,
}

impl SnsTransport {
    pub fn new(aws: Arc<dyn Aws>, topic_arn: &str, region: &str) -> Self {
        Self {
            aws,
            topic_arn: topic_arn.to_string(),
            region: region.to_string(),
        }
    }
}

#[async_trait]
impl AlertTransport for SnsTransport {
    fn destination(&self) -> String {
        format!("SNS topic {}", self.topic_arn)
    }

    async fn send(&self, message: &AlertMessage) -> Result<(), DeliveryError> {
        let sns = self.aws.sns(&self.region).await;
        sns.publish(&self.topic_arn, &message.subject, &message.json())
            .await
            .map(drop)
            .map_err(|e| DeliveryError {
                message: e.to_string(),
                // No code: the request could not be built (no credentials yet): worth another try.
                retryable: e.is_retryable() || e.code().is_none(),
            })
    }
}

/// What a [`RecordingTransport`] does with its next attempt.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// Fails, retryably (a 503).
    Fail,
    /// Fails for good (a 404).
    Reject,
    /// Never answers.
    Hang,
}

/// Keeps every message it is given, with the time; attempts can be scripted to fail or hang. For
/// tests.
pub struct RecordingTransport {
    clock: Arc<dyn Clock>,
    delivered: Mutex<Vec<(DateTime<Utc>, AlertMessage)>>,
    attempts: Mutex<Vec<DateTime<Utc>>>,
    script: Mutex<VecDeque<Scripted>>,
}

impl RecordingTransport {
    pub fn new(clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            clock,
            delivered: Mutex::default(),
            attempts: Mutex::default(),
            script: Mutex::default(),
        })
    }

    /// The next `times` attempts meet `what`.
    pub fn script(&self, times: usize, what: Scripted) {
        self.script
            .lock()
            .expect("transport lock")
            .extend(std::iter::repeat_n(what, times));
    }

    /// The messages delivered, with when.
    pub fn delivered(&self) -> Vec<(DateTime<Utc>, AlertMessage)> {
        self.delivered.lock().expect("transport lock").clone()
    }

    /// When each attempt was made, delivered or not.
    pub fn attempts(&self) -> Vec<DateTime<Utc>> {
        self.attempts.lock().expect("transport lock").clone()
    }
}

#[async_trait]
impl AlertTransport for RecordingTransport {
    fn destination(&self) -> String {
        "recording".to_string()
    }

    async fn send(&self, message: &AlertMessage) -> Result<(), DeliveryError> {
        let now = self.clock.now();
        self.attempts.lock().expect("transport lock").push(now);
        let next = self.script.lock().expect("transport lock").pop_front();
        match next {
            None => {
                self.delivered
                    .lock()
                    .expect("transport lock")
                    .push((now, message.clone()));
                Ok(())
            }
            Some(Scripted::Fail) => Err(DeliveryError {
                message: "HTTP 503 Service Unavailable".into(),
                retryable: true,
            }),
            Some(Scripted::Reject) => Err(DeliveryError {
                message: "HTTP 404 Not Found".into(),
                retryable: false,
            }),
            Some(Scripted::Hang) => std::future::pending().await,
        }
    }
}

/// Builds the destinations of a `[notify]` table (again after a reload that changes it).
pub type Transports =
    Arc<dyn Fn(&Config, &NotifyConfig) -> Vec<Arc<dyn AlertTransport>> + Send + Sync>;

/// The real destinations: the webhook over HTTP(S), SNS through `connect`'s AWS (the delegate's own
/// credentials, in the topic's region).
pub fn transports(connect: ConnectAws) -> Transports {
    Arc::new(move |config: &Config, notify: &NotifyConfig| {
        let mut out: Vec<Arc<dyn AlertTransport>> = Vec::new();
        if let Some(url) = &notify.webhook_url {
            out.push(Arc::new(WebhookTransport::new(url.clone())));
        }
        if let (Some(arn), Some(region)) = (&notify.sns_topic_arn, notify.sns_region()) {
            let aws = connect(&config.credentials, region);
            out.push(Arc::new(SnsTransport::new(aws, arn, region)));
        }
        out
    })
}

// ---------------------------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------------------------

/// How alerts are delivered.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryPolicy {
    /// Attempts per message, the first included.
    pub attempts: u32,
    /// The pause after the first failed attempt; each next one is 3 times longer, up to `max_retry`.
    pub first_retry: Duration,
    pub max_retry: Duration,
    /// One attempt is abandoned after this long.
    pub attempt_timeout: Duration,
    /// At most this many messages a minute per destination; the rest are summarised.
    pub per_minute: usize,
    /// Messages waiting per destination; more are counted, and summarised.
    pub queue: usize,
}

/// 5 attempts over about 4 minutes (10 s, 30 s, 90 s, 2 min apart), 30 s each; 10 messages a minute.
pub const DELIVERY: DeliveryPolicy = DeliveryPolicy {
    attempts: 5,
    first_retry: Duration::from_secs(10),
    max_retry: Duration::from_secs(120),
    attempt_timeout: Duration::from_secs(30),
    per_minute: 10,
    queue: 100,
};

impl DeliveryPolicy {
    /// The pause after failed attempt `attempt` (1-based).
    pub fn retry_in(&self, attempt: u32) -> Duration {
        let factor = 3u32.saturating_pow(attempt.saturating_sub(1).min(10));
        self.first_retry.saturating_mul(factor).min(self.max_retry)
    }
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

struct Channel {
    destination: String,
    tx: mpsc::Sender<AlertMessage>,
    overflow: Arc<AtomicU64>,
    worker: JoinHandle<()>,
}

struct Active {
    key: (NotifyConfig, CredentialSource),
    channels: Vec<Channel>,
}

/// The alerting sink: passes every outcome on to `inner`, and queues a message for each destination
/// when a finished batch has a result in `[notify] on`.
pub struct Alerts {
    inner: Arc<dyn OutcomeSink>,
    transports: Transports,
    clock: Arc<dyn Clock>,
    policy: DeliveryPolicy,
    active: Mutex<Option<Active>>,
    /// Messages built (for each destination), for tests and logs.
    queued: AtomicUsize,
}

impl Alerts {
    pub fn new(
        inner: Arc<dyn OutcomeSink>,
        transports: Transports,
        clock: Arc<dyn Clock>,
        policy: DeliveryPolicy,
    ) -> Self {
        Self {
            inner,
            transports,
            clock,
            policy,
            active: Mutex::new(None),
            queued: AtomicUsize::new(0),
        }
    }

    /// Closes the queues and waits up to `bound` for what is queued to be delivered (at shutdown).
    pub async fn flush(&self, bound: Duration) {
        let Some(active) = self.active.lock().expect("alerts lock").take() else {
            return;
        };
        let mut workers = Vec::new();
        for c in active.channels {
            drop(c.tx);
            workers.push((c.destination, c.worker));
        }
        let deadline = tokio::time::sleep(bound);
        tokio::pin!(deadline);
        for (destination, mut worker) in workers {
            tokio::select! {
                _ = &mut worker => {}
                () = &mut deadline => {
                    worker.abort();
                    tracing::warn!(
                        "alerts to {destination}: not all delivered within {} of shutting down",
                        humantime::format_duration(bound)
                    );
                }
            }
        }
    }
}

impl OutcomeSink for Alerts {
    fn record(&self, outcome: &Outcome) {
        self.inner.record(outcome);
    }

    fn batch_done(&self, outcomes: &[Outcome]) {
        self.inner.batch_done(outcomes);
        let active = self.active.lock().expect("alerts lock");
        let Some(active) = active.as_ref() else {
            return;
        };
        let Some(message) = AlertMessage::for_batch(outcomes, &active.key.0.on) else {
            return;
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        for c in &active.channels {
            if c.tx.try_send(message.clone()).is_err()
                && c.overflow.fetch_add(1, Ordering::Relaxed) == 0
            {
                tracing::warn!(
                    "alerts to {}: the queue is full ({} waiting); further batches are counted and \
                     summarised",
                    c.destination,
                    self.policy.queue
                );
            }
        }
    }

    fn configured(&self, config: &Config) {
        self.inner.configured(config);
        let mut active = self.active.lock().expect("alerts lock");
        let key = config
            .notify
            .clone()
            .map(|n| (n, config.credentials.clone()));
        if active.as_ref().map(|a| &a.key) == key.as_ref() {
            return;
        }
        // Replaced: the old queues close, and their workers finish delivering what they hold.
        *active = None;
        let Some(key) = key else {
            tracing::info!("alerts: off (no [notify])");
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("alerts: no async runtime to deliver them on; alerts are off");
            return;
        };
        let mut channels = Vec::new();
        for transport in (self.transports)(config, &key.0) {
            let (tx, rx) = mpsc::channel(self.policy.queue.max(1));
            let overflow = Arc::new(AtomicU64::new(0));
            let destination = transport.destination();
            let worker = runtime.spawn(deliver_all(
                transport,
                rx,
                overflow.clone(),
                self.policy,
                self.clock.clone(),
            ));
            channels.push(Channel {
                destination,
                tx,
                overflow,
                worker,
            });
        }
        let on: Vec<&str> = key.0.on.iter().map(|k| k.as_str()).collect();
        let to: Vec<&str> = channels.iter().map(|c| c.destination.as_str()).collect();
        tracing::info!(
            "alerts: one message per batch with a result in [{}], to {}",
            on.join(", "),
            to.join(" and ")
        );
        *active = Some(Active { key, channels });
    }
}

/// One destination's worker: delivers queued messages in order, at most `per_minute` a minute (the
/// rest summarised), each with bounded retries. Ends when the queue is closed and empty.
async fn deliver_all(
    transport: Arc<dyn AlertTransport>,
    mut rx: mpsc::Receiver<AlertMessage>,
    overflow: Arc<AtomicU64>,
    policy: DeliveryPolicy,
    clock: Arc<dyn Clock>,
) {
    let destination = transport.destination();
    // When each message of the last minute went out.
    let mut sent: VecDeque<tokio::time::Instant> = VecDeque::new();
    let mut last_sent: Option<tokio::time::Instant> = None;
    // Past the limit: one summary a minute, until a minute passes with nothing to send.
    let mut limiting = false;
    while let Some(first) = rx.recv().await {
        let mut pending = vec![first];
        let now = clock.monotonic();
        while sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= RATE_WINDOW)
        {
            sent.pop_front();
        }
        if limiting && last_sent.is_some_and(|t| now.duration_since(t) >= RATE_WINDOW) {
            limiting = false;
            tracing::info!(
                "alerts to {destination}: the flood is over: one message per batch again"
            );
        }
        let hold_until = if limiting {
            last_sent.map(|t| t + RATE_WINDOW)
        } else if sent.len() >= policy.per_minute.max(1) {
            limiting = true;
            tracing::warn!(
                "alerts to {destination}: more than {} a minute; the next ones are summarised, one \
                 message a minute",
                policy.per_minute
            );
            sent.front().map(|t| *t + RATE_WINDOW)
        } else {
            None
        };
        if let Some(at) = hold_until {
            tokio::time::sleep_until(at).await;
            while let Ok(m) = rx.try_recv() {
                pending.push(m);
            }
        }
        let dropped = overflow.swap(0, Ordering::Relaxed);
        let message = if pending.len() == 1 && dropped == 0 {
            pending.remove(0)
        } else {
            AlertMessage::summary(pending, dropped, policy.per_minute)
        };
        let at = clock.monotonic();
        sent.push_back(at);
        last_sent = Some(at);
        deliver(transport.as_ref(), &destination, &message, &policy).await;
    }
}

/// Delivers one message, with bounded retries; logs the outcome. Returns whether it was delivered.
async fn deliver(
    transport: &dyn AlertTransport,
    destination: &str,
    message: &AlertMessage,
    policy: &DeliveryPolicy,
) -> bool {
    let attempts = policy.attempts.max(1);
    for attempt in 1..=attempts {
        let result = tokio::time::timeout(policy.attempt_timeout, transport.send(message))
            .await
            .unwrap_or_else(|_| {
                Err(DeliveryError {
                    message: format!(
                        "no answer within {}",
                        humantime::format_duration(policy.attempt_timeout)
                    ),
                    retryable: true,
                })
            });
        match result {
            Ok(()) => {
                tracing::info!(
                    destination = %destination,
                    attempt,
                    "alert delivered to {destination}: {}",
                    message.subject
                );
                return true;
            }
            Err(e) if e.retryable && attempt < attempts => {
                let wait = policy.retry_in(attempt);
                tracing::warn!(
                    destination = %destination,
                    attempt,
                    "alert to {destination} failed (attempt {attempt} of {attempts}, retrying in {}): {e}",
                    humantime::format_duration(wait)
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                tracing::error!(
                    destination = %destination,
                    attempt,
                    "alert to {destination} not delivered after {attempt} attempt(s): {e}; it said: {}",
                    message.subject
                );
                return false;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Trigger;

    #[test]
    fn webhook_urls_print_without_path_query_or_user_info() {
        let u = WebhookUrl::parse(
            "https://user:pw@hooks.example.com:8443/services/T0/B0/SECRETTOKEN?key=QUERYKEY",
        )
        .unwrap();
        assert_eq!(u.to_string(), "https://hooks.example.com:8443/…");
        assert_eq!(
            format!("{u:?}"),
            "WebhookUrl(https://hooks.example.com:8443/…)"
        );
        let error = format!(
            "error trying to connect to {}: /services/T0/B0/SECRETTOKEN refused (key=QUERYKEY)",
            u.expose()
        );
        let shown = u.redact(&error);
        for secret in ["SECRETTOKEN", "QUERYKEY", "pw@", "user"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("hooks.example.com"), "{shown}");
    }

    #[test]
    fn webhook_urls_are_https_or_http_to_loopback_and_errors_never_quote_them() {
        for ok in [
            "https://hooks.slack.com/services/T/B/X",
            "http://127.0.0.1:8080/hook?token=X",
            "http://[::1]/x",
            "http://localhost:9/x",
        ] {
            assert!(WebhookUrl::parse(ok).is_ok(), "{ok}");
        }
        for (bad, want) in [
            ("http://hooks.example.com/SECRETPATH?SECRETQ", "plain http"),
            ("ftp://example.com/SECRETPATH", "expected https"),
            ("hooks.example.com/SECRETPATH", "not an absolute URL"),
            ("file:///SECRETPATH", "no host"),
            ("https://:443/SECRETPATH", "not an absolute URL"),
        ] {
            let e = WebhookUrl::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains("SECRET"), "{bad}: {e}");
        }
    }

    fn outcome(id: &str, result: ResultKind) -> Outcome {
        Outcome {
            action: Action::Stop,
            rules: vec!["office".into()],
            account: "account1".into(),
            region: "ap-northeast-1".into(),
            instance_id: Some(id.into()),
            result,
            reason: format!("{result} reason"),
            trigger: Trigger::Schedule,
        }
    }

    #[test]
    fn a_batch_message_lists_the_results_asked_for() {
        let batch = [
            outcome("i-1", ResultKind::Ok),
            outcome("i-2", ResultKind::Failed),
        ];
        let on = [ResultKind::Failed, ResultKind::Missed];
        let m = AlertMessage::for_batch(&batch, &on).unwrap();
        assert_eq!(m.instances.len(), 1);
        assert_eq!(m.instances[0].instance.as_deref(), Some("i-2"));
        assert!(
            m.text
                .starts_with("shiftd: 1 failed, 1 ok - stop office in account1/ap-northeast-1\n"),
            "{}",
            m.text
        );
        assert!(m.text.contains("• failed: stop i-2 (office"), "{}", m.text);
        let body: serde_json::Value = serde_json::from_str(&m.json()).unwrap();
        assert_eq!(body["instances"][0]["reason"], "failed reason");
        assert_eq!(body["instances"][0]["action"], "stop");
        assert!(
            AlertMessage::for_batch(&batch[..1], &on).is_none(),
            "an all-ok batch has nothing to say"
        );
        assert!(m.subject.is_ascii() && m.subject.len() <= 100);
    }

    #[test]
    fn retries_back_off_three_times_longer_up_to_the_cap() {
        let d: Vec<u64> = (1..=5).map(|a| DELIVERY.retry_in(a).as_secs()).collect();
        assert_eq!(d, [10, 30, 90, 120, 120]);
    }
}
