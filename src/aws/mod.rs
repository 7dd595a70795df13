//! AWS as shiftd sees it, in shiftd's own words: traits for STS and EC2 and the types they speak.
//!
//! - [`sdk`] implements them with the AWS SDK: the only module that names an SDK type.
//! - [`fake`] implements them in memory, on the caller's clock, for the scenario tests.
//!
//! Nothing else in shiftd knows which one it talks to.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::config::{Action, CredentialSource, Selection};
use crate::planner::InstanceView;

pub mod fake;
pub mod sdk;

/// An AWS error as operators need it: which call, the service's error code and message, the request ID
/// and the HTTP status. Never the response's headers or body (an AssumeRole answer that does not parse
/// still holds key material).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AwsError {
    /// e.g. `ec2:StopInstances`.
    pub operation: String,
    /// The service's error code (`RequestLimitExceeded`), or shiftd's name for what happened on the
    /// way (`Timeout`, `ConnectionFailed`, `UnreadableResponse`).
    pub code: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
    pub http_status: Option<u16>,
}

impl AwsError {
    pub fn new(operation: &str, code: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            operation: operation.to_string(),
            code: code.map(String::from),
            message: message.into(),
            ..Default::default()
        }
    }

    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// Errors worth another attempt: throttling, capacity, server-side and network trouble.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.code(),
            Some(
                "RequestLimitExceeded"
                    | "Throttling"
                    | "ThrottlingException"
                    | "InsufficientInstanceCapacity"
                    | "InternalError"
                    | "ServiceUnavailable"
                    | "Unavailable"
                    | "Timeout"
                    | "ConnectionFailed"
            )
        ) || self.http_status.is_some_and(|s| s >= 500)
    }
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.code, self.message.is_empty()) {
            (Some(code), false) => write!(f, "{code}: {}", self.message)?,
            (Some(code), true) => write!(f, "{code}")?,
            (None, _) => write!(f, "{}", self.message)?,
        }
        let mut extra = Vec::new();
        if !self.operation.is_empty() {
            extra.push(self.operation.clone());
        }
        if let Some(s) = self.http_status {
            extra.push(format!("HTTP {s}"));
        }
        if let Some(id) = &self.request_id {
            extra.push(format!("request ID {id}"));
        }
        if !extra.is_empty() {
            write!(f, " ({})", extra.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for AwsError {}

/// Key material that prints as `<redacted>` in `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Assumed-role credentials of one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    /// When STS says they expire, by STS's clock.
    pub expiry: SystemTime,
}

/// What AssumeRole is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssumeRoleRequest {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    pub duration: Duration,
}

/// The credentials one account's EC2 client signs with: always the newest, none when unusable.
pub trait SigningCredentials: Send + Sync {
    /// The account's name in the configuration.
    fn account(&self) -> &str;
    /// The current credentials, if they may sign a request now.
    fn usable_now(&self) -> Option<SessionCredentials>;
    /// When the current credentials stop being usable.
    fn usable_until(&self) -> Option<SystemTime>;
}

/// STS, signing with the delegate's own credentials.
#[async_trait]
pub trait Sts: Send + Sync {
    /// AssumeRole: the session's credentials and their expiry.
    async fn assume_role(
        &self,
        request: &AssumeRoleRequest,
    ) -> Result<SessionCredentials, AwsError>;

    /// GetCallerIdentity with the delegate's own credentials: (account ID, ARN).
    async fn caller_identity(&self) -> Result<(String, String), AwsError>;
}

/// EC2 in one target account and region, signing with that account's assumed-role credentials.
#[async_trait]
pub trait Ec2: Send + Sync {
    /// Instances matching `selection`: its listed IDs and tags, ANDed. An unknown ID matches nothing.
    async fn describe_selection(
        &self,
        selection: &Selection,
    ) -> Result<Vec<InstanceView>, AwsError>;

    /// These instances, whatever their tags; unknown IDs are left out.
    async fn describe_ids(&self, ids: &[String]) -> Result<Vec<InstanceView>, AwsError>;

    /// One StartInstances or StopInstances call. With `dry_run`, `Ok(())` means EC2 would allow it.
    /// `hibernate` (stops only) asks EC2 to hibernate them: every one must be configured for it, or the
    /// call fails with `UnsupportedHibernationConfiguration`.
    async fn change_state(
        &self,
        action: Action,
        ids: &[String],
        dry_run: bool,
        hibernate: bool,
    ) -> Result<(), AwsError>;

    /// How many instances DescribeInstanceStatus lists (the walkthrough's final check).
    async fn count_instance_status(&self) -> Result<usize, AwsError>;
}

/// The delegate's view of AWS: its own identity and credentials, and clients built on them.
#[async_trait]
pub trait Aws: Send + Sync {
    /// Where the delegate's own credentials come from.
    fn source(&self) -> &CredentialSource;

    /// STS on `region`'s endpoint, with the delegate's own credentials.
    async fn sts(&self, region: &str) -> Arc<dyn Sts>;

    /// EC2 for one target account and region, signing with `credentials` (always the newest).
    async fn ec2(&self, region: &str, credentials: Arc<dyn SigningCredentials>) -> Arc<dyn Ec2>;

    /// The delegate's name for AssumeRole sessions: its instance ID, else its host name.
    async fn delegate_name(&self) -> String;

    /// Whether the delegate's own credentials resolve; the error says why not.
    async fn check_base_credentials(&self) -> Result<(), String>;

    /// The instance profile role's name as IMDS reports it; `Ok(None)` when none is attached.
    async fn instance_profile_role(&self) -> Result<Option<String>, String>;

    // --- alerts (`[notify] sns_topic_arn`) ---
    /// SNS on `region`'s endpoint, with the delegate's own credentials.
    async fn sns(&self, region: &str) -> Arc<dyn Sns>;

    // --- accounts discovered from AWS Organizations (`[organization]`) ---
    /// Organizations on `region`'s endpoint (its only one: us-east-1 in the aws partition), signing
    /// with the org-reader role's `credentials`.
    async fn organizations(
        &self,
        region: &str,
        credentials: Arc<dyn SigningCredentials>,
    ) -> Arc<dyn Organizations>;

    // --- high availability (`[cluster]`) ---
    /// The claim table `table` in `region`, with the delegate's own credentials.
    async fn claim_table(&self, table: &str, region: &str) -> Arc<dyn crate::cluster::ClaimTable>;
}

// ---------------------------------------------------------------------------------------------------------
// SNS, for alerts
// ---------------------------------------------------------------------------------------------------------

/// SNS, signing with the delegate's own credentials: where `[notify] sns_topic_arn` alerts go.
#[async_trait]
pub trait Sns: Send + Sync {
    /// Publish: `subject` (at most 100 printable ASCII characters) and `message` to `topic_arn`.
    /// Returns the message ID.
    async fn publish(
        &self,
        topic_arn: &str,
        subject: &str,
        message: &str,
    ) -> Result<String, AwsError>;
}

// ---------------------------------------------------------------------------------------------------------
// Organizations, for discovering accounts
// ---------------------------------------------------------------------------------------------------------

/// An account as Organizations lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgAccountEntry {
    pub id: String,
    pub name: String,
    /// `ACTIVE`, `SUSPENDED`, `PENDING_CLOSURE`, `CLOSED`...: only ACTIVE accounts are acted in.
    pub status: String,
}

/// An organizational unit (or root): its ID and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgUnit {
    pub id: String,
    pub name: String,
}

/// AWS Organizations, read through the org-reader role. Every list is complete (all pages).
#[async_trait]
pub trait Organizations: Send + Sync {
    /// ListRoots: the organization's root (there is one).
    async fn list_roots(&self) -> Result<Vec<OrgUnit>, AwsError>;
    /// ListAccountsForParent: the accounts directly in a root or OU.
    async fn list_accounts_for_parent(
        &self,
        parent: &str,
    ) -> Result<Vec<OrgAccountEntry>, AwsError>;
    /// ListOrganizationalUnitsForParent: the OUs directly in a root or OU.
    async fn list_ous_for_parent(&self, parent: &str) -> Result<Vec<OrgUnit>, AwsError>;
}

/// Builds the [`Aws`] for a credential source; `region` is where a profile's own role chain calls STS.
pub type ConnectAws = Arc<dyn Fn(&CredentialSource, &str) -> Arc<dyn Aws> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_code_message_operation_status_and_request_id() {
        let cases = [
            (
                AwsError {
                    operation: "ec2:StopInstances".into(),
                    code: Some("RequestLimitExceeded".into()),
                    message: "Request limit exceeded.".into(),
                    request_id: Some("r-1".into()),
                    http_status: Some(503),
                },
                "RequestLimitExceeded: Request limit exceeded. (ec2:StopInstances, HTTP 503, request ID r-1)",
            ),
            (AwsError::new("", None, "timed out"), "timed out"),
            (
                AwsError::new("sts:AssumeRole", Some("AccessDenied"), ""),
                "AccessDenied (sts:AssumeRole)",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let c = SessionCredentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI"),
            session_token: Secret::new("FwoGZXIvYXdzE"),
            expiry: SystemTime::UNIX_EPOCH,
        };
        let shown = format!("{c:?} {}", c.secret_access_key);
        assert!(
            !shown.contains("wJalr") && !shown.contains("FwoG"),
            "{shown}"
        );
    }
}
