//! Assumed-role credentials per target account, renewed ahead of expiry.
//!
//! aws-config refreshes credentials only on demand, seconds before they expire, which would put an
//! AssumeRole call (and its failure modes) in front of every due action. shiftd instead keeps one
//! session per account alive in the background: it renews `refresh_before_expiry` ahead of expiry,
//! retries failures with jittered backoff while the old credentials stay in use, and never hands out
//! credentials that are about to expire.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};

use crate::aws::{AssumeRoleRequest, SessionCredentials, SigningCredentials, Sts};
use crate::clock::Clock;
use crate::config::Account;

/// Credentials this close to expiry are no longer handed out: a request signed now must still be valid
/// when it arrives, including SDK retries.
pub const SIGNING_MARGIN: Duration = Duration::from_secs(60);

/// A difference between this machine's clock and STS's below this is network latency, not skew.
const SKEW_TOLERANCE: Duration = Duration::from_secs(30);

/// Whether credentials expiring at `expiry` (on this machine's clock) may sign a request at `now`.
pub fn usable(expiry: SystemTime, now: SystemTime) -> bool {
    expiry > now + SIGNING_MARGIN
}

/// The renewals of many accounts are spread over up to this long (and at most half of
/// `refresh_before_expiry`), so that they do not all call STS at the same instant an hour later.
pub const RENEWAL_SPREAD: Duration = Duration::from_secs(300);

/// When to renew credentials issued at `issued` that expire at `expiry`: `before` ahead of expiry, and
/// earlier by `jitter` (in [0, 1)) of the spread (min(`before` / 2, [`RENEWAL_SPREAD`])), never later;
/// but not sooner than 30 s after issue (a role whose maximum session is shorter than configured).
pub fn renew_at(
    issued: SystemTime,
    expiry: SystemTime,
    before: Duration,
    jitter: f64,
) -> SystemTime {
    let spread = (before / 2).min(RENEWAL_SPREAD);
    let early = before + spread.mul_f64(jitter.clamp(0.0, 1.0));
    let wanted = expiry.checked_sub(early).unwrap_or(issued);
    wanted.max(issued + Duration::from_secs(30))
}

/// Pause before retry `attempt` (0-based) of a failed renewal: exponential from 1 s, capped at 60 s,
/// scaled by `jitter` in [0, 1) into its upper half (so many accounts do not retry in lockstep).
/// Whole milliseconds, so that logs read "1s 500ms", not nanoseconds.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60));
    let scaled = base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    Duration::from_millis(scaled.as_millis() as u64)
}

/// How far this machine's clock is ahead of STS's (negative: behind), judged from a session's expiry:
/// STS issued it `requested` before its expiry, and the answer arrived at `received` on this clock.
/// `None` when the difference is within network latency.
pub fn clock_skew(
    received: SystemTime,
    expiry: SystemTime,
    requested: Duration,
) -> Option<chrono::Duration> {
    let issued_by_sts = expiry.checked_sub(requested)?;
    let skew = chrono::DateTime::<chrono::Utc>::from(received)
        - chrono::DateTime::<chrono::Utc>::from(issued_by_sts);
    (skew.abs() > crate::clock::chrono_duration(SKEW_TOLERANCE)).then_some(skew)
}

/// One session's credentials as held: the expiry translated to this machine's clock.
#[derive(Clone, Debug)]
pub struct HeldCredentials {
    pub credentials: SessionCredentials,
    /// The expiry on this machine's clock (STS's expiry moved by the measured skew).
    pub local_expiry: SystemTime,
}

/// What the renewal of one account's credentials looks like from outside.
#[derive(Clone, Debug, Default)]
pub struct CredentialState {
    pub held: Option<HeldCredentials>,
    /// The last renewal error, cleared by a success.
    pub last_error: Option<String>,
}

/// The shared, always-current assumed-role credentials of one account. Cloning shares.
#[derive(Clone)]
pub struct AccountCredentials {
    account: Arc<str>,
    state: Arc<watch::Sender<CredentialState>>,
    clock: Arc<dyn Clock>,
    observer: Option<Arc<dyn CredentialsObserver>>,
    published: Option<Arc<Notify>>,
}

/// Told of each renewal's outcome (the metrics).
pub trait CredentialsObserver: Send + Sync {
    /// New credentials for `account`, expiring at `local_expiry` on this machine's clock.
    fn renewed(&self, account: &str, local_expiry: SystemTime);
    /// An AssumeRole for `account` failed.
    fn renewal_failed(&self, account: &str);
}

impl std::fmt::Debug for AccountCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountCredentials")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl AccountCredentials {
    pub fn new(account: &str, clock: Arc<dyn Clock>) -> Self {
        Self {
            account: account.into(),
            state: Arc::new(watch::Sender::new(CredentialState::default())),
            clock,
            observer: None,
            published: None,
        }
    }

    /// The same store, poking `published` whenever new credentials are published (the daemon's
    /// loop, which then says so in STATUS= and gives back what start-up used).
    pub fn notifying(mut self, published: Arc<Notify>) -> Self {
        self.published = Some(published);
        self
    }

    /// The same store, telling `observer` of each renewal and each failed one.
    pub fn observed_by(mut self, observer: Arc<dyn CredentialsObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Publishes credentials whose expiry is `local_expiry` on this machine's clock.
    pub fn publish(&self, credentials: SessionCredentials, local_expiry: SystemTime) {
        if let Some(o) = &self.observer {
            o.renewed(&self.account, local_expiry);
        }
        self.state.send_replace(CredentialState {
            held: Some(HeldCredentials {
                credentials,
                local_expiry,
            }),
            last_error: None,
        });
        if let Some(p) = &self.published {
            p.notify_one();
        }
    }

    pub fn record_error(&self, error: String) {
        if let Some(o) = &self.observer {
            o.renewal_failed(&self.account);
        }
        self.state.send_modify(|s| s.last_error = Some(error));
    }

    /// The credentials, if usable now.
    pub fn usable_now(&self) -> Option<SessionCredentials> {
        let now = self.clock.system_time();
        let state = self.state.borrow();
        let held = state.held.as_ref()?;
        usable(held.local_expiry, now).then(|| held.credentials.clone())
    }

    /// Whether usable credentials exist now (`usable_now` without copying them).
    pub fn is_usable_now(&self) -> bool {
        let now = self.clock.system_time();
        let state = self.state.borrow();
        state
            .held
            .as_ref()
            .is_some_and(|held| usable(held.local_expiry, now))
    }

    /// When the current credentials stop being usable (their local expiry less the signing margin).
    pub fn usable_until(&self) -> Option<SystemTime> {
        let state = self.state.borrow();
        state
            .held
            .as_ref()
            .and_then(|h| h.local_expiry.checked_sub(SIGNING_MARGIN))
    }

    pub fn last_error(&self) -> Option<String> {
        self.state.borrow().last_error.clone()
    }

    /// Why there are no usable credentials now (for logs and STATUS=).
    pub fn why_unusable(&self) -> String {
        if let Some(e) = self.last_error() {
            return e;
        }
        match self.state.borrow().held.as_ref() {
            Some(h) => format!(
                "the last credentials expired at {} (this machine's clock)",
                humantime::format_rfc3339_seconds(h.local_expiry)
            ),
            None => "no AssumeRole call has succeeded yet".to_string(),
        }
    }

    /// Waits until usable credentials exist, at most `bound`. The error says why there are none.
    pub async fn wait_usable(&self, bound: Duration) -> Result<(), String> {
        let mut rx = self.state.subscribe();
        let wait = async {
            loop {
                if self.is_usable_now() {
                    return;
                }
                // Wake on a renewal, or re-check every second (credentials can also just expire).
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            }
        };
        tokio::time::timeout(bound, wait).await.map_err(|_| {
            format!(
                "no valid credentials for account {} after waiting {}: {}",
                self.account,
                humantime::format_duration(bound),
                self.why_unusable()
            )
        })
    }
}

/// How one account's session is requested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSpec {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    pub duration: Duration,
    pub refresh_before_expiry: Duration,
}

impl SigningCredentials for AccountCredentials {
    fn account(&self) -> &str {
        AccountCredentials::account(self)
    }

    fn usable_now(&self) -> Option<SessionCredentials> {
        AccountCredentials::usable_now(self)
    }

    fn usable_until(&self) -> Option<SystemTime> {
        AccountCredentials::usable_until(self)
    }
}

impl SessionSpec {
    /// The AssumeRole call this session is renewed with.
    pub fn request(&self) -> AssumeRoleRequest {
        AssumeRoleRequest {
            role_arn: self.role_arn.clone(),
            external_id: self.external_id.clone(),
            session_name: self.session_name.clone(),
            duration: self.duration,
        }
    }

    pub fn new(
        account: &Account,
        session_name: &str,
        duration: Duration,
        before: Duration,
    ) -> Self {
        Self {
            role_arn: account.role_arn.clone(),
            external_id: account.external_id.clone(),
            session_name: session_name.to_string(),
            duration,
            refresh_before_expiry: before,
        }
    }
}

/// `shiftd-<instance id or host name>`, reduced to what AssumeRole accepts (`[\w+=,.@-]`, 2 to 64).
pub fn session_name(delegate: &str) -> String {
    let cleaned: String = delegate
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@-_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("shiftd-{cleaned}");
    name.truncate(64);
    name
}

/// One AssumeRole for `spec`, published to `store` with its expiry moved to this machine's clock.
/// Returns the renewal instant (this machine's clock), or the error (also recorded in `store`).
pub async fn renew_once(
    sts: &dyn Sts,
    spec: &SessionSpec,
    store: &AccountCredentials,
) -> Result<SystemTime, String> {
    let clock = store.clock().clone();
    let sent = clock.system_time();
    match sts.assume_role(&spec.request()).await {
        Ok(creds) => {
            let received = clock.system_time();
            let skew = clock_skew(received, creds.expiry, spec.duration);
            let local_expiry = match skew {
                Some(s) if s > chrono::Duration::zero() => {
                    creds.expiry + s.to_std().unwrap_or_default()
                }
                Some(s) => creds
                    .expiry
                    .checked_sub((-s).to_std().unwrap_or_default())
                    .unwrap_or(creds.expiry),
                None => creds.expiry,
            };
            if let Some(s) = skew {
                tracing::warn!(
                    account = store.account(),
                    skew_seconds = s.num_seconds(),
                    "this machine's clock is {} {} STS's (judged from the session's expiry): \
                     credential lifetimes are measured on STS's clock; fix the time source (chrony, NTP)",
                    humantime::format_duration(s.abs().to_std().unwrap_or_default()),
                    if s > chrono::Duration::zero() {
                        "ahead of"
                    } else {
                        "behind"
                    }
                );
            }
            let issued_local = sent.min(received);
            let next = renew_at(
                issued_local,
                local_expiry,
                spec.refresh_before_expiry,
                rand::random(),
            );
            tracing::info!(
                account = store.account(),
                role_arn = %spec.role_arn,
                session_name = %spec.session_name,
                expires_at = %humantime::format_rfc3339_seconds(creds.expiry),
                renews_at = %humantime::format_rfc3339_seconds(next),
                "assumed role for account {}: credentials valid until {}",
                store.account(),
                humantime::format_rfc3339_seconds(creds.expiry)
            );
            store.publish(creds, local_expiry);
            Ok(next)
        }
        Err(error) => {
            let error = error.to_string();
            store.record_error(error.clone());
            Err(error)
        }
    }
}

/// Keeps `store` filled with fresh credentials for `spec`, forever (abort the task to stop it). Each
/// AssumeRole waits for its turn at `pacer` (the process's STS rate and in-flight cap).
pub async fn keep_fresh(
    sts: Arc<dyn Sts>,
    spec: SessionSpec,
    store: AccountCredentials,
    pacer: Arc<crate::pacing::Pacer>,
) {
    let clock = store.clock().clone();
    let mut attempt: u32 = 0;
    // What the warning of this renewal said: a retry failing the same way is logged at debug level
    // only (an account whose role is not deployed yet is said once, not at every back-off step).
    let mut said: Option<(String, bool)> = None;
    loop {
        let renewed = {
            let _slot = pacer
                .assume_role_turn(store.account(), clock.as_ref())
                .await;
            renew_once(sts.as_ref(), &spec, &store).await
        };
        match renewed {
            Ok(next) => {
                if said.take().is_some() {
                    tracing::info!(
                        account = store.account(),
                        role_arn = %spec.role_arn,
                        "AssumeRole for account {} works again (after {attempt} failed attempt(s))",
                        store.account()
                    );
                }
                attempt = 0;
                // Re-reading the wall clock as it sleeps: a step moves the renewal instant.
                crate::clock::sleep_until(clock.as_ref(), next.into(), None).await;
            }
            Err(error) => {
                let retry_in = backoff(attempt, rand::random::<f64>());
                attempt = attempt.saturating_add(1);
                let still_valid = store.is_usable_now();
                let now_said = (without_request_ids(&error), still_valid);
                let message = format!(
                    "AssumeRole for account {} failed (attempt {attempt}, retrying in {}; {}): {error}",
                    store.account(),
                    humantime::format_duration(retry_in),
                    if still_valid {
                        "current credentials still valid"
                    } else {
                        "no valid credentials"
                    },
                );
                if said.as_ref() == Some(&now_said) {
                    tracing::debug!(
                        account = store.account(),
                        role_arn = %spec.role_arn,
                        error = %error,
                        attempt,
                        still_valid,
                        "{message} (as before)"
                    );
                } else {
                    tracing::warn!(
                        account = store.account(),
                        role_arn = %spec.role_arn,
                        error = %error,
                        attempt,
                        retry_in = %humantime::format_duration(retry_in),
                        still_valid,
                        "{message}"
                    );
                    said = Some(now_said);
                }
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// An error as it is compared with the previous one: without its request IDs (each attempt has its
/// own).
fn without_request_ids(error: &str) -> String {
    let mut out = String::with_capacity(error.len());
    let mut rest = error;
    while let Some(i) = rest.find("request ID ") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let end = after.find([',', ')']).unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_retry_failing_the_same_way_compares_equal_whatever_its_request_id() {
        let a = "AccessDenied: not allowed (sts:AssumeRole, HTTP 403, request ID r-1)";
        let b = "AccessDenied: not allowed (sts:AssumeRole, HTTP 403, request ID r-2)";
        assert_eq!(without_request_ids(a), without_request_ids(b));
        assert_eq!(
            without_request_ids(a),
            "AccessDenied: not allowed (sts:AssumeRole, HTTP 403, )"
        );
        assert_ne!(
            without_request_ids(a),
            without_request_ids("Throttling: slow down (sts:AssumeRole, request ID r-3)")
        );
    }

    #[test]
    fn renewal_and_usability_table() {
        let min = 60;
        // (issued, expiry, before, jitter, expected renewal)
        let cases = [
            (0, 60 * min, 10 * min, 0.0, 50 * min),
            (0, 15 * min, 10 * min, 0.0, 5 * min),
            // Spread: up to half of `before` earlier, at most 5 minutes.
            (0, 60 * min, 10 * min, 0.5, 50 * min - 150),
            (0, 60 * min, 10 * min, 1.0, 45 * min),
            (0, 60 * min, 30 * min, 1.0, 25 * min),
            (0, 60 * min, 2 * min, 1.0, 57 * min),
            // The role granted less than asked: never renew sooner than 30 s after issue.
            (0, 5 * min, 10 * min, 0.0, 30),
            (0, 11 * min, 10 * min, 1.0, 30),
        ];
        for (issued, expiry, before, jitter, want) in cases {
            assert_eq!(
                renew_at(t(issued), t(expiry), Duration::from_secs(before), jitter),
                t(want),
                "{issued} {expiry} {before} {jitter}"
            );
        }
        assert!(usable(t(1000), t(900)));
        assert!(!usable(t(1000), t(940)), "inside the signing margin");
        assert!(!usable(t(1000), t(2000)), "expired");
    }

    #[test]
    fn backoff_grows_jitters_and_caps() {
        assert_eq!(backoff(0, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(20, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(20, 0.0), Duration::from_secs(30));
    }

    #[test]
    fn session_names_are_valid_for_sts() {
        assert_eq!(
            session_name("i-0123456789abcdef0"),
            "shiftd-i-0123456789abcdef0"
        );
        assert_eq!(session_name("host name/x"), "shiftd-host-name-x");
        assert_eq!(session_name(&"h".repeat(100)).len(), 64);
    }

    fn creds(expiry: SystemTime) -> SessionCredentials {
        SessionCredentials {
            access_key_id: "ASIA".into(),
            secret_access_key: crate::aws::Secret::new("s"),
            session_token: crate::aws::Secret::new("t"),
            expiry,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn store_hands_out_only_usable_credentials() {
        let clock = Arc::new(crate::clock::SimulatedClock::starting_at(
            chrono::DateTime::from(t(1_000_000)),
        ));
        let store = AccountCredentials::new("a1", clock.clone());
        assert!(store.usable_now().is_none());
        let soon = t(1_000_030);
        store.publish(creds(soon), soon);
        assert!(store.usable_now().is_none(), "within the signing margin");
        let err = store
            .wait_usable(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.contains("no valid credentials for account a1"), "{err}");
        assert!(err.contains("expired at"), "{err}");
        let later = t(1_003_600);
        store.publish(creds(later), later);
        assert!(store.usable_now().is_some());
        store.wait_usable(Duration::from_millis(50)).await.unwrap();
        // They stop being usable a signing margin before expiry, on simulated time.
        tokio::time::sleep(Duration::from_secs(3600 - 60 - 1)).await;
        assert!(store.usable_now().is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(store.usable_now().is_none());
    }

    #[test]
    fn skew_is_judged_from_the_expiry_and_the_requested_duration() {
        let hour = Duration::from_secs(3600);
        // (received on this clock, expiry by STS, expected skew in seconds)
        let cases = [
            (t(10_000), t(10_000 + 3600), None),
            (t(10_005), t(10_000 + 3600), None),
            (t(13_600), t(10_000 + 3600), Some(3600)),
            (t(6_400), t(10_000 + 3600), Some(-3600)),
        ];
        for (received, expiry, want) in cases {
            assert_eq!(
                clock_skew(received, expiry, hour).map(|s| s.num_seconds()),
                want
            );
        }
    }

    #[test]
    fn backoff_is_whole_milliseconds() {
        let d = backoff(3, 0.123456789);
        assert_eq!(d.subsec_nanos() % 1_000_000, 0, "{d:?}");
        assert!(!humantime::format_duration(d).to_string().contains("us"));
    }
}
