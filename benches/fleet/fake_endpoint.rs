//! A fast fake AWS endpoint for the fleet benchmark: STS, EC2 and IMDSv2 on one loopback port.
//!
//! It speaks the wire format the AWS SDK speaks (AWS Query protocol: form-encoded POST bodies, XML
//! answers with EC2's and STS's namespaces, request IDs and error documents), for what shiftd calls:
//!
//! - STS `AssumeRole`, `GetCallerIdentity`: errors as `<ErrorResponse><Error>…`;
//! - EC2 `DescribeInstances` (filters `instance-id`, `instance-state-name`, `tag:KEY`, `tag-key`, with
//!   the `*`/`?` wildcards and `\` escapes; `MaxResults`/`NextToken` pages), `StartInstances`,
//!   `StopInstances` (`InstanceId.N`, `DryRun`, `Hibernate`), `DescribeInstanceStatus`: errors as
//!   `<Response><Errors><Error>…`, `RequestLimitExceeded` with HTTP 503 as EC2 answers it;
//! - IMDSv2 (`PUT /latest/api/token`, the instance ID, the instance profile's credentials), so the
//!   daemon runs with its default credential source and no other process.
//!
//! Signatures are not checked. Every access key the fake issues is `ASIAFAKE` followed by the
//! 12-digit account it belongs to (the delegate's from IMDS, a target's from AssumeRole), so each EC2
//! request maps to its account through the `Credential=` of its `Authorization` header, and to its
//! region through the same credential scope. A key the fake did not issue is refused (`AuthFailure`).
//!
//! Instances live per account and region; `pending`/`stopping` last a set time. EC2's throttling is
//! enforced per account and region with token buckets: a request bucket per API class (non-mutating
//! describes, mutating Start/Stop) and a resource bucket per instance for StartInstances and
//! StopInstances (see [`Limits::ec2_documented`]). Every call is recorded with its arrival time
//! (monotonic and wall), account, region, instance IDs and answer.
//!
//! HTTP/1.1 is written by hand on tokio's TCP (keep-alive, `Content-Length` and chunked bodies):
//! enough for the SDK's client, and no HTTP server crate to build for the benchmarks.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The delegate's own account: the instance profile's credentials belong to it.
pub const DELEGATE_ACCOUNT: &str = "123456789012";
/// The delegate instance's ID, as IMDS reports it.
pub const DELEGATE_INSTANCE_ID: &str = "i-0de1e6a7e0000cafe";
/// The instance profile's role name, as IMDS reports it.
pub const DELEGATE_ROLE: &str = "shiftd-delegate";
/// Every access key the fake issues: this, then the account's 12 digits.
const KEY_PREFIX: &str = "ASIAFAKE";
const EC2_NS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";
const STS_NS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";

pub const ASSUME_ROLE: &str = "AssumeRole";
pub const CALLER_IDENTITY: &str = "GetCallerIdentity";
pub const DESCRIBE: &str = "DescribeInstances";
pub const START: &str = "StartInstances";
pub const STOP: &str = "StopInstances";
pub const STATUS: &str = "DescribeInstanceStatus";
/// IMDS requests (token, instance ID, credentials), recorded under this action.
pub const IMDS: &str = "IMDS";

/// One token bucket: `capacity` tokens, refilled at `refill_per_second`.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    pub capacity: f64,
    pub refill_per_second: f64,
}

/// EC2's token buckets, each per account and region.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request bucket of non-mutating actions (DescribeInstances, DescribeInstanceStatus).
    pub describe: Bucket,
    /// Request bucket of mutating actions (StartInstances, StopInstances).
    pub mutate: Bucket,
    /// Resource bucket of StartInstances: one token per instance in the call.
    pub start_instances: Bucket,
    /// Resource bucket of StopInstances: one token per instance in the call.
    pub stop_instances: Bucket,
}

impl Limits {
    /// The default bucket sizes and refill rates of EC2's API throttling documentation, as shiftd's
    /// model has them (`shiftd::pacing::Ec2Limits::DEFAULT`, the one place they are written):
    /// non-mutating actions 100 tokens refilled at 20/s, mutating actions 50 at 5/s; resource buckets
    /// StartInstances 1,000 at 2/s, StopInstances 1,000 at 20/s.
    pub fn ec2_documented() -> Self {
        let d = shiftd::pacing::Ec2Limits::DEFAULT;
        Limits {
            describe: d.describe.into(),
            mutate: d.mutate.into(),
            start_instances: d.start_instances.into(),
            stop_instances: d.stop_instances.into(),
        }
    }
}

impl From<shiftd::pacing::Rate> for Bucket {
    fn from(r: shiftd::pacing::Rate) -> Self {
        Bucket {
            capacity: r.capacity,
            refill_per_second: r.per_second,
        }
    }
}

/// How the fake behaves.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How long `pending` lasts.
    pub start_takes: Duration,
    /// How long `stopping` lasts.
    pub stop_takes: Duration,
    /// EC2's throttling; `None`: never throttled.
    pub limits: Option<Limits>,
    /// Lifetime of the sessions AssumeRole issues (capped by the DurationSeconds asked for).
    pub session: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            start_takes: Duration::from_secs(2),
            stop_takes: Duration::from_secs(2),
            limits: Some(Limits::ec2_documented()),
            session: Duration::from_secs(3600),
        }
    }
}

/// One request as the fake answered it.
#[derive(Clone, Debug)]
pub struct Call {
    pub action: &'static str,
    /// The account acted in (for AssumeRole: the role's account). Empty when unknown.
    pub account: String,
    pub region: String,
    pub ids: Vec<String>,
    /// Arrival, monotonic.
    pub at: Instant,
    /// Arrival, wall clock.
    pub wall: SystemTime,
    pub http_status: u16,
    /// The error code answered, if any.
    pub error: Option<&'static str>,
}

impl Call {
    pub fn throttled(&self) -> bool {
        self.error == Some("RequestLimitExceeded")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Stopping,
    Stopped,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }

    fn code(self) -> u16 {
        match self {
            State::Pending => 0,
            State::Running => 16,
            State::Stopping => 64,
            State::Stopped => 80,
        }
    }

    fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "running" => State::Running,
            "stopping" => State::Stopping,
            "stopped" => State::Stopped,
            _ => return None,
        })
    }
}

struct Instance {
    id: String,
    tags: Vec<(String, String)>,
    state: State,
    /// When the current state was entered (ends `pending`/`stopping`).
    since: Instant,
}

impl Instance {
    /// The state at `now`, with transitions that have run their time completed.
    fn settle(&mut self, now: Instant, s: &Settings) -> State {
        let (next, takes) = match self.state {
            State::Pending => (State::Running, s.start_takes),
            State::Stopping => (State::Stopped, s.stop_takes),
            other => return other,
        };
        if now.duration_since(self.since) >= takes {
            self.state = next;
            self.since += takes;
        }
        self.state
    }
}

#[derive(Default)]
struct Place {
    /// In ID order (IDs are issued in increasing order).
    instances: Vec<Instance>,
    index: HashMap<String, usize>,
    /// Bucket name -> (tokens, last refill).
    levels: HashMap<&'static str, (f64, Instant)>,
}

impl Place {
    /// Takes `cost` tokens from `bucket`, or refuses (taking none).
    fn take(&mut self, name: &'static str, b: Bucket, cost: f64, now: Instant) -> bool {
        let (tokens, last) = self.levels.entry(name).or_insert((b.capacity, now));
        let elapsed = now.duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * b.refill_per_second).min(b.capacity);
        *last = now;
        if *tokens < cost {
            return false;
        }
        *tokens -= cost;
        true
    }
}

struct World {
    settings: Settings,
    places: HashMap<(String, String), Place>,
    calls: Vec<Call>,
    next_instance: u64,
    next_request: u64,
}

/// The fake endpoint. Cloning shares it; it serves until the runtime it was started on ends.
#[derive(Clone)]
pub struct FakeEndpoint {
    world: Arc<Mutex<World>>,
    addr: SocketAddr,
}

impl FakeEndpoint {
    /// Listens on a free loopback port and serves from the current tokio runtime.
    pub async fn start(settings: Settings) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let me = FakeEndpoint {
            world: Arc::new(Mutex::new(World {
                settings,
                places: HashMap::new(),
                calls: Vec::new(),
                next_instance: 1,
                next_request: 1,
            })),
            addr: listener.local_addr()?,
        };
        let server = me.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(server.clone().serve(stream));
            }
        });
        Ok(me)
    }

    /// `http://127.0.0.1:PORT`: for AWS_ENDPOINT_URL and AWS_EC2_METADATA_SERVICE_ENDPOINT alike.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().expect("fake endpoint lock")
    }

    /// Adds `count` instances in `state` ("running", "stopped", …) with `tags`; returns their IDs.
    pub fn add_instances(
        &self,
        account: &str,
        region: &str,
        count: usize,
        state: &str,
        tags: &[(String, String)],
    ) -> Vec<String> {
        let state = State::parse(state).expect("a known instance state");
        let now = Instant::now();
        let mut w = self.world();
        let first = w.next_instance;
        w.next_instance += count as u64;
        let place = w
            .places
            .entry((account.to_string(), region.to_string()))
            .or_default();
        (first..first + count as u64)
            .map(|n| {
                let id = format!("i-{n:017x}");
                place.index.insert(id.clone(), place.instances.len());
                place.instances.push(Instance {
                    id: id.clone(),
                    tags: tags.to_vec(),
                    state,
                    since: now,
                });
                id
            })
            .collect()
    }

    /// How many instances of `account` in `region` are in each state now.
    pub fn state_counts(&self, account: &str, region: &str) -> HashMap<&'static str, usize> {
        let now = Instant::now();
        let mut w = self.world();
        let settings = w.settings;
        let mut counts = HashMap::new();
        if let Some(place) = w.places.get_mut(&(account.to_string(), region.to_string())) {
            for i in &mut place.instances {
                *counts.entry(i.settle(now, &settings).name()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Runs `f` on the calls recorded so far.
    pub fn with_calls<R>(&self, f: impl FnOnce(&[Call]) -> R) -> R {
        f(&self.world().calls)
    }

    /// Forgets the calls recorded so far.
    pub fn clear_calls(&self) {
        self.world().calls.clear();
    }

    async fn serve(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut out = Vec::new();
        loop {
            // Arrival: when the request's first bytes are there to read, before they are parsed (a
            // body of a few KiB comes in one read).
            match read.fill_buf().await {
                Ok([]) | Err(_) => return,
                Ok(_) => {}
            }
            let arrived = (Instant::now(), SystemTime::now());
            let Ok(Some(request)) = read_request(&mut read).await else {
                return;
            };
            let response = self.handle(&request, arrived);
            out.clear();
            let _ = write!(
                Bytes(&mut out),
                "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
                response.status,
                reason(response.status),
                response.content_type,
                response.body.len()
            );
            for (k, v) in &response.headers {
                let _ = write!(Bytes(&mut out), "{k}: {v}\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(response.body.as_bytes());
            if write.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    fn handle(&self, r: &Request, arrived: (Instant, SystemTime)) -> Response {
        if r.path.starts_with("/latest/") {
            return self.imds(r, arrived);
        }
        let form = parse_form(&r.body);
        let action = form.get("Action").map_or("", String::as_str);
        let (key, region) = credential_scope(r.header("authorization").unwrap_or(""));
        let caller = key.and_then(account_of_key);
        let mut w = self.world();
        let request_id = w.request_id();
        let mut call = Call {
            action: IMDS,
            account: caller.clone().unwrap_or_default(),
            region: region.clone(),
            ids: Vec::new(),
            at: arrived.0,
            wall: arrived.1,
            http_status: 200,
            error: None,
        };
        let response = match (action, caller) {
            (ASSUME_ROLE | CALLER_IDENTITY, None) | ("", _) => {
                call.action = match action {
                    ASSUME_ROLE => ASSUME_ROLE,
                    CALLER_IDENTITY => CALLER_IDENTITY,
                    _ => "(unknown)",
                };
                sts_error(
                    403,
                    "InvalidClientTokenId",
                    "The security token included in the request is invalid.",
                    &request_id,
                )
            }
            (ASSUME_ROLE, Some(_)) => {
                call.action = ASSUME_ROLE;
                w.assume_role(&form, &mut call, &request_id)
            }
            (CALLER_IDENTITY, Some(account)) => {
                call.action = CALLER_IDENTITY;
                ok(
                    "text/xml",
                    format!(
                        "<GetCallerIdentityResponse xmlns=\"{STS_NS}\"><GetCallerIdentityResult>\
                         <Arn>arn:aws:sts::{account}:assumed-role/{DELEGATE_ROLE}/{DELEGATE_INSTANCE_ID}</Arn>\
                         <UserId>AROAFAKE{account}:{DELEGATE_INSTANCE_ID}</UserId><Account>{account}</Account>\
                         </GetCallerIdentityResult><ResponseMetadata><RequestId>{request_id}</RequestId>\
                         </ResponseMetadata></GetCallerIdentityResponse>"
                    ),
                )
            }
            (DESCRIBE | START | STOP | STATUS, None) => {
                call.action = match action {
                    DESCRIBE => DESCRIBE,
                    START => START,
                    STOP => STOP,
                    _ => STATUS,
                };
                ec2_error(
                    401,
                    "AuthFailure",
                    "AWS was not able to validate the provided access credentials",
                    &request_id,
                )
            }
            (DESCRIBE, Some(account)) => {
                call.action = DESCRIBE;
                w.describe(&account, &region, &form, &mut call, &request_id)
            }
            (START | STOP, Some(account)) => {
                call.action = if action == START { START } else { STOP };
                w.change(&account, &region, &form, &mut call, &request_id)
            }
            (STATUS, Some(account)) => {
                call.action = STATUS;
                w.status(&account, &region, &form, &mut call, &request_id)
            }
            (_, _) => {
                call.action = "(unknown)";
                ec2_error(
                    400,
                    "InvalidAction",
                    &format!("The action {action} is not valid for this web service."),
                    &request_id,
                )
            }
        };
        call.http_status = response.status;
        w.calls.push(call);
        response
    }

    fn imds(&self, r: &Request, arrived: (Instant, SystemTime)) -> Response {
        const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
        let response = if r.method == "PUT" && r.path == "/latest/api/token" {
            let ttl = r
                .header("x-aws-ec2-metadata-token-ttl-seconds")
                .unwrap_or("21600")
                .to_string();
            let mut response = ok("text/plain", "FAKEIMDSTOKEN".to_string());
            response
                .headers
                .push(("X-aws-ec2-metadata-token-ttl-seconds", ttl));
            response
        } else if r.method != "GET" {
            plain(405, "method not allowed")
        } else if r.header("x-aws-ec2-metadata-token").is_none() {
            plain(401, "unauthorized: IMDSv2 token required")
        } else if r.path == "/latest/meta-data/instance-id" {
            ok("text/plain", DELEGATE_INSTANCE_ID.to_string())
        } else if r.path == CREDENTIALS {
            ok("text/plain", DELEGATE_ROLE.to_string())
        } else if r.path.strip_prefix(CREDENTIALS) == Some(DELEGATE_ROLE) {
            let now = chrono::DateTime::<chrono::Utc>::from(arrived.1);
            let expiry = now + chrono::Duration::hours(6);
            let n = self.world().request_id();
            ok(
                "application/json",
                format!(
                    "{{\"Code\":\"Success\",\"LastUpdated\":\"{}\",\"Type\":\"AWS-HMAC\",\
                     \"AccessKeyId\":\"{KEY_PREFIX}{DELEGATE_ACCOUNT}\",\"SecretAccessKey\":\"FAKESECRET{n}\",\
                     \"Token\":\"FAKETOKEN{n}\",\"Expiration\":\"{}\"}}",
                    now.format("%Y-%m-%dT%H:%M:%SZ"),
                    expiry.format("%Y-%m-%dT%H:%M:%SZ")
                ),
            )
        } else {
            plain(404, "not found")
        };
        self.world().calls.push(Call {
            action: IMDS,
            account: DELEGATE_ACCOUNT.to_string(),
            region: String::new(),
            ids: Vec::new(),
            at: arrived.0,
            wall: arrived.1,
            http_status: response.status,
            error: None,
        });
        response
    }
}

impl World {
    fn request_id(&mut self) -> String {
        let n = self.next_request;
        self.next_request += 1;
        format!("{:08x}-fa6e-4e00-8000-{n:012x}", n >> 16)
    }

    fn assume_role(
        &mut self,
        form: &HashMap<String, String>,
        call: &mut Call,
        request_id: &str,
    ) -> Response {
        let arn = form.get("RoleArn").map_or("", String::as_str);
        let session = form.get("RoleSessionName").map_or("", String::as_str);
        let parts: Vec<&str> = arn.split(':').collect();
        let valid = parts.len() == 6
            && parts[2] == "iam"
            && parts[4].len() == 12
            && parts[4].bytes().all(|b| b.is_ascii_digit())
            && parts[5].starts_with("role/");
        if !valid || session.is_empty() {
            call.error = Some("ValidationError");
            return sts_error(
                400,
                "ValidationError",
                &format!("{arn} is invalid"),
                request_id,
            );
        }
        let account = parts[4];
        let role = &parts[5]["role/".len()..];
        call.account = account.to_string();
        let asked = form
            .get("DurationSeconds")
            .and_then(|d| d.parse().ok())
            .map_or(self.settings.session, Duration::from_secs);
        let expiry = chrono::DateTime::<chrono::Utc>::from(call.wall)
            + chrono::Duration::from_std(asked.min(self.settings.session)).unwrap_or_default();
        let n = self.next_request;
        ok(
            "text/xml",
            format!(
                "<AssumeRoleResponse xmlns=\"{STS_NS}\"><AssumeRoleResult>\
                 <AssumedRoleUser><AssumedRoleId>AROAFAKE{account}:{}</AssumedRoleId>\
                 <Arn>arn:aws:sts::{account}:assumed-role/{}/{}</Arn></AssumedRoleUser>\
                 <Credentials><AccessKeyId>{KEY_PREFIX}{account}</AccessKeyId>\
                 <SecretAccessKey>FAKESECRET{n}</SecretAccessKey><SessionToken>FAKETOKEN{n}</SessionToken>\
                 <Expiration>{}</Expiration></Credentials></AssumeRoleResult>\
                 <ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></AssumeRoleResponse>",
                xml(session),
                xml(role),
                xml(session),
                expiry.format("%Y-%m-%dT%H:%M:%SZ")
            ),
        )
    }

    /// Takes a token from the request bucket `name`, or answers RequestLimitExceeded.
    fn throttle(
        &mut self,
        place_key: &(String, String),
        name: &'static str,
        cost: f64,
        now: Instant,
    ) -> bool {
        let Some(limits) = self.settings.limits else {
            return true;
        };
        let bucket = match name {
            DESCRIBE | STATUS => limits.describe,
            START | STOP => limits.mutate,
            "start-resource" => limits.start_instances,
            _ => limits.stop_instances,
        };
        let key = match name {
            DESCRIBE | STATUS => "describe",
            START | STOP => "mutate",
            other => other,
        };
        self.places
            .entry(place_key.clone())
            .or_default()
            .take(key, bucket, cost, now)
    }

    fn describe(
        &mut self,
        account: &str,
        region: &str,
        form: &HashMap<String, String>,
        call: &mut Call,
        request_id: &str,
    ) -> Response {
        let filters = match parse_filters(form) {
            Ok(f) => f,
            Err(message) => {
                call.error = Some("InvalidParameterValue");
                return ec2_error(400, "InvalidParameterValue", &message, request_id);
            }
        };
        let max = match form.get("MaxResults").map(|m| m.parse::<usize>()) {
            None => usize::MAX,
            Some(Ok(m)) if (5..=1000).contains(&m) => m,
            Some(_) => {
                call.error = Some("InvalidParameterValue");
                return ec2_error(
                    400,
                    "InvalidParameterValue",
                    "Value for parameter maxResults is invalid. Expecting a value between 5 and 1000.",
                    request_id,
                );
            }
        };
        let Some(skip) = page_token(form) else {
            call.error = Some("InvalidParameterValue");
            return ec2_error(
                400,
                "InvalidParameterValue",
                "Unable to parse pagination token",
                request_id,
            );
        };
        let key = (account.to_string(), region.to_string());
        if !self.throttle(&key, DESCRIBE, 1.0, call.at) {
            return limit_exceeded(call, request_id);
        }
        let settings = self.settings;
        let mut page = Vec::new();
        let mut more = false;
        if let Some(place) = self.places.get_mut(&key) {
            let mut matched = 0;
            for i in &mut place.instances {
                let state = i.settle(call.at, &settings);
                if !filters.iter().all(|f| f.matches(i, state)) {
                    continue;
                }
                matched += 1;
                if matched <= skip {
                    continue;
                }
                if page.len() == max {
                    more = true;
                    break;
                }
                page.push((i.id.clone(), state, i.tags.clone()));
            }
        }
        call.ids = page.iter().map(|(id, _, _)| id.clone()).collect();
        let mut body = String::with_capacity(256 + page.len() * 1400);
        let _ = write!(
            body,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstancesResponse xmlns=\"{EC2_NS}\">\
             <requestId>{request_id}</requestId><reservationSet>"
        );
        for (id, state, tags) in &page {
            instance_xml(&mut body, account, region, id, *state, tags);
        }
        body.push_str("</reservationSet>");
        if more {
            let _ = write!(body, "<nextToken>page-{}</nextToken>", skip + page.len());
        }
        body.push_str("</DescribeInstancesResponse>");
        ok("text/xml;charset=UTF-8", body)
    }

    fn change(
        &mut self,
        account: &str,
        region: &str,
        form: &HashMap<String, String>,
        call: &mut Call,
        request_id: &str,
    ) -> Response {
        let start = call.action == START;
        let ids = numbered(form, "InstanceId.");
        call.ids = ids.clone();
        if ids.is_empty() {
            call.error = Some("MissingParameter");
            return ec2_error(
                400,
                "MissingParameter",
                "The request must contain the parameter InstanceId",
                request_id,
            );
        }
        let key = (account.to_string(), region.to_string());
        let settings = self.settings;
        // Validation first (unknown IDs, incompatible states), as EC2 does, then DryRun, then buckets.
        {
            let place = self.places.entry(key.clone()).or_default();
            let unknown: Vec<&str> = ids
                .iter()
                .filter(|id| !place.index.contains_key(*id))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                call.error = Some("InvalidInstanceID.NotFound");
                return ec2_error(
                    400,
                    "InvalidInstanceID.NotFound",
                    &format!("The instance IDs '{}' do not exist", unknown.join(", ")),
                    request_id,
                );
            }
            for id in &ids {
                let i = &mut place.instances[place.index[id]];
                let state = i.settle(call.at, &settings);
                let blocked = if start {
                    state == State::Stopping
                } else {
                    state == State::Pending
                };
                if blocked {
                    call.error = Some("IncorrectInstanceState");
                    return ec2_error(
                        400,
                        "IncorrectInstanceState",
                        &format!(
                            "The instance '{id}' is not in a state from which it can be {}.",
                            if start { "started" } else { "stopped" }
                        ),
                        request_id,
                    );
                }
            }
        }
        if form.get("DryRun").is_some_and(|d| d == "true") {
            call.error = Some("DryRunOperation");
            return ec2_error(
                412,
                "DryRunOperation",
                "Request would have succeeded, but DryRun flag is set.",
                request_id,
            );
        }
        if !self.throttle(&key, call.action, 1.0, call.at) {
            return limit_exceeded(call, request_id);
        }
        let resource = if start {
            "start-resource"
        } else {
            "stop-resource"
        };
        if !self.throttle(&key, resource, ids.len() as f64, call.at) {
            return limit_exceeded(call, request_id);
        }
        let place = self.places.get_mut(&key).expect("validated above");
        let name = if start {
            "StartInstancesResponse"
        } else {
            "StopInstancesResponse"
        };
        let mut body = String::with_capacity(256 + ids.len() * 200);
        let _ = write!(
            body,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{name} xmlns=\"{EC2_NS}\">\
             <requestId>{request_id}</requestId><instancesSet>"
        );
        for id in &ids {
            let i = &mut place.instances[place.index[id]];
            let previous = i.state;
            match (start, previous) {
                (true, State::Stopped) => {
                    i.state = State::Pending;
                    i.since = call.at;
                }
                (false, State::Running) => {
                    i.state = State::Stopping;
                    i.since = call.at;
                }
                _ => {}
            }
            let _ = write!(
                body,
                "<item><instanceId>{id}</instanceId><currentState><code>{}</code><name>{}</name>\
                 </currentState><previousState><code>{}</code><name>{}</name></previousState></item>",
                i.state.code(),
                i.state.name(),
                previous.code(),
                previous.name()
            );
        }
        let _ = write!(body, "</instancesSet></{name}>");
        ok("text/xml;charset=UTF-8", body)
    }

    fn status(
        &mut self,
        account: &str,
        region: &str,
        form: &HashMap<String, String>,
        call: &mut Call,
        request_id: &str,
    ) -> Response {
        let all = form.get("IncludeAllInstances").is_some_and(|v| v == "true");
        let max = form
            .get("MaxResults")
            .and_then(|m| m.parse::<usize>().ok())
            .unwrap_or(1000)
            .clamp(5, 1000);
        let Some(skip) = page_token(form) else {
            call.error = Some("InvalidParameterValue");
            return ec2_error(
                400,
                "InvalidParameterValue",
                "Unable to parse pagination token",
                request_id,
            );
        };
        let key = (account.to_string(), region.to_string());
        if !self.throttle(&key, STATUS, 1.0, call.at) {
            return limit_exceeded(call, request_id);
        }
        let settings = self.settings;
        let mut body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstanceStatusResponse xmlns=\"{EC2_NS}\">\
             <requestId>{request_id}</requestId><instanceStatusSet>"
        );
        let mut listed = 0;
        let mut more = false;
        if let Some(place) = self.places.get_mut(&key) {
            let mut matched = 0;
            for i in &mut place.instances {
                let state = i.settle(call.at, &settings);
                if !all && state != State::Running {
                    continue;
                }
                matched += 1;
                if matched <= skip {
                    continue;
                }
                if listed == max {
                    more = true;
                    break;
                }
                listed += 1;
                let check = if state == State::Running {
                    "ok"
                } else {
                    "not-applicable"
                };
                let _ = write!(
                    body,
                    "<item><instanceId>{}</instanceId><availabilityZone>{}a</availabilityZone>\
                     <instanceState><code>{}</code><name>{}</name></instanceState>\
                     <systemStatus><status>{check}</status></systemStatus>\
                     <instanceStatus><status>{check}</status></instanceStatus></item>",
                    i.id,
                    xml(region),
                    state.code(),
                    state.name()
                );
            }
        }
        body.push_str("</instanceStatusSet>");
        if more {
            let _ = write!(body, "<nextToken>page-{}</nextToken>", skip + listed);
        }
        body.push_str("</DescribeInstanceStatusResponse>");
        ok("text/xml;charset=UTF-8", body)
    }
}

/// One instance as DescribeInstances lists it: one reservation each, with the fields a real answer
/// carries most often (a real one is larger still: network interfaces, security groups, …).
fn instance_xml(
    out: &mut String,
    account: &str,
    region: &str,
    id: &str,
    state: State,
    tags: &[(String, String)],
) {
    let n = &id[2..];
    let _ = write!(
        out,
        "<item><reservationId>r-{n}</reservationId><ownerId>{account}</ownerId><groupSet/>\
         <instancesSet><item><instanceId>{id}</instanceId><imageId>ami-0abcdef1234567890</imageId>\
         <instanceState><code>{}</code><name>{}</name></instanceState>\
         <privateDnsName>ip-10-0-0-1.{region}.compute.internal</privateDnsName><dnsName/>\
         <reason>{}</reason><amiLaunchIndex>0</amiLaunchIndex><productCodes/>\
         <instanceType>t3.micro</instanceType><launchTime>2026-01-05T08:00:00.000Z</launchTime>\
         <placement><availabilityZone>{region}a</availabilityZone><groupName/><tenancy>default</tenancy></placement>\
         <monitoring><state>disabled</state></monitoring><subnetId>subnet-0123456789abcdef0</subnetId>\
         <vpcId>vpc-0123456789abcdef0</vpcId><privateIpAddress>10.0.0.1</privateIpAddress>\
         <sourceDestCheck>true</sourceDestCheck><architecture>x86_64</architecture>\
         <rootDeviceType>ebs</rootDeviceType><rootDeviceName>/dev/xvda</rootDeviceName>\
         <blockDeviceMapping><item><deviceName>/dev/xvda</deviceName><ebs><volumeId>vol-{n}</volumeId>\
         <status>attached</status><attachTime>2026-01-05T08:00:01.000Z</attachTime>\
         <deleteOnTermination>true</deleteOnTermination></ebs></item></blockDeviceMapping>\
         <virtualizationType>hvm</virtualizationType><clientToken/>",
        state.code(),
        state.name(),
        if state == State::Stopped {
            "User initiated (2026-01-05 20:00:00 GMT)"
        } else {
            ""
        },
        region = xml(region),
    );
    if state == State::Stopped {
        out.push_str(
            "<stateReason><code>Client.UserInitiatedShutdown</code>\
             <message>Client.UserInitiatedShutdown: User initiated shutdown</message></stateReason>",
        );
    }
    out.push_str("<tagSet>");
    for (k, v) in tags {
        let _ = write!(
            out,
            "<item><key>{}</key><value>{}</value></item>",
            xml(k),
            xml(v)
        );
    }
    out.push_str(
        "</tagSet><hypervisor>xen</hypervisor><ebsOptimized>false</ebsOptimized>\
         <hibernationOptions><configured>false</configured></hibernationOptions>\
         <metadataOptions><state>applied</state><httpTokens>required</httpTokens></metadataOptions>\
         </item></instancesSet></item>",
    );
}

enum Filter {
    Id(Vec<String>),
    State(Vec<String>),
    Tag(String, Vec<String>),
    TagKey(Vec<String>),
}

impl Filter {
    fn matches(&self, i: &Instance, state: State) -> bool {
        match self {
            Filter::Id(values) => values.iter().any(|v| wildcard(v, &i.id)),
            Filter::State(values) => values.iter().any(|v| wildcard(v, state.name())),
            Filter::Tag(key, values) => i
                .tags
                .iter()
                .any(|(k, v)| k == key && values.iter().any(|p| wildcard(p, v))),
            Filter::TagKey(values) => i
                .tags
                .iter()
                .any(|(k, _)| values.iter().any(|p| wildcard(p, k))),
        }
    }
}

/// `Filter.N.Name` / `Filter.N.Value.M`, and `InstanceId.N` as an instance-id filter.
fn parse_filters(form: &HashMap<String, String>) -> Result<Vec<Filter>, String> {
    let mut filters = Vec::new();
    for n in 1.. {
        let Some(name) = form.get(&format!("Filter.{n}.Name")) else {
            break;
        };
        let values = numbered(form, &format!("Filter.{n}.Value."));
        filters.push(match name.as_str() {
            "instance-id" => Filter::Id(values),
            "instance-state-name" => Filter::State(values),
            "tag-key" => Filter::TagKey(values),
            other => match other.strip_prefix("tag:") {
                Some(key) => Filter::Tag(key.to_string(), values),
                None => return Err(format!("The filter '{other}' is invalid")),
            },
        });
    }
    let ids = numbered(form, "InstanceId.");
    if !ids.is_empty() {
        filters.push(Filter::Id(ids));
    }
    Ok(filters)
}

/// `PREFIX1`, `PREFIX2`, … in order, up to the first missing one.
fn numbered(form: &HashMap<String, String>, prefix: &str) -> Vec<String> {
    (1..)
        .map_while(|m| form.get(&format!("{prefix}{m}")).cloned())
        .collect()
}

/// The offset a NextToken stands for (0 without one); `None` when it is not one of ours.
fn page_token(form: &HashMap<String, String>) -> Option<usize> {
    match form.get("NextToken") {
        None => Some(0),
        Some(t) if t.is_empty() => Some(0),
        Some(t) => t.strip_prefix("page-")?.parse().ok(),
    }
}

/// EC2's filter wildcards: `*` any run of characters, `?` exactly one, `\` escapes the next one.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Tok {
        Lit(char),
        One,
        Any,
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '\\' => Tok::Lit(chars.next().unwrap_or('\\')),
            '*' => Tok::Any,
            '?' => Tok::One,
            c => Tok::Lit(c),
        });
    }
    let text: Vec<char> = text.chars().collect();
    // Greedy match with backtracking to the last `*`.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match toks.get(p) {
            Some(Tok::Lit(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            Some(Tok::One) => {
                p += 1;
                t += 1;
            }
            Some(Tok::Any) => {
                star = Some((p, t));
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    toks[p..].iter().all(|t| matches!(t, Tok::Any))
}

/// The access key ID and region of a SigV4 `Authorization` header's `Credential=`.
fn credential_scope(authorization: &str) -> (Option<&str>, String) {
    let Some(rest) = authorization.split("Credential=").nth(1) else {
        return (None, String::new());
    };
    let scope = rest.split([',', ' ']).next().unwrap_or("");
    let mut parts = scope.split('/');
    let key = parts.next().filter(|k| !k.is_empty());
    let region = parts.nth(1).unwrap_or("").to_string();
    (key, region)
}

/// The account an access key the fake issued belongs to.
fn account_of_key(key: &str) -> Option<String> {
    let account = key.strip_prefix(KEY_PREFIX)?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()))
        .then(|| account.to_string())
}

/// XML text escaping.
pub fn xml(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out.into()
}

/// `application/x-www-form-urlencoded` into a map.
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut kv = pair.splitn(2, |b| *b == b'=');
            let k = percent_decode(kv.next().unwrap_or(b""));
            let v = percent_decode(kv.next().unwrap_or(b""));
            (k, v)
        })
        .collect()
}

pub fn percent_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => {
                let hex = std::str::from_utf8(&s[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
}

fn ok(content_type: &'static str, body: String) -> Response {
    Response {
        status: 200,
        content_type,
        headers: Vec::new(),
        body,
    }
}

fn plain(status: u16, body: &str) -> Response {
    Response {
        status,
        content_type: "text/plain",
        headers: Vec::new(),
        body: body.to_string(),
    }
}

fn ec2_error(status: u16, code: &str, message: &str, request_id: &str) -> Response {
    Response {
        status,
        content_type: "text/xml;charset=UTF-8",
        headers: Vec::new(),
        body: format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code>\
             <Message>{}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>",
            xml(code),
            xml(message)
        ),
    }
}

fn sts_error(status: u16, code: &str, message: &str, request_id: &str) -> Response {
    Response {
        status,
        content_type: "text/xml",
        headers: vec![("x-amzn-RequestId", request_id.to_string())],
        body: format!(
            "<ErrorResponse xmlns=\"{STS_NS}\"><Error><Type>Sender</Type><Code>{}</Code>\
             <Message>{}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>",
            xml(code),
            xml(message)
        ),
    }
}

fn limit_exceeded(call: &mut Call, request_id: &str) -> Response {
    call.error = Some("RequestLimitExceeded");
    ec2_error(
        503,
        "RequestLimitExceeded",
        "Request limit exceeded.",
        request_id,
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        412 => "Precondition Failed",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// `write!` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// One HTTP/1.1 request, or `None` at the end of the connection.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut request = Request {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    if request
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = request.body.len();
            request.body.resize(start + size, 0);
            r.read_exact(&mut request.body[start..]).await?;
            line.clear();
            r.read_line(&mut line).await?;
        }
    } else if let Some(n) = request
        .header("content-length")
        .and_then(|n| n.parse::<usize>().ok())
    {
        request.body.resize(n, 0);
        r.read_exact(&mut request.body).await?;
    }
    Ok(Some(request))
}

/// Checks of the pure parts (wildcards, escaping, forms, credential scopes); the smoke run calls it.
pub fn self_check() {
    assert!(wildcard("fleet-*", "fleet-12"));
    assert!(wildcard("*", ""));
    assert!(wildcard("a?c", "abc") && !wildcard("a?c", "ac"));
    assert!(wildcard("*-b*", "a-a-b-c") && !wildcard("*-b", "a-b-c"));
    assert!(wildcard("x\\*y", "x*y") && !wildcard("x\\*y", "xzy"));
    assert!(!wildcard("dev", "dev2") && wildcard("dev", "dev"));
    assert_eq!(xml("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
    let form = parse_form(
        b"Action=DescribeInstances&Filter.1.Name=tag%3ASchedule&Filter.1.Value.1=a+b%2A&X=%zz",
    );
    assert_eq!(form["Filter.1.Name"], "tag:Schedule");
    assert_eq!(form["Filter.1.Value.1"], "a b*");
    assert_eq!(form["X"], "%zz");
    let (key, region) = credential_scope(
        "AWS4-HMAC-SHA256 Credential=ASIAFAKE111111111111/20260101/eu-west-1/ec2/aws4_request, SignedHeaders=host, Signature=0",
    );
    assert_eq!(
        key.and_then(account_of_key).as_deref(),
        Some("111111111111")
    );
    assert_eq!(region, "eu-west-1");
    assert_eq!(account_of_key("AKIAOTHER"), None);
}
