//! The AWS SDK behind shiftd's traits: the only module that names an SDK type.
//!
//! Endpoints come from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_STS`,
//! `AWS_ENDPOINT_URL_EC2`, `AWS_EC2_METADATA_SERVICE_ENDPOINT`), so tests and the demo point shiftd at
//! local fakes with no code path of their own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::identity::IdentityCache;
use aws_config::imds;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_ec2::operation::RequestId;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::{
    AssumeRoleRequest, Aws, AwsError, Ec2, Secret, SessionCredentials, SigningCredentials, Sns, Sts,
};
use crate::config::{Action, CredentialSource, Selection};
use crate::planner::InstanceView;

/// Every AWS call is bounded, so a hung endpoint cannot stall an action or a shutdown.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// EC2 accepts at most 200 values in one filter.
const FILTER_VALUES_MAX: usize = 200;
/// DescribeInstances page size: each page is its own request (and its own attempt timeout).
const DESCRIBE_PAGE: i32 = 500;

/// An SDK error as shiftd reports it: never the raw response (headers, body), which for AssumeRole can
/// hold key material when it does not parse.
fn aws_error<E>(operation: &str, e: &aws_sdk_ec2::error::SdkError<E>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_ec2::error::SdkError;
    let http_status = e.raw_response().map(|r| r.status().as_u16());
    let request_id = e.request_id().map(String::from);
    let (code, message) = match e {
        SdkError::ServiceError(_) => match (e.code(), e.message()) {
            (Some(code), msg) => (Some(code.to_string()), msg.unwrap_or_default().to_string()),
            (None, _) => (
                Some("UnreadableResponse".to_string()),
                "the service answered with an error that has no readable code".to_string(),
            ),
        },
        SdkError::TimeoutError(_) => (
            Some("Timeout".to_string()),
            format!(
                "no answer within the timeout ({} per attempt, {} in all)",
                humantime::format_duration(ATTEMPT_TIMEOUT),
                humantime::format_duration(OPERATION_TIMEOUT)
            ),
        ),
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_timeout() {
                "timed out"
            } else if d.is_io() {
                "connection failed"
            } else {
                "request could not be sent"
            };
            // The connector's own error (connection refused, DNS, TLS) holds no response.
            let cause = d
                .as_connector_error()
                .map(|c| error_chain(c))
                .unwrap_or_default();
            (
                Some("ConnectionFailed".to_string()),
                format!("{kind}: {cause}"),
            )
        }
        SdkError::ConstructionFailure(_) => {
            // Before sending: e.g. no credentials to sign with. Holds no response.
            let cause = std::error::Error::source(e)
                .map(error_chain)
                .unwrap_or_default();
            (None, format!("request could not be built: {cause}"))
        }
        SdkError::ResponseError(_) => (
            Some("UnreadableResponse".to_string()),
            "the answer could not be read (truncated or malformed); its content is not logged"
                .to_string(),
        ),
        _ => (None, "unexpected SDK error".to_string()),
    };
    AwsError {
        operation: operation.to_string(),
        code,
        message,
        request_id,
        http_status,
    }
}

/// An error and its causes on one line. Only for errors that cannot hold a response body.
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
    let mut line = parts.join(": ");
    if line.len() > 300 {
        let cut = (0..=300)
            .rev()
            .find(|&i| line.is_char_boundary(i))
            .unwrap_or(0);
        line.truncate(cut);
        line.push('…');
    }
    line
}

/// Connects to AWS for a credential source: the `ConnectAws` of the real binary.
pub fn connect(source: &CredentialSource, region: &str) -> Arc<dyn Aws> {
    Arc::new(SdkAws::new(source, region))
}

/// Where the delegate's own credentials come from, and the per-region SDK configuration built on them.
pub struct SdkAws {
    base: SharedCredentialsProvider,
    source: CredentialSource,
    configs: tokio::sync::Mutex<BTreeMap<String, SdkConfig>>,
}

impl SdkAws {
    /// `region` is where a profile's own role chain calls STS (the first configured region).
    pub fn new(source: &CredentialSource, region: &str) -> Self {
        let base = match source {
            CredentialSource::Imds => SharedCredentialsProvider::new(
                imds::credentials::ImdsCredentialsProvider::builder().build(),
            ),
            CredentialSource::Profile(name) => SharedCredentialsProvider::new(
                aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .configure(
                        &aws_config::provider_config::ProviderConfig::default()
                            .with_region(Some(Region::new(region.to_string()))),
                    )
                    .profile_name(name)
                    .build(),
            ),
        };
        Self {
            base,
            source: source.clone(),
            configs: Default::default(),
        }
    }

    async fn sdk_config(&self, region: &str) -> SdkConfig {
        let mut configs = self.configs.lock().await;
        if let Some(c) = configs.get(region) {
            return c.clone();
        }
        let config = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .credentials_provider(self.base.clone())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(OPERATION_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            )
            .load()
            .await;
        configs.insert(region.to_string(), config.clone());
        config
    }
}

#[async_trait]
impl Aws for SdkAws {
    fn source(&self) -> &CredentialSource {
        &self.source
    }

    async fn sts(&self, region: &str) -> Arc<dyn Sts> {
        Arc::new(SdkSts {
            client: aws_sdk_sts::Client::new(&self.sdk_config(region).await),
        })
    }

    async fn ec2(&self, region: &str, credentials: Arc<dyn SigningCredentials>) -> Arc<dyn Ec2> {
        let config = aws_sdk_ec2::config::Builder::from(&self.sdk_config(region).await)
            .credentials_provider(AssumedRoleProvider(credentials))
            .identity_cache(IdentityCache::no_cache())
            .build();
        Arc::new(SdkEc2 {
            client: aws_sdk_ec2::Client::from_conf(config),
        })
    }

    async fn delegate_name(&self) -> String {
        let client = imds::Client::builder()
            .max_attempts(1)
            .operation_timeout(Duration::from_secs(2))
            .build();
        match client.get("/latest/meta-data/instance-id").await {
            Ok(id) if !id.as_ref().trim().is_empty() => id.as_ref().trim().to_string(),
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "unknown-host".to_string()),
        }
    }

    async fn check_base_credentials(&self) -> Result<(), String> {
        self.base
            .provide_credentials()
            .await
            .map(drop)
            .map_err(|e| error_chain(&e))
    }

    async fn instance_profile_role(&self) -> Result<Option<String>, String> {
        let client = imds::Client::builder()
            .max_attempts(2)
            .operation_timeout(Duration::from_secs(5))
            .build();
        match client
            .get("/latest/meta-data/iam/security-credentials/")
            .await
        {
            Ok(role) => Ok(Some(role.as_ref().trim().to_string()).filter(|r| !r.is_empty())),
            Err(imds::client::error::ImdsError::ErrorResponse(r)) => {
                match r.response().status().as_u16() {
                    404 => Ok(None),
                    s => Err(format!("IMDS answered HTTP {s}")),
                }
            }
            Err(e) => Err(error_chain(&e)),
        }
    }

    async fn sns(&self, region: &str) -> Arc<dyn Sns> {
        Arc::new(SdkSns {
            client: aws_sdk_sns::Client::new(&self.sdk_config(region).await),
        })
    }
}

/// The SDK's view of an account's credentials: always the newest, never ones about to expire.
struct AssumedRoleProvider(Arc<dyn SigningCredentials>);

impl std::fmt::Debug for AssumedRoleProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AssumedRoleProvider")
            .field(&self.0.account())
            .finish()
    }
}

impl ProvideCredentials for AssumedRoleProvider {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let store = &self.0;
        provider::future::ProvideCredentials::ready(
            store
                .usable_now()
                .map(|c| {
                    Credentials::new(
                        c.access_key_id,
                        c.secret_access_key.expose(),
                        Some(c.session_token.expose().to_string()),
                        store
                            .usable_until()
                            .map(|u| u + crate::credentials::SIGNING_MARGIN),
                        "shiftd-assume-role",
                    )
                })
                .ok_or_else(|| {
                    CredentialsError::not_loaded(format!(
                        "no unexpired assumed-role credentials for account {}",
                        store.account()
                    ))
                }),
        )
    }
}

struct SdkSts {
    client: aws_sdk_sts::Client,
}

#[async_trait]
impl Sts for SdkSts {
    async fn assume_role(&self, spec: &AssumeRoleRequest) -> Result<SessionCredentials, AwsError> {
        const OP: &str = "sts:AssumeRole";
        let out = self
            .client
            .assume_role()
            .role_arn(&spec.role_arn)
            .role_session_name(&spec.session_name)
            .duration_seconds(spec.duration.as_secs().min(i32::MAX as u64) as i32)
            .set_external_id(spec.external_id.clone())
            .send()
            .await
            .map_err(|e| aws_error(OP, &e))?;
        let request_id = out.request_id().map(String::from);
        let fail = |message: &str| AwsError {
            operation: OP.to_string(),
            code: Some("UnreadableResponse".to_string()),
            message: message.to_string(),
            request_id: request_id.clone(),
            http_status: None,
        };
        let c = out
            .credentials()
            .ok_or_else(|| fail("AssumeRole answered without credentials"))?;
        // A response cut short can parse with the expiration missing, which the SDK fills with the
        // epoch: no session is issued before 2011 (STS's launch), so such a time is unreadable too.
        let sts_launch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_293_840_000);
        let expiry = SystemTime::try_from(*c.expiration())
            .ok()
            .filter(|e| *e > sts_launch)
            .ok_or_else(|| fail("AssumeRole answered without a readable expiration"))?;
        Ok(SessionCredentials {
            access_key_id: c.access_key_id().to_string(),
            secret_access_key: Secret::new(c.secret_access_key()),
            session_token: Secret::new(c.session_token()),
            expiry,
        })
    }

    async fn caller_identity(&self) -> Result<(String, String), AwsError> {
        let out = self
            .client
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| aws_error("sts:GetCallerIdentity", &e))?;
        Ok((
            out.account().unwrap_or_default().to_string(),
            out.arn().unwrap_or_default().to_string(),
        ))
    }
}

struct SdkEc2 {
    client: aws_sdk_ec2::Client,
}

fn filter(name: &str, values: &[String]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.to_vec()))
        .build()
}

impl SdkEc2 {
    /// DescribeInstances with `filters`, page by page (each page its own request, retried by the SDK).
    async fn describe_filtered(&self, filters: Vec<Filter>) -> Result<Vec<InstanceView>, AwsError> {
        let mut pages = self
            .client
            .describe_instances()
            .set_filters(Some(filters))
            .max_results(DESCRIBE_PAGE)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| aws_error("ec2:DescribeInstances", &e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id() else {
                    continue;
                };
                let state = instance
                    .state()
                    .and_then(|s| s.name())
                    .map_or("unknown", InstanceStateName::as_str);
                let state_reason =
                    instance
                        .state_reason()
                        .and_then(|r| match (r.code(), r.message()) {
                            (Some(c), Some(m)) if m.starts_with(c) => Some(m.to_string()),
                            (Some(c), Some(m)) => Some(format!("{c}: {m}")),
                            (c, m) => c.or(m).map(String::from),
                        });
                let tags = instance
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                    .collect();
                let hibernation_configured = instance
                    .hibernation_options()
                    .and_then(|h| h.configured())
                    .unwrap_or(false);
                out.push(InstanceView {
                    id: id.to_string(),
                    state: state.to_string(),
                    state_reason,
                    tags,
                    hibernation_configured,
                });
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Ec2 for SdkEc2 {
    async fn describe_selection(
        &self,
        selection: &Selection,
    ) -> Result<Vec<InstanceView>, AwsError> {
        let tag_filters: Vec<Filter> = selection
            .tags
            .iter()
            .map(|(k, v)| filter(&format!("tag:{k}"), v))
            .collect();
        if selection.instance_ids.is_empty() {
            return self.describe_filtered(tag_filters).await;
        }
        let mut out = Vec::new();
        for chunk in selection.instance_ids.chunks(FILTER_VALUES_MAX) {
            let mut filters = tag_filters.clone();
            filters.push(filter("instance-id", chunk));
            out.extend(self.describe_filtered(filters).await?);
        }
        Ok(out)
    }

    async fn describe_ids(&self, ids: &[String]) -> Result<Vec<InstanceView>, AwsError> {
        let mut out = Vec::new();
        // Filters rather than InstanceIds: an unknown ID matches nothing instead of failing the call.
        for chunk in ids.chunks(FILTER_VALUES_MAX) {
            out.extend(
                self.describe_filtered(vec![filter("instance-id", chunk)])
                    .await?,
            );
        }
        Ok(out)
    }

    async fn change_state(
        &self,
        action: Action,
        ids: &[String],
        dry_run: bool,
        hibernate: bool,
    ) -> Result<(), AwsError> {
        let ids = Some(ids.to_vec());
        let result = match action {
            Action::Start => self
                .client
                .start_instances()
                .set_instance_ids(ids)
                .dry_run(dry_run)
                .send()
                .await
                .map(drop)
                .map_err(|e| aws_error("ec2:StartInstances", &e)),
            Action::Stop => self
                .client
                .stop_instances()
                .set_instance_ids(ids)
                .set_hibernate(hibernate.then_some(true))
                .dry_run(dry_run)
                .send()
                .await
                .map(drop)
                .map_err(|e| aws_error("ec2:StopInstances", &e)),
        };
        match (dry_run, result) {
            (true, Err(e)) if e.code() == Some("DryRunOperation") => Ok(()),
            (true, Ok(())) => Err(AwsError::new(
                "",
                None,
                "EC2 did not honour DryRun: the call was made",
            )),
            (_, r) => r,
        }
    }

    async fn count_instance_status(&self) -> Result<usize, AwsError> {
        let mut pages = self
            .client
            .describe_instance_status()
            .include_all_instances(true)
            .into_paginator()
            .send();
        let mut n = 0;
        while let Some(page) = pages.next().await {
            n += page
                .map_err(|e| aws_error("ec2:DescribeInstanceStatus", &e))?
                .instance_statuses()
                .len();
        }
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------------------------
// SNS, for alerts
// ---------------------------------------------------------------------------------------------------------

struct SdkSns {
    client: aws_sdk_sns::Client,
}

#[async_trait]
impl Sns for SdkSns {
    async fn publish(
        &self,
        topic_arn: &str,
        subject: &str,
        message: &str,
    ) -> Result<String, AwsError> {
        let out = self
            .client
            .publish()
            .topic_arn(topic_arn)
            .subject(subject)
            .message(message)
            .send()
            .await
            .map_err(|e| aws_error("sns:Publish", &e))?;
        Ok(out.message_id().unwrap_or_default().to_string())
    }
}
