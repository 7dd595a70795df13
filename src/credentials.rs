//! Assumed-role credentials per target account, renewed ahead of expiry.
//!
//! aws-config refreshes credentials only on demand, seconds before they expire, which would put an
//! AssumeRole call (and its failure modes) in front of every due action. shiftd instead keeps one
//! session per account alive in the background: it renews `refresh_before_expiry` ahead of expiry,
//! retries failures with jittered backoff while the old credentials stay in use, and never hands out
//! credentials that are about to expire.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{self, ProvideCredentials, error::CredentialsError};
use tokio::sync::watch;

use crate::aws::AwsError;
use crate::config::Account;

/// Credentials this close to expiry are no longer handed out: a request signed now must still be valid
/// when it arrives, including SDK retries.
pub const SIGNING_MARGIN: Duration = Duration::from_secs(60);

/// Whether credentials expiring at `expiry` may sign a request at `now`.
pub fn usable(expiry: SystemTime, now: SystemTime) -> bool {
    expiry > now + SIGNING_MARGIN
}

/// When to renew credentials issued at `issued` that expire at `expiry`: `before` ahead of expiry, but
/// not sooner than 30 s after issue (a role whose maximum session is shorter than configured).
pub fn renew_at(issued: SystemTime, expiry: SystemTime, before: Duration) -> SystemTime {
    let wanted = expiry.checked_sub(before).unwrap_or(issued);
    wanted.max(issued + Duration::from_secs(30))
}

/// Pause before retry `attempt` (0-based) of a failed renewal: exponential from 1 s, capped at 60 s,
/// scaled by `jitter` in [0, 1) into its upper half (so many accounts do not retry in lockstep).
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60));
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// What the renewal of one account's credentials looks like from outside.
#[derive(Clone, Debug, Default)]
pub struct CredentialState {
    pub credentials: Option<Credentials>,
    /// The last renewal error, cleared by a success.
    pub last_error: Option<String>,
}

/// The shared, always-current assumed-role credentials of one account. Cloning shares.
#[derive(Clone, Debug)]
pub struct AccountCredentials {
    account: Arc<str>,
    state: Arc<watch::Sender<CredentialState>>,
}

impl AccountCredentials {
    pub fn new(account: &str) -> Self {
        Self {
            account: account.into(),
            state: Arc::new(watch::Sender::new(CredentialState::default())),
        }
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn publish(&self, credentials: Credentials) {
        self.state.send_replace(CredentialState {
            credentials: Some(credentials),
            last_error: None,
        });
    }

    pub fn record_error(&self, error: String) {
        self.state.send_modify(|s| s.last_error = Some(error));
    }

    /// The credentials, if usable at `now`.
    pub fn usable_at(&self, now: SystemTime) -> Option<Credentials> {
        let state = self.state.borrow();
        let creds = state.credentials.as_ref()?;
        let expiry = creds.expiry()?;
        usable(expiry, now).then(|| creds.clone())
    }

    pub fn last_error(&self) -> Option<String> {
        self.state.borrow().last_error.clone()
    }

    /// Waits until usable credentials exist, at most `bound`. The error says why there are none.
    pub async fn wait_usable(&self, bound: Duration) -> Result<(), String> {
        let mut rx = self.state.subscribe();
        let wait = async {
            loop {
                if self.usable_at(SystemTime::now()).is_some() {
                    return;
                }
                // Wake on a renewal, or re-check every second (credentials can also just expire).
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            }
        };
        tokio::time::timeout(bound, wait).await.map_err(|_| {
            let why = self
                .last_error()
                .unwrap_or_else(|| "no AssumeRole call has succeeded yet".to_string());
            format!(
                "no valid credentials for account {} after waiting {}: {why}",
                self.account,
                humantime::format_duration(bound)
            )
        })
    }
}

impl ProvideCredentials for AccountCredentials {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::ready(self.usable_at(SystemTime::now()).ok_or_else(
            || {
                CredentialsError::not_loaded(format!(
                    "no unexpired assumed-role credentials for account {}",
                    self.account
                ))
            },
        ))
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

impl SessionSpec {
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

/// Calls AssumeRole for `spec` with `sts`, returning the session's credentials.
pub async fn assume_role(
    sts: &aws_sdk_sts::Client,
    spec: &SessionSpec,
) -> Result<Credentials, AwsError> {
    let fail = |message: &str| AwsError {
        code: None,
        message: message.to_string(),
    };
    let out = sts
        .assume_role()
        .role_arn(&spec.role_arn)
        .role_session_name(&spec.session_name)
        .duration_seconds(spec.duration.as_secs().min(i32::MAX as u64) as i32)
        .set_external_id(spec.external_id.clone())
        .send()
        .await
        .map_err(|e| AwsError::from_sdk(&e))?;
    let c = out
        .credentials()
        .ok_or_else(|| fail("AssumeRole answered without credentials"))?;
    let expiry = SystemTime::try_from(*c.expiration())
        .map_err(|_| fail("AssumeRole answered with an unreadable expiration"))?;
    Ok(Credentials::new(
        c.access_key_id(),
        c.secret_access_key(),
        Some(c.session_token().to_string()),
        Some(expiry),
        "shiftd-assume-role",
    ))
}

/// Keeps `store` filled with fresh credentials for `spec`, forever (abort the task to stop it).
pub async fn keep_fresh(sts: aws_sdk_sts::Client, spec: SessionSpec, store: AccountCredentials) {
    let mut attempt: u32 = 0;
    loop {
        let issued = SystemTime::now();
        match assume_role(&sts, &spec).await {
            Ok(creds) => {
                let expiry = creds.expiry().expect("assume_role sets an expiry");
                store.publish(creds);
                attempt = 0;
                let next = renew_at(issued, expiry, spec.refresh_before_expiry);
                tracing::info!(
                    account = store.account(),
                    role_arn = %spec.role_arn,
                    session_name = %spec.session_name,
                    expires_at = %humantime::format_rfc3339_seconds(expiry),
                    renews_at = %humantime::format_rfc3339_seconds(next),
                    "assumed role for account {}: credentials valid until {}",
                    store.account(),
                    humantime::format_rfc3339_seconds(expiry)
                );
                let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                let error = error.to_string();
                let retry_in = backoff(attempt, rand::random::<f64>());
                attempt = attempt.saturating_add(1);
                let still_valid = store.usable_at(SystemTime::now()).is_some();
                tracing::warn!(
                    account = store.account(),
                    role_arn = %spec.role_arn,
                    error = %error,
                    attempt,
                    retry_in = %humantime::format_duration(retry_in),
                    still_valid,
                    "AssumeRole for account {} failed (attempt {attempt}, retrying in {}; {}): {error}",
                    store.account(),
                    humantime::format_duration(retry_in),
                    if still_valid { "current credentials still valid" } else { "no valid credentials" },
                );
                store.record_error(error);
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_and_usability_table() {
        let min = 60;
        // (issued, expiry, before, expected renewal)
        let cases = [
            (0, 60 * min, 10 * min, 50 * min),
            (0, 15 * min, 10 * min, 5 * min),
            // The role granted less than asked: never renew sooner than 30 s after issue.
            (0, 5 * min, 10 * min, 30),
        ];
        for (issued, expiry, before, want) in cases {
            assert_eq!(
                renew_at(t(issued), t(expiry), Duration::from_secs(before)),
                t(want)
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

    #[tokio::test]
    async fn store_hands_out_only_usable_credentials() {
        let store = AccountCredentials::new("a1");
        assert!(store.provide_credentials().await.is_err());
        let soon = SystemTime::now() + Duration::from_secs(30);
        store.publish(Credentials::new("AKIA", "s", None, Some(soon), "test"));
        assert!(
            store.provide_credentials().await.is_err(),
            "within the signing margin"
        );
        let err = store
            .wait_usable(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.contains("no valid credentials for account a1"), "{err}");
        let later = SystemTime::now() + Duration::from_secs(3600);
        store.publish(Credentials::new("AKIA", "s", None, Some(later), "test"));
        assert!(store.provide_credentials().await.is_ok());
        store.wait_usable(Duration::from_millis(50)).await.unwrap();
    }
}
