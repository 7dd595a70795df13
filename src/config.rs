//! The configuration file: parsing, validation, and the validated model the daemon runs on.
//!
//! Every problem is reported with the file, line and column it concerns and what was expected, and all
//! problems of a file are reported together (the first [`MAX_ISSUES`] listed, then how many more). A
//! file that is not one (a directory, FIFO, device), is over [`MAX_CONFIG_BYTES`] or is not UTF-8 text
//! is refused the same way. A [`Config`] only exists once the whole file is valid.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use toml::Spanned;

use crate::schedule::CronSchedule;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/shiftd/shiftd.toml";

/// The range a duration in `[defaults]` must lie in (both ends included), and its default.
pub struct DurationBounds {
    pub min: Duration,
    pub max: Duration,
    pub default: Duration,
    /// Why the range is what it is, appended to the message for a value outside it.
    why: &'static str,
}

/// AssumeRole accepts 15 minutes to 12 hours (the role's maximum session duration may be lower).
pub const SESSION_DURATION: DurationBounds = DurationBounds {
    min: Duration::from_secs(15 * 60),
    max: Duration::from_secs(12 * 3600),
    default: Duration::from_secs(3600),
    why: " (what AssumeRole accepts)",
};

/// Credentials stop signing requests [`SIGNING_MARGIN`](crate::credentials::SIGNING_MARGIN) before they
/// expire, so renewal starts at least a minute earlier than that; and at least a minute after issue.
pub const REFRESH_BEFORE_EXPIRY: DurationBounds = DurationBounds {
    min: crate::credentials::SIGNING_MARGIN.saturating_add(Duration::from_secs(60)),
    max: SESSION_DURATION.max.saturating_sub(Duration::from_secs(60)),
    default: Duration::from_secs(600),
    why: " (credentials stop being used 1m before they expire: renewal needs a minute more)",
};

/// How long an action follows its instances: starting or stopping one takes seconds to minutes.
pub const VERIFY_TIMEOUT: DurationBounds = DurationBounds {
    min: Duration::from_secs(10),
    max: Duration::from_secs(3600),
    default: Duration::from_secs(600),
    why: "",
};

/// How long a due action waits for credentials; 0s fails it at once when there are none.
pub const CREDENTIALS_WAIT: DurationBounds = DurationBounds {
    min: Duration::ZERO,
    max: Duration::from_secs(3600),
    default: Duration::from_secs(300),
    why: "",
};

/// How late an occurrence may still be acted on after downtime (per rule `catch_up`, default in
/// `[defaults]`); older ones are reported as missed. At most a day: a stop caught up a day late is more
/// likely to surprise than to help, and `enforce` is the tool for "keep them in this state".
pub const CATCH_UP: DurationBounds = DurationBounds {
    min: Duration::from_secs(60),
    max: Duration::from_secs(24 * 3600),
    default: Duration::from_secs(300),
    why: " (less than a minute would report occurrences missed that were merely noticed a few \
          seconds late, e.g. after a slow start)",
};

/// How often `[organization]` accounts are listed again.
pub const ORG_REFRESH: DurationBounds = DurationBounds {
    min: Duration::from_secs(10),
    max: Duration::from_secs(24 * 3600),
    default: Duration::from_secs(3600),
    why: " (each refresh lists the organization's accounts once)",
};

/// How often rules with `enforce = true` check their instances.
pub const ENFORCE_EVERY: DurationBounds = DurationBounds {
    min: Duration::from_secs(10),
    max: Duration::from_secs(24 * 3600),
    default: Duration::from_secs(300),
    why: " (each check costs one DescribeInstances per account and region)",
};

/// How long before an occurrence's instant its selection is resolved (describe, plan), so that the
/// Start/Stop call leaves at the instant.
pub const RESOLVE_AHEAD: DurationBounds = DurationBounds {
    min: Duration::ZERO,
    max: Duration::from_secs(60),
    default: Duration::from_secs(5),
    why: " (the selection is described this long before the instant; 0s describes at the instant)",
};

// ---------------------------------------------------------------------------------------------------------
// The validated model
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Start,
    Stop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
        }
    }
    /// The EC2 state an instance ends in once this action has completed.
    pub fn target_state(self) -> &'static str {
        match self {
            Action::Start => "running",
            Action::Stop => "stopped",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub defaults: Defaults,
    pub credentials: CredentialSource,
    pub accounts: BTreeMap<String, Account>,
    pub rules: Vec<Rule>,
    /// `[calendars.NAME]`: named sets of dates that rules `skip` or fire `only` on.
    pub calendars: BTreeMap<String, Calendar>,
    /// `[notify]`: where alerts about failed (by default) batches go; none without the table.
    pub notify: Option<NotifyConfig>,
    /// `[metrics]`: where Prometheus metrics are served; off without the table.
    pub metrics: Option<MetricsConfig>,
    /// `[cluster]`: the claim table several delegates share; shiftd runs on its own without it.
    pub cluster: Option<ClusterConfig>,
    /// `[organization]`: accounts discovered from AWS Organizations, for rules' `accounts`.
    pub organization: Option<OrganizationConfig>,
    /// `[pacing]`: the in-flight caps and EC2's limits; the defaults without the table.
    pub pacing: PacingConfig,
}

/// `[organization]`: where AWS Organizations is read, and how discovered accounts are reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrganizationConfig {
    /// The org-reader role (management or delegated administrator account).
    pub role_arn: String,
    /// Assumed in every discovered account: `arn:<partition>:iam::<id>:role/<target_role_name>`.
    pub target_role_name: String,
    /// For both the org-reader role and the target roles.
    pub external_id: Option<String>,
    pub regions: Vec<String>,
    /// OU (or root) IDs whose accounts are discovered, recursively; empty: the whole organization.
    pub include_ous: Vec<String>,
    pub exclude_accounts: Vec<String>,
    pub refresh: Duration,
}

impl OrganizationConfig {
    /// The partition of `role_arn` (`aws`, `aws-cn`, `aws-us-gov`).
    pub fn partition(&self) -> &str {
        self.role_arn.split(':').nth(1).unwrap_or("aws")
    }

    /// The role shiftd assumes in discovered account `id`.
    pub fn target_role_arn(&self, id: &str) -> String {
        format!(
            "arn:{}:iam::{id}:role/{}",
            self.partition(),
            self.target_role_name
        )
    }
}

/// One element of a rule's `accounts`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AccountSelector {
    /// `ou:ou-...`: the discovered accounts in this OU or any OU below it.
    Ou(String),
    /// `org:*`: every discovered account.
    Organization,
    /// A configured account's name.
    Name(String),
    /// A 12-digit account ID: a configured account with that ID, else a discovered one.
    Id(String),
}

impl fmt::Display for AccountSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountSelector::Ou(ou) => write!(f, "ou:{ou}"),
            AccountSelector::Organization => f.write_str("org:*"),
            AccountSelector::Name(n) | AccountSelector::Id(n) => f.write_str(n),
        }
    }
}

/// `[cluster]`: where delegates claim occurrences, and how long a claim holds without news.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub table: String,
    pub region: String,
    pub lease: Duration,
}

/// A claim holder has this long to report progress before another delegate may take over. At least
/// twice the clock-skew tolerance on either side, so that a holder can act at all.
pub const LEASE: DurationBounds = DurationBounds {
    min: Duration::from_secs(60),
    max: Duration::from_secs(600),
    default: Duration::from_secs(60),
    why: " (the holder stops calling Start/Stop 30s before its lease ends, and others take over 30s \
          after, so that clocks 30s apart still act once)",
};

/// A whole number of `[pacing]`: the range it must lie in (both ends included).
pub struct CountBounds {
    pub min: i64,
    pub max: i64,
    /// Why the range is what it is, appended to the message for a value outside it.
    why: &'static str,
}

/// Calls to AWS in flight at once for the whole process. Each is a task and a connection: a thousand is
/// more than one delegate needs (EC2's buckets, not this cap, decide how fast one account goes).
pub const MAX_IN_FLIGHT: CountBounds = CountBounds {
    min: 1,
    max: 1024,
    why: " (calls to AWS in flight at once, for the whole process)",
};

/// Of those, for one target account.
pub const MAX_IN_FLIGHT_PER_ACCOUNT: CountBounds = CountBounds {
    min: 1,
    max: 1024,
    why: " (calls in flight for one target account)",
};

/// A bucket's `burst`: tokens (requests, or instances for the resource buckets).
pub const BURST: CountBounds = CountBounds {
    min: 1,
    max: 100_000,
    why: " (the bucket's size in tokens: requests, or instances for start_instances and \
          stop_instances)",
};

/// A bucket's `refill_per_second`, integer or not.
pub struct RateBounds {
    pub min: f64,
    pub max: f64,
}

/// Tokens a second: a tenth (a token every 10 s) to far beyond anything AWS grants.
pub const REFILL_PER_SECOND: RateBounds = RateBounds {
    min: 0.1,
    max: 10_000.0,
};

/// `[pacing]`: how fast shiftd calls AWS (see [`crate::pacing`]). The defaults without the table.
#[derive(Clone, Debug, PartialEq)]
pub struct PacingConfig {
    /// Calls to AWS in flight at once, for the whole process (EC2 and STS).
    pub max_in_flight: usize,
    /// Of those, at most this many for one target account.
    pub max_in_flight_per_account: usize,
    /// `[pacing.ec2]`: EC2's buckets in every account and region (EC2's documented defaults unless set).
    pub ec2: crate::pacing::Ec2Limits,
    /// `[pacing.accounts.NAME]`: the accounts whose EC2 limits differ, by AWS account ID (12 digits).
    pub accounts: BTreeMap<String, AccountPacing>,
}

/// One `[pacing.accounts.NAME]`: an AWS account's EC2 limits (in each of its regions).
#[derive(Clone, Debug, PartialEq)]
pub struct AccountPacing {
    /// The table's name as written: an account's name, or an account ID.
    pub written: String,
    /// Its buckets: those it sets, the others of `[pacing.ec2]`.
    pub ec2: crate::pacing::Ec2Limits,
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self {
            max_in_flight: crate::pacing::IN_FLIGHT,
            max_in_flight_per_account: crate::pacing::PER_ACCOUNT_IN_FLIGHT,
            ec2: crate::pacing::Ec2Limits::DEFAULT,
            accounts: BTreeMap::new(),
        }
    }
}

impl PacingConfig {
    /// The EC2 limits of every account, as the pacer takes them.
    pub fn account_limits(&self) -> crate::pacing::AccountLimits {
        crate::pacing::AccountLimits {
            default: self.ec2,
            accounts: self
                .accounts
                .iter()
                .map(|(id, a)| (id.clone(), a.ec2))
                .collect(),
        }
    }

    /// What differs from the defaults, a line each (none: the defaults): the caps, `[pacing.ec2]`'s
    /// buckets against EC2's defaults, and each account's against `[pacing.ec2]`.
    pub fn differences(&self) -> Vec<String> {
        let defaults = Self::default();
        let mut out = Vec::new();
        for (key, value, default) in [
            ("max_in_flight", self.max_in_flight, defaults.max_in_flight),
            (
                "max_in_flight_per_account",
                self.max_in_flight_per_account,
                defaults.max_in_flight_per_account,
            ),
        ] {
            if value != default {
                out.push(format!("{key} {value} (default {default})"));
            }
        }
        let buckets = |limits: &crate::pacing::Ec2Limits, base: &crate::pacing::Ec2Limits| {
            let pairs = [
                ("describe", limits.describe, base.describe),
                ("start_stop", limits.mutate, base.mutate),
                (
                    "start_instances",
                    limits.start_instances,
                    base.start_instances,
                ),
                ("stop_instances", limits.stop_instances, base.stop_instances),
            ];
            pairs
                .into_iter()
                .filter(|(_, rate, base)| rate != base)
                .map(|(key, rate, base)| (key, show_rate(rate), show_rate(base)))
                .collect::<Vec<_>>()
        };
        for (key, rate, base) in buckets(&self.ec2, &defaults.ec2) {
            out.push(format!("ec2.{key}: {rate} (EC2's default {base})"));
        }
        for (id, account) in &self.accounts {
            let named = if account.written == *id {
                id.clone()
            } else {
                format!("{} ({id})", account.written)
            };
            let changed = buckets(&account.ec2, &self.ec2);
            if changed.is_empty() {
                out.push(format!("account {named}: as [pacing.ec2]"));
            }
            for (key, rate, _) in changed {
                out.push(format!("account {named}: ec2.{key}: {rate}"));
            }
        }
        out
    }
}

/// A bucket as `shiftd check` shows it: "burst 1000, refill 2/s".
fn show_rate(r: crate::pacing::Rate) -> String {
    format!("burst {}, refill {}/s", r.capacity, r.per_second)
}

/// A `[calendars.NAME]` table: its `dates` and the dates of its `files`' events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    pub name: String,
    pub dates: BTreeSet<chrono::NaiveDate>,
}

#[derive(Clone, Debug)]
pub struct Defaults {
    pub timezone: Tz,
    pub refresh_before_expiry: Duration,
    pub session_duration: Duration,
    pub dry_run: bool,
    /// How long an action follows its instances towards `running`/`stopped` before reporting them failed.
    pub verify_timeout: Duration,
    /// How long a due action waits for valid credentials of its account before it is reported failed.
    pub credentials_wait: Duration,
    /// How often rules with `enforce = true` check their instances.
    pub enforce_every: Duration,
    /// The default of the rules' `catch_up`.
    pub catch_up: Duration,
    /// How long before each instant its selection is resolved.
    pub resolve_ahead: Duration,
}

/// How a rule stops its instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StopMode {
    /// A plain StopInstances.
    #[default]
    Stop,
    /// StopInstances with `Hibernate=true` for instances configured for hibernation; a plain stop for
    /// the others (logged as a fall-back).
    Hibernate,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// The instance profile, through IMDSv2.
    Imds,
    /// A named profile of the shared AWS config files (e.g. `role_arn` + `credential_source`).
    Profile(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub role_arn: String,
    pub account_id: String,
    pub external_id: Option<String>,
    pub regions: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub instance_ids: Vec<String>,
    /// Tag key -> accepted values (EC2 filter wildcards allowed). All keys must match.
    pub tags: BTreeMap<String, Vec<String>>,
}

impl Selection {
    /// Whether the instance `id` with `tags` is selected: listed (when IDs are given) and carrying
    /// every key with one of its values, EC2 filter wildcards (`*`, `?`, `\` escaping) included.
    pub fn matches(&self, id: &str, tags: &BTreeMap<String, String>) -> bool {
        (self.instance_ids.is_empty() || self.instance_ids.iter().any(|i| i == id))
            && self.tags.iter().all(|(k, values)| {
                tags.get(k)
                    .is_some_and(|v| values.iter().any(|pattern| wildcard_match(pattern, v)))
            })
    }
}

/// EC2 filter value matching: `*` any run of characters, `?` any one, `\` makes the next literal.
pub fn wildcard_match(pattern: &str, value: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Token {
        Any,
        One,
        Char(char),
    }
    let mut tokens = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '*' => Token::Any,
            '?' => Token::One,
            '\\' => Token::Char(chars.next().unwrap_or('\\')),
            c => Token::Char(c),
        });
    }
    let value: Vec<char> = value.chars().collect();
    // Classic two-pointer glob match with back-tracking to the last `*`.
    let (mut t, mut v) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while v < value.len() {
        match tokens.get(t) {
            Some(Token::Char(c)) if *c == value[v] => {
                t += 1;
                v += 1;
            }
            Some(Token::One) => {
                t += 1;
                v += 1;
            }
            Some(Token::Any) => {
                star = Some((t, v));
                t += 1;
            }
            _ => match star {
                Some((st, sv)) => {
                    t = st + 1;
                    v = sv + 1;
                    star = Some((st, sv + 1));
                }
                None => return false,
            },
        }
    }
    tokens[t..].iter().all(|x| *x == Token::Any)
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.instance_ids.is_empty() {
            parts.push(format!("ids [{}]", self.instance_ids.join(", ")));
        }
        if !self.tags.is_empty() {
            let tags: Vec<String> = self
                .tags
                .iter()
                .map(|(k, v)| format!("{k}={}", v.join("|")))
                .collect();
            parts.push(format!("tags {}", tags.join(" ")));
        }
        f.write_str(&parts.join(" and "))
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    /// The account the rule acts in. Empty for a rule with `accounts` as written, until the accounts
    /// are known (`org::expand` makes one rule per selected account, each with its account here).
    pub account: String,
    /// `accounts = [...]` as written; empty for a rule with `account`.
    pub accounts: Vec<AccountSelector>,
    /// The regions to act in. For a rule with `accounts` as written: those it names, empty for all
    /// of each account's regions.
    pub regions: Vec<String>,
    pub selection: Selection,
    pub start: Vec<CronSchedule>,
    pub stop: Vec<CronSchedule>,
    pub timezone: Tz,
    /// Calendars on whose dates the rule does not fire (its schedules leave them out).
    pub skip: Vec<String>,
    /// Calendars outside whose dates the rule does not fire (empty: no such restriction).
    pub only: Vec<String>,
    /// Keep the instances in the state of the rule's latest occurrence, acting on those found otherwise
    /// every `enforce_every` (only for rules with both `start` and `stop`).
    pub enforce: bool,
    /// How late an occurrence may still be acted on after downtime.
    pub catch_up: Duration,
    pub stop_mode: StopMode,
}

impl Rule {
    /// A rule with `accounts` as written, not yet expanded to one account.
    pub fn is_multi_account(&self) -> bool {
        !self.accounts.is_empty() && self.account.is_empty()
    }

    /// Where the rule acts, as written: its account, or its `accounts` list.
    pub fn accounts_text(&self) -> String {
        if self.accounts.is_empty() || !self.account.is_empty() {
            return self.account.clone();
        }
        let all: Vec<String> = self.accounts.iter().map(|a| a.to_string()).collect();
        format!("[{}]", all.join(", "))
    }

    pub fn schedules(&self, action: Action) -> &[CronSchedule] {
        match action {
            Action::Start => &self.start,
            Action::Stop => &self.stop,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------

/// One problem in a configuration file, at a 1-based line and column; line 0 is the file as a whole
/// (it is not a regular file, or too large), where no position makes sense.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ConfigIssue {
    fn whole_file(message: impl Into<String>) -> ConfigIssue {
        ConfigIssue {
            line: 0,
            column: 0,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: refusing a configuration file that {why}: it controls production fleets \
         (fix: chown root {} && chmod go-w {})",
        path.display(), path.display(), path.display()
    )]
    Permissions { path: PathBuf, why: String },
    #[error("{}", render_issues(path, issues))]
    Invalid {
        path: PathBuf,
        issues: Vec<ConfigIssue>,
    },
}

fn render_issues(path: &Path, issues: &[ConfigIssue]) -> String {
    let lines: Vec<String> = issues
        .iter()
        .map(|i| match i.line {
            0 => format!("{}: {}", path.display(), i.message),
            _ => format!("{}:{}:{}: {}", path.display(), i.line, i.column, i.message),
        })
        .collect();
    lines.join("\n")
}

/// At most this many problems of a file are listed, then how many more there are: a file can hold
/// hundreds of thousands, and the first ones are what to fix.
pub const MAX_ISSUES: usize = 100;

/// A problem found in the file as written: the byte offset it concerns, and what is wrong.
struct Problem {
    offset: usize,
    message: String,
}

/// The problems found in a file, in the order they were found.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn report(&mut self, offset: usize, message: String) {
        self.0.push(Problem { offset, message });
    }
}

/// Turns byte offsets into 1-based line and column (in characters).
struct Locator<'a> {
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, offset: usize, message: impl Into<String>) -> ConfigIssue {
        let message = message.into();
        self.all(vec![Problem { offset, message }]).remove(0)
    }

    /// Places every problem, in file order (problems at one place keep their order), listing at most
    /// [`MAX_ISSUES`]: one pass over the text, however many problems there are.
    fn all(&self, mut problems: Vec<Problem>) -> Vec<ConfigIssue> {
        problems.sort_by_key(|p| p.offset);
        let more = problems.len().saturating_sub(MAX_ISSUES);
        if more > 0 {
            problems.truncate(MAX_ISSUES + 1);
            let first = problems.pop().expect("more than MAX_ISSUES");
            problems.push(Problem {
                offset: first.offset,
                message: format!(
                    "{more} more problem(s) from here on are not listed, the first: {}",
                    first.message
                ),
            });
        }
        let (mut pos, mut line, mut column) = (0, 1, 1);
        problems
            .into_iter()
            .map(|Problem { offset, message }| {
                let offset = self.text.floor_char_boundary(offset);
                for c in self.text[pos..offset].chars() {
                    if c == '\n' {
                        line += 1;
                        column = 1;
                    } else {
                        column += 1;
                    }
                }
                pos = offset;
                ConfigIssue {
                    line,
                    column,
                    message,
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------------------
// The file as written
// ---------------------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    credentials: Option<Spanned<RawCredentials>>,
    #[serde(default)]
    accounts: BTreeMap<Spanned<String>, Spanned<RawAccount>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    calendars: BTreeMap<Spanned<String>, Spanned<RawCalendar>>,
    #[serde(default)]
    notify: Option<Spanned<RawNotify>>,
    #[serde(default)]
    metrics: Option<Spanned<RawMetrics>>,
    #[serde(default)]
    cluster: Option<Spanned<RawCluster>>,
    #[serde(default)]
    organization: Option<Spanned<RawOrganization>>,
    #[serde(default)]
    pacing: Option<RawPacing>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPacing {
    max_in_flight: Option<Spanned<i64>>,
    max_in_flight_per_account: Option<Spanned<i64>>,
    ec2: Option<RawEc2Limits>,
    #[serde(default)]
    accounts: BTreeMap<Spanned<String>, RawEc2Limits>,
}

/// EC2's buckets as `[pacing.ec2]` and `[pacing.accounts.NAME]` write them; each may be left out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEc2Limits {
    describe: Option<Spanned<RawBucket>>,
    start_stop: Option<Spanned<RawBucket>>,
    start_instances: Option<Spanned<RawBucket>>,
    stop_instances: Option<Spanned<RawBucket>>,
}

/// `{ burst = 1000, refill_per_second = 2 }`; what is left out stays as it was.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucket {
    burst: Option<Spanned<i64>>,
    refill_per_second: Option<Spanned<Number>>,
}

/// A TOML integer or float, as a float.
struct Number(f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrganization {
    role_arn: Spanned<String>,
    target_role_name: Spanned<String>,
    external_id: Option<Spanned<String>>,
    regions: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    include_ous: Vec<Spanned<String>>,
    #[serde(default)]
    exclude_accounts: Vec<Spanned<String>>,
    refresh: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    table: Spanned<String>,
    region: Spanned<String>,
    lease: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCalendar {
    dates: Option<Vec<Spanned<String>>>,
    files: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timezone: Option<Spanned<String>>,
    refresh_before_expiry: Option<Spanned<String>>,
    session_duration: Option<Spanned<String>>,
    dry_run: Option<bool>,
    verify_timeout: Option<Spanned<String>>,
    credentials_wait: Option<Spanned<String>>,
    enforce_every: Option<Spanned<String>>,
    catch_up: Option<Spanned<String>>,
    resolve_ahead: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    source: Option<Spanned<String>>,
    profile: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    role_arn: Spanned<String>,
    external_id: Option<Spanned<String>>,
    regions: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    account: Option<Spanned<String>>,
    accounts: Option<Spanned<Vec<Spanned<String>>>>,
    regions: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    instances: Vec<Spanned<String>>,
    #[serde(default)]
    tags: BTreeMap<Spanned<String>, Spanned<OneOrMany>>,
    start: Option<Spanned<OneOrMany>>,
    stop: Option<Spanned<OneOrMany>>,
    timezone: Option<Spanned<String>>,
    skip: Option<Spanned<OneOrMany>>,
    only: Option<Spanned<OneOrMany>>,
    enforce: Option<Spanned<bool>>,
    catch_up: Option<Spanned<String>>,
    stop_mode: Option<Spanned<String>>,
}

/// A string or an array of strings; each element of an array keeps its own place in the file.
struct OneOrMany(Vec<Element>);

/// One string of a [`OneOrMany`], with its place in the file if it is an element of an array.
struct Element {
    value: String,
    span: Option<std::ops::Range<usize>>,
}

impl OneOrMany {
    fn values(&self) -> Vec<String> {
        self.0.iter().map(|e| e.value.clone()).collect()
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Element {
                    value: v.to_string(),
                    span: None,
                }]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<Spanned<String>>()? {
                    let span = Some(s.span());
                    out.push(Element {
                        value: s.into_inner(),
                        span,
                    });
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Loading and validation
// ---------------------------------------------------------------------------------------------------------

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (bytes, _) = read_config_file(path)?;
        Config::parse(path, decode(path, &bytes)?)
    }

    /// Validates `text` as the contents of `path` (the path is only used in messages). A leading UTF-8
    /// byte order mark is ignored.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let loc = Locator { text };
        let invalid = |issues| ConfigError::Invalid {
            path: path.to_path_buf(),
            issues,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            invalid(vec![loc.at(offset, e.message().trim_end().to_string())])
        })?;
        let mut problems = Problems::default();
        let config = validate(path, raw, &mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(invalid(loc.all(problems.0)))
        }
    }

    /// Like [`Config::load`], and refuses a file that others could have changed (as sshd's
    /// StrictModes does): writable by group or others, or owned by neither root nor the user running.
    /// Mode and owner are those of the very file read, not of whatever the path names afterwards.
    pub fn load_strict(path: &Path) -> Result<Config, ConfigError> {
        use std::os::unix::fs::MetadataExt;
        let (bytes, meta) = read_config_file(path)?;
        let config = Config::parse(path, decode(path, &bytes)?)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        match permission_problem(meta.mode(), meta.uid(), euid) {
            Some(why) => Err(ConfigError::Permissions {
                path: path.to_path_buf(),
                why,
            }),
            None => Ok(config),
        }
    }

    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.get(name)
    }
}

/// The largest configuration file read: far more than any real one (100,000 instance IDs fit in 3 MB,
/// so a fleet that size is selected by tags), and small enough that parsing it is quick.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// What kind of file `file_type` is, for a message refusing anything but a regular file.
fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "not a file"
    }
}

fn not_regular(path: &Path, file_type: std::fs::FileType) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        issues: vec![ConfigIssue::whole_file(format!(
            "not a regular file: {}: expected a configuration file",
            file_kind(file_type)
        ))],
    }
}

/// Opens `path` for reading without blocking (a FIFO would block a plain open until a writer came) and
/// refuses, by the opened handle's own metadata, anything that is not a regular file.
fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), ConfigError> {
    use std::os::unix::fs::OpenOptionsExt;
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(not_regular(path, meta.file_type()));
    }
    Ok((file, meta))
}

/// The bytes of the configuration file at `path` (at most [`MAX_CONFIG_BYTES`]) and its metadata.
fn read_config_file(path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), ConfigError> {
    use std::io::Read;
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Refuse what is plainly not a regular file before opening it: opening a device can have effects.
    // A socket cannot be opened at all. The opened handle is checked again, as the path may change.
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
    {
        return Err(not_regular(path, meta.file_type()));
    }
    let (file, meta) = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            issues: vec![ConfigIssue::whole_file(format!(
                "larger than {} MiB: expected a configuration file of at most {MAX_CONFIG_BYTES} bytes",
                MAX_CONFIG_BYTES / (1024 * 1024)
            ))],
        });
    }
    Ok((bytes, meta))
}

/// The text of a configuration file: UTF-8, with or without a byte order mark.
fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, ConfigError> {
    let invalid = |issue| ConfigError::Invalid {
        path: path.to_path_buf(),
        issues: vec![issue],
    };
    let encoding = match bytes {
        [0, 0, 0xFE, 0xFF, ..] => Some("UTF-32 (big-endian byte order mark 00 00 FE FF)"),
        [0xFF, 0xFE, 0, 0, ..] => Some("UTF-32 (little-endian byte order mark FF FE 00 00)"),
        [0xFE, 0xFF, ..] => Some("UTF-16 (big-endian byte order mark FE FF)"),
        [0xFF, 0xFE, ..] => Some("UTF-16 (little-endian byte order mark FF FE)"),
        _ => None,
    };
    if let Some(encoding) = encoding {
        return Err(invalid(ConfigIssue::whole_file(format!(
            "the file is {encoding}: save it as UTF-8"
        ))));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let offset = e.valid_up_to();
        // The valid prefix locates the bad byte; the BOM, if any, is not counted as a column.
        let valid = std::str::from_utf8(&bytes[..offset]).unwrap_or_default();
        let bom = usize::from(valid.starts_with('\u{feff}')) * 3;
        let loc = Locator {
            text: &valid[bom..],
        };
        invalid(loc.at(
            offset - bom,
            format!(
                "not UTF-8: byte 0x{:02X} at byte offset {offset}: expected UTF-8 text \
                 (save the file as UTF-8, not Latin-1 or another legacy encoding)",
                bytes[offset]
            ),
        ))
    })?;
    // TOML allows no NUL anywhere; they mostly come from UTF-16 without a byte order mark, which the
    // TOML parser would report as some unexpected character.
    if let Some(offset) = text.find('\0') {
        let bom = if text.starts_with('\u{feff}') { 3 } else { 0 };
        let loc = Locator { text: &text[bom..] };
        return Err(invalid(loc.at(
            offset - bom,
            "NUL byte: expected UTF-8 text (a file with NUL bytes is often UTF-16 without a byte \
             order mark: save it as UTF-8)",
        )));
    }
    Ok(text)
}

/// What is wrong with a configuration file's mode and owner, if anything.
pub fn permission_problem(mode: u32, owner: u32, euid: u32) -> Option<String> {
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "others",
        };
        return Some(format!("is writable by {who} (mode {:04o})", mode & 0o7777));
    }
    if owner != 0 && owner != euid {
        return Some(format!(
            "is owned by uid {owner}, neither root nor the user shiftd runs as (uid {euid})"
        ));
    }
    None
}

/// Checks `raw` section by section, adding each problem found to `problems` as the byte offset it
/// concerns and a message. The model returned only means something when no problem was found.
fn validate(path: &Path, raw: RawConfig, problems: &mut Problems) -> Config {
    let defaults = validate_defaults(&raw.defaults, problems);
    let credentials = validate_credentials(raw.credentials, problems);
    let accounts = validate_accounts(raw.accounts, problems);
    let organization = raw
        .organization
        .map(|o| validate_organization(o.into_inner(), problems));
    let calendars = validate_calendars(path, raw.calendars, problems);
    let rules = validate_rules(
        raw.rules,
        &accounts,
        organization.as_ref(),
        &calendars,
        &defaults,
        problems,
    );
    let notify = raw.notify.and_then(|n| validate_notify(n, problems));
    let metrics = raw.metrics.and_then(|m| validate_metrics(m, problems));
    let cluster = raw
        .cluster
        .map(|c| validate_cluster(c.into_inner(), problems));
    let pacing = raw.pacing.map_or_else(PacingConfig::default, |p| {
        validate_pacing(p, &accounts, organization.as_ref(), problems)
    });
    Config {
        path: path.to_path_buf(),
        defaults,
        credentials,
        accounts,
        rules,
        calendars,
        notify,
        metrics,
        cluster,
        organization,
        pacing,
    }
}

/// `ou-` and 4 to 32 lowercase letters or digits, `-`, and 8 to 32 more (an OU ID), or `r-` and 4 to
/// 32 (a root ID).
pub fn valid_ou_id(s: &str) -> bool {
    let alnum = |p: &str, min: usize| {
        (min..=32).contains(&p.len())
            && p.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
    };
    if let Some(rest) = s.strip_prefix("ou-") {
        return rest
            .split_once('-')
            .is_some_and(|(a, b)| alnum(a, 4) && alnum(b, 8));
    }
    s.strip_prefix("r-").is_some_and(|r| alnum(r, 4))
}

/// Twelve digits.
pub fn valid_account_id(s: &str) -> bool {
    s.len() == 12 && s.chars().all(|c| c.is_ascii_digit())
}

/// Checks `[organization]`: the org-reader role, the target role's name, the external ID, regions,
/// OUs, excluded accounts and the refresh interval.
fn validate_organization(raw: RawOrganization, problems: &mut Problems) -> OrganizationConfig {
    if let Err(why) = parse_role_arn(raw.role_arn.get_ref()) {
        problems.report(
            raw.role_arn.span().start,
            format!("organization.role_arn: {why}"),
        );
    }
    let target = raw.target_role_name.get_ref();
    let target_ok = !target.is_empty()
        && target.len() <= 64
        && target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c));
    if !target_ok {
        problems.report(
            raw.target_role_name.span().start,
            format!(
                "organization.target_role_name: {target:?} is not an IAM role name: expected 1 to 64 \
                 letters, digits or +=,.@_- (shiftd assumes arn:aws:iam::<account id>:role/<name>)"
            ),
        );
    }
    if let Some(x) = &raw.external_id {
        check_external_id(x, problems);
    }
    let regions = validate_account_regions("organization", raw.regions, problems);
    for ou in &raw.include_ous {
        if !valid_ou_id(ou.get_ref()) {
            problems.report(
                ou.span().start,
                format!(
                    "organization.include_ous: {:?} is not an OU or root ID: expected \
                     \"ou-ab12-cdef3456\" or \"r-ab12\"",
                    ou.get_ref()
                ),
            );
        }
    }
    for id in &raw.exclude_accounts {
        if !valid_account_id(id.get_ref()) {
            problems.report(
                id.span().start,
                format!(
                    "organization.exclude_accounts: {:?} is not an account ID: expected 12 digits",
                    id.get_ref()
                ),
            );
        }
    }
    let refresh = check_duration(
        raw.refresh.as_ref(),
        "organization.refresh",
        &ORG_REFRESH,
        problems,
    )
    .unwrap_or(ORG_REFRESH.default);
    let dedup = |v: Vec<Spanned<String>>| -> Vec<String> {
        let mut seen = HashSet::new();
        v.into_iter()
            .map(Spanned::into_inner)
            .filter(|x| seen.insert(x.clone()))
            .collect()
    };
    OrganizationConfig {
        role_arn: raw.role_arn.into_inner(),
        target_role_name: raw.target_role_name.into_inner(),
        external_id: raw.external_id.map(Spanned::into_inner),
        regions,
        include_ous: dedup(raw.include_ous),
        exclude_accounts: dedup(raw.exclude_accounts),
        refresh,
    }
}

/// Checks `[cluster]`: a DynamoDB table name (3 to 255 of `[A-Za-z0-9_.-]`), a region, and the lease.
fn validate_cluster(raw: RawCluster, problems: &mut Problems) -> ClusterConfig {
    let table = raw.table.get_ref();
    let valid_table = (3..=255).contains(&table.len())
        && table
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid_table {
        problems.report(
            raw.table.span().start,
            format!(
                "cluster.table: {table:?} is not a DynamoDB table name: expected 3 to 255 letters, \
                 digits, '_', '-' or '.'"
            ),
        );
    }
    check_region(&raw.region, problems);
    let lease = check_duration(raw.lease.as_ref(), "cluster.lease", &LEASE, problems)
        .unwrap_or(LEASE.default);
    ClusterConfig {
        table: table.clone(),
        region: raw.region.into_inner(),
        lease,
    }
}

/// Checks `[pacing]`: the caps (each in its range, the account's at most the process's), `[pacing.ec2]`'s
/// buckets, and each `[pacing.accounts.NAME]`: a configured account's name or a 12-digit account ID
/// (one of no configured account needs `[organization]`), at most one table per AWS account, its buckets
/// in range (those it leaves out are `[pacing.ec2]`'s).
fn validate_pacing(
    raw: RawPacing,
    accounts: &BTreeMap<String, Account>,
    organization: Option<&OrganizationConfig>,
    problems: &mut Problems,
) -> PacingConfig {
    let defaults = PacingConfig::default();
    let max_in_flight = check_count(
        raw.max_in_flight.as_ref(),
        "pacing.max_in_flight",
        &MAX_IN_FLIGHT,
        problems,
    )
    .unwrap_or(defaults.max_in_flight);
    let per_account = check_count(
        raw.max_in_flight_per_account.as_ref(),
        "pacing.max_in_flight_per_account",
        &MAX_IN_FLIGHT_PER_ACCOUNT,
        problems,
    );
    let max_in_flight_per_account = match (per_account, &raw.max_in_flight_per_account) {
        (Some(n), Some(written)) if n > max_in_flight => {
            problems.report(
                written.span().start,
                format!(
                    "pacing.max_in_flight_per_account: {n} is more than max_in_flight ({max_in_flight}): \
                     expected at most {max_in_flight} (one account's share of the process's calls)"
                ),
            );
            max_in_flight
        }
        (Some(n), Some(_)) => n,
        // Not written (or invalid): the default, within the process's cap.
        _ => defaults.max_in_flight_per_account.min(max_in_flight),
    };
    let ec2 = match &raw.ec2 {
        Some(e) => check_ec2_limits(e, "pacing.ec2", defaults.ec2, problems),
        None => defaults.ec2,
    };
    let mut by_id: BTreeMap<String, AccountPacing> = BTreeMap::new();
    for (key, limits) in &raw.accounts {
        let at = key.span().start;
        let written = key.get_ref();
        let table = format!("pacing.accounts.{written}");
        let checked = check_ec2_limits(limits, &table, ec2, problems);
        let id = if let Some(a) = accounts.get(written) {
            a.account_id.clone()
        } else if valid_account_id(written) {
            let configured = accounts.values().any(|a| a.account_id == *written);
            if !configured && organization.is_none() {
                problems.report(
                    at,
                    format!(
                        "{table}: {written:?} is the ID of no [accounts] table, and there is no \
                         [organization] table to discover it in"
                    ),
                );
            }
            written.clone()
        } else {
            let known: Vec<&str> = accounts.keys().map(String::as_str).collect();
            problems.report(
                at,
                format!(
                    "{table}: account {written:?} is not defined: expected one of [{}] or a 12-digit \
                     account ID",
                    known.join(", ")
                ),
            );
            continue;
        };
        // An account whose role ARN is invalid has no ID (reported there).
        if id.is_empty() {
            continue;
        }
        if let Some(first) = by_id.get(&id) {
            problems.report(
                at,
                format!(
                    "{table}: account {id} already has its limits in pacing.accounts.{}: expected one \
                     table per AWS account (EC2's limits are the account's, whichever role reaches it)",
                    first.written
                ),
            );
            continue;
        }
        by_id.insert(
            id,
            AccountPacing {
                written: written.clone(),
                ec2: checked,
            },
        );
    }
    PacingConfig {
        max_in_flight,
        max_in_flight_per_account,
        ec2,
        accounts: by_id,
    }
}

/// Checks the buckets of `[pacing.ec2]` or a `[pacing.accounts.NAME]` (`table` in messages); those left
/// out, and the values they leave out, are `base`'s.
fn check_ec2_limits(
    raw: &RawEc2Limits,
    table: &str,
    base: crate::pacing::Ec2Limits,
    problems: &mut Problems,
) -> crate::pacing::Ec2Limits {
    let mut bucket = |field: &Option<Spanned<RawBucket>>, key: &str, base| {
        check_bucket(field.as_ref(), &format!("{table}.{key}"), base, problems)
    };
    crate::pacing::Ec2Limits {
        describe: bucket(&raw.describe, "describe", base.describe),
        mutate: bucket(&raw.start_stop, "start_stop", base.mutate),
        start_instances: bucket(
            &raw.start_instances,
            "start_instances",
            base.start_instances,
        ),
        stop_instances: bucket(&raw.stop_instances, "stop_instances", base.stop_instances),
    }
}

/// Checks one bucket (`name` in messages): `burst` and/or `refill_per_second`, each in its range.
/// Returns it, with `base`'s values for what it leaves out (and for what is invalid).
fn check_bucket(
    field: Option<&Spanned<RawBucket>>,
    name: &str,
    base: crate::pacing::Rate,
    problems: &mut Problems,
) -> crate::pacing::Rate {
    let Some(field) = field else {
        return base;
    };
    let raw = field.get_ref();
    if raw.burst.is_none() && raw.refill_per_second.is_none() {
        problems.report(
            field.span().start,
            format!(
                "{name}: expected burst and/or refill_per_second, e.g. {{ burst = {}, \
                 refill_per_second = {} }}",
                base.capacity, base.per_second
            ),
        );
    }
    let capacity = check_count(
        raw.burst.as_ref(),
        &format!("{name}.burst"),
        &BURST,
        problems,
    )
    .map_or(base.capacity, |n| n as f64);
    let per_second = match &raw.refill_per_second {
        None => base.per_second,
        Some(r) => {
            let v = r.get_ref().0;
            let bounds = &REFILL_PER_SECOND;
            if (bounds.min..=bounds.max).contains(&v) {
                v
            } else {
                // Shown as written, near enough: 1e-300 in exponent form, not with 300 zeros.
                let shown = if v == 0.0 || (1e-6..1e16).contains(&v.abs()) {
                    format!("{v}")
                } else {
                    format!("{v:?}")
                };
                problems.report(
                    r.span().start,
                    format!(
                        "{name}.refill_per_second: {shown} is out of range: expected {} to {} (tokens \
                         added to the bucket each second)",
                        bounds.min, bounds.max
                    ),
                );
                base.per_second
            }
        }
    };
    crate::pacing::Rate {
        capacity,
        per_second,
    }
}

/// Checks the whole number `field` (named `name` in messages) lies within `bounds`. Returns it, nothing
/// when it is not given or out of range.
fn check_count(
    field: Option<&Spanned<i64>>,
    name: &str,
    bounds: &CountBounds,
    problems: &mut Problems,
) -> Option<usize> {
    let field = field?;
    let v = *field.get_ref();
    if (bounds.min..=bounds.max).contains(&v) {
        return Some(v as usize);
    }
    problems.report(
        field.span().start,
        format!(
            "{name}: {v} is out of range: expected {} to {}{}",
            bounds.min, bounds.max, bounds.why
        ),
    );
    None
}

/// Checks `[calendars]`: each name, each of `dates` (a real date, YYYY-MM-DD), and each of `files` (an
/// iCalendar file, relative to the configuration file's directory, read as the configuration file is:
/// a regular file, at most [`MAX_CONFIG_BYTES`], UTF-8). A problem inside a file is reported at the file's
/// place in `files`, naming the file's own line and column.
fn validate_calendars(
    path: &Path,
    raw: BTreeMap<Spanned<String>, Spanned<RawCalendar>>,
    problems: &mut Problems,
) -> BTreeMap<String, Calendar> {
    let base = path.parent().unwrap_or(Path::new(""));
    let mut calendars = BTreeMap::new();
    for (name, calendar) in raw {
        let at = calendar.span().start;
        let calendar = calendar.into_inner();
        let name_at = name.span().start;
        let name = name.into_inner();
        if !valid_name(&name) {
            problems.report(
                name_at,
                format!("calendar name {name:?}: expected letters, digits, '-', '_' or '.'"),
            );
        }
        if calendar.dates.is_none() && calendar.files.is_none() {
            problems.report(
                at,
                format!(
                    "calendar {name:?} has neither dates nor files: expected dates = [\"YYYY-MM-DD\", \
                     ...] and/or files = [\"holidays.ics\", ...]"
                ),
            );
        }
        let mut dates = BTreeSet::new();
        for date in calendar.dates.iter().flatten() {
            match parse_calendar_date(date.get_ref()) {
                Some(d) => {
                    dates.insert(d);
                }
                None => problems.report(
                    date.span().start,
                    format!(
                        "calendar {name:?}: date {:?} is not a date: expected YYYY-MM-DD, a real date",
                        date.get_ref()
                    ),
                ),
            }
        }
        for file in calendar.files.iter().flatten() {
            match read_ics(&base.join(file.get_ref())) {
                Ok(file_dates) => dates.extend(file_dates),
                Err(message) => {
                    problems.report(file.span().start, format!("calendar {name:?}: {message}"))
                }
            }
        }
        calendars.insert(name.clone(), Calendar { name, dates });
    }
    calendars
}

/// A calendar's date as written in `dates`: exactly YYYY-MM-DD, and a day that exists.
fn parse_calendar_date(s: &str) -> Option<chrono::NaiveDate> {
    let b = s.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    shape
        .then(|| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        .flatten()
}

/// The dates of the iCalendar file at `path`, read with the configuration file's reader; or what is
/// wrong, naming the file (and the line and column of a problem in it).
fn read_ics(path: &Path) -> Result<BTreeSet<chrono::NaiveDate>, String> {
    let as_calendar = |e: ConfigError| match e {
        ConfigError::Read { source, .. } => format!("cannot read {}: {source}", path.display()),
        e => e
            .to_string()
            .replace("a configuration file", "an iCalendar file"),
    };
    let (bytes, _) = read_config_file(path).map_err(as_calendar)?;
    let text = decode(path, &bytes).map_err(as_calendar)?;
    crate::calendar::parse_ics(text)
        .map_err(|e| format!("{}:{}:{}: {}", path.display(), e.line, e.column, e.message))
}

/// Checks `[defaults]`: the time zone, each duration against its own range, then (when both are valid
/// on their own) that `refresh_before_expiry` fits in `session_duration`. Invalid values were
/// reported; their defaults stand in for them in the (discarded) model.
fn validate_defaults(d: &RawDefaults, problems: &mut Problems) -> Defaults {
    let timezone = match &d.timezone {
        Some(s) => parse_zone(s, problems),
        None => Tz::UTC,
    };
    let session_duration = check_duration(
        d.session_duration.as_ref(),
        "session_duration",
        &SESSION_DURATION,
        problems,
    );
    let refresh_before_expiry = check_duration(
        d.refresh_before_expiry.as_ref(),
        "refresh_before_expiry",
        &REFRESH_BEFORE_EXPIRY,
        problems,
    );
    let verify_timeout = check_duration(
        d.verify_timeout.as_ref(),
        "verify_timeout",
        &VERIFY_TIMEOUT,
        problems,
    );
    let credentials_wait = check_duration(
        d.credentials_wait.as_ref(),
        "credentials_wait",
        &CREDENTIALS_WAIT,
        problems,
    );
    let enforce_every = check_duration(
        d.enforce_every.as_ref(),
        "enforce_every",
        &ENFORCE_EVERY,
        problems,
    );
    let catch_up = check_duration(d.catch_up.as_ref(), "catch_up", &CATCH_UP, problems);
    let resolve_ahead = check_duration(
        d.resolve_ahead.as_ref(),
        "resolve_ahead",
        &RESOLVE_AHEAD,
        problems,
    );
    if let (Some(refresh), Some(session)) = (refresh_before_expiry, session_duration) {
        check_refresh_fits_session(d, refresh, session, problems);
    }
    Defaults {
        timezone,
        refresh_before_expiry: refresh_before_expiry.unwrap_or(REFRESH_BEFORE_EXPIRY.default),
        session_duration: session_duration.unwrap_or(SESSION_DURATION.default),
        dry_run: d.dry_run.unwrap_or(false),
        verify_timeout: verify_timeout.unwrap_or(VERIFY_TIMEOUT.default),
        credentials_wait: credentials_wait.unwrap_or(CREDENTIALS_WAIT.default),
        enforce_every: enforce_every.unwrap_or(ENFORCE_EVERY.default),
        catch_up: catch_up.unwrap_or(CATCH_UP.default),
        resolve_ahead: resolve_ahead.unwrap_or(RESOLVE_AHEAD.default),
    }
}

/// Checks the duration `field` (named `name` in messages) is one and lies within `bounds`. Returns it,
/// its default when it is not given, or nothing when it is invalid.
fn check_duration(
    field: Option<&Spanned<String>>,
    name: &str,
    bounds: &DurationBounds,
    problems: &mut Problems,
) -> Option<Duration> {
    let Some(s) = field else {
        return Some(bounds.default);
    };
    let range = format!(
        "{} to {}",
        humantime::format_duration(bounds.min),
        humantime::format_duration(bounds.max)
    );
    match humantime::parse_duration(s.get_ref()) {
        Ok(v) if (bounds.min..=bounds.max).contains(&v) => Some(v),
        Ok(_) => {
            problems.report(
                s.span().start,
                format!(
                    "{name}: {:?} is out of range: expected {range}{}",
                    s.get_ref(),
                    bounds.why
                ),
            );
            None
        }
        Err(_) => {
            problems.report(
                s.span().start,
                format!(
                    "{name}: {:?} is not a duration: expected a duration from {range}, such as \"10m\", \"1h\" or \"90s\"",
                    s.get_ref()
                ),
            );
            None
        }
    }
}

/// Checks that renewal starts at least a minute after credentials are issued: `refresh` (the valid
/// `refresh_before_expiry`) at least 1m shorter than `session` (the valid `session_duration`).
fn check_refresh_fits_session(
    d: &RawDefaults,
    refresh: Duration,
    session: Duration,
    problems: &mut Problems,
) {
    if refresh.saturating_add(Duration::from_secs(60)) <= session {
        return;
    }
    let offset = d
        .refresh_before_expiry
        .as_ref()
        .or(d.session_duration.as_ref())
        .map_or(0, |s| s.span().start);
    problems.report(
        offset,
        format!(
            "refresh_before_expiry ({}) must be at least 1m shorter than session_duration ({})",
            humantime::format_duration(refresh),
            humantime::format_duration(session)
        ),
    );
}

/// Checks `[credentials]`: a known `source`, and a non-blank `profile` exactly when the source is
/// "profile". Without the table, or when it is invalid, the source is IMDS.
fn validate_credentials(
    raw: Option<Spanned<RawCredentials>>,
    problems: &mut Problems,
) -> CredentialSource {
    let Some(c) = raw else {
        return CredentialSource::Imds;
    };
    let span = c.span();
    let c = c.into_inner();
    let source = c
        .source
        .as_ref()
        .map(|s| s.get_ref().as_str())
        .unwrap_or("imds");
    match (source, c.profile) {
        ("imds", None) => CredentialSource::Imds,
        ("imds", Some(p)) => {
            problems.report(
                p.span().start,
                "profile is only used with source = \"profile\"".to_string(),
            );
            CredentialSource::Imds
        }
        ("profile", Some(p)) if !p.get_ref().trim().is_empty() => {
            CredentialSource::Profile(p.into_inner())
        }
        ("profile", _) => {
            problems.report(
                span.start,
                "source = \"profile\" needs profile = \"<name of an AWS profile>\"".to_string(),
            );
            CredentialSource::Imds
        }
        (other, _) => {
            let offset = c.source.as_ref().map_or(span.start, |s| s.span().start);
            problems.report(
                offset,
                format!(
                    "credentials.source: {other:?} is not a credential source: expected \"imds\" or \"profile\""
                ),
            );
            CredentialSource::Imds
        }
    }
}

/// Checks each `[accounts.NAME]` table, in the order of their names (see [`validate_account`]).
fn validate_accounts(
    raw: BTreeMap<Spanned<String>, Spanned<RawAccount>>,
    problems: &mut Problems,
) -> BTreeMap<String, Account> {
    let mut accounts = BTreeMap::new();
    for (name, account) in raw {
        let account = validate_account(name, account.into_inner(), problems);
        accounts.insert(account.name.clone(), account);
    }
    accounts
}

/// Checks one account: its name, its role ARN (which gives the account ID), its external ID and its
/// regions.
fn validate_account(name: Spanned<String>, raw: RawAccount, problems: &mut Problems) -> Account {
    let name_span = name.span();
    let name = name.into_inner();
    if !valid_name(&name) {
        problems.report(
            name_span.start,
            format!("account name {name:?}: expected letters, digits, '-', '_' or '.'"),
        );
    }
    let account_id = match parse_role_arn(raw.role_arn.get_ref()) {
        Ok(id) => id,
        Err(why) => {
            problems.report(raw.role_arn.span().start, format!("role_arn: {why}"));
            String::new()
        }
    };
    if let Some(x) = &raw.external_id {
        check_external_id(x, problems);
    }
    let regions = validate_account_regions(&name, raw.regions, problems);
    Account {
        name,
        role_arn: raw.role_arn.into_inner(),
        account_id,
        external_id: raw.external_id.map(Spanned::into_inner),
        regions,
    }
}

/// Checks an account's `external_id`: 2 to 1224 of the characters STS accepts in one.
fn check_external_id(x: &Spanned<String>, problems: &mut Problems) {
    let v = x.get_ref();
    let ok_chars = v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+=,.@:/-_".contains(c));
    if !(2..=1224).contains(&v.len()) || !ok_chars {
        problems.report(
            x.span().start,
            "external_id: expected 2 to 1224 characters of letters, digits and +=,.@:/-_"
                .to_string(),
        );
    }
}

/// Checks the regions of account `name`: at least one, each a region name. Returns them without
/// repetitions, in the order written.
fn validate_account_regions(
    name: &str,
    regions: Spanned<Vec<Spanned<String>>>,
    problems: &mut Problems,
) -> Vec<String> {
    if regions.get_ref().is_empty() {
        let table = if name == "organization" {
            "organization".to_string()
        } else {
            format!("accounts.{name}")
        };
        problems.report(
            regions.span().start,
            format!("{table}.regions: expected at least one region, e.g. [\"ap-northeast-1\"]"),
        );
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for r in regions.into_inner() {
        check_region(&r, problems);
        if seen.insert(r.get_ref().clone()) {
            out.push(r.into_inner());
        }
    }
    out
}

/// Checks each `[[rules]]` table in turn: its name against those before it, then the rest of it
/// against the `accounts` (see [`RuleCheck::rule`]); `default_zone` is that of `[defaults]`.
fn validate_rules(
    raw: Vec<Spanned<RawRule>>,
    accounts: &BTreeMap<String, Account>,
    organization: Option<&OrganizationConfig>,
    calendars: &BTreeMap<String, Calendar>,
    defaults: &Defaults,
    problems: &mut Problems,
) -> Vec<Rule> {
    let mut names = BTreeSet::new();
    let mut rules = Vec::new();
    let mut schedules = crate::schedule::Interner::default();
    for rule in raw {
        let at = rule.span().start;
        let rule = rule.into_inner();
        check_rule_name(&rule.name, &mut names, problems);
        let check = RuleCheck {
            name: rule.name.get_ref().clone(),
            at,
            accounts,
            organization,
            calendars,
            defaults,
            problems,
            schedules: &mut schedules,
        };
        rules.push(check.rule(rule));
    }
    rules
}

/// Checks a rule's name: letters, digits and `-_.` only, and not that of a rule before it (whose valid
/// names are in `seen`).
fn check_rule_name(name: &Spanned<String>, seen: &mut BTreeSet<String>, problems: &mut Problems) {
    let at = name.span().start;
    let name = name.get_ref();
    if !valid_name(name) {
        problems.report(
            at,
            format!("rule name {name:?}: expected letters, digits, '-', '_' or '.'"),
        );
    } else if !seen.insert(name.clone()) {
        problems.report(
            at,
            format!("rule name {name:?} is used twice: rule names must be unique"),
        );
    }
}

/// One `[[rules]]` table being checked, with what checking it needs from the rest of the file.
struct RuleCheck<'a> {
    /// The rule's name as written, which every message about the rule quotes.
    name: String,
    /// Where the rule's table starts: the place of a problem with the rule as a whole.
    at: usize,
    /// The accounts of `[accounts]`, one of which the rule names.
    accounts: &'a BTreeMap<String, Account>,
    /// `[organization]`, which `accounts` selectors other than configured names need.
    organization: Option<&'a OrganizationConfig>,
    /// The calendars of `[calendars]`, which the rule's `skip` and `only` name.
    calendars: &'a BTreeMap<String, Calendar>,
    /// `[defaults]`: the time zone and catch-up window of a rule that gives none.
    defaults: &'a Defaults,
    problems: &'a mut Problems,
    /// Expressions parsed so far, shared between the rules that write the same one.
    schedules: &'a mut crate::schedule::Interner,
}

impl<'a> RuleCheck<'a> {
    /// Checks one rule but its name (see [`check_rule_name`]): its account, regions, selection,
    /// schedules and time zone, in that order, and that each schedule fires in that zone.
    fn rule(mut self, raw: RawRule) -> Rule {
        let (account, selectors) = match (&raw.account, &raw.accounts) {
            (Some(a), None) => (self.account(a), Vec::new()),
            (None, Some(list)) => (None, self.selectors(list)),
            (Some(a), Some(_)) => {
                let name = &self.name;
                self.problems.report(
                    a.span().start,
                    format!(
                        "rule {name:?} has both account and accounts: expected exactly one of them"
                    ),
                );
                (None, Vec::new())
            }
            (None, None) => {
                let name = &self.name;
                self.problems.report(
                    self.at,
                    format!(
                        "rule {name:?} names no account: expected account = \"NAME\" or \
                         accounts = [\"NAME\", \"ou:ou-...\", \"org:*\", \"<12-digit ID>\"]"
                    ),
                );
                (None, Vec::new())
            }
        };
        let regions = if raw.accounts.is_some() {
            self.multi_account_regions(raw.regions.as_ref())
        } else {
            self.regions(raw.regions.as_ref(), account)
        };
        let selection = self.selection(&raw);
        let start = self.schedules(raw.start.as_ref());
        let stop = self.schedules(raw.stop.as_ref());
        if raw.start.is_none() && raw.stop.is_none() {
            let name = &self.name;
            self.problems.report(
                self.at,
                format!(
                    "rule {name:?} has neither start nor stop: expected at least one cron expression"
                ),
            );
        }
        let timezone = self.zone(raw.timezone.as_ref());
        self.check_fires(raw.start.as_ref(), &start, timezone);
        self.check_fires(raw.stop.as_ref(), &stop, timezone);
        let skip = self.calendar_names("skip", raw.skip.as_ref());
        let only = self.calendar_names("only", raw.only.as_ref());
        let enforce = self.enforce(&raw);
        let catch_up = match &raw.catch_up {
            Some(_) => {
                let name = format!("rule {:?}: catch_up", self.name);
                check_duration(raw.catch_up.as_ref(), &name, &CATCH_UP, self.problems)
                    .unwrap_or(CATCH_UP.default)
            }
            None => self.defaults.catch_up,
        };
        let stop_mode = self.stop_mode(&raw);
        let (start, stop) = match self.day_filter(&skip, &only) {
            Some(days) => (
                start
                    .into_iter()
                    .map(|s| s.with_days(days.clone()))
                    .collect(),
                stop.into_iter()
                    .map(|s| s.with_days(days.clone()))
                    .collect(),
            ),
            None => (start, stop),
        };
        Rule {
            name: self.name,
            account: match (&raw.account, &raw.accounts) {
                (Some(a), None) => a.get_ref().clone(),
                _ => String::new(),
            },
            accounts: selectors,
            regions,
            selection,
            start,
            stop,
            timezone,
            skip,
            only,
            enforce,
            catch_up,
            stop_mode,
        }
    }

    /// Checks the rule's `enforce`: only a rule with both `start` and `stop` has a desired state at every
    /// time. Returns it.
    fn enforce(&mut self, raw: &RawRule) -> bool {
        let Some(enforce) = &raw.enforce else {
            return false;
        };
        if *enforce.get_ref() && (raw.start.is_none() || raw.stop.is_none()) {
            let name = &self.name;
            let has = if raw.start.is_some() { "start" } else { "stop" };
            self.problems.report(
                enforce.span().start,
                format!(
                    "rule {name:?}: enforce = true needs both start and stop (the desired state is the \
                     action of the latest occurrence); this rule has only {has}"
                ),
            );
        }
        *enforce.get_ref()
    }

    /// Checks the rule's `stop_mode`: "stop" (the default) or "hibernate", and only with `stop`.
    fn stop_mode(&mut self, raw: &RawRule) -> StopMode {
        let Some(mode) = &raw.stop_mode else {
            return StopMode::Stop;
        };
        let name = &self.name;
        match mode.get_ref().as_str() {
            "stop" => StopMode::Stop,
            "hibernate" => {
                if raw.stop.is_none() {
                    self.problems.report(
                        mode.span().start,
                        format!(
                            "rule {name:?}: stop_mode = \"hibernate\" but the rule has no stop: \
                             expected a stop schedule, or no stop_mode"
                        ),
                    );
                }
                StopMode::Hibernate
            }
            other => {
                self.problems.report(
                    mode.span().start,
                    format!(
                        "rule {name:?}: stop_mode {other:?}: expected \"stop\" or \"hibernate\""
                    ),
                );
                StopMode::Stop
            }
        }
    }

    /// Checks the rule's `skip` or `only` (`field`), if given: names of `[calendars]`. Returns them.
    fn calendar_names(&mut self, field: &str, names: Option<&Spanned<OneOrMany>>) -> Vec<String> {
        let Some(names) = names else {
            return Vec::new();
        };
        let rule = &self.name;
        if names.get_ref().0.is_empty() {
            self.problems.report(
                names.span().start,
                format!(
                    "rule {rule:?}: {field}: expected a calendar name or a non-empty list of them"
                ),
            );
        }
        for e in &names.get_ref().0 {
            if !self.calendars.contains_key(&e.value) {
                let known: Vec<&str> = self.calendars.keys().map(String::as_str).collect();
                let at = e.span.as_ref().map_or(names.span().start, |s| s.start);
                self.problems.report(
                    at,
                    format!(
                        "rule {rule:?}: {field}: calendar {:?} is not defined: expected one of [{}]",
                        e.value,
                        known.join(", ")
                    ),
                );
            }
        }
        names.get_ref().values()
    }

    /// The dates the rule's `skip` and `only` calendars leave out or keep; `None` without either.
    fn day_filter(
        &self,
        skip: &[String],
        only: &[String],
    ) -> Option<std::sync::Arc<crate::schedule::DayFilter>> {
        if skip.is_empty() && only.is_empty() {
            return None;
        }
        let dates = |names: &[String]| -> BTreeSet<chrono::NaiveDate> {
            names
                .iter()
                .filter_map(|n| self.calendars.get(n))
                .flat_map(|c| c.dates.iter().copied())
                .collect()
        };
        Some(std::sync::Arc::new(crate::schedule::DayFilter {
            skip: dates(skip),
            only: (!only.is_empty()).then(|| dates(only)),
        }))
    }

    /// Checks the rule's `accounts`: not empty, each a configured name, a 12-digit ID, `ou:<OU ID>` or
    /// `org:*` (the last two, and IDs of no configured account, need `[organization]`). Returns them
    /// without repetitions, in the order written.
    fn selectors(&mut self, list: &Spanned<Vec<Spanned<String>>>) -> Vec<AccountSelector> {
        let name = self.name.clone();
        if list.get_ref().is_empty() {
            self.problems.report(
                list.span().start,
                format!("rule {name:?}: accounts is empty: expected at least one account"),
            );
        }
        let no_org = |what: &str| {
            format!(
                "rule {name:?}: accounts: {what} needs an [organization] table (accounts are \
                 discovered from AWS Organizations)"
            )
        };
        let mut out = Vec::new();
        for item in list.get_ref() {
            let at = item.span().start;
            let v = item.get_ref();
            let selector = if let Some(ou) = v.strip_prefix("ou:") {
                if !valid_ou_id(ou) {
                    self.problems.report(
                        at,
                        format!(
                            "rule {name:?}: accounts: {v:?}: {ou:?} is not an OU ID: expected \
                             \"ou:ou-ab12-cdef3456\" (or a root, \"ou:r-ab12\")"
                        ),
                    );
                    continue;
                }
                if self.organization.is_none() {
                    self.problems.report(at, no_org(&format!("{v:?}")));
                }
                AccountSelector::Ou(ou.to_string())
            } else if let Some(rest) = v.strip_prefix("org:") {
                if rest != "*" {
                    self.problems.report(
                        at,
                        format!(
                            "rule {name:?}: accounts: {v:?}: expected \"org:*\" (every account of \
                             the organization)"
                        ),
                    );
                    continue;
                }
                if self.organization.is_none() {
                    self.problems.report(at, no_org("\"org:*\""));
                }
                AccountSelector::Organization
            } else if valid_account_id(v) && !self.accounts.contains_key(v) {
                let configured = self.accounts.values().any(|a| a.account_id == *v);
                if !configured && self.organization.is_none() {
                    self.problems.report(
                        at,
                        format!(
                            "rule {name:?}: accounts: {v:?} is the ID of no [accounts] table, and \
                             there is no [organization] table to discover it in"
                        ),
                    );
                }
                AccountSelector::Id(v.clone())
            } else if self.accounts.contains_key(v) {
                AccountSelector::Name(v.clone())
            } else {
                let known: Vec<&str> = self.accounts.keys().map(String::as_str).collect();
                self.problems.report(
                    at,
                    format!(
                        "rule {name:?}: account {v:?} is not defined: expected one of [{}], \
                         \"ou:<OU ID>\", \"org:*\" or a 12-digit account ID",
                        known.join(", ")
                    ),
                );
                continue;
            };
            if !out.contains(&selector) {
                out.push(selector);
            }
        }
        out
    }

    /// Checks the `regions` of a rule with `accounts`: not empty when given, each a region name
    /// (each selected account acts in those of its regions among them). Returns them without
    /// repetitions; empty when not given.
    fn multi_account_regions(
        &mut self,
        regions: Option<&Spanned<Vec<Spanned<String>>>>,
    ) -> Vec<String> {
        let Some(rs) = regions else {
            return Vec::new();
        };
        if rs.get_ref().is_empty() {
            let name = &self.name;
            self.problems.report(
                rs.span().start,
                format!(
                    "rule {name:?}: regions is empty: leave it out to use all of each account's regions"
                ),
            );
        }
        let mut out: Vec<String> = Vec::new();
        for r in rs.get_ref() {
            if check_region(r, self.problems) && !out.contains(r.get_ref()) {
                out.push(r.get_ref().clone());
            }
        }
        out
    }

    /// Checks that the rule's `account` is one of `[accounts]`, and returns that account.
    fn account(&mut self, account: &Spanned<String>) -> Option<&'a Account> {
        let accounts = self.accounts;
        let found = accounts.get(account.get_ref());
        if found.is_none() {
            let known: Vec<&str> = accounts.keys().map(String::as_str).collect();
            let name = &self.name;
            self.problems.report(
                account.span().start,
                format!(
                    "rule {name:?}: account {:?} is not defined: expected one of [{}]",
                    account.get_ref(),
                    known.join(", ")
                ),
            );
        }
        found
    }

    /// Checks the rule's `regions`, if given: not empty, each a region name of the rule's `account`.
    /// Returns them without repetitions, else all of the account's; none without an account.
    fn regions(
        &mut self,
        regions: Option<&Spanned<Vec<Spanned<String>>>>,
        account: Option<&Account>,
    ) -> Vec<String> {
        let Some(account) = account else {
            return Vec::new();
        };
        let Some(rs) = regions else {
            return account.regions.clone();
        };
        let name = &self.name;
        if rs.get_ref().is_empty() {
            self.problems.report(
                rs.span().start,
                format!(
                    "rule {name:?}: regions is empty: leave it out to use all of the account's regions"
                ),
            );
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let known: HashSet<&str> = account.regions.iter().map(String::as_str).collect();
        for r in rs.get_ref() {
            if check_region(r, self.problems) && !known.contains(r.get_ref().as_str()) {
                self.problems.report(
                    r.span().start,
                    format!(
                        "rule {name:?}: region {:?} is not one of account {:?}'s regions [{}]",
                        r.get_ref(),
                        account.name,
                        account.regions.join(", ")
                    ),
                );
            }
            if seen.insert(r.get_ref().as_str()) {
                out.push(r.get_ref().clone());
            }
        }
        out
    }

    /// Checks what the rule selects: its instance IDs, its tags, and that it selects something at all.
    fn selection(&mut self, raw: &RawRule) -> Selection {
        let instance_ids = self.instance_ids(&raw.instances);
        let tags = self.tags(&raw.tags);
        if raw.instances.is_empty() && tags.is_empty() {
            let name = &self.name;
            self.problems.report(
                raw.name.span().start,
                format!(
                    "rule {name:?} selects no instances: give instances = [\"i-...\"] and/or tags = {{ Key = \"value\" }} \
                     (a rule without a selection would act on every instance of the account)"
                ),
            );
        }
        Selection { instance_ids, tags }
    }

    /// Checks each of the rule's `instances` is an instance ID. Returns the valid ones without
    /// repetitions.
    fn instance_ids(&mut self, ids: &[Spanned<String>]) -> Vec<String> {
        let name = &self.name;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for id in ids {
            if !valid_instance_id(id.get_ref()) {
                self.problems.report(
                    id.span().start,
                    format!(
                        "rule {name:?}: {:?} is not an instance ID: expected \"i-\" and 8 or 17 hex digits",
                        id.get_ref()
                    ),
                );
            } else if seen.insert(id.get_ref().as_str()) {
                out.push(id.get_ref().clone());
            }
        }
        out
    }

    /// Checks each of the rule's `tags`: a key of 1 to 128 characters, and one or more values of at
    /// most 256 characters each. Returns them all.
    fn tags(
        &mut self,
        tags: &BTreeMap<Spanned<String>, Spanned<OneOrMany>>,
    ) -> BTreeMap<String, Vec<String>> {
        let name = &self.name;
        let mut out = BTreeMap::new();
        for (key, values) in tags {
            let values_span = values.span();
            let values = values.get_ref().values();
            if key.get_ref().is_empty() || key.get_ref().len() > 128 {
                self.problems.report(
                    key.span().start,
                    format!("rule {name:?}: tag key must be 1 to 128 characters"),
                );
            }
            if values.is_empty() || values.iter().any(|v| v.len() > 256) {
                self.problems.report(
                    values_span.start,
                    format!(
                        "rule {name:?}: tag {:?}: expected a value or a non-empty list of values (at most 256 characters each)",
                        key.get_ref()
                    ),
                );
            }
            out.insert(key.get_ref().clone(), values);
        }
        out
    }

    /// Checks the rule's `start` or `stop`, if given: one or more cron expressions. Returns the valid
    /// ones.
    fn schedules(&mut self, field: Option<&Spanned<OneOrMany>>) -> Vec<CronSchedule> {
        let Some(exprs) = field else {
            return Vec::new();
        };
        let name = &self.name;
        if exprs.get_ref().0.is_empty() {
            self.problems.report(
                exprs.span().start,
                format!("rule {name:?}: expected a cron expression or a non-empty list of them"),
            );
        }
        let mut schedules: Vec<CronSchedule> = exprs
            .get_ref()
            .0
            .iter()
            .filter_map(|e| match self.schedules.parse(&e.value) {
                Ok(s) => Some(s),
                Err(err) => {
                    let at = e.span.as_ref().map_or(exprs.span().start, |s| s.start);
                    self.problems.report(at, format!("rule {name:?}: {err}"));
                    None
                }
            })
            .collect();
        // Collected with room for four (the filter hides the count), and kept for the daemon's life.
        schedules.shrink_to_fit();
        schedules
    }

    /// Checks the rule's `timezone`, if given; returns it, else the default one.
    fn zone(&mut self, timezone: Option<&Spanned<String>>) -> Tz {
        match timezone {
            Some(z) => parse_zone(z, self.problems),
            None => self.defaults.timezone,
        }
    }

    /// Checks that each of `schedules`, from the rule's `field` (`start` or `stop`), fires at some
    /// time in `zone`.
    fn check_fires(
        &mut self,
        field: Option<&Spanned<OneOrMany>>,
        schedules: &[CronSchedule],
        zone: Tz,
    ) {
        for s in schedules {
            if s.next_after(chrono::DateTime::UNIX_EPOCH, zone).is_none() {
                let offset = field.map_or(self.at, |f| f.span().start);
                let name = &self.name;
                self.problems.report(
                    offset,
                    format!(
                        "rule {name:?}: cron expression {:?} never fires",
                        s.source()
                    ),
                );
            }
        }
    }
}

/// Checks `s` is an IANA time zone name; returns the zone, or UTC when it is not one.
fn parse_zone(s: &Spanned<String>, problems: &mut Problems) -> Tz {
    s.get_ref().parse::<Tz>().unwrap_or_else(|_| {
        problems.report(
            s.span().start,
            format!(
                "timezone: {:?} is not an IANA time zone: expected a name such as \"Asia/Tokyo\", \"Europe/Berlin\" or \"UTC\"",
                s.get_ref()
            ),
        );
        Tz::UTC
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `i-` followed by 8 (older) or 17 lowercase hex digits.
pub fn valid_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// Region names such as `ap-northeast-1`, `us-gov-west-1`, `eu-central-2`.
pub fn valid_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts.iter().all(|p| !p.is_empty())
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].chars().all(|c| c.is_ascii_digit())
}

/// Checks `r` is an AWS region name; returns whether it is.
fn check_region(r: &Spanned<String>, problems: &mut Problems) -> bool {
    let ok = valid_region(r.get_ref());
    if !ok {
        problems.report(
            r.span().start,
            format!(
                "{:?} is not an AWS region name: expected a name such as \"ap-northeast-1\"",
                r.get_ref()
            ),
        );
    }
    ok
}

/// Checks an IAM role ARN and returns its account ID.
fn parse_role_arn(arn: &str) -> Result<String, String> {
    let expected = "expected arn:aws:iam::<12-digit account id>:role/<name>";
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if parts.len() != 6
        || parts[0] != "arn"
        || !parts[1].starts_with("aws")
        || parts[2] != "iam"
        || !parts[3].is_empty()
    {
        return Err(format!("{arn:?} is not an IAM role ARN: {expected}"));
    }
    let account = parts[4];
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "{arn:?}: account {account:?} is not 12 digits: {expected}"
        ));
    }
    let name = parts[5].strip_prefix("role/").unwrap_or("");
    let name_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c));
    if name.is_empty() || name.ends_with('/') || !name_ok {
        return Err(format!("{arn:?} names no role: {expected}"));
    }
    Ok(account.to_string())
}

// ---------------------------------------------------------------------------------------------------------
// [notify] and [metrics]: being told
// ---------------------------------------------------------------------------------------------------------

/// `[notify]`: alerts, one message per batch with a result in `on`, to a webhook and/or an SNS topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Prints as `scheme://host[:port]/…`: its path and query often hold a token.
    pub webhook_url: Option<crate::alerts::WebhookUrl>,
    pub sns_topic_arn: Option<String>,
    /// The results that make a batch worth a message (default: failed and missed).
    pub on: Vec<crate::outcome::ResultKind>,
}

impl NotifyConfig {
    /// The region of the SNS topic (from its ARN).
    pub fn sns_region(&self) -> Option<&str> {
        self.sns_topic_arn
            .as_deref()
            .and_then(|a| a.split(':').nth(3))
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: std::net::SocketAddr,
    /// The operator's explicit consent to serve on a non-loopback address.
    pub allow_remote: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    webhook_url: Option<Spanned<String>>,
    sns_topic_arn: Option<Spanned<String>>,
    on: Option<Spanned<OneOrMany>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
    allow_remote: Option<bool>,
}

/// The results `[notify] on` accepts, and its default.
const NOTIFY_ON: [crate::outcome::ResultKind; 5] = {
    use crate::outcome::ResultKind::*;
    [Failed, Missed, Ok, Skipped, DryRun]
};

/// Checks `[notify]`: a webhook URL (see [`crate::alerts::WebhookUrl::parse`]) and/or an SNS topic ARN,
/// and the results it is sent `on`. A webhook URL is never quoted back: its path and query are secret.
fn validate_notify(raw: Spanned<RawNotify>, problems: &mut Problems) -> Option<NotifyConfig> {
    let at = raw.span().start;
    let raw = raw.into_inner();
    if raw.webhook_url.is_none() && raw.sns_topic_arn.is_none() {
        problems.report(
            at,
            "[notify] has neither webhook_url nor sns_topic_arn: expected webhook_url = \"https://...\" \
             and/or sns_topic_arn = \"arn:aws:sns:REGION:ACCOUNT:NAME\""
                .to_string(),
        );
    }
    let webhook_url = raw.webhook_url.and_then(|u| {
        crate::alerts::WebhookUrl::parse(u.get_ref())
            .map_err(|why| problems.report(u.span().start, format!("notify.webhook_url: {why}")))
            .ok()
    });
    let sns_topic_arn = raw.sns_topic_arn.and_then(|a| {
        if valid_sns_topic_arn(a.get_ref()) {
            Some(a.into_inner())
        } else {
            problems.report(
                a.span().start,
                format!(
                    "notify.sns_topic_arn: {:?} is not an SNS topic ARN: expected \
                     arn:aws:sns:REGION:ACCOUNT:NAME (a 12-digit account, a name of letters, digits, - and _)",
                    a.get_ref()
                ),
            );
            None
        }
    });
    let mut on = Vec::new();
    match raw.on {
        None => on.extend([
            crate::outcome::ResultKind::Failed,
            crate::outcome::ResultKind::Missed,
        ]),
        Some(list) => {
            if list.get_ref().0.is_empty() {
                problems.report(
                    list.span().start,
                    "notify.on: expected a non-empty list of results, e.g. [\"failed\", \"missed\"]"
                        .to_string(),
                );
            }
            for e in &list.get_ref().0 {
                match NOTIFY_ON.iter().find(|k| k.as_str() == e.value) {
                    Some(k) if !on.contains(k) => on.push(*k),
                    Some(_) => {}
                    None => {
                        let known: Vec<String> = NOTIFY_ON
                            .iter()
                            .map(|k| format!("{:?}", k.as_str()))
                            .collect();
                        let at = e.span.as_ref().map_or(list.span().start, |s| s.start);
                        problems.report(
                            at,
                            format!(
                                "notify.on: {:?} is not a result: expected one of [{}]",
                                e.value,
                                known.join(", ")
                            ),
                        );
                    }
                }
            }
        }
    }
    Some(NotifyConfig {
        webhook_url,
        sns_topic_arn,
        on,
    })
}

/// `arn:PARTITION:sns:REGION:ACCOUNT:NAME`: a region name, a 12-digit account, a topic name of 1 to 256
/// letters, digits, `-` and `_` (with `.fifo` for a FIFO topic).
pub fn valid_sns_topic_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.split(':').collect();
    let name = parts.get(5).map(|n| n.strip_suffix(".fifo").unwrap_or(n));
    parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "sns"
        && valid_region(parts[3])
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && name.is_some_and(|n| {
            (1..=256).contains(&n.len())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// Checks `[metrics]`: `listen` is an IP address and port, on loopback unless `allow_remote = true`
/// says otherwise (metrics name accounts, rules and instances: not for every network by default).
fn validate_metrics(raw: Spanned<RawMetrics>, problems: &mut Problems) -> Option<MetricsConfig> {
    let at = raw.span().start;
    let raw = raw.into_inner();
    let allow_remote = raw.allow_remote.unwrap_or(false);
    let Some(listen) = raw.listen else {
        problems.report(
            at,
            "[metrics] has no listen: expected listen = \"127.0.0.1:9464\" (leave [metrics] out to \
             serve no metrics)"
                .to_string(),
        );
        return None;
    };
    let addr = match listen.get_ref().parse::<std::net::SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            problems.report(
                listen.span().start,
                format!(
                    "metrics.listen: {:?} is not an address and port: expected e.g. \"127.0.0.1:9464\" \
                     or \"[::1]:9464\"",
                    listen.get_ref()
                ),
            );
            return None;
        }
    };
    if !addr.ip().is_loopback() && !allow_remote {
        problems.report(
            listen.span().start,
            format!(
                "metrics.listen: {addr} is not a loopback address: expected 127.0.0.1 or [::1], or \
                 allow_remote = true to serve metrics to the network on purpose"
            ),
        );
    }
    Some(MetricsConfig {
        listen: addr,
        allow_remote,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[accounts.account1]
role_arn = "arn:aws:iam::111111111111:role/account1-role-ec2"
regions = ["ap-northeast-1"]

[[rules]]
name = "office-hours"
account = "account1"
instances = ["i-0123456789abcdef0"]
start = "0 8 * * Mon-Fri"
stop = ["0 20 * * 1-5", "0 23 * * 0,6"]
timezone = "Asia/Tokyo"
"#;

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert_eq!(c.credentials, CredentialSource::Imds);
        assert_eq!(c.defaults.timezone, Tz::UTC);
        assert_eq!(c.defaults.session_duration, Duration::from_secs(3600));
        assert_eq!(c.defaults.refresh_before_expiry, Duration::from_secs(600));
        let a = c.account("account1").unwrap();
        assert_eq!(a.account_id, "111111111111");
        let r = &c.rules[0];
        assert_eq!(r.regions, vec!["ap-northeast-1"]);
        assert_eq!(r.start.len(), 1);
        assert_eq!(r.stop.len(), 2);
        assert_eq!(r.timezone, chrono_tz::Asia::Tokyo);
    }

    /// MINIMAL with `[calendars]` tables and the rule's `skip`/`only` lines, in a directory holding the
    /// given files; the loaded configuration, or its problems as "line:column: message".
    fn with_calendars(
        calendars: &str,
        rule_lines: &str,
        files: &[(&str, &[u8])],
    ) -> Result<Config, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let text = MINIMAL.replace(
            "timezone = \"Asia/Tokyo\"\n",
            &format!("timezone = \"Asia/Tokyo\"\n{rule_lines}\n{calendars}\n"),
        );
        let path = dir.path().join("shiftd.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).map_err(|e| match e {
            ConfigError::Invalid { issues, .. } => issues
                .into_iter()
                .map(|i| format!("{}:{}: {}", i.line, i.column, i.message))
                .collect(),
            e => vec![e.to_string()],
        })
    }

    const HOLIDAYS_ICS: &[u8] = b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\n\
DTSTART;VALUE=DATE:20270111\r\nDTEND;VALUE=DATE:20270112\r\nSUMMARY:Coming of Age Day\r\nEND:VEVENT\r\n\
BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270429\r\nDTEND;VALUE=DATE:20270501\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";

    #[test]
    fn calendars_collect_dates_and_files_and_rules_skip_them() {
        let c = with_calendars(
            "[calendars.jp-holidays]\ndates = [\"2027-01-01\"]\nfiles = [\"jp.ics\"]\n\
             [calendars.patch-days]\ndates = [\"2027-01-12\", \"2027-01-13\"]",
            "skip = [\"jp-holidays\"]",
            &[("jp.ics", HOLIDAYS_ICS)],
        )
        .unwrap();
        let dates: Vec<String> = c.calendars["jp-holidays"]
            .dates
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            dates,
            ["2027-01-01", "2027-01-11", "2027-04-29", "2027-04-30"]
        );
        let r = &c.rules[0];
        assert_eq!(r.skip, ["jp-holidays"]);
        // Monday 2027-01-11 is a holiday: the start skips from Friday the 8th to Tuesday the 12th.
        let after = chrono::DateTime::parse_from_rfc3339("2027-01-07T12:00:00Z")
            .unwrap()
            .to_utc();
        let next: Vec<String> = r.start[0]
            .firings_between(after, after + chrono::Duration::days(5), r.timezone, 10)
            .into_iter()
            .map(|t| {
                t.with_timezone(&r.timezone)
                    .format("%m-%d %H:%M")
                    .to_string()
            })
            .collect();
        assert_eq!(next, ["01-08 08:00", "01-12 08:00"]);
        // The planner agrees: nothing due on the 11th.
        let holiday = chrono::DateTime::parse_from_rfc3339("2027-01-10T23:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            crate::planner::due_between(
                &c,
                holiday - chrono::Duration::hours(1),
                holiday + chrono::Duration::hours(1)
            ),
            crate::planner::DueWork::default()
        );
        // Skip applies to every action: the 11th's stop does not fire either.
        assert_eq!(
            crate::planner::next_due(&c, holiday - chrono::Duration::hours(1)),
            Some(
                chrono::DateTime::parse_from_rfc3339("2027-01-11T23:00:00Z")
                    .unwrap()
                    .to_utc()
            ),
        );
    }

    #[test]
    fn only_keeps_the_calendars_dates() {
        let c = with_calendars(
            "[calendars.patch-days]\ndates = [\"2027-01-12\", \"2027-01-16\"]\n\
             [calendars.more]\ndates = [\"2027-01-14\"]",
            "only = [\"patch-days\", \"more\"]",
            &[],
        )
        .unwrap();
        let r = &c.rules[0];
        let after = chrono::DateTime::parse_from_rfc3339("2027-01-07T12:00:00Z")
            .unwrap()
            .to_utc();
        let local = |s: &crate::schedule::CronSchedule| -> Vec<String> {
            s.firings_between(after, after + chrono::Duration::days(14), r.timezone, 10)
                .into_iter()
                .map(|t| {
                    t.with_timezone(&r.timezone)
                        .format("%m-%d %H:%M")
                        .to_string()
                })
                .collect()
        };
        // Weekday starts on the dates of either calendar; Saturday the 16th only for the weekend stop.
        assert_eq!(local(&r.start[0]), ["01-12 08:00", "01-14 08:00"]);
        assert_eq!(local(&r.stop[1]), ["01-16 23:00"]);
    }

    #[test]
    fn bad_calendars_are_refused_with_their_place() {
        let ics = |body: &str| {
            format!("BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\n{body}END:VEVENT\r\nEND:VCALENDAR\r\n")
        };
        let rrule = ics("DTSTART;VALUE=DATE:20270101\r\nRRULE:FREQ=YEARLY\r\n");
        let bad_date = ics("DTSTART;VALUE=DATE:20270230\r\n");
        // (calendars, rule lines, files, expected problem)
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a [u8])], &'a str);
        let cases: &[Case] = &[
            (
                "[calendars.h]\ndates = [\"2027-02-30\"]",
                "",
                &[],
                "15:10: calendar \"h\": date \"2027-02-30\" is not a date: expected YYYY-MM-DD, a real date",
            ),
            (
                "[calendars.h]\ndates = [\"2027-1-5\"]",
                "",
                &[],
                "15:10: calendar \"h\": date \"2027-1-5\"",
            ),
            (
                "[calendars.h]\nfiles = [\"missing.ics\"]",
                "",
                &[],
                "15:10: calendar \"h\": cannot read ",
            ),
            (
                "[calendars.h]\nfiles = [\"h.ics\"]",
                "",
                &[("h.ics", rrule.as_bytes())],
                "h.ics:4:1: RRULE (recurrence) is not supported",
            ),
            (
                "[calendars.h]\nfiles = [\"h.ics\"]",
                "",
                &[("h.ics", bad_date.as_bytes())],
                "h.ics:3:20: DTSTART \"20270230\" is not a date",
            ),
            (
                "[calendars.h]\nfiles = [\"h.ics\"]",
                "",
                &[(
                    "h.ics",
                    b"BEGIN:VCALENDAR\r\nSUMMARY:caf\xe9\r\nEND:VCALENDAR\r\n",
                )],
                "h.ics:2:12: not UTF-8",
            ),
            (
                "[calendars.h]\nfiles = [\".\"]",
                "",
                &[],
                "not a regular file: a directory: expected an iCalendar file",
            ),
            (
                "[calendars.h]",
                "",
                &[],
                "14:1: calendar \"h\" has neither dates nor files",
            ),
            (
                "[calendars.\"a b\"]\ndates = []",
                "",
                &[],
                "14:12: calendar name \"a b\"",
            ),
            (
                "[calendars.h]\ndates = [\"2027-01-01\"]",
                "skip = [\"holidays\"]",
                &[],
                "13:9: rule \"office-hours\": skip: calendar \"holidays\" is not defined: expected one of [h]",
            ),
            (
                "",
                "only = \"patch\"",
                &[],
                "13:8: rule \"office-hours\": only: calendar \"patch\" is not defined: expected one of []",
            ),
            (
                "",
                "only = []",
                &[],
                "13:8: rule \"office-hours\": only: expected a calendar name",
            ),
            (
                "[calendars.h]\ndate = []",
                "",
                &[],
                "unknown field `date`, expected `dates` or `files`",
            ),
        ];
        for (calendars, rule_lines, files, want) in cases {
            let problems = with_calendars(calendars, rule_lines, files).unwrap_err();
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "{calendars} / {rule_lines}: want {want}, got {problems:#?}"
            );
        }
    }

    #[test]
    fn tag_values_may_be_strings_or_lists() {
        let text = MINIMAL.replace(
            "instances = [\"i-0123456789abcdef0\"]",
            "tags = { Schedule = \"office-hours\", Environment = [\"dev\", \"stg\"] }",
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let tags = &c.rules[0].selection.tags;
        assert_eq!(tags["Schedule"], vec!["office-hours"]);
        assert_eq!(tags["Environment"], vec!["dev", "stg"]);
    }

    const ORG: &str = r#"
[organization]
role_arn = "arn:aws:iam::999999999999:role/shiftd-org-reader"
target_role_name = "shiftd-target"
regions = ["ap-northeast-1", "us-east-1"]
include_ous = ["ou-ab12-dev00000"]
exclude_accounts = ["111111111111"]
refresh = "1h"

[accounts.account1]
role_arn = "arn:aws:iam::111111111111:role/account1-role-ec2"
regions = ["ap-northeast-1"]

[[rules]]
name = "dev-nights"
accounts = ["ou:ou-ab12-dev00000", "account1", "org:*", "222222222222", "account1"]
tags = { Schedule = "dev-office-hours" }
stop = "0 21 * * *"
"#;

    /// The problems of `text` as "line:column: message".
    fn problems_of(text: &str) -> Vec<String> {
        match Config::parse(Path::new("t.toml"), text) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { issues, .. }) => issues
                .iter()
                .map(|i| format!("{}:{}: {}", i.line, i.column, i.message))
                .collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn organization_and_multi_account_rules_are_read() {
        let c = Config::parse(Path::new("t.toml"), ORG).unwrap();
        let o = c.organization.as_ref().unwrap();
        assert_eq!(
            o.target_role_arn("333333333333"),
            "arn:aws:iam::333333333333:role/shiftd-target"
        );
        assert_eq!(o.regions, ["ap-northeast-1", "us-east-1"]);
        assert_eq!(o.include_ous, ["ou-ab12-dev00000"]);
        assert_eq!(o.exclude_accounts, ["111111111111"]);
        assert_eq!(o.refresh, Duration::from_secs(3600));
        assert_eq!(o.external_id, None);
        let r = &c.rules[0];
        assert!(r.is_multi_account());
        assert_eq!(r.account, "");
        assert!(r.regions.is_empty(), "all of each account's regions");
        assert_eq!(
            r.accounts,
            [
                AccountSelector::Ou("ou-ab12-dev00000".into()),
                AccountSelector::Name("account1".into()),
                AccountSelector::Organization,
                AccountSelector::Id("222222222222".into()),
            ]
        );
        assert_eq!(
            r.accounts_text(),
            "[ou:ou-ab12-dev00000, account1, org:*, 222222222222]"
        );
        // The refresh defaults to an hour; `account` keeps working beside [organization].
        let c = Config::parse(
            Path::new("t.toml"),
            &ORG.replace("refresh = \"1h\"\n", "").replace(
                "accounts = [\"ou:ou-ab12-dev00000\", \"account1\", \"org:*\", \"222222222222\", \"account1\"]",
                "account = \"account1\"",
            ),
        )
        .unwrap();
        assert_eq!(c.organization.unwrap().refresh, Duration::from_secs(3600));
        assert!(!c.rules[0].is_multi_account());
        assert_eq!(c.rules[0].regions, ["ap-northeast-1"]);
        // Configured names and the IDs of configured accounts need no [organization].
        let text = MINIMAL.replace(
            "account = \"account1\"",
            "accounts = [\"account1\", \"111111111111\"]",
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert!(c.organization.is_none());
        assert_eq!(c.rules[0].accounts.len(), 2);
    }

    #[test]
    fn bad_organization_and_accounts_are_refused_with_their_place() {
        let rule_accounts = "accounts = [\"ou:ou-ab12-dev00000\", \"account1\", \"org:*\", \"222222222222\", \"account1\"]";
        let cases: &[(String, &str)] = &[
            (
                ORG.replace(rule_accounts, "accounts = [\"acount1\"]"),
                "16:13: rule \"dev-nights\": account \"acount1\" is not defined: expected one of [account1], \"ou:<OU ID>\", \"org:*\" or a 12-digit account ID",
            ),
            (
                ORG.replace(rule_accounts, "accounts = [\"ou:dev\"]"),
                "16:13: rule \"dev-nights\": accounts: \"ou:dev\": \"dev\" is not an OU ID",
            ),
            (
                ORG.replace(rule_accounts, "accounts = [\"org:all\"]"),
                "16:13: rule \"dev-nights\": accounts: \"org:all\": expected \"org:*\"",
            ),
            (
                ORG.replace(rule_accounts, "accounts = []"),
                "16:12: rule \"dev-nights\": accounts is empty",
            ),
            (
                ORG.replace(
                    rule_accounts,
                    "account = \"account1\"\naccounts = [\"account1\"]",
                ),
                "16:11: rule \"dev-nights\" has both account and accounts: expected exactly one of them",
            ),
            (
                ORG.replace(&format!("{rule_accounts}\n"), ""),
                "14:1: rule \"dev-nights\" names no account",
            ),
            (
                ORG.replace("role/shiftd-org-reader", "user/x"),
                "3:12: organization.role_arn: \"arn:aws:iam::999999999999:user/x\" names no role",
            ),
            (
                ORG.replace("\"shiftd-target\"", "\"shiftd target\""),
                "4:20: organization.target_role_name: \"shiftd target\" is not an IAM role name",
            ),
            (
                ORG.replace("[\"ap-northeast-1\", \"us-east-1\"]", "[]"),
                "5:11: organization.regions: expected at least one region",
            ),
            (
                ORG.replace("[\"ou-ab12-dev00000\"]", "[\"dev\"]"),
                "6:16: organization.include_ous: \"dev\" is not an OU or root ID",
            ),
            (
                ORG.replace("[\"111111111111\"]", "[\"1111\"]"),
                "7:21: organization.exclude_accounts: \"1111\" is not an account ID: expected 12 digits",
            ),
            (
                ORG.replace("\"1h\"", "\"1s\""),
                "8:11: organization.refresh: \"1s\" is out of range: expected 10s to 1day",
            ),
            (ORG.replace("target_role_name", "target_role"), ""),
        ];
        for (text, want) in cases {
            let got = problems_of(text);
            if want.is_empty() {
                assert!(!got.is_empty(), "{text}");
                continue;
            }
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "want {want:?}, got {got:#?}"
            );
        }
        // Without [organization]: OUs, the organization and unknown IDs have nowhere to come from.
        let no_org = ORG.split("[accounts.account1]").nth(1).unwrap();
        let no_org = format!("[accounts.account1]{no_org}");
        let got = problems_of(&no_org);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(
            got[0].contains("\"ou:ou-ab12-dev00000\" needs an [organization] table"),
            "{got:#?}"
        );
        assert!(
            got[1].contains("\"org:*\" needs an [organization] table"),
            "{got:#?}"
        );
        assert!(
            got[2].contains("\"222222222222\" is the ID of no [accounts] table"),
            "{got:#?}"
        );
    }

    #[test]
    fn ou_and_account_ids() {
        for ok in ["ou-ab12-dev00000", "ou-ab12-cdef3456", "r-ab12"] {
            assert!(valid_ou_id(ok), "{ok}");
        }
        for bad in [
            "ou-ab12",
            "ou-AB12-cdef3456",
            "ou-ab1-cdef3456",
            "dev",
            "r-a",
            "",
        ] {
            assert!(!valid_ou_id(bad), "{bad}");
        }
        assert!(valid_account_id("123456789012"));
        assert!(!valid_account_id("12345678901"));
        assert!(!valid_account_id("12345678901x"));
    }

    #[test]
    fn profile_source_is_read() {
        let text = format!(
            "[credentials]\nsource = \"profile\"\nprofile = \"assume-role-ec2\"\n{MINIMAL}"
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(
            c.credentials,
            CredentialSource::Profile("assume-role-ec2".into())
        );
    }

    #[test]
    fn several_problems_are_reported_together_in_file_order() {
        let text = MINIMAL
            .replace("ap-northeast-1", "tokyo")
            .replace("Asia/Tokyo", "Asia/Tokio");
        let err = Config::parse(Path::new("t.toml"), &text).unwrap_err();
        let ConfigError::Invalid { issues, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(issues.len(), 2, "{err}");
        assert!(issues[0].message.contains("not an AWS region"), "{err}");
        assert!(issues[1].message.contains("not an IANA time zone"), "{err}");
        assert!(issues[0].line < issues[1].line);
    }

    #[test]
    fn unattended_keys_are_read_and_checked_with_their_place() {
        let c = Config::parse(
            Path::new("t.toml"),
            &format!(
                "[defaults]\nenforce_every = \"1m\"\ncatch_up = \"30m\"\n{MINIMAL}enforce = true\n\
                 stop_mode = \"hibernate\"\ncatch_up = \"2h\"\n"
            ),
        )
        .unwrap();
        assert_eq!(c.defaults.enforce_every, Duration::from_secs(60));
        assert_eq!(c.defaults.catch_up, Duration::from_secs(1800));
        let r = &c.rules[0];
        assert!(r.enforce);
        assert_eq!(r.stop_mode, StopMode::Hibernate);
        assert_eq!(r.catch_up, Duration::from_secs(7200));
        // Defaults: no enforce, a plain stop, [defaults] catch_up (itself 5m by default).
        let c = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert!(!c.rules[0].enforce);
        assert_eq!(c.rules[0].stop_mode, StopMode::Stop);
        assert_eq!(c.rules[0].catch_up, Duration::from_secs(300));
        assert_eq!(c.defaults.enforce_every, Duration::from_secs(300));

        let only_start = MINIMAL.replace("stop = [\"0 20 * * 1-5\", \"0 23 * * 0,6\"]\n", "");
        let cases: &[(String, &str)] = &[
            (
                format!("{only_start}enforce = true\n"),
                "12:11: rule \"office-hours\": enforce = true needs both start and stop",
            ),
            (
                format!("{MINIMAL}stop_mode = \"suspend\"\n"),
                "13:13: rule \"office-hours\": stop_mode \"suspend\": expected \"stop\" or \"hibernate\"",
            ),
            (
                format!("{MINIMAL}catch_up = \"2d\"\n"),
                "13:12: rule \"office-hours\": catch_up: \"2d\" is out of range: expected 1m to 1day",
            ),
            (
                format!("[defaults]\nenforce_every = \"5s\"\n{MINIMAL}"),
                "2:17: enforce_every: \"5s\" is out of range: expected 10s to 1day",
            ),
            (
                format!("[defaults]\nresolve_ahead = \"2m\"\n{MINIMAL}"),
                "2:17: resolve_ahead: \"2m\" is out of range: expected 0s to 1m",
            ),
            (
                format!("{MINIMAL}enforce = \"yes\"\n"),
                "13:11: invalid type: string \"yes\", expected a boolean",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(Path::new("t.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "want {want}\ngot {err}");
            assert!(err.starts_with("t.toml:"), "names the file: {err}");
        }
    }

    #[test]
    fn selections_match_like_ec2_filters() {
        let sel = Selection {
            instance_ids: vec![],
            tags: BTreeMap::from([
                (
                    "Schedule".to_string(),
                    vec!["office-*".to_string(), "lab".to_string()],
                ),
                ("Env".to_string(), vec!["d?v".to_string()]),
            ]),
        };
        let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("Schedule", "office-hours"), ("Env", "dev")], true),
            (&[("Schedule", "lab"), ("Env", "dav")], true),
            (&[("Schedule", "office-"), ("Env", "dev")], true),
            (&[("Schedule", "labs"), ("Env", "dev")], false),
            (&[("Schedule", "office-hours"), ("Env", "deev")], false),
            (&[("Schedule", "office-hours")], false),
            (&[], false),
        ];
        for (t, want) in cases {
            assert_eq!(sel.matches("i-1", &tags(t)), *want, "{t:?}");
        }
        let listed = Selection {
            instance_ids: vec!["i-1".into()],
            tags: BTreeMap::new(),
        };
        assert!(listed.matches("i-1", &BTreeMap::new()));
        assert!(!listed.matches("i-2", &BTreeMap::new()));
        for (pattern, value, want) in [
            ("*", "", true),
            ("a*b*c", "aXXbYc", true),
            ("a*b*c", "aXXbY", false),
            ("\\*", "*", true),
            ("\\*", "x", false),
            ("??", "ab", true),
            ("??", "a", false),
            ("日本*", "日本語", true),
        ] {
            assert_eq!(wildcard_match(pattern, value), want, "{pattern} {value}");
        }
    }

    #[test]
    fn permission_table() {
        let cases = [
            (0o100640, 0, 999, None),
            (0o100600, 999, 999, None),
            (0o100644, 0, 0, None),
            (
                0o100660,
                0,
                999,
                Some("is writable by its group (mode 0660)"),
            ),
            (0o100646, 0, 999, Some("is writable by others (mode 0646)")),
            (
                0o100666,
                0,
                999,
                Some("is writable by group and others (mode 0666)"),
            ),
            (
                0o100640,
                1000,
                999,
                Some("is owned by uid 1000, neither root nor the user shiftd runs as (uid 999)"),
            ),
        ];
        for (mode, owner, euid, want) in cases {
            assert_eq!(
                permission_problem(mode, owner, euid).as_deref(),
                want,
                "{mode:o} {owner} {euid}"
            );
        }
    }

    #[test]
    fn helpers_accept_and_reject() {
        assert!(valid_instance_id("i-0123456789abcdef0"));
        assert!(valid_instance_id("i-01234567"));
        assert!(!valid_instance_id("i-0123456789ABCDEF0"));
        assert!(!valid_instance_id("0123456789abcdef0"));
        assert!(valid_region("us-gov-west-1"));
        assert!(!valid_region("us-east"));
        assert!(!valid_region("Tokyo"));
        assert_eq!(
            parse_role_arn("arn:aws:iam::111111111111:role/path/x").unwrap(),
            "111111111111"
        );
        assert!(parse_role_arn("arn:aws:iam::1111:role/x").is_err());
        assert!(parse_role_arn("arn:aws:iam::111111111111:user/x").is_err());
    }

    #[test]
    fn a_file_with_a_third_of_a_million_problems_lists_the_first_hundred() {
        // 1 MiB holds about 350,000 empty instance IDs, each a problem. Placing each one by scanning
        // the text before it took minutes.
        let mut text = String::from(
            "[accounts.a]\nrole_arn = \"arn:aws:iam::111111111111:role/r\"\nregions = [\"eu-west-1\"]\n\
             [[rules]]\nname = \"many\"\naccount = \"a\"\nstart = \"0 8 * * *\"\ninstances = [",
        );
        let count = (MAX_CONFIG_BYTES as usize - text.len() - 2) / 3;
        text.push_str(&"\"\",".repeat(count));
        text.push_str("]\n");
        assert!(text.len() as u64 <= MAX_CONFIG_BYTES && count > 300_000);
        let err = Config::parse(Path::new("t.toml"), &text).unwrap_err();
        let ConfigError::Invalid { issues, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(issues.len(), MAX_ISSUES + 1);
        assert_eq!((issues[0].line, issues[0].column), (8, 14));
        assert_eq!((issues[1].line, issues[1].column), (8, 17));
        let last = &issues[MAX_ISSUES];
        assert_eq!((last.line, last.column), (8, 14 + 3 * MAX_ISSUES));
        assert!(
            last.message.starts_with(&format!(
                "{} more problem(s) from here on are not listed, the first: rule \"many\": \"\" is not an instance ID",
                count - MAX_ISSUES
            )),
            "{}",
            last.message
        );
    }

    #[test]
    fn problems_are_placed_by_character_and_listed_in_file_order() {
        // The rule's problems are found before the account's, and the columns count characters.
        let text = "[[rules]]\nname = \"ö-rule\"\naccount = \"nope\"\nstart = \"0 8 * * *\"\n\
                    [accounts.a]\nrole_arn = \"arn:aws:iam::1:role/r\"\nregions = [\"日本\", \"x\"]\n";
        let err = Config::parse(Path::new("t.toml"), text).unwrap_err();
        let ConfigError::Invalid { issues, .. } = &err else {
            panic!("{err:?}")
        };
        let places: Vec<(usize, usize)> = issues.iter().map(|i| (i.line, i.column)).collect();
        assert_eq!(
            places,
            [(2, 8), (2, 8), (3, 11), (6, 12), (7, 12), (7, 18)],
            "{err}"
        );
    }

    #[test]
    fn a_rule_with_100000_instance_ids_validates() {
        let ids: Vec<String> = (0..100_000u64).map(|i| format!("\"i-{i:017x}\"")).collect();
        let text = format!(
            "[accounts.a]\nrole_arn = \"arn:aws:iam::111111111111:role/r\"\nregions = [\"eu-west-1\"]\n\
             [[rules]]\nname = \"many\"\naccount = \"a\"\nstart = \"0 8 * * *\"\ninstances = [{}, \"i-{:017x}\"]\n",
            ids.join(", "),
            7
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let got = &c.rules[0].selection.instance_ids;
        assert_eq!(got.len(), 100_000, "the repeated ID is kept once");
        assert_eq!(got[0], "i-00000000000000000");
        assert_eq!(got[99_999], format!("i-{:017x}", 99_999));
    }

    /// `[defaults]` with one duration set, and where its value starts (line 2, column 1 + key + 4).
    fn with_default(key: &str, value: &str) -> String {
        format!("[defaults]\n{key} = \"{value}\"\n{MINIMAL}")
    }

    #[test]
    fn durations_are_checked_against_their_ranges() {
        // (key, value, None if accepted, else a part of the message)
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("session_duration", "15m", None),
            ("session_duration", "12h", None),
            (
                "session_duration",
                "14m 59s",
                Some("is out of range: expected 15m to 12h (what AssumeRole accepts)"),
            ),
            (
                "session_duration",
                "12h 1s",
                Some("is out of range: expected 15m to 12h"),
            ),
            (
                "session_duration",
                "18446744073709551615s",
                Some("is out of range: expected 15m to 12h"),
            ),
            ("session_duration", "0s", Some("is out of range")),
            (
                "session_duration",
                "1 hour and a bit",
                Some("is not a duration: expected a duration from 15m to 12h"),
            ),
            ("refresh_before_expiry", "2m", None),
            ("refresh_before_expiry", "59m", None),
            (
                "refresh_before_expiry",
                "119s",
                Some("is out of range: expected 2m to 11h 59m"),
            ),
            (
                "refresh_before_expiry",
                "0s",
                Some("is out of range: expected 2m to 11h 59m"),
            ),
            (
                "refresh_before_expiry",
                "18446744073709551615s",
                Some("is out of range: expected 2m to 11h 59m"),
            ),
            (
                "refresh_before_expiry",
                "59m 1s",
                Some("must be at least 1m shorter than session_duration (1h)"),
            ),
            (
                "refresh_before_expiry",
                "99999999999999999999999s",
                Some("is not a duration"),
            ),
            ("verify_timeout", "10s", None),
            ("verify_timeout", "1h", None),
            (
                "verify_timeout",
                "9s",
                Some("verify_timeout: \"9s\" is out of range: expected 10s to 1h"),
            ),
            (
                "verify_timeout",
                "1h 1s",
                Some("is out of range: expected 10s to 1h"),
            ),
            (
                "verify_timeout",
                "18446744073709551615s",
                Some("is out of range: expected 10s to 1h"),
            ),
            ("verify_timeout", "-1s", Some("is not a duration")),
            ("credentials_wait", "0s", None),
            ("credentials_wait", "1h", None),
            (
                "credentials_wait",
                "3601s",
                Some("credentials_wait: \"3601s\" is out of range: expected 0s to 1h"),
            ),
            (
                "credentials_wait",
                "18446744073709551615s",
                Some("is out of range: expected 0s to 1h"),
            ),
            ("credentials_wait", "", Some("is not a duration")),
        ];
        for &(key, value, want) in cases {
            let text = with_default(key, value);
            let got = Config::parse(Path::new("t.toml"), &text);
            match (want, got) {
                (None, Ok(_)) => {}
                (None, Err(e)) => panic!("{key} = {value:?} refused: {e}"),
                (Some(want), Ok(_)) => panic!("{key} = {value:?} accepted, expected {want:?}"),
                (Some(want), Err(e)) => {
                    let message = e.to_string();
                    let at = format!("t.toml:2:{}: ", key.len() + 4);
                    assert!(
                        message.starts_with(&at) && message.contains(want),
                        "{key} = {value:?}: expected {at}...{want}... got {message}"
                    );
                }
            }
        }
    }

    #[test]
    fn accepted_durations_leave_no_arithmetic_to_overflow() {
        let text = format!(
            "[defaults]\nsession_duration = \"12h\"\nrefresh_before_expiry = \"11h 59m\"\n\
             verify_timeout = \"1h\"\ncredentials_wait = \"1h\"\n{MINIMAL}"
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let d = &c.defaults;
        assert_eq!(d.refresh_before_expiry, REFRESH_BEFORE_EXPIRY.max);
        for bounds in [
            &SESSION_DURATION,
            &REFRESH_BEFORE_EXPIRY,
            &VERIFY_TIMEOUT,
            &CREDENTIALS_WAIT,
        ] {
            assert!(bounds.min <= bounds.default && bounds.default <= bounds.max);
            assert!(bounds.max <= Duration::from_secs(24 * 3600));
        }
        assert!(REFRESH_BEFORE_EXPIRY.min > crate::credentials::SIGNING_MARGIN);
    }

    /// What loading `path` says, as `check` would print it.
    fn load_error(path: &Path) -> ConfigError {
        match Config::load(path) {
            Ok(_) => panic!("{} accepted", path.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn file_contents_that_are_not_utf8_text_are_refused_with_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let utf8_bom = [b"\xEF\xBB\xBF".as_slice(), MINIMAL.as_bytes()].concat();
        // (contents, None if accepted, else the whole first line of the message after the path)
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (MINIMAL.as_bytes().to_vec(), None),
            (utf8_bom, None),
            (
                b"# caf\xE9\n".to_vec(),
                Some(":1:6: not UTF-8: byte 0xE9 at byte offset 5: expected UTF-8 text"),
            ),
            (
                [MINIMAL.as_bytes(), b"# d\xC3\xA9j\xC3\xA0 vu, caf\xE9\n"].concat(),
                Some(":13:15: not UTF-8: byte 0xE9 at byte offset 308"),
            ),
            (
                b"\xEF\xBB\xBF# caf\xE9".to_vec(),
                Some(":1:6: not UTF-8: byte 0xE9 at byte offset 8"),
            ),
            (b"x = \"\xC3\"".to_vec(), Some(":1:6: not UTF-8: byte 0xC3")),
            (
                b"# a\0b\n".to_vec(),
                Some(":1:4: NUL byte: expected UTF-8 text"),
            ),
            (
                b"#\0 \0x\0\n\0".to_vec(),
                Some(":1:2: NUL byte: expected UTF-8 text (a file with NUL bytes is often UTF-16"),
            ),
            (b"\xEF\xBB\xBFx\0".to_vec(), Some(":1:2: NUL byte")),
            (
                b"\xFF\xFE#\0 \0x\0\n\0".to_vec(),
                Some(
                    ": the file is UTF-16 (little-endian byte order mark FF FE): save it as UTF-8",
                ),
            ),
            (
                b"\xFE\xFF\0#\0 \0x\0\n".to_vec(),
                Some(": the file is UTF-16 (big-endian byte order mark FE FF): save it as UTF-8"),
            ),
            (
                b"\xFF\xFE\0\0#\0\0\0".to_vec(),
                Some(": the file is UTF-32 (little-endian byte order mark FF FE 00 00)"),
            ),
        ];
        for (i, (bytes, want)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("case{i}.toml"));
            std::fs::write(&path, &bytes).unwrap();
            match want {
                None => {
                    Config::load(&path).unwrap_or_else(|e| panic!("case {i} refused: {e}"));
                }
                Some(want) => {
                    let err = load_error(&path);
                    assert!(
                        matches!(err, ConfigError::Invalid { .. }),
                        "case {i}: {err:?}"
                    );
                    let message = err.to_string();
                    let want = format!("{}{want}", path.display());
                    assert!(
                        message.starts_with(&want),
                        "case {i}: expected {want}\n got {message}"
                    );
                }
            }
        }
    }

    #[test]
    fn files_that_are_not_regular_are_refused_without_blocking() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let socket = dir.path().join("socket.toml");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let cases = [
            (dir.path().to_path_buf(), "a directory"),
            (fifo.clone(), "a FIFO"),
            (PathBuf::from("/dev/zero"), "a character device"),
            (PathBuf::from("/dev/null"), "a character device"),
            (socket, "a socket"),
        ];
        for (path, kind) in cases {
            // A blocking open of the FIFO, or reading an endless device to its end, would never return.
            let (tx, rx) = std::sync::mpsc::channel();
            let p = path.clone();
            std::thread::spawn(move || tx.send(Config::load_strict(&p).map(|_| ())));
            let got = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{} still loading after 10 s", path.display()));
            let err = got.expect_err("refused");
            assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                format!(
                    "{}: not a regular file: {kind}: expected a configuration file",
                    path.display()
                )
            );
        }
        // The opened handle is checked too (the path may have been replaced after the first look):
        // a FIFO is opened without waiting for a writer, then refused.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(open_regular(&fifo).map(|_| ())));
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("open did not block");
        assert!(
            got.unwrap_err()
                .to_string()
                .contains("not a regular file: a FIFO")
        );
    }

    #[test]
    fn files_that_cannot_be_read_are_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let mut cases = vec![
            (a, "Too many levels of symbolic links"),
            (dir.path().join("missing.toml"), "No such file or directory"),
        ];
        // Even root cannot read this regular file (reading address 0 of a process fails), if it exists.
        let mem = Path::new("/proc/self/mem");
        if mem.is_file() {
            cases.push((mem.to_path_buf(), ""));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            use std::os::unix::fs::PermissionsExt;
            let locked = dir.path().join("locked.toml");
            std::fs::write(&locked, MINIMAL).unwrap();
            std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
            cases.push((locked, "Permission denied"));
        }
        for (path, why) in cases {
            let err = load_error(&path);
            assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
            let message = err.to_string();
            assert!(
                message.starts_with(&format!(
                    "cannot read configuration file {}: ",
                    path.display()
                )) && message.contains(why),
                "{message}"
            );
        }
    }

    #[test]
    fn files_over_one_mib_are_refused_saying_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        let line = format!("#{}\n", "x".repeat(1022));
        let mut text = line.repeat(1024);
        assert_eq!(text.len() as u64, MAX_CONFIG_BYTES);
        std::fs::write(&path, &text).unwrap();
        Config::load(&path).expect("exactly the limit is accepted");
        text.push('\n');
        std::fs::write(&path, &text).unwrap();
        let err = load_error(&path);
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: larger than 1 MiB: expected a configuration file of at most 1048576 bytes",
                path.display()
            )
        );
    }

    // --- [pacing] ---

    #[test]
    fn pacing_is_read_and_what_it_leaves_out_is_the_default() {
        use crate::pacing::{Ec2Limits, Rate};
        let none = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert_eq!(none.pacing, PacingConfig::default());
        assert_eq!(none.pacing.max_in_flight, 64);
        assert_eq!(none.pacing.max_in_flight_per_account, 8);
        assert_eq!(none.pacing.ec2, Ec2Limits::DEFAULT);
        assert!(none.pacing.differences().is_empty());

        let text = format!(
            "{MINIMAL}\n[accounts.shared]\nrole_arn = \"arn:aws:iam::222222222222:role/r\"\n\
             regions = [\"us-east-1\"]\n\n\
             [pacing]\nmax_in_flight = 16\n\
             [pacing.ec2]\nstart_instances = {{ burst = 2000, refill_per_second = 4 }}\n\
             describe = {{ refill_per_second = 2.5 }}\n\
             [pacing.accounts.account1]\nstart_instances = {{ refill_per_second = 10 }}\n\
             [pacing.accounts.shared.stop_instances]\nburst = 500\n"
        );
        let p = Config::parse(Path::new("t.toml"), &text).unwrap().pacing;
        assert_eq!(p.max_in_flight, 16);
        assert_eq!(p.max_in_flight_per_account, 8);
        let ec2 = Ec2Limits {
            start_instances: Rate {
                capacity: 2000.0,
                per_second: 4.0,
            },
            describe: Rate {
                capacity: 100.0,
                per_second: 2.5,
            },
            ..Ec2Limits::DEFAULT
        };
        assert_eq!(p.ec2, ec2);
        // By account ID; what an account leaves out is [pacing.ec2]'s, not EC2's default.
        let account1 = &p.accounts["111111111111"];
        assert_eq!(account1.written, "account1");
        assert_eq!(
            account1.ec2.start_instances,
            Rate {
                capacity: 2000.0,
                per_second: 10.0
            }
        );
        assert_eq!(account1.ec2.describe, ec2.describe);
        assert_eq!(
            p.accounts["222222222222"].ec2.stop_instances.capacity,
            500.0
        );
        let limits = p.account_limits();
        assert_eq!(limits.of("333333333333"), ec2);
        assert_eq!(limits.of("111111111111"), account1.ec2);
        assert_eq!(
            p.differences(),
            [
                "max_in_flight 16 (default 64)",
                "ec2.describe: burst 100, refill 2.5/s (EC2's default burst 100, refill 20/s)",
                "ec2.start_instances: burst 2000, refill 4/s (EC2's default burst 1000, refill 2/s)",
                "account account1 (111111111111): ec2.start_instances: burst 2000, refill 10/s",
                "account shared (222222222222): ec2.stop_instances: burst 500, refill 20/s",
            ]
        );
        // A cap of the process below the default share lowers the share with it.
        let low = format!("[pacing]\nmax_in_flight = 4\n{MINIMAL}");
        let p = Config::parse(Path::new("t.toml"), &low).unwrap().pacing;
        assert_eq!((p.max_in_flight, p.max_in_flight_per_account), (4, 4));
        // An account ID of the organization's accounts is accepted with [organization].
        let org = format!("[pacing.accounts.333333333333]\nstart_stop = {{ burst = 200 }}\n{ORG}");
        let p = Config::parse(Path::new("t.toml"), &org).unwrap().pacing;
        assert_eq!(p.accounts["333333333333"].ec2.mutate.capacity, 200.0);
        assert_eq!(
            p.differences(),
            ["account 333333333333: ec2.start_stop: burst 200, refill 5/s"]
        );
    }

    #[test]
    fn pacing_values_are_checked_with_their_place() {
        // (the lines after "[pacing]", the expected problems as "line:column: part of the message")
        let cases: &[(&str, &[&str])] = &[
            (
                "max_in_flight = 1024\nmax_in_flight_per_account = 1024",
                &[],
            ),
            ("max_in_flight = 1\nmax_in_flight_per_account = 1", &[]),
            (
                "max_in_flight = 0",
                &[
                    "2:17: pacing.max_in_flight: 0 is out of range: expected 1 to 1024 (calls to AWS \
                   in flight at once, for the whole process)",
                ],
            ),
            (
                "max_in_flight = 1025",
                &["2:17: pacing.max_in_flight: 1025 is out of range: expected 1 to 1024"],
            ),
            (
                "max_in_flight = -8",
                &["2:17: pacing.max_in_flight: -8 is out of range"],
            ),
            (
                "max_in_flight = \"64\"",
                &["2:17: invalid type: string \"64\", expected i64"],
            ),
            (
                "max_in_flight = 2.5",
                &["2:17: invalid type: floating point `2.5`, expected i64"],
            ),
            (
                "max_in_flight_per_account = 0",
                &["2:29: pacing.max_in_flight_per_account: 0 is out of range: expected 1 to 1024"],
            ),
            (
                "max_in_flight = 8\nmax_in_flight_per_account = 9",
                &[
                    "3:29: pacing.max_in_flight_per_account: 9 is more than max_in_flight (8): \
                   expected at most 8",
                ],
            ),
            (
                "max_inflight = 8",
                &[
                    "2:1: unknown field `max_inflight`, expected one of `max_in_flight`, \
                   `max_in_flight_per_account`, `ec2`, `accounts`",
                ],
            ),
            (
                "[pacing.ec2]\nstart_instances = { burst = 0, refill_per_second = 0 }",
                &[
                    "3:29: pacing.ec2.start_instances.burst: 0 is out of range: expected 1 to \
                     100000 (the bucket's size in tokens",
                    "3:52: pacing.ec2.start_instances.refill_per_second: 0 is out of range: \
                     expected 0.1 to 10000 (tokens added to the bucket each second)",
                ],
            ),
            (
                "[pacing.ec2]\ndescribe = { burst = 100001, refill_per_second = 10000.5 }",
                &[
                    "3:22: pacing.ec2.describe.burst: 100001 is out of range",
                    "3:50: pacing.ec2.describe.refill_per_second: 10000.5 is out of range",
                ],
            ),
            (
                "[pacing.ec2]\nstop_instances = { refill_per_second = nan }",
                &["3:40: pacing.ec2.stop_instances.refill_per_second: NaN is out of range"],
            ),
            (
                "[pacing.ec2]\nstop_instances = { refill_per_second = 1e-300 }",
                &["3:40: pacing.ec2.stop_instances.refill_per_second: 1e-300 is out of range"],
            ),
            (
                "[pacing.ec2]\nstop_instances = { refill_per_second = -inf }",
                &["3:40: pacing.ec2.stop_instances.refill_per_second: -inf is out of range"],
            ),
            (
                "[pacing.ec2]\nstart_stop = { refill_per_second = 0.1, burst = 1 }",
                &[],
            ),
            (
                "[pacing.ec2]\nstart_stop = {}",
                &[
                    "3:14: pacing.ec2.start_stop: expected burst and/or refill_per_second, e.g. \
                   { burst = 50, refill_per_second = 5 }",
                ],
            ),
            (
                "[pacing.ec2]\nstart_stop = { burst = 10, refill = 2 }",
                &["3:28: unknown field `refill`, expected `burst` or `refill_per_second`"],
            ),
            (
                "[pacing.ec2]\nmutate = { burst = 10 }",
                &[
                    "3:1: unknown field `mutate`, expected one of `describe`, `start_stop`, \
                   `start_instances`, `stop_instances`",
                ],
            ),
            (
                "[pacing.ec2]\nstart_instances = 1000",
                &["3:19: invalid type: integer `1000`, expected struct RawBucket"],
            ),
            (
                "[pacing.accounts.acount1]\nstart_instances = { burst = 5000 }",
                &[
                    "2:18: pacing.accounts.acount1: account \"acount1\" is not defined: expected \
                   one of [account1] or a 12-digit account ID",
                ],
            ),
            (
                "[pacing.accounts.222222222222]\nstart_instances = { burst = 5000 }",
                &[
                    "2:18: pacing.accounts.222222222222: \"222222222222\" is the ID of no [accounts] \
                   table, and there is no [organization] table to discover it in",
                ],
            ),
            (
                "[pacing.accounts.111111111111]\nstart_instances = { burst = 5000 }\n\
                 [pacing.accounts.account1]\nstart_instances = { burst = 6000 }",
                &[
                    "4:18: pacing.accounts.account1: account 111111111111 already has its limits in \
                   pacing.accounts.111111111111: expected one table per AWS account",
                ],
            ),
            (
                "[pacing.accounts.account1]\nstart_instances = { burst = 5000, refill_per_second = 0.01 }",
                &[
                    "3:55: pacing.accounts.account1.start_instances.refill_per_second: 0.01 is out of \
                   range",
                ],
            ),
            (
                "[pacing.accounts.account1]\nmax_in_flight = 2",
                &["3:1: unknown field `max_in_flight`, expected one of `describe`"],
            ),
        ];
        let mut wrong = Vec::new();
        for (lines, want) in cases {
            let text = format!("[pacing]\n{lines}\n{MINIMAL}");
            let got = problems_of(&text);
            let matches = got.len() == want.len()
                && got.iter().zip(want.iter()).all(|(got, want)| {
                    let (at, part) = want.split_once(' ').unwrap();
                    got.starts_with(at) && got.contains(part)
                });
            if !matches {
                wrong.push(format!("{lines}:\n got  {got:?}\n want {want:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    // --- [notify] and [metrics] ---

    #[test]
    fn notify_and_metrics_are_read_with_their_defaults() {
        let text = format!(
            "{MINIMAL}\n[notify]\nwebhook_url = \"https://hooks.example.com/services/T/B/X\"\n\
             sns_topic_arn = \"arn:aws:sns:ap-northeast-1:123456789012:shiftd-alerts\"\n\
             \n[metrics]\nlisten = \"[::1]:9464\"\n"
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let n = c.notify.unwrap();
        use crate::outcome::ResultKind;
        assert_eq!(n.on, [ResultKind::Failed, ResultKind::Missed]);
        assert_eq!(n.sns_region(), Some("ap-northeast-1"));
        assert_eq!(
            n.webhook_url.unwrap().to_string(),
            "https://hooks.example.com/…"
        );
        let m = c.metrics.unwrap();
        assert_eq!(m.listen.to_string(), "[::1]:9464");
        assert!(!m.allow_remote);
        let none = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert!(
            none.notify.is_none() && none.metrics.is_none(),
            "both off by default"
        );
    }

    #[test]
    fn notify_and_metrics_errors_name_their_place_and_never_the_webhook_token() {
        let lines = MINIMAL.lines().count();
        let text = format!(
            "{MINIMAL}[notify]\n\
             webhook_url = \"http://hooks.example.com/services/T/B/SECRETTOKEN?k=QSECRET\"\n\
             sns_topic_arn = \"arn:aws:sns:ap-northeast-1:1234:bad name\"\n\
             on = [\"failed\", \"sometimes\"]\n\
             [metrics]\n\
             listen = \"0.0.0.0:9464\"\n"
        );
        let err = Config::parse(Path::new("t.toml"), &text).unwrap_err();
        let ConfigError::Invalid { issues, .. } = &err else {
            panic!("{err:?}")
        };
        let got: Vec<(usize, usize, &str)> = issues
            .iter()
            .map(|i| (i.line, i.column, i.message.as_str()))
            .collect();
        let n = lines + 1;
        assert_eq!(got.len(), 4, "{err}");
        assert_eq!((got[0].0, got[0].1), (n + 1, 15), "{err}");
        assert!(
            got[0].2.starts_with(
                "notify.webhook_url: http://hooks.example.com/…: plain http is only accepted to a loopback host"
            ),
            "{err}"
        );
        assert_eq!((got[1].0, got[1].1), (n + 2, 17), "{err}");
        assert!(got[1].2.contains("is not an SNS topic ARN"), "{err}");
        assert_eq!((got[2].0, got[2].1), (n + 3, 17), "{err}");
        assert!(
            got[2].2.starts_with(
                "notify.on: \"sometimes\" is not a result: expected one of [\"failed\""
            ),
            "{err}"
        );
        assert_eq!((got[3].0, got[3].1), (n + 5, 10), "{err}");
        assert!(
            got[3].2.contains("0.0.0.0:9464 is not a loopback address")
                && got[3].2.contains("allow_remote = true"),
            "{err}"
        );
        let shown = err.to_string();
        assert!(
            !shown.contains("SECRETTOKEN") && !shown.contains("QSECRET"),
            "{shown}"
        );

        // An operator who says so may serve metrics to the network.
        let remote =
            format!("{MINIMAL}[metrics]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true\n");
        assert!(
            Config::parse(Path::new("t.toml"), &remote)
                .unwrap()
                .metrics
                .unwrap()
                .allow_remote
        );
        // A [notify] that goes nowhere, and an unknown key, are refused.
        for (extra, want) in [
            (
                "[notify]\non = [\"failed\"]\n",
                "neither webhook_url nor sns_topic_arn",
            ),
            ("[notify]\nslack = \"x\"\n", "unknown field `slack`"),
            ("[metrics]\nport = 9464\n", "unknown field `port`"),
        ] {
            let err = Config::parse(Path::new("t.toml"), &format!("{MINIMAL}{extra}")).unwrap_err();
            assert!(err.to_string().contains(want), "{extra}: {err}");
        }
    }
}

/// Property tests: nothing a configuration file or a cron expression can hold makes shiftd panic.
/// `PROPTEST_CASES` sets the number of cases per property (256 by default). Inputs found to fail
/// belong in `tests/fixtures/fuzz-seeds/`, which `every_seed_is_refused_or_accepted_without_panicking`
/// replays; no regression files are written next to the source.
#[cfg(test)]
mod fuzz {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};
    use proptest::prelude::*;
    use proptest::test_runner::Config as ProptestConfig;

    /// A valid file using every section, which the structured generators fill in and mutate.
    const TEMPLATE: &str = r#"[defaults]
timezone = "Asia/Tokyo"
session_duration = "@SESSION@"
refresh_before_expiry = "@REFRESH@"
verify_timeout = "@VERIFY@"
credentials_wait = "@WAIT@"
dry_run = false

[credentials]
source = "imds"

[accounts.account1]
role_arn = "arn:aws:iam::111111111111:role/account1-role-ec2"
external_id = "shiftd-7f3a"
regions = ["ap-northeast-1", "us-east-1"]

[[rules]]
name = "office-hours"
account = "account1"
instances = ["i-0123456789abcdef0", "i-01234567"]
start = "@START@"
stop = ["@STOP@", "0 23 * * 0,6"]
timezone = "Europe/Berlin"

[[rules]]
name = "dev.nights"
account = "account1"
regions = ["us-east-1"]
tags = { Environment = ["dev", "stg"], Schedule = "office*" }
stop = "0 21 * * *"

[pacing]
max_in_flight = 32
max_in_flight_per_account = 4

[pacing.ec2]
start_instances = { burst = 2000, refill_per_second = 2.5 }

[pacing.accounts.account1]
stop_instances = { burst = 5000, refill_per_second = 50 }
"#;

    fn valid() -> String {
        TEMPLATE
            .replace("@SESSION@", "1h")
            .replace("@REFRESH@", "10m")
            .replace("@VERIFY@", "10m")
            .replace("@WAIT@", "5m")
            .replace("@START@", "0 8 * * Mon-Fri")
            .replace("@STOP@", "0 20 * * 1-5")
    }

    fn config() -> ProptestConfig {
        ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// Parses `text` and, if it is valid, uses the result the ways the commands do. Panics only on a bug.
    fn exercise_config(text: &str) {
        match Config::parse(Path::new("t.toml"), text) {
            Ok(c) => exercise_valid(&c),
            Err(ConfigError::Invalid { issues, .. }) => {
                assert!(!issues.is_empty());
                for i in &issues {
                    assert!(i.line >= 1 && i.column >= 1, "{i:?}");
                    assert!(!i.message.is_empty());
                }
            }
            Err(e) => panic!("parse can only find the text invalid: {e:?}"),
        }
    }

    fn exercise_valid(c: &Config) {
        let from = Utc.with_ymd_and_hms(2026, 3, 28, 0, 0, 0).unwrap();
        let until = from + chrono::Duration::days(2);
        let _ = crate::check::render(c, from);
        let (items, truncated) = crate::plan::upcoming(c, from, until, 50);
        let _ = crate::plan::render_text(c, &items, from, until, truncated);
        let (items, truncated) = crate::plan::occurrences(c, from, until, 50, true);
        let _ = crate::plan::render_text(c, &items, from, until, truncated);
        let delegate = crate::policy::Delegate::Account("123456789012".into());
        let _ = crate::policy::render(&crate::policy::documents(c, None, Some(&delegate)));
    }

    /// Bytes as `load` would see them in a file.
    fn exercise_bytes(bytes: &[u8]) {
        match decode(Path::new("t.toml"), bytes) {
            Ok(text) => exercise_config(text),
            Err(ConfigError::Invalid { issues, .. }) => assert_eq!(issues.len(), 1),
            Err(e) => panic!("decode can only find the bytes invalid: {e:?}"),
        }
    }

    fn exercise_cron(expression: &str) {
        if let Ok(s) = CronSchedule::parse(expression) {
            let _ = s.describe();
            let from: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 10, 24, 22, 30, 0).unwrap();
            for zone in [
                Tz::UTC,
                chrono_tz::Europe::London,
                chrono_tz::Australia::Lord_Howe,
            ] {
                let _ = s.next_after(from, zone);
            }
            let _ = s.firings_between(from, from + chrono::Duration::days(3), Tz::UTC, 20);
        }
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u64..=61).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            Just("18446744073709551616".to_string()),
            Just("4294967296".to_string()),
            Just("-1".to_string()),
            Just("00".to_string()),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "Mon", "TUE", "wed", "Thu", "Fri", "Sat", "Sun", "Fry", "Monday", "Jan", "FEB",
                "dec", "Sept", "Oct", "L", "W", "LW", "?", "*",
            ])
            .prop_map(str::to_string),
            "[A-Za-z]{1,4}",
        ]
    }

    fn cron_item() -> impl Strategy<Value = String> {
        let atom = prop_oneof![number(), name()];
        prop_oneof![
            atom.clone(),
            (atom.clone(), atom.clone()).prop_map(|(a, b)| format!("{a}-{b}")),
            (atom.clone(), number()).prop_map(|(a, s)| format!("{a}/{s}")),
            (atom.clone(), atom.clone(), number()).prop_map(|(a, b, s)| format!("{a}-{b}/{s}")),
            number().prop_map(|s| format!("*/{s}")),
            number().prop_map(|n| format!("{n}L")),
            number().prop_map(|n| format!("{n}W")),
            (atom, number()).prop_map(|(d, n)| format!("{d}#{n}")),
        ]
    }

    fn cron_field() -> impl Strategy<Value = String> {
        prop::collection::vec(cron_item(), 1..4).prop_map(|items| items.join(","))
    }

    fn cron_expression() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => prop::collection::vec(cron_field(), 5..=6).prop_map(|f| f.join(" ")),
            2 => prop::collection::vec(cron_field(), 0..=8).prop_map(|f| f.join(" ")),
            1 => prop::sample::select(vec![
                "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly",
                "@reboot", "@every 5m", "@", "@Daily",
            ])
            .prop_map(str::to_string),
        ]
    }

    fn duration() -> impl Strategy<Value = String> {
        let unit = prop::sample::select(vec![
            "", "s", "sec", "m", "min", "h", "hr", "d", "w", "M", "y", "ms", "us", "ns", "x",
        ]);
        prop_oneof![
            (number(), unit.clone()).prop_map(|(n, u)| format!("{n}{u}")),
            prop::collection::vec((number(), unit), 1..4).prop_map(|parts| {
                parts
                    .into_iter()
                    .map(|(n, u)| format!("{n}{u}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }),
        ]
    }

    /// Short TOML-ish snippets: keys, tables, values, and the characters that end or open them.
    fn snippet() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "[defaults]",
                "[[rules]]",
                "[accounts.x]",
                "[credentials]",
                "[rules]",
                "[[defaults]]",
                "name = \"office-hours\"",
                "account = \"account1\"",
                "instances = []",
                "tags = {}",
                "tags = { \"\" = [] }",
                "regions = []",
                "start = []",
                "stop = [[]]",
                "start = 1",
                "timezone = \"\"",
                "source = \"profile\"",
                "profile = \" \"",
                "dry_run = 1",
                "[pacing]",
                "[pacing.ec2]",
                "[pacing.accounts.account1]",
                "max_in_flight = 0",
                "max_in_flight_per_account = 9223372036854775807",
                "start_instances = { burst = -1, refill_per_second = inf }",
                "describe = { refill_per_second = 1e-300 }",
                "\"",
                "'''",
                "\"\"\"",
                "[",
                "]",
                "{",
                "}",
                "=",
                ",",
                "#",
                "\n",
                "\r\n",
                "\t",
                "\0",
                "\u{feff}",
                "\u{301}",
                "ø",
                "日本",
                "\\u0000",
                "\\",
                "1979-05-27T07:32:00Z",
                "nan",
                "inf",
                "-0",
                "0x10",
                "1e400",
                "a.b.c = 1",
                "x = { y = { z = [1, [2, {}]] } }",
            ])
            .prop_map(str::to_string),
            duration().prop_map(|d| format!("session_duration = \"{d}\"")),
            cron_expression().prop_map(|c| format!("start = \"{c}\"")),
            any::<String>(),
        ]
    }

    /// A valid file changed by a few insertions, deletions and replacements at arbitrary places.
    fn mutated() -> impl Strategy<Value = String> {
        let edit = (any::<prop::sample::Index>(), 0usize..40, snippet());
        prop::collection::vec(edit, 1..5).prop_map(|edits| {
            let mut text = valid();
            for (at, delete, insert) in edits {
                let start = text.floor_char_boundary(at.index(text.len() + 1));
                let end = text.floor_char_boundary((start + delete).min(text.len()));
                text.replace_range(start..end, &insert);
            }
            text
        })
    }

    /// The template with generated durations and cron expressions in its holes.
    fn filled() -> impl Strategy<Value = String> {
        (
            duration(),
            duration(),
            duration(),
            duration(),
            cron_expression(),
            cron_expression(),
        )
            .prop_map(|(session, refresh, verify, wait, start, stop)| {
                TEMPLATE
                    .replace("@SESSION@", &session)
                    .replace("@REFRESH@", &refresh)
                    .replace("@VERIFY@", &verify)
                    .replace("@WAIT@", &wait)
                    .replace("@START@", &start)
                    .replace("@STOP@", &stop)
            })
    }

    #[test]
    fn the_template_is_valid() {
        Config::parse(Path::new("t.toml"), &valid()).unwrap();
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn config_from_any_string(text in any::<String>()) {
            exercise_config(&text);
        }

        #[test]
        fn config_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            exercise_bytes(&bytes);
        }

        #[test]
        fn config_with_a_bom_or_bad_byte(prefix in prop::sample::select(vec![
            &b""[..], b"\xEF\xBB\xBF", b"\xFF\xFE", b"\xFE\xFF", b"\xEF\xBB",
        ]), text in mutated(), at in any::<prop::sample::Index>(), byte in 0x80u8..) {
            let mut bytes = [prefix, text.as_bytes()].concat();
            bytes.insert(at.index(bytes.len() + 1), byte);
            exercise_bytes(&bytes);
        }

        #[test]
        fn config_mutated_from_a_valid_one(text in mutated()) {
            exercise_config(&text);
        }

        #[test]
        fn config_with_generated_durations_and_cron(text in filled()) {
            exercise_config(&text);
        }

        #[test]
        fn cron_from_any_string(expression in any::<String>()) {
            exercise_cron(&expression);
        }

        #[test]
        fn cron_from_generated_fields(expression in cron_expression()) {
            exercise_cron(&expression);
        }
    }

    fn seeds() -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-seeds");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn every_seed_is_refused_or_accepted_without_panicking() {
        let (mut configs, mut crons) = (0, 0);
        for path in seeds() {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).unwrap();
            if file.starts_with("config-") {
                // Through the file, as `check` reads it, and through the bytes alone.
                match Config::load(&path) {
                    Ok(c) => exercise_valid(&c),
                    Err(ConfigError::Invalid { .. }) => {}
                    Err(e) => panic!("{file}: {e:?}"),
                }
                exercise_bytes(&bytes);
                configs += 1;
            } else if file.starts_with("cron-") {
                // One expression per file; the final newline is not part of it.
                let text = String::from_utf8_lossy(&bytes);
                let expression = text.strip_suffix('\n').unwrap_or(&text);
                exercise_cron(expression);
                // And in a rule, quoted as TOML quotes it.
                let quoted = toml::Value::String(expression.to_string()).to_string();
                exercise_config(&valid().replace("\"0 21 * * *\"", &quoted));
                crons += 1;
            } else if file != "README.md" {
                panic!("{file}: seeds are config-*.toml or cron-*.txt");
            }
        }
        assert!(
            configs >= 10 && crons >= 10,
            "{configs} config and {crons} cron seeds"
        );
    }
}
