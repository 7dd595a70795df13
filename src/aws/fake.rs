//! In-memory STS and EC2 behind shiftd's traits, on the caller's clock, for the scenario tests.
//!
//! It models what shiftd must cope with:
//! - instances that pass through `pending`/`stopping` for a configurable time, start calls that fall
//!   back to `stopped` with a state reason (a missing KMS grant), and describes that show a stale view
//!   for a while after a change;
//! - EC2's whole-call errors: `IncorrectInstanceState`, `InsufficientInstanceCapacity`,
//!   `InvalidInstanceID.NotFound`, `UnauthorizedOperation`, and `RequestLimitExceeded` from per-account,
//!   per-region token buckets (one per operation, or EC2's own request and resource buckets:
//!   `throttle_like_ec2`);
//! - calls that take time (`set_call_latency`), and the most ever in flight, in all and per account;
//! - STS sessions that expire (on STS's own clock, which may be skewed), `AccessDenied`, throttling;
//! - scripted faults on any operation: an error, a delay, a hang;
//! - a log of every call, with the instant it was made.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    AssumeRoleRequest, Aws, AwsError, Ec2, OrgAccountEntry, OrgUnit, Organizations, Secret,
    SessionCredentials, SigningCredentials, Sns, Sts,
};
use crate::clock::{Clock, chrono_duration};
use crate::config::{Action, CredentialSource, Selection};
use crate::pacing::{Ec2Limits, Rate};
use crate::planner::InstanceView;

pub const ASSUME_ROLE: &str = "sts:AssumeRole";
pub const DESCRIBE: &str = "ec2:DescribeInstances";
pub const START: &str = "ec2:StartInstances";
pub const STOP: &str = "ec2:StopInstances";
pub const PUBLISH: &str = "sns:Publish";
pub const LIST_ROOTS: &str = "organizations:ListRoots";
pub const LIST_ACCOUNTS_FOR_PARENT: &str = "organizations:ListAccountsForParent";
pub const LIST_OUS_FOR_PARENT: &str = "organizations:ListOrganizationalUnitsForParent";

/// A scripted fault for the next call of an operation.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this error.
    Error(AwsError),
    /// Answer this much later (then normally).
    Delay(Duration),
    /// Never answer.
    Hang,
}

/// One call as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub operation: &'static str,
    pub account: String,
    pub region: String,
    pub ids: Vec<String>,
    pub dry_run: bool,
    /// A StopInstances call with `Hibernate=true`.
    pub hibernate: bool,
    pub at: DateTime<Utc>,
}

/// One fake instance.
#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    pub account: String,
    pub region: String,
    pub tags: BTreeMap<String, String>,
    pub state: String,
    pub state_reason: Option<String>,
    /// A start gets this far (`pending`), then falls back to `stopped` with this reason.
    pub start_falls_back: Option<String>,
    /// StartInstances including it fails with `InsufficientInstanceCapacity`.
    pub no_capacity: bool,
    /// `HibernationOptions.Configured`.
    pub hibernation_configured: bool,
    transition: Option<(DateTime<Utc>, String, Option<String>)>,
    stale: Option<(DateTime<Utc>, String, Option<String>)>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    capacity: f64,
    refill_per_second: f64,
    per_instance: bool,
}

struct World {
    delegate_account: String,
    instances: BTreeMap<String, Instance>,
    /// Role ARN -> required external ID. Empty: every well-formed role ARN may be assumed.
    roles: BTreeMap<String, Option<String>>,
    denied: BTreeSet<(String, &'static str)>,
    faults: BTreeMap<&'static str, VecDeque<Fault>>,
    calls: Vec<Call>,
    start_takes: Duration,
    stop_takes: Duration,
    stale_for: Duration,
    buckets: BTreeMap<&'static str, Bucket>,
    /// (account, region, operation) -> (tokens, last refill).
    levels: BTreeMap<(String, String, &'static str), (f64, DateTime<Utc>)>,
    sts_ahead: chrono::Duration,
    sessions_issued: u64,
    imds_down: bool,
    published: Vec<Published>,
    /// EC2's request and resource buckets per account and region (`throttle_like_ec2`): their sizes
    /// and refills, and those of the accounts whose limits AWS raised (by account ID).
    ec2_like: Option<Ec2Limits>,
    ec2_raised: BTreeMap<String, Ec2Limits>,
    /// Answers of RequestLimitExceeded from the buckets.
    throttled: usize,
    /// How long each call takes (so that calls overlap).
    latency: Duration,
    /// Calls in flight now, and the most ever, in all and per account.
    in_flight: usize,
    max_in_flight: usize,
    in_flight_by_account: BTreeMap<String, usize>,
    max_in_flight_by_account: BTreeMap<String, usize>,
    org: FakeOrg,
}

/// An organization: one root, OUs, and accounts, each under a parent (the root or an OU).
#[derive(Default)]
struct FakeOrg {
    root: Option<String>,
    /// OU ID -> (parent ID, name).
    ous: BTreeMap<String, (String, String)>,
    /// Account ID -> (parent ID, name, status).
    accounts: BTreeMap<String, (String, String, String)>,
}

/// EC2's buckets in one account and region: (bucket, its size and refill). Request buckets:
/// describes, mutating actions (StartInstances and StopInstances share it); resource buckets: a token
/// per instance.
fn ec2_buckets(limits: &Ec2Limits) -> [(&'static str, Rate); 4] {
    [
        ("describe", limits.describe),
        ("mutate", limits.mutate),
        ("start-resource", limits.start_instances),
        ("stop-resource", limits.stop_instances),
    ]
}

/// The fake AWS: one world of accounts, regions and instances. Cloning shares it.
#[derive(Clone)]
pub struct FakeAws {
    world: Arc<Mutex<World>>,
    clock: Arc<dyn Clock>,
    /// The claim table every daemon on this fake shares (`[cluster]`).
    pub claims: crate::cluster::MemoryClaims,
}

/// The secret part of every session the fake issues starts with this, so tests can grep for leaks.
pub const SECRET_MARK: &str = "FAKESECRET";

fn role_account(role_arn: &str) -> Option<String> {
    let parts: Vec<&str> = role_arn.split(':').collect();
    (parts.len() == 6
        && parts[2] == "iam"
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5].starts_with("role/"))
    .then(|| parts[4].to_string())
}

impl FakeAws {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            world: Arc::new(Mutex::new(World {
                delegate_account: "123456789012".into(),
                instances: BTreeMap::new(),
                roles: BTreeMap::new(),
                denied: BTreeSet::new(),
                faults: BTreeMap::new(),
                calls: Vec::new(),
                start_takes: Duration::from_secs(10),
                stop_takes: Duration::from_secs(20),
                stale_for: Duration::ZERO,
                buckets: BTreeMap::new(),
                levels: BTreeMap::new(),
                sts_ahead: chrono::Duration::zero(),
                sessions_issued: 0,
                imds_down: false,
                ec2_like: None,
                ec2_raised: BTreeMap::new(),
                throttled: 0,
                latency: Duration::ZERO,
                in_flight: 0,
                max_in_flight: 0,
                in_flight_by_account: BTreeMap::new(),
                max_in_flight_by_account: BTreeMap::new(),
                published: Vec::new(),
                org: FakeOrg::default(),
            })),
            clock,
            claims: Default::default(),
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().expect("fake world lock")
    }

    /// A `ConnectAws` that always answers with this world.
    pub fn connector(&self) -> super::ConnectAws {
        let me = self.clone();
        Arc::new(move |_, _| Arc::new(me.clone()) as Arc<dyn Aws>)
    }

    /// Adds `count` instances in `state` with `tags`; returns their IDs.
    pub fn add_instances(
        &self,
        account: &str,
        region: &str,
        count: usize,
        state: &str,
        tags: &[(&str, &str)],
    ) -> Vec<String> {
        let mut w = self.world();
        (0..count)
            .map(|_| {
                let id = format!("i-{:017x}", w.instances.len() + 1);
                w.instances.insert(
                    id.clone(),
                    Instance {
                        id: id.clone(),
                        account: account.to_string(),
                        region: region.to_string(),
                        tags: tags
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        state: state.to_string(),
                        state_reason: None,
                        start_falls_back: None,
                        no_capacity: false,
                        hibernation_configured: false,
                        transition: None,
                        stale: None,
                    },
                );
                id
            })
            .collect()
    }

    /// Creates the organization with root `root` (e.g. "r-ab12").
    pub fn org_create(&self, root: &str) {
        self.world().org.root = Some(root.to_string());
    }

    /// Adds OU `id` under `parent` (the root or an OU).
    pub fn org_add_ou(&self, parent: &str, id: &str, name: &str) {
        self.world()
            .org
            .ous
            .insert(id.to_string(), (parent.to_string(), name.to_string()));
    }

    /// Adds account `id` under `parent`, ACTIVE.
    pub fn org_add_account(&self, parent: &str, id: &str, name: &str) {
        self.world().org.accounts.insert(
            id.to_string(),
            (parent.to_string(), name.to_string(), "ACTIVE".to_string()),
        );
    }

    /// Sets an account's status (`SUSPENDED`, `PENDING_CLOSURE`, `CLOSED`...).
    pub fn org_set_status(&self, id: &str, status: &str) {
        if let Some(a) = self.world().org.accounts.get_mut(id) {
            a.2 = status.to_string();
        }
    }

    /// Moves account `id` under `parent`.
    pub fn org_move_account(&self, id: &str, parent: &str) {
        if let Some(a) = self.world().org.accounts.get_mut(id) {
            a.0 = parent.to_string();
        }
    }

    /// Removes account `id` from the organization.
    pub fn org_remove_account(&self, id: &str) {
        self.world().org.accounts.remove(id);
    }

    /// Changes one instance (e.g. to make it fall back on start).
    pub fn modify(&self, id: &str, f: impl FnOnce(&mut Instance)) {
        let mut w = self.world();
        f(w.instances.get_mut(id).expect("known instance"));
    }

    /// Sets an instance's state now, as someone at the console would (a transition takes its time).
    pub fn set_state(&self, id: &str, state: &str) {
        let now = self.clock.now();
        let mut w = self.world();
        let (start_takes, stop_takes) = (w.start_takes, w.stop_takes);
        let i = w.instances.get_mut(id).expect("known instance");
        i.transition = match state {
            "pending" => Some((now + chrono_duration(start_takes), "running".into(), None)),
            "stopping" => Some((now + chrono_duration(stop_takes), "stopped".into(), None)),
            _ => None,
        };
        i.state = state.to_string();
    }

    /// Current state of each instance, in ID order.
    pub fn states(&self, ids: &[String]) -> Vec<String> {
        let now = self.clock.now();
        let mut w = self.world();
        w.advance(now);
        ids.iter().map(|id| w.instances[id].state.clone()).collect()
    }

    /// How long `pending` and `stopping` last.
    pub fn set_transition_times(&self, start: Duration, stop: Duration) {
        let mut w = self.world();
        w.start_takes = start;
        w.stop_takes = stop;
    }

    /// After a Start/Stop, describes show the previous view for this long.
    pub fn set_stale_describes(&self, d: Duration) {
        self.world().stale_for = d;
    }

    /// Only these roles may be assumed (with their external IDs); others get AccessDenied.
    pub fn allow_role(&self, role_arn: &str, external_id: Option<&str>) {
        self.world()
            .roles
            .insert(role_arn.to_string(), external_id.map(String::from));
    }

    /// `operation` in `account` is refused with UnauthorizedOperation (DryRun included).
    pub fn deny(&self, account: &str, operation: &'static str) {
        self.world().denied.insert((account.to_string(), operation));
    }

    /// EC2's token bucket for `operation` in every account and region: `capacity` tokens, refilled at
    /// `per_second`. `per_instance`: each instance in a call takes a token (resource rate limits).
    pub fn set_bucket(
        &self,
        operation: &'static str,
        capacity: f64,
        per_second: f64,
        per_instance: bool,
    ) {
        self.world().buckets.insert(
            operation,
            Bucket {
                capacity,
                refill_per_second: per_second,
                per_instance,
            },
        );
    }

    /// EC2's throttling as EC2 does it, per account and region: request buckets (describes 100 tokens
    /// refilled at 20/s; StartInstances and StopInstances share 50 at 5/s) and resource buckets (a token
    /// per instance: StartInstances 1,000 at 2/s, StopInstances 1,000 at 20/s). A call refused by its
    /// resource bucket has taken its request token. Refusals are `RequestLimitExceeded` (HTTP 503).
    pub fn throttle_like_ec2(&self) {
        self.throttle_like_ec2_with(Ec2Limits::DEFAULT);
    }

    /// As [`Self::throttle_like_ec2`], with these buckets in every account (limits AWS raised, or a
    /// smaller budget).
    pub fn throttle_like_ec2_with(&self, limits: Ec2Limits) {
        self.world().ec2_like = Some(limits);
    }

    /// With EC2's throttling, the buckets of `account` (its 12 digits) are these, in each of its
    /// regions: limits AWS raised for that account only.
    pub fn raise_ec2_limits(&self, account: &str, limits: Ec2Limits) {
        self.world().ec2_raised.insert(account.to_string(), limits);
    }

    /// RequestLimitExceeded answers from the buckets so far.
    pub fn throttled_answers(&self) -> usize {
        self.world().throttled
    }

    /// Every call takes this long (so that calls overlap and the number in flight means something).
    pub fn set_call_latency(&self, d: Duration) {
        self.world().latency = d;
    }

    /// The most calls ever in flight at once (EC2 and STS), in all.
    pub fn max_in_flight(&self) -> usize {
        self.world().max_in_flight
    }

    /// The most calls ever in flight at once on behalf of `account` (its 12 digits; the delegate's for
    /// STS).
    pub fn max_in_flight_for(&self, account: &str) -> usize {
        self.world()
            .max_in_flight_by_account
            .get(account)
            .copied()
            .unwrap_or(0)
    }

    /// STS's clock runs this far ahead of the caller's (negative: behind).
    pub fn set_sts_clock_ahead(&self, by: chrono::Duration) {
        self.world().sts_ahead = by;
    }

    /// IMDS unreachable: the delegate has no base credentials.
    pub fn set_imds_down(&self, down: bool) {
        self.world().imds_down = down;
    }

    /// The next `times` calls of `operation` meet `fault`.
    pub fn fault(&self, operation: &'static str, times: usize, fault: Fault) {
        let mut w = self.world();
        let q = w.faults.entry(operation).or_default();
        q.extend(std::iter::repeat_n(fault, times));
    }

    /// An error with a code, as EC2 or STS would send it.
    pub fn error(operation: &str, code: &str, message: &str) -> Fault {
        Fault::Error(AwsError {
            operation: operation.to_string(),
            code: Some(code.to_string()),
            message: message.to_string(),
            request_id: Some("fake-request".into()),
            http_status: Some(400),
        })
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.world().calls.clone()
    }

    /// Calls of one operation (dry runs excluded).
    pub fn calls_of(&self, operation: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.operation == operation && !c.dry_run)
            .collect()
    }

    /// Records the call, waits the call latency (counted in flight), then applies its scripted fault,
    /// if any.
    async fn enter(
        &self,
        operation: &'static str,
        account: &str,
        region: &str,
        ids: &[String],
        (dry_run, hibernate): (bool, bool),
    ) -> Result<(), AwsError> {
        let latency = {
            let mut w = self.world();
            w.in_flight += 1;
            w.max_in_flight = w.max_in_flight.max(w.in_flight);
            let n = {
                let n = w
                    .in_flight_by_account
                    .entry(account.to_string())
                    .or_default();
                *n += 1;
                *n
            };
            let max = w
                .max_in_flight_by_account
                .entry(account.to_string())
                .or_default();
            *max = (*max).max(n);
            w.latency
        };
        struct Leave<'a>(&'a FakeAws, &'a str);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                let mut w = self.0.world();
                w.in_flight -= 1;
                if let Some(n) = w.in_flight_by_account.get_mut(self.1) {
                    *n -= 1;
                }
            }
        }
        let leave = Leave(self, account);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        drop(leave);
        let fault = {
            let mut w = self.world();
            w.calls.push(Call {
                operation,
                account: account.to_string(),
                region: region.to_string(),
                ids: ids.to_vec(),
                dry_run,
                hibernate,
                at: self.clock.now(),
            });
            w.faults.get_mut(operation).and_then(VecDeque::pop_front)
        };
        match fault {
            None => Ok(()),
            Some(Fault::Error(e)) => Err(e),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Hang) => std::future::pending().await,
        }
    }
}

impl World {
    fn advance(&mut self, now: DateTime<Utc>) {
        for i in self.instances.values_mut() {
            if let Some((until, next, reason)) = &i.transition
                && *until <= now
            {
                i.state = next.clone();
                i.state_reason = reason.clone();
                i.transition = None;
            }
            if i.stale.as_ref().is_some_and(|(until, _, _)| *until <= now) {
                i.stale = None;
            }
        }
    }

    fn take_tokens(
        &mut self,
        account: &str,
        region: &str,
        operation: &'static str,
        instances: usize,
        now: DateTime<Utc>,
    ) -> Result<(), AwsError> {
        if let Some(default) = self.ec2_like {
            let limits = self.ec2_raised.get(account).copied().unwrap_or(default);
            let buckets: &[&'static str] = match operation {
                DESCRIBE => &["describe"],
                START => &["mutate", "start-resource"],
                STOP => &["mutate", "stop-resource"],
                _ => &[],
            };
            for &name in buckets {
                let (_, rate) = ec2_buckets(&limits)
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .expect("known bucket");
                let b = Bucket {
                    capacity: rate.capacity,
                    refill_per_second: rate.per_second,
                    per_instance: name.ends_with("-resource"),
                };
                self.take_from(account, region, (name, operation), b, instances, now)?;
            }
        }
        let Some(b) = self.buckets.get(operation).copied() else {
            return Ok(());
        };
        self.take_from(account, region, (operation, operation), b, instances, now)
    }

    /// Takes the tokens of the bucket `key` for a call of `operation`, or answers RequestLimitExceeded.
    fn take_from(
        &mut self,
        account: &str,
        region: &str,
        (key, operation): (&'static str, &'static str),
        b: Bucket,
        instances: usize,
        now: DateTime<Utc>,
    ) -> Result<(), AwsError> {
        let cost = if b.per_instance {
            instances as f64
        } else {
            1.0
        };
        let (tokens, last) = self
            .levels
            .entry((account.to_string(), region.to_string(), key))
            .or_insert((b.capacity, now));
        let elapsed = (now - *last).to_std().unwrap_or_default().as_secs_f64();
        *tokens = (*tokens + elapsed * b.refill_per_second).min(b.capacity);
        *last = now;
        if *tokens < cost {
            self.throttled += 1;
            return Err(AwsError {
                operation: operation.to_string(),
                code: Some("RequestLimitExceeded".into()),
                message: "Request limit exceeded.".into(),
                request_id: Some("fake-request".into()),
                http_status: Some(503),
            });
        }
        *tokens -= cost;
        Ok(())
    }

    fn view(&self, i: &Instance) -> InstanceView {
        match &i.stale {
            Some((_, state, reason)) => InstanceView {
                id: i.id.clone(),
                state: state.clone(),
                state_reason: reason.clone(),
                tags: i.tags.clone(),
                hibernation_configured: i.hibernation_configured,
            },
            None => InstanceView {
                id: i.id.clone(),
                state: i.state.clone(),
                state_reason: i.state_reason.clone(),
                tags: i.tags.clone(),
                hibernation_configured: i.hibernation_configured,
            },
        }
    }
}

#[async_trait]
impl Aws for FakeAws {
    fn source(&self) -> &CredentialSource {
        &CredentialSource::Imds
    }

    async fn sts(&self, region: &str) -> Arc<dyn Sts> {
        Arc::new(FakeSts {
            aws: self.clone(),
            region: region.to_string(),
        })
    }

    async fn ec2(&self, region: &str, credentials: Arc<dyn SigningCredentials>) -> Arc<dyn Ec2> {
        Arc::new(FakeEc2 {
            aws: self.clone(),
            region: region.to_string(),
            credentials,
        })
    }

    async fn delegate_name(&self) -> String {
        "i-0de1e6a7e0000cafe".into()
    }

    async fn check_base_credentials(&self) -> Result<(), String> {
        if self.world().imds_down {
            Err("IMDS is not reachable".into())
        } else {
            Ok(())
        }
    }

    async fn instance_profile_role(&self) -> Result<Option<String>, String> {
        self.check_base_credentials().await?;
        Ok(Some("shiftd-delegate".into()))
    }

    async fn sns(&self, region: &str) -> Arc<dyn Sns> {
        Arc::new(FakeSns {
            aws: self.clone(),
            region: region.to_string(),
        })
    }

    async fn claim_table(
        &self,
        _table: &str,
        _region: &str,
    ) -> Arc<dyn crate::cluster::ClaimTable> {
        Arc::new(self.claims.clone())
    }

    async fn organizations(
        &self,
        region: &str,
        credentials: Arc<dyn SigningCredentials>,
    ) -> Arc<dyn Organizations> {
        Arc::new(FakeOrganizations {
            aws: self.clone(),
            region: region.to_string(),
            credentials,
        })
    }
}

struct FakeOrganizations {
    aws: FakeAws,
    region: String,
    credentials: Arc<dyn SigningCredentials>,
}

impl FakeOrganizations {
    /// Records the call (under the org-reader's account), applies its fault, and checks there are
    /// credentials to sign with and an organization to read.
    async fn enter(&self, operation: &'static str) -> Result<(), AwsError> {
        let account = self
            .credentials
            .usable_now()
            .map(|c| c.access_key_id.get(4..16).unwrap_or_default().to_string())
            .ok_or_else(|| {
                AwsError::new(
                    operation,
                    None,
                    "request could not be built: no unexpired assumed-role credentials for the \
                     organization",
                )
            })?;
        self.aws
            .enter(operation, &account, &self.region, &[], (false, false))
            .await?;
        if self.aws.world().org.root.is_none() {
            return Err(AwsError::new(
                operation,
                Some("AWSOrganizationsNotInUseException"),
                "your account is not a member of an organization",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Organizations for FakeOrganizations {
    async fn list_roots(&self) -> Result<Vec<OrgUnit>, AwsError> {
        self.enter(LIST_ROOTS).await?;
        let w = self.aws.world();
        Ok(w.org
            .root
            .iter()
            .map(|r| OrgUnit {
                id: r.clone(),
                name: "Root".into(),
            })
            .collect())
    }

    async fn list_accounts_for_parent(
        &self,
        parent: &str,
    ) -> Result<Vec<OrgAccountEntry>, AwsError> {
        self.enter(LIST_ACCOUNTS_FOR_PARENT).await?;
        let w = self.aws.world();
        Ok(w.org
            .accounts
            .iter()
            .filter(|(_, (p, _, _))| p == parent)
            .map(|(id, (_, name, status))| OrgAccountEntry {
                id: id.clone(),
                name: name.clone(),
                status: status.clone(),
            })
            .collect())
    }

    async fn list_ous_for_parent(&self, parent: &str) -> Result<Vec<OrgUnit>, AwsError> {
        self.enter(LIST_OUS_FOR_PARENT).await?;
        let w = self.aws.world();
        Ok(w.org
            .ous
            .iter()
            .filter(|(_, (p, _))| p == parent)
            .map(|(id, (_, name))| OrgUnit {
                id: id.clone(),
                name: name.clone(),
            })
            .collect())
    }
}

struct FakeSts {
    aws: FakeAws,
    region: String,
}

#[async_trait]
impl Sts for FakeSts {
    async fn assume_role(&self, spec: &AssumeRoleRequest) -> Result<SessionCredentials, AwsError> {
        let delegate = self.aws.world().delegate_account.clone();
        self.aws
            .enter(ASSUME_ROLE, &delegate, &self.region, &[], (false, false))
            .await?;
        let denied = |why: &str| {
            Err(AwsError {
                operation: ASSUME_ROLE.into(),
                code: Some("AccessDenied".into()),
                message: format!(
                    "not authorized to perform sts:AssumeRole on {}: {why}",
                    spec.role_arn
                ),
                request_id: Some("fake-request".into()),
                http_status: Some(403),
            })
        };
        if self.aws.world().imds_down {
            return Err(AwsError::new(
                ASSUME_ROLE,
                None,
                "request could not be built: no base credentials (IMDS is not reachable)",
            ));
        }
        let Some(account) = role_account(&spec.role_arn) else {
            return denied("not a role ARN");
        };
        let now = self.aws.clock.now();
        let mut w = self.aws.world();
        if !w.roles.is_empty() {
            match w.roles.get(&spec.role_arn) {
                None => return denied("the role does not trust the delegate"),
                Some(want) if *want != spec.external_id => return denied("external ID mismatch"),
                Some(_) => {}
            }
        }
        w.sessions_issued += 1;
        let n = w.sessions_issued;
        let sts_now = now + w.sts_ahead;
        Ok(SessionCredentials {
            access_key_id: format!("ASIA{account}X{n:06}"),
            secret_access_key: Secret::new(format!("{SECRET_MARK}-key-{n}")),
            session_token: Secret::new(format!("{SECRET_MARK}-token-{n}")),
            expiry: (sts_now + chrono_duration(spec.duration)).into(),
        })
    }

    async fn caller_identity(&self) -> Result<(String, String), AwsError> {
        let delegate = self.aws.world().delegate_account.clone();
        Ok((
            delegate.clone(),
            format!("arn:aws:sts::{delegate}:assumed-role/shiftd-delegate/i-0de1e6a7e0000cafe"),
        ))
    }
}

struct FakeEc2 {
    aws: FakeAws,
    region: String,
    credentials: Arc<dyn SigningCredentials>,
}

impl FakeEc2 {
    /// The account the current credentials belong to, as EC2 would tell from the signature.
    fn account(&self, operation: &str) -> Result<String, AwsError> {
        let creds = self.credentials.usable_now().ok_or_else(|| {
            AwsError::new(
                operation,
                None,
                format!(
                    "request could not be built: no unexpired assumed-role credentials for account {}",
                    self.credentials.account()
                ),
            )
        })?;
        // Expired by STS's clock: what a real endpoint would say.
        let w = self.aws.world();
        let sts_now = self.aws.clock.now() + w.sts_ahead;
        if DateTime::<Utc>::from(creds.expiry) <= sts_now {
            return Err(AwsError {
                operation: operation.to_string(),
                code: Some("RequestExpired".into()),
                message: "the security token included in the request is expired".into(),
                request_id: Some("fake-request".into()),
                http_status: Some(400),
            });
        }
        Ok(creds.access_key_id[4..16].to_string())
    }

    async fn describe(
        &self,
        select: impl Fn(&Instance) -> bool + Send,
        ids: &[String],
    ) -> Result<Vec<InstanceView>, AwsError> {
        let account = self.account(DESCRIBE)?;
        self.aws
            .enter(DESCRIBE, &account, &self.region, ids, (false, false))
            .await?;
        let now = self.aws.clock.now();
        let mut w = self.aws.world();
        w.take_tokens(&account, &self.region, DESCRIBE, 1, now)?;
        w.advance(now);
        Ok(w.instances
            .values()
            .filter(|i| i.account == account && i.region == self.region && select(i))
            .map(|i| w.view(i))
            .collect())
    }
}

#[async_trait]
impl Ec2 for FakeEc2 {
    async fn describe_selection(
        &self,
        selection: &Selection,
    ) -> Result<Vec<InstanceView>, AwsError> {
        let listed: Vec<String> = selection.instance_ids.clone();
        self.describe(|i| selection.matches(&i.id, &i.tags), &listed)
            .await
    }

    async fn describe_ids(&self, ids: &[String]) -> Result<Vec<InstanceView>, AwsError> {
        let set: BTreeSet<&String> = ids.iter().collect();
        self.describe(|i| set.contains(&i.id), ids).await
    }

    async fn change_state(
        &self,
        action: Action,
        ids: &[String],
        dry_run: bool,
        hibernate: bool,
    ) -> Result<(), AwsError> {
        let op = match action {
            Action::Start => START,
            Action::Stop => STOP,
        };
        let account = self.account(op)?;
        self.aws
            .enter(op, &account, &self.region, ids, (dry_run, hibernate))
            .await?;
        let now = self.aws.clock.now();
        let mut w = self.aws.world();
        let fail = |code: &str, message: String| {
            Err(AwsError {
                operation: op.to_string(),
                code: Some(code.to_string()),
                message,
                request_id: Some("fake-request".into()),
                http_status: Some(400),
            })
        };
        if w.denied.contains(&(account.clone(), op)) {
            return fail(
                "UnauthorizedOperation",
                format!("You are not authorized to perform this operation ({op})."),
            );
        }
        if dry_run {
            return Ok(());
        }
        w.take_tokens(&account, &self.region, op, ids.len(), now)?;
        w.advance(now);
        // EC2 checks the whole call before changing anything.
        for id in ids {
            let Some(i) = w
                .instances
                .get(id)
                .filter(|i| i.account == account && i.region == self.region)
            else {
                return fail(
                    "InvalidInstanceID.NotFound",
                    format!("The instance ID '{id}' does not exist"),
                );
            };
            let bad_state = match action {
                Action::Start => matches!(
                    i.state.as_str(),
                    "stopping" | "shutting-down" | "terminated"
                ),
                Action::Stop => {
                    matches!(i.state.as_str(), "pending" | "shutting-down" | "terminated")
                }
            };
            if bad_state {
                return fail(
                    "IncorrectInstanceState",
                    format!(
                        "The instance '{id}' is not in a state from which it can be {}ed.",
                        if action == Action::Start {
                            "start"
                        } else {
                            "stopp"
                        }
                    ),
                );
            }
            if hibernate && !i.hibernation_configured {
                return fail(
                    "UnsupportedHibernationConfiguration",
                    format!(
                        "The instance '{id}' does not have hibernation configured. Only instances \
                         configured for hibernation can be hibernated."
                    ),
                );
            }
            if action == Action::Start && i.no_capacity && i.state == "stopped" {
                return fail(
                    "InsufficientInstanceCapacity",
                    "We currently do not have sufficient capacity in the Availability Zone you requested."
                        .into(),
                );
            }
        }
        let (start_takes, stop_takes, stale_for) = (w.start_takes, w.stop_takes, w.stale_for);
        for id in ids {
            let i = w.instances.get_mut(id).expect("checked");
            let before = (i.state.clone(), i.state_reason.clone());
            match (action, i.state.as_str()) {
                (Action::Start, "stopped") => {
                    i.state = "pending".into();
                    i.state_reason = None;
                    i.transition = Some(match &i.start_falls_back {
                        Some(reason) => (
                            now + chrono_duration(start_takes),
                            "stopped".into(),
                            Some(reason.clone()),
                        ),
                        None => (now + chrono_duration(start_takes), "running".into(), None),
                    });
                }
                (Action::Stop, "running") => {
                    i.state = "stopping".into();
                    i.transition = Some((
                        now + chrono_duration(stop_takes),
                        "stopped".into(),
                        Some("Client.UserInitiatedShutdown: User initiated shutdown".into()),
                    ));
                }
                _ => continue,
            }
            if !stale_for.is_zero() {
                i.stale = Some((now + chrono_duration(stale_for), before.0, before.1));
            }
        }
        Ok(())
    }

    async fn count_instance_status(&self) -> Result<usize, AwsError> {
        let account = self.account("ec2:DescribeInstanceStatus")?;
        let w = self.aws.world();
        Ok(w.instances
            .values()
            .filter(|i| i.account == account && i.region == self.region)
            .count())
    }
}

// ---------------------------------------------------------------------------------------------------------
// SNS, for alerts
// ---------------------------------------------------------------------------------------------------------

/// One message the fake SNS accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub topic_arn: String,
    pub region: String,
    pub subject: String,
    pub message: String,
    pub at: DateTime<Utc>,
}

impl FakeAws {
    /// Every message published to SNS so far, in order.
    pub fn published(&self) -> Vec<Published> {
        self.world().published.clone()
    }
}

struct FakeSns {
    aws: FakeAws,
    region: String,
}

#[async_trait]
impl Sns for FakeSns {
    async fn publish(
        &self,
        topic_arn: &str,
        subject: &str,
        message: &str,
    ) -> Result<String, AwsError> {
        let delegate = self.aws.world().delegate_account.clone();
        self.aws
            .enter(
                PUBLISH,
                &delegate,
                &self.region,
                &[topic_arn.to_string()],
                (false, false),
            )
            .await?;
        if self.aws.world().imds_down {
            return Err(AwsError::new(
                PUBLISH,
                None,
                "request could not be built: no base credentials (IMDS is not reachable)",
            ));
        }
        let now = self.aws.clock.now();
        let mut w = self.aws.world();
        w.published.push(Published {
            topic_arn: topic_arn.to_string(),
            region: self.region.clone(),
            subject: subject.to_string(),
            message: message.to_string(),
            at: now,
        });
        Ok(format!("fake-message-{}", w.published.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SimulatedClock;
    use crate::credentials::AccountCredentials;

    fn world() -> (FakeAws, AccountCredentials) {
        let clock: Arc<dyn Clock> = Arc::new(SimulatedClock::starting_at(
            DateTime::parse_from_rfc3339("2026-12-01T08:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
        ));
        let aws = FakeAws::new(clock.clone());
        let creds = AccountCredentials::new("a1", clock.clone());
        (aws, creds)
    }

    async fn session(aws: &FakeAws, creds: &AccountCredentials) {
        let spec = AssumeRoleRequest {
            role_arn: "arn:aws:iam::111111111111:role/r".into(),
            external_id: None,
            session_name: "shiftd-test".into(),
            duration: Duration::from_secs(3600),
        };
        let c = aws.sts("r").await.assume_role(&spec).await.unwrap();
        let expiry = c.expiry;
        creds.publish(c, expiry);
    }

    #[tokio::test(start_paused = true)]
    async fn token_buckets_refuse_when_empty_and_refill_over_time() {
        let (aws, creds) = world();
        session(&aws, &creds).await;
        let ids = aws.add_instances("111111111111", "r", 3, "stopped", &[]);
        // A resource bucket: 2 instances, refilled at 1 per second.
        aws.set_bucket(START, 2.0, 1.0, true);
        let ec2 = aws.ec2("r", Arc::new(creds.clone())).await;
        ec2.change_state(Action::Start, &ids[..2], false, false)
            .await
            .unwrap();
        let e = ec2
            .change_state(Action::Start, &ids[2..], false, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("RequestLimitExceeded"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        ec2.change_state(Action::Start, &ids[2..], false, false)
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_take_their_time_and_wrong_states_are_refused() {
        let (aws, creds) = world();
        session(&aws, &creds).await;
        let ids = aws.add_instances("111111111111", "r", 1, "stopped", &[]);
        let ec2 = aws.ec2("r", Arc::new(creds.clone())).await;
        ec2.change_state(Action::Start, &ids, false, false)
            .await
            .unwrap();
        assert_eq!(aws.states(&ids), ["pending"]);
        let e = ec2
            .change_state(Action::Stop, &ids, false, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("IncorrectInstanceState"));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(aws.states(&ids), ["running"]);
        assert_eq!(
            aws.calls_of(START).len(),
            1,
            "the refused stop is logged as a stop, not a start"
        );
    }
}
