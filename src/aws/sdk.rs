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
use aws_sdk_ec2::config::SharedHttpClient;
use aws_sdk_ec2::operation::RequestId;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::{
    AssumeRoleRequest, Aws, AwsError, Ec2, OrgAccountEntry, OrgUnit, Organizations, Secret,
    SessionCredentials, SigningCredentials, Sns, Sts,
};
use crate::config::{Action, CredentialSource, Selection};
use crate::planner::InstanceView;

/// Every AWS call is bounded, so a hung endpoint cannot stall an action or a shutdown.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle connections kept per endpoint, and for how long.
const POOL_IDLE_PER_HOST: usize = 16;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
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

/// The SDK's default HTTPS client (hyper 1, rustls with aws-lc, the system's roots, `HTTPS_PROXY` and
/// `NO_PROXY` from the environment), built once. Connectors are made per connector settings (timeouts)
/// and cached inside it, so every client with the same settings shares one pool.
fn shared_https_client() -> SharedHttpClient {
    use aws_smithy_http_client::proxy::ProxyConfig;
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    use aws_smithy_http_client::{Builder, ConnectorBuilder};
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector =
            ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        // After a burst (a thousand accounts acting at one instant) the pool keeps a few connections
        // per endpoint, not one per request that was in flight, each with its buffers.
        connector.set_pool_max_idle_per_host(Some(POOL_IDLE_PER_HOST));
        connector.set_pool_idle_timeout(Some(Some(POOL_IDLE_TIMEOUT)));
        connector.build()
    })
}

/// Where the delegate's own credentials come from, and the per-region SDK configuration built on them.
pub struct SdkAws {
    base: SharedCredentialsProvider,
    /// Shared by every SDK client: one connection pool and one TLS configuration (with its parsed
    /// root certificates) for the process, instead of one per client, that is per account and region.
    http: SharedHttpClient,
    source: CredentialSource,
    configs: tokio::sync::Mutex<BTreeMap<String, SdkConfig>>,
    /// One EC2 client per region for every account, and one STS client per region: an account's
    /// credentials go with each of its calls (`SdkEc2`), so a thousand accounts cost a thousand small
    /// handles, not a thousand SDK clients per region.
    ec2_clients: tokio::sync::Mutex<BTreeMap<String, aws_sdk_ec2::Client>>,
    sts_clients: tokio::sync::Mutex<BTreeMap<String, aws_sdk_sts::Client>>,
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
            http: shared_https_client(),
            source: source.clone(),
            configs: Default::default(),
            ec2_clients: Default::default(),
            sts_clients: Default::default(),
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
            .http_client(self.http.clone())
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
        let config = self.sdk_config(region).await;
        let client = self
            .sts_clients
            .lock()
            .await
            .entry(region.to_string())
            .or_insert_with(|| aws_sdk_sts::Client::new(&config))
            .clone();
        Arc::new(SdkSts { client })
    }

    async fn ec2(&self, region: &str, credentials: Arc<dyn SigningCredentials>) -> Arc<dyn Ec2> {
        let config = self.sdk_config(region).await;
        let client = self
            .ec2_clients
            .lock()
            .await
            .entry(region.to_string())
            .or_insert_with(|| {
                // No credentials of its own: a call without an account's credentials fails, rather than
                // acting with the delegate's own.
                aws_sdk_ec2::Client::from_conf(
                    aws_sdk_ec2::config::Builder::from(&config)
                        .credentials_provider(NoAccountCredentials)
                        .identity_cache(IdentityCache::no_cache())
                        .build(),
                )
            })
            .clone();
        Arc::new(SdkEc2 {
            client,
            credentials: SharedCredentialsProvider::new(AssumedRoleProvider(credentials)),
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

    async fn organizations(
        &self,
        region: &str,
        credentials: Arc<dyn SigningCredentials>,
    ) -> Arc<dyn Organizations> {
        let config = aws_sdk_organizations::config::Builder::from(&self.sdk_config(region).await)
            .credentials_provider(AssumedRoleProvider(credentials))
            .identity_cache(IdentityCache::no_cache())
            .build();
        Arc::new(SdkOrganizations {
            client: aws_sdk_organizations::Client::from_conf(config),
        })
    }

    async fn claim_table(&self, table: &str, region: &str) -> Arc<dyn ClaimTable> {
        Arc::new(SdkClaims {
            client: aws_sdk_dynamodb::Client::new(&self.sdk_config(region).await),
            table: table.to_string(),
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

/// The shared EC2 clients' own credentials: none. Every call carries its account's.
#[derive(Debug)]
struct NoAccountCredentials;

impl ProvideCredentials for NoAccountCredentials {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::ready(Err(CredentialsError::not_loaded(
            "an EC2 call without an account's credentials (a bug in shiftd)",
        )))
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

/// EC2 in one region, for one account: the region's shared client, and the account's credentials,
/// given with each call.
struct SdkEc2 {
    client: aws_sdk_ec2::Client,
    credentials: SharedCredentialsProvider,
}

fn filter(name: &str, values: &[String]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.to_vec()))
        .build()
}

impl SdkEc2 {
    /// What each call adds to the shared client's configuration: this account's credentials.
    fn account(&self) -> aws_sdk_ec2::config::Builder {
        aws_sdk_ec2::config::Builder::default().credentials_provider(self.credentials.clone())
    }

    /// DescribeInstances with `filters`, page by page (each page its own request, retried by the SDK).
    async fn describe_filtered(&self, filters: Vec<Filter>) -> Result<Vec<InstanceView>, AwsError> {
        let mut out = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let page = self
                .client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .max_results(DESCRIBE_PAGE)
                .set_next_token(next_token.clone())
                .customize()
                .config_override(self.account())
                .send()
                .await
                .map_err(|e| aws_error("ec2:DescribeInstances", &e))?;
            let asked = next_token.take();
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
            match page.next_token() {
                // A token repeated would describe the same page for ever (the SDK's paginator stops
                // there too).
                Some(t) if !t.is_empty() && Some(t) != asked.as_deref() => {
                    next_token = Some(t.to_string())
                }
                _ => return Ok(out),
            }
        }
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
                .customize()
                .config_override(self.account())
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
                .customize()
                .config_override(self.account())
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
        let mut n = 0;
        let mut next_token: Option<String> = None;
        loop {
            let page = self
                .client
                .describe_instance_status()
                .include_all_instances(true)
                .set_next_token(next_token.clone())
                .customize()
                .config_override(self.account())
                .send()
                .await
                .map_err(|e| aws_error("ec2:DescribeInstanceStatus", &e))?;
            n += page.instance_statuses().len();
            match page.next_token() {
                Some(t) if !t.is_empty() && Some(t) != next_token.as_deref() => {
                    next_token = Some(t.to_string())
                }
                _ => return Ok(n),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Organizations, for discovering accounts
// ---------------------------------------------------------------------------------------------------------

struct SdkOrganizations {
    client: aws_sdk_organizations::Client,
}

fn org_unit(id: Option<&str>, name: Option<&str>) -> Option<OrgUnit> {
    Some(OrgUnit {
        id: id?.to_string(),
        name: name.unwrap_or_default().to_string(),
    })
}

#[async_trait]
impl Organizations for SdkOrganizations {
    async fn list_roots(&self) -> Result<Vec<OrgUnit>, AwsError> {
        let mut pages = self.client.list_roots().into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| aws_error("organizations:ListRoots", &e))?;
            out.extend(
                page.roots()
                    .iter()
                    .filter_map(|r| org_unit(r.id(), r.name())),
            );
        }
        Ok(out)
    }

    async fn list_accounts_for_parent(
        &self,
        parent: &str,
    ) -> Result<Vec<OrgAccountEntry>, AwsError> {
        let mut pages = self
            .client
            .list_accounts_for_parent()
            .parent_id(parent)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| aws_error("organizations:ListAccountsForParent", &e))?;
            for a in page.accounts() {
                let Some(id) = a.id() else { continue };
                // `State` (newer) says CLOSED and PENDING_ACTIVATION too; `Status` where it is absent.
                #[allow(deprecated)]
                let status = match (a.state(), a.status()) {
                    (Some(state), _) => state.as_str().to_string(),
                    (None, Some(status)) => status.as_str().to_string(),
                    (None, None) => "UNKNOWN".to_string(),
                };
                out.push(OrgAccountEntry {
                    id: id.to_string(),
                    name: a.name().unwrap_or_default().to_string(),
                    status,
                });
            }
        }
        Ok(out)
    }

    async fn list_ous_for_parent(&self, parent: &str) -> Result<Vec<OrgUnit>, AwsError> {
        let mut pages = self
            .client
            .list_organizational_units_for_parent()
            .parent_id(parent)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| aws_error("organizations:ListOrganizationalUnitsForParent", &e))?;
            out.extend(
                page.organizational_units()
                    .iter()
                    .filter_map(|u| org_unit(u.id(), u.name())),
            );
        }
        Ok(out)
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

// ---------------------------------------------------------------------------------------------------------
// DynamoDB, the claim table of `[cluster]`
// ---------------------------------------------------------------------------------------------------------

use crate::cluster::{
    Claim, ClaimKey, ClaimTable, KEEP_CLAIMS, KEY_ATTRIBUTE, Progress, TTL_ATTRIBUTE, TableSetup,
};
use aws_sdk_dynamodb::types::AttributeValue as Av;

pub(crate) struct SdkClaims {
    pub(crate) client: aws_sdk_dynamodb::Client,
    pub(crate) table: String,
}

fn millis(t: chrono::DateTime<chrono::Utc>) -> Av {
    Av::N(t.timestamp_millis().to_string())
}

fn is_condition_failed(e: &AwsError) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

/// A conditional write's answer: whether its condition held (and it was made).
fn conditional<T>(r: Result<T, AwsError>) -> Result<bool, AwsError> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if is_condition_failed(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

fn claim_item(c: &Claim) -> std::collections::HashMap<String, Av> {
    let expires = c.key.at + crate::clock::chrono_duration(KEEP_CLAIMS);
    std::collections::HashMap::from([
        (KEY_ATTRIBUTE.to_string(), Av::S(c.key.id())),
        ("rule".into(), Av::S(c.key.rule.clone())),
        ("action".into(), Av::S(c.key.action.clone())),
        (
            "at".into(),
            Av::S(c.key.at.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
        ),
        ("account".into(), Av::S(c.key.account.clone())),
        ("region".into(), Av::S(c.key.region.clone())),
        ("owner".into(), Av::S(c.owner.clone())),
        ("lease_until".into(), millis(c.lease_until)),
        ("progress".into(), Av::S(c.progress.as_str().into())),
        ("results".into(), Av::S(c.results.join("\n"))),
        (
            TTL_ATTRIBUTE.to_string(),
            Av::N(expires.timestamp().to_string()),
        ),
    ])
}

fn claim_from(item: &std::collections::HashMap<String, Av>) -> Option<Claim> {
    let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let at = chrono::DateTime::parse_from_rfc3339(&s("at")?)
        .ok()?
        .with_timezone(&chrono::Utc);
    let lease_ms: i64 = item.get("lease_until")?.as_n().ok()?.parse().ok()?;
    Some(Claim {
        key: ClaimKey {
            rule: s("rule")?,
            action: s("action")?,
            at,
            account: s("account")?,
            region: s("region")?,
        },
        owner: s("owner")?,
        lease_until: chrono::DateTime::from_timestamp_millis(lease_ms)?,
        progress: Progress::parse(&s("progress")?)?,
        results: s("results")
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect(),
    })
}

#[async_trait]
impl ClaimTable for SdkClaims {
    async fn create(&self, claim: &Claim) -> Result<Option<Claim>, AwsError> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(claim_item(claim)))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", KEY_ATTRIBUTE)
            .send()
            .await
            .map_err(|e| aws_error("dynamodb:PutItem", &e));
        match put {
            Ok(_) => Ok(None),
            Err(e) if is_condition_failed(&e) => match self.get(&claim.key).await? {
                Some(held) => Ok(Some(held)),
                // Deleted in between (TTL): try again later as if held by nobody known.
                None => Err(AwsError::new(
                    "dynamodb:GetItem",
                    Some("ClaimVanished"),
                    "the claim was there and is gone",
                )),
            },
            Err(e) => Err(e),
        }
    }

    async fn get(&self, key: &ClaimKey) -> Result<Option<Claim>, AwsError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, Av::S(key.id()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| aws_error("dynamodb:GetItem", &e))?;
        Ok(out.item().and_then(claim_from))
    }

    async fn take_over(
        &self,
        old: &Claim,
        owner: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, AwsError> {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, Av::S(old.key.id()))
            .update_expression("SET #o = :o, lease_until = :l")
            .condition_expression("lease_until = :old AND progress <> :done")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":o", Av::S(owner.into()))
            .expression_attribute_values(":l", millis(lease_until))
            .expression_attribute_values(":old", millis(old.lease_until))
            .expression_attribute_values(":done", Av::S(Progress::Done.as_str().into()))
            .send()
            .await
            .map_err(|e| aws_error("dynamodb:UpdateItem", &e));
        conditional(r)
    }

    async fn update(&self, claim: &Claim) -> Result<bool, AwsError> {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, Av::S(claim.key.id()))
            .update_expression("SET lease_until = :l, progress = :p, results = :r")
            .condition_expression("#o = :o")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":o", Av::S(claim.owner.clone()))
            .expression_attribute_values(":l", millis(claim.lease_until))
            .expression_attribute_values(":p", Av::S(claim.progress.as_str().into()))
            .expression_attribute_values(":r", Av::S(claim.results.join("\n")))
            .send()
            .await
            .map_err(|e| aws_error("dynamodb:UpdateItem", &e));
        conditional(r)
    }

    async fn extend(
        &self,
        key: &ClaimKey,
        owner: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, AwsError> {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, Av::S(key.id()))
            .update_expression("SET lease_until = :l")
            .condition_expression("#o = :o AND progress <> :done")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":o", Av::S(owner.into()))
            .expression_attribute_values(":l", millis(lease_until))
            .expression_attribute_values(":done", Av::S(Progress::Done.as_str().into()))
            .send()
            .await
            .map_err(|e| aws_error("dynamodb:UpdateItem", &e));
        conditional(r)
    }

    async fn recent(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Vec<Claim>, AwsError> {
        let mut pages = self
            .client
            .scan()
            .table_name(&self.table)
            .filter_expression("#at >= :since")
            .expression_attribute_names("#at", "at")
            .expression_attribute_values(
                ":since",
                Av::S(since.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
            )
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| aws_error("dynamodb:Scan", &e))?;
            out.extend(page.items().iter().filter_map(claim_from));
            if out.len() > 100_000 {
                break;
            }
        }
        out.sort_by(|a, b| (b.key.at, &a.key).cmp(&(a.key.at, &b.key)));
        out.truncate(limit);
        Ok(out)
    }

    async fn create_table(&self) -> Result<TableSetup, AwsError> {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
            TimeToLiveSpecification,
        };
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(KEY_ATTRIBUTE)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("complete"),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(KEY_ATTRIBUTE)
                    .key_type(KeyType::Hash)
                    .build()
                    .expect("complete"),
            )
            .send()
            .await
            .map_err(|e| aws_error("dynamodb:CreateTable", &e));
        let setup = match created {
            Ok(_) => {
                // Wait for it to be ACTIVE before TTL can be set (seconds in AWS).
                for _ in 0..60 {
                    let d = self
                        .client
                        .describe_table()
                        .table_name(&self.table)
                        .send()
                        .await
                        .map_err(|e| aws_error("dynamodb:DescribeTable", &e))?;
                    if d.table().and_then(|t| t.table_status()).map(|s| s.as_str())
                        == Some("ACTIVE")
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                TableSetup::Created
            }
            Err(e) if e.code() == Some("ResourceInUseException") => {
                match self.check_table().await? {
                    TableSetup::Missing => TableSetup::Exists,
                    other => other,
                }
            }
            Err(e) => return Err(e),
        };
        if matches!(setup, TableSetup::WrongSchema(_)) {
            return Ok(setup);
        }
        let ttl = self
            .client
            .update_time_to_live()
            .table_name(&self.table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name(TTL_ATTRIBUTE)
                    .enabled(true)
                    .build()
                    .expect("complete"),
            )
            .send()
            .await
            .map_err(|e| aws_error("dynamodb:UpdateTimeToLive", &e));
        match ttl {
            Ok(_) => Ok(setup),
            // Already enabled: what we wanted.
            Err(e) if e.code() == Some("ValidationException") => Ok(setup),
            Err(e) => Err(e),
        }
    }

    async fn check_table(&self) -> Result<TableSetup, AwsError> {
        let d = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| aws_error("dynamodb:DescribeTable", &e));
        let d = match d {
            Ok(d) => d,
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                return Ok(TableSetup::Missing);
            }
            Err(e) => return Err(e),
        };
        let keys: Vec<(String, String)> = d
            .table()
            .map(|t| {
                t.key_schema()
                    .iter()
                    .map(|k| {
                        (
                            k.attribute_name().to_string(),
                            k.key_type().as_str().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if keys == [(KEY_ATTRIBUTE.to_string(), "HASH".to_string())] {
            Ok(TableSetup::Exists)
        } else {
            Ok(TableSetup::WrongSchema(format!(
                "its key is {keys:?}; shiftd needs a string hash key {KEY_ATTRIBUTE:?} and nothing else"
            )))
        }
    }
}
