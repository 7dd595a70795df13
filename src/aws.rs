//! The seam to AWS: base credentials, STS and EC2 clients, and the few EC2 calls shiftd makes, in
//! shiftd's own types. Nothing outside this module (and `credentials`) sees an SDK type.
//!
//! Endpoints come from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_STS`,
//! `AWS_ENDPOINT_URL_EC2`, `AWS_EC2_METADATA_SERVICE_ENDPOINT`), so tests and the demo point shiftd at
//! local fakes with no code path of their own.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_config::identity::IdentityCache;
use aws_config::imds;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::config::{Action, CredentialSource, Selection};
use crate::credentials::AccountCredentials;
use crate::planner::InstanceView;

/// Every AWS call is bounded, so a hung endpoint cannot stall an action or a shutdown.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// EC2 accepts at most 200 values in one filter.
const FILTER_VALUES_MAX: usize = 200;

/// An AWS error as shiftd reports it: the service's code (when there is one) and a readable message.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct AwsError {
    pub code: Option<String>,
    pub message: String,
}

impl AwsError {
    pub(crate) fn from_sdk<E, R>(e: &aws_sdk_ec2::error::SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        Self {
            code: e.code().map(String::from),
            message: describe_sdk_error(e),
        }
    }
}

/// A one-line description of an SDK error: the service's code and message when the service answered,
/// otherwise the whole chain of causes (timeouts, connection failures, credential errors).
fn describe_sdk_error<E, R>(e: &aws_sdk_ec2::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match (e.code(), e.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_string(),
        _ => aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
    }
}

/// Where the delegate's own credentials come from, and the per-region SDK configuration built on them.
pub struct AwsEnv {
    base: SharedCredentialsProvider,
    source: CredentialSource,
    configs: tokio::sync::Mutex<BTreeMap<String, SdkConfig>>,
}

impl AwsEnv {
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

    pub fn source(&self) -> &CredentialSource {
        &self.source
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

    /// An STS client signing with the delegate's own (base) credentials, on the regional endpoint.
    pub async fn sts(&self, region: &str) -> aws_sdk_sts::Client {
        aws_sdk_sts::Client::new(&self.sdk_config(region).await)
    }

    /// An EC2 client for one target account and region, signing with that account's assumed-role
    /// credentials (always the newest: no SDK-side cache).
    pub async fn ec2(&self, region: &str, credentials: AccountCredentials) -> Ec2Region {
        let config = aws_sdk_ec2::config::Builder::from(&self.sdk_config(region).await)
            .credentials_provider(credentials)
            .identity_cache(IdentityCache::no_cache())
            .build();
        Ec2Region {
            client: aws_sdk_ec2::Client::from_conf(config),
            exclusive: Default::default(),
        }
    }

    /// The delegate's own identity (GetCallerIdentity with the base credentials): (account, ARN).
    pub async fn caller_identity(&self, region: &str) -> Result<(String, String), AwsError> {
        let out = self
            .sts(region)
            .await
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| AwsError::from_sdk(&e))?;
        Ok((
            out.account().unwrap_or_default().to_string(),
            out.arn().unwrap_or_default().to_string(),
        ))
    }

    /// Whether the base credentials resolve; the error says why not.
    pub async fn check_base_credentials(&self) -> Result<(), String> {
        use aws_credential_types::provider::ProvideCredentials;
        self.base
            .provide_credentials()
            .await
            .map(drop)
            .map_err(|e| aws_sdk_ec2::error::DisplayErrorContext(e).to_string())
    }

    /// The instance profile role's name as IMDS reports it: `Ok(None)` when IMDS answers but no role
    /// is attached.
    pub async fn instance_profile_role(&self) -> Result<Option<String>, String> {
        let client = imds::Client::builder()
            .max_attempts(2)
            .operation_timeout(Duration::from_secs(5))
            .build();
        match client
            .get("/latest/meta-data/iam/security-credentials/")
            .await
        {
            Ok(role) => Ok(Some(role.as_ref().trim().to_string()).filter(|r| !r.is_empty())),
            Err(imds::client::error::ImdsError::ErrorResponse(r))
                if r.response().status().as_u16() == 404 =>
            {
                Ok(None)
            }
            Err(e) => Err(aws_sdk_ec2::error::DisplayErrorContext(e).to_string()),
        }
    }

    /// The delegate's name for AssumeRole sessions: its instance ID from IMDS, else the host name.
    pub async fn delegate_name(&self) -> String {
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
}

/// EC2 in one account and region.
#[derive(Clone, Debug)]
pub struct Ec2Region {
    client: aws_sdk_ec2::Client,
    exclusive: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Ec2Region {
    /// Held while a batch resolves its selection and acts, so that batches due close together for the
    /// same account and region see each other's effects instead of acting twice.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.exclusive.lock().await
    }

    /// Instances matching `selection` (listed IDs and tags, ANDed), or only the given IDs when
    /// `ids_only` is set. Uses filters rather than `InstanceIds`, so an unknown ID simply matches nothing.
    pub async fn describe(
        &self,
        selection: &Selection,
        ids_only: Option<&[String]>,
    ) -> Result<Vec<InstanceView>, AwsError> {
        let (ids, tags): (&[String], Option<&BTreeMap<String, Vec<String>>>) = match ids_only {
            Some(ids) => (ids, None),
            None => (&selection.instance_ids, Some(&selection.tags)),
        };
        let tag_filters: Vec<Filter> = tags
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                Filter::builder()
                    .name(format!("tag:{k}"))
                    .set_values(Some(v.clone()))
                    .build()
            })
            .collect();
        let id_chunks: Vec<Option<&[String]>> = if ids.is_empty() {
            vec![None]
        } else {
            ids.chunks(FILTER_VALUES_MAX).map(Some).collect()
        };
        let mut out = Vec::new();
        for chunk in id_chunks {
            let mut filters = tag_filters.clone();
            if let Some(chunk) = chunk {
                filters.push(
                    Filter::builder()
                        .name("instance-id")
                        .set_values(Some(chunk.to_vec()))
                        .build(),
                );
            }
            let mut pages = self
                .client
                .describe_instances()
                .set_filters(Some(filters))
                .max_results(1000)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| AwsError::from_sdk(&e))?;
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
                    out.push(InstanceView {
                        id: id.to_string(),
                        state: state.to_string(),
                        state_reason,
                    });
                }
            }
        }
        Ok(out)
    }

    /// How many instances DescribeInstanceStatus lists (the walkthrough's final check).
    pub async fn count_instance_status(&self) -> Result<usize, AwsError> {
        let mut pages = self
            .client
            .describe_instance_status()
            .include_all_instances(true)
            .into_paginator()
            .send();
        let mut n = 0;
        while let Some(page) = pages.next().await {
            n += page
                .map_err(|e| AwsError::from_sdk(&e))?
                .instance_statuses()
                .len();
        }
        Ok(n)
    }

    /// One StartInstances or StopInstances call, with `DryRun` set as asked.
    async fn start_or_stop(
        &self,
        action: Action,
        ids: &[String],
        dry_run: bool,
    ) -> Result<(), AwsError> {
        let ids = Some(ids.to_vec());
        match action {
            Action::Start => self
                .client
                .start_instances()
                .set_instance_ids(ids)
                .dry_run(dry_run)
                .send()
                .await
                .map(drop)
                .map_err(|e| AwsError::from_sdk(&e)),
            Action::Stop => self
                .client
                .stop_instances()
                .set_instance_ids(ids)
                .dry_run(dry_run)
                .send()
                .await
                .map(drop)
                .map_err(|e| AwsError::from_sdk(&e)),
        }
    }

    /// StartInstances/StopInstances with DryRun: `Ok(())` when EC2 says the call would be allowed
    /// (`DryRunOperation`), the error otherwise (`UnauthorizedOperation` when it would be denied).
    pub async fn dry_run(&self, action: Action, ids: &[String]) -> Result<(), AwsError> {
        match self.start_or_stop(action, ids, true).await {
            Err(e) if e.code.as_deref() == Some("DryRunOperation") => Ok(()),
            Ok(()) => Err(AwsError {
                code: None,
                message: "EC2 did not honour DryRun: the call was made".into(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Calls StartInstances or StopInstances for `ids` (one call).
    pub async fn change_state(&self, action: Action, ids: &[String]) -> Result<(), AwsError> {
        self.start_or_stop(action, ids, false).await
    }
}
