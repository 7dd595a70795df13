//! Cron schedules with crontab(5) semantics, evaluated in an IANA time zone.
//!
//! Pure: no clock reads. The questions are "what is the first firing strictly after this instant?"
//! (`next_after`, and `firings_after` for the ones after it) and "what is the latest firing at or before
//! this instant?" (`prev_at_or_before`).
//!
//! Semantics (these are shiftd's, not the `cron` crate's, which only parses the fields):
//! - 5 fields (`min hour dom month dow`) or 6 with leading seconds, or one of crontab's macros:
//!   `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`. `@reboot` is
//!   refused: shiftd acts at instants, and catches up after a restart.
//! - Day of week counts as in crontab: 0 and 7 are Sunday, 1 is Monday; names `Sun`..`Sat` work too.
//! - When both day-of-month and day-of-week are restricted (neither starts with `*`), a day matches
//!   when *either* matches; otherwise both must (one of them matches every day anyway).
//! - `?` (as in EventBridge and Quartz) as the whole day-of-month or day-of-week field means "no specific
//!   value": the other day field alone decides (`0 8 ? * Mon-Fri` fires on weekdays only). It is an
//!   error in both day fields at once, and in any other field.
//! - Quartz and EventBridge day rules, in lists or alone: in day-of-month `L` (the last day), `LW` (the
//!   last weekday, Monday to Friday) and `nW` (the weekday nearest day n, within the month); in
//!   day-of-week `dL` (the last day d of the month: `5L`, `FriL`) and `d#k` (the k-th day d: `Mon#2`).
//!   The `cron` crate does not parse them: they are taken out of the fields handed to it and matched here.
//! - EventBridge expressions keep their wrapper and their rules: `cron(min hour dom month dow year)`,
//!   day of week 1 (Sunday) to 7 (Saturday), `L` alone in day-of-week is Saturday, exactly one day field
//!   is `?`, and the year field (1970-2199) restricts the years. They are translated into the bare form
//!   (crontab's weekday numbers) plus a set of years, and evaluated as bare expressions are. A bare
//!   expression that reads as EventBridge's (six fields with `?` third or fifth, where a bare one has the
//!   hour and the month, or a year last) is refused with the `cron(...)` form to write instead.
//! - A rule's calendars (`skip`, `only`) come in as a [`DayFilter`] on the dates a schedule fires on, so
//!   every search leaves those dates out (the date of the wall-clock time scheduled, which is the
//!   firing's local date but for a DST gap across midnight).
//! - A local time that does not exist (DST spring forward) fires once, at the first instant after the gap.
//! - A local time that occurs twice (DST fall back) fires once, at its first occurrence.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset,
    TimeZone, Timelike, Utc, Weekday,
};
use chrono_tz::Tz;
use cron::TimeUnitSpec;

/// How far ahead a schedule is searched before it is declared to never fire.
/// Eight years covers every leap-day/weekday combination.
const SEARCH_DAYS: i64 = 366 * 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid cron expression {expression:?}: {reason}")]
pub struct CronError {
    pub expression: String,
    pub reason: String,
}

/// The cron crate's error, as a user of shiftd can act on it. The crate echoes the expression it was
/// given (shiftd's translation, with seconds and day names added) and points a caret into it: only
/// its last line, the cause, is about what the user wrote. Its bounds are inclusive ("Minutes must be
/// less than 59" accepts 59), so they are worded as such.
fn cron_reason(e: &cron::error::Error) -> String {
    let text = e.to_string();
    let cause = text.lines().last().unwrap_or(&text).trim();
    format!(
        "{}; expected \"minute hour day-of-month month day-of-week\", optionally with seconds first",
        cron_cause(cause)
    )
}

/// Names, crate keywords and expectations of the six fields, in order.
const FIELDS: [(&str, &[&str], &str); 6] = [
    ("second", &["Seconds"], "0-59"),
    ("minute", &["Minutes"], "0-59"),
    ("hour", &["Hours"], "0-23"),
    (
        "day-of-month",
        &["Days of Month", "Day of Month"],
        "1-31, \"L\", \"LW\" or \"nW\"",
    ),
    ("month", &["Months", "month name"], "1-12 or Jan-Dec"),
    (
        "day-of-week",
        &["Days of Week", "day of the week"],
        "0-7 (0 and 7 are Sunday) or Sun-Sat, \"dL\" or \"d#k\"",
    ),
];

/// Which field the cron crate refused, found by parsing each (as translated) on its own, and why, in
/// the user's terms: the crate's own message only points a caret into shiftd's translation, or names
/// another field than the one at fault.
fn field_reason(fields: &[(&str, String); 6], e: &cron::error::Error) -> String {
    for (i, (written, translated)) in fields.iter().enumerate() {
        let mut probe = ["0", "0", "0", "*", "*", "*"];
        probe[i] = translated;
        let Err(probe_error) = cron::Schedule::from_str(&probe.join(" ")) else {
            continue;
        };
        let (name, keywords, expected) = FIELDS[i];
        let text = probe_error.to_string();
        let cause = text.lines().last().unwrap_or(&text).trim();
        let detail = if keywords.iter().any(|k| cause.contains(k)) {
            format!(": {}", cron_cause(cause))
        } else {
            String::new()
        };
        return format!(
            "{name} {written:?} is not valid{detail}; expected {expected}, with ranges (a-b), lists (a,b) \
             and steps (*/n)"
        );
    }
    cron_reason(e)
}

fn cron_cause(cause: &str) -> String {
    cause
        .trim_end_matches('.')
        .replace(". (", " (")
        .replace(".)", ")")
        .replace("must be less than", "must be at most")
}

/// A parsed cron expression, with the rule's calendars if it has any. Cheap to clone: the parsed
/// expression is shared, and so is it between the rules that write the same one (see [`Interner`]).
#[derive(Clone, Debug)]
pub struct CronSchedule {
    parsed: Arc<ParsedCron>,
    /// The rule's calendars (`skip`, `only`), if it has any.
    days: Option<Arc<DayFilter>>,
}

/// What an expression says, once parsed.
#[derive(Debug)]
struct ParsedCron {
    source: String,
    fields: cron::Schedule,
    day_of_month: DayField,
    day_of_week: DayField,
    /// EventBridge's year field: the years it fires in (`None`: every year).
    years: Option<BTreeSet<i32>>,
}

/// Parses expressions, sharing one parsed form between the rules that write the same expression: a
/// thousand rules on a few office-hours schedules hold a few parsed schedules, not two thousand.
#[derive(Default)]
pub struct Interner {
    parsed: std::collections::HashMap<String, Arc<ParsedCron>>,
}

impl Interner {
    /// As [`CronSchedule::parse`], sharing the parsed form with earlier equal expressions.
    pub fn parse(&mut self, expression: &str) -> Result<CronSchedule, CronError> {
        if let Some(parsed) = self.parsed.get(expression) {
            return Ok(CronSchedule {
                parsed: parsed.clone(),
                days: None,
            });
        }
        let schedule = CronSchedule::parse(expression)?;
        self.parsed
            .insert(expression.to_string(), schedule.parsed.clone());
        Ok(schedule)
    }
}

/// The dates a rule's calendars leave out (`skip`) or keep (`only`). Checked on the date of each firing's
/// wall-clock time in the rule's zone, where the schedule decides its days, so that every search (the
/// next firing, the latest one, those in a window) skips those dates and agrees with the others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DayFilter {
    /// Dates that never fire.
    pub skip: BTreeSet<NaiveDate>,
    /// With `Some`, only these dates fire.
    pub only: Option<BTreeSet<NaiveDate>>,
}

impl DayFilter {
    pub fn allows(&self, date: NaiveDate) -> bool {
        !self.skip.contains(&date) && self.only.as_ref().is_none_or(|only| only.contains(&date))
    }
}

/// How one day field decides, beyond what the `cron` crate parsed of it.
#[derive(Clone, Debug)]
struct DayField {
    /// Not `*` or `?` (crontab: when both day fields are restricted, either matching is enough).
    restricted: bool,
    /// Whether the field has plain items (days, ranges, steps), which the `cron` crate matches. When it
    /// only has special ones, the crate was given `*` and its answer does not count.
    plain: bool,
    special: Vec<SpecialDay>,
}

impl DayField {
    fn matches(&self, date: NaiveDate, plain_match: bool) -> bool {
        (self.plain && plain_match) || self.special.iter().any(|s| s.matches(date))
    }
}

/// Day rules of Quartz and EventBridge that the `cron` crate does not parse, matched by shiftd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpecialDay {
    /// `L` in day-of-month: the last day of the month.
    LastDay,
    /// `LW`: the last weekday (Monday to Friday) of the month.
    LastWeekday,
    /// `nW`: the weekday nearest day n, within the month (none in a month without day n).
    NearestWeekday(u32),
    /// `dL` in day-of-week: the last of these days in the month.
    LastOf(Weekday),
    /// `d#k`: the k-th of these days in the month.
    Nth(Weekday, u32),
}

impl SpecialDay {
    fn matches(self, date: NaiveDate) -> bool {
        let last = last_day_of_month(date);
        match self {
            SpecialDay::LastDay => date.day() == last,
            SpecialDay::LastWeekday => {
                let back = match date.with_day(last).map(|d| d.weekday()) {
                    Some(Weekday::Sat) => 1,
                    Some(Weekday::Sun) => 2,
                    _ => 0,
                };
                date.day() == last - back
            }
            SpecialDay::NearestWeekday(n) => {
                let Some(day) = date.with_day(n) else {
                    return false;
                };
                let nearest = match day.weekday() {
                    Weekday::Sat if n == 1 => 3,
                    Weekday::Sat => n - 1,
                    Weekday::Sun if n == last => n - 2,
                    Weekday::Sun => n + 1,
                    _ => n,
                };
                date.day() == nearest
            }
            SpecialDay::LastOf(weekday) => date.weekday() == weekday && date.day() + 7 > last,
            SpecialDay::Nth(weekday, k) => {
                date.weekday() == weekday && (date.day() - 1) / 7 + 1 == k
            }
        }
    }
}

fn last_day_of_month(date: NaiveDate) -> u32 {
    let first_of_next = if date.month() == 12 {
        NaiveDate::from_ymd_opt(date.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(date.year(), date.month() + 1, 1)
    };
    first_of_next
        .and_then(|d| d.pred_opt())
        .map_or(31, |d| d.day())
}

impl From<ParsedCron> for CronSchedule {
    fn from(parsed: ParsedCron) -> Self {
        Self {
            parsed: Arc::new(parsed),
            days: None,
        }
    }
}

impl CronSchedule {
    pub fn parse(expression: &str) -> Result<Self, CronError> {
        let err = |reason: String| CronError {
            expression: expression.to_string(),
            reason,
        };
        if let Some(inner) = eventbridge_inner(expression.trim()) {
            let (bare, years) = translate_eventbridge(inner).map_err(err)?;
            let bare = Self::parse(&bare).map_err(|e| err(e.reason))?;
            let mut parsed = Arc::into_inner(bare.parsed).expect("a new parse is not shared");
            parsed.source = expression.to_string();
            parsed.years = years;
            return Ok(Self {
                parsed: Arc::new(parsed),
                days: None,
            });
        }
        let expanded = expand_macro(expression.trim()).map_err(err)?;
        let fields: Vec<&str> = expanded.unwrap_or(expression).split_whitespace().collect();
        if let Some(hint) = looks_like_eventbridge(&fields) {
            return Err(err(hint));
        }
        let (seconds, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(err(format!(
                    "expected 5 fields (minute hour day-of-month month day-of-week) \
                     or 6 with leading seconds, found {n}"
                )));
            }
        };
        let (minute, hour, dom, month, dow) = (rest[0], rest[1], rest[2], rest[3], rest[4]);
        let named = [
            (seconds, "second"),
            (minute, "minute"),
            (hour, "hour"),
            (month, "month"),
        ];
        for (field, name) in named {
            if field.contains('?') {
                return Err(err(format!(
                    "{name} {field:?}: \"?\" (no specific value) is only for day-of-month or day-of-week"
                )));
            }
            if has_day_syntax(field, name == "month") {
                return Err(err(format!(
                    "{name} {field:?}: \"L\", \"W\" and \"#\" are only for day-of-month and day-of-week"
                )));
            }
        }
        for (field, name) in [(dom, "day-of-month"), (dow, "day-of-week")] {
            if field.contains('?') && field != "?" {
                return Err(err(format!(
                    "{name} {field:?}: \"?\" (no specific value) must be the whole field"
                )));
            }
        }
        // "?" says "no specific value": the other day field alone decides, as if this one were "*".
        let (dom, dow) = match (dom, dow) {
            ("?", "?") => {
                return Err(err(
                    "day-of-month and day-of-week are both \"?\": one of them must say which days \
                     (\"*\" for every day)"
                        .to_string(),
                ));
            }
            ("?", dow) => ("*", dow),
            (dom, "?") => (dom, "*"),
            fields => fields,
        };
        let (dom_plain, dom_special) = split_day_of_month(dom).map_err(err)?;
        let (dow_plain, dow_special) = split_day_of_week(dow).map_err(err)?;
        let dow_names =
            crontab_day_of_week_to_names(dow_plain.as_deref().unwrap_or("*")).map_err(err)?;
        let translated = format!(
            "{seconds} {minute} {hour} {} {month} {dow_names}",
            dom_plain.as_deref().unwrap_or("*")
        );
        let parsed = cron::Schedule::from_str(&translated).map_err(|e| {
            let user_dow = if dow == "*" { "*" } else { dow };
            let fields = [
                (seconds, seconds.to_string()),
                (minute, minute.to_string()),
                (hour, hour.to_string()),
                (dom, dom_plain.clone().unwrap_or_else(|| "*".into())),
                (month, month.to_string()),
                (user_dow, dow_names.clone()),
            ];
            err(field_reason(&fields, &e))
        })?;
        Ok(Self::from(ParsedCron {
            source: expression.to_string(),
            fields: parsed,
            day_of_month: DayField {
                restricted: !dom.starts_with('*'),
                plain: dom_plain.is_some(),
                special: dom_special,
            },
            day_of_week: DayField {
                restricted: !dow.starts_with('*'),
                plain: dow_plain.is_some(),
                special: dow_special,
            },
            years: None,
        }))
    }

    pub fn source(&self) -> &str {
        &self.parsed.source
    }

    /// In plain language, in the rule's local time: "08:00 Mon–Fri", "00:00 every day",
    /// "09:00 on the first Monday of the month", "every 15 minutes". Common shapes only: for others
    /// (steps over days, both day fields restricted, several years...) the expression itself.
    pub fn describe(&self) -> String {
        describe(&self.parsed.source).unwrap_or_else(|| self.parsed.source.clone())
    }

    /// The same schedule without the rule's calendars: the firings they leave out included.
    pub fn without_days(&self) -> Self {
        Self {
            days: None,
            ..self.clone()
        }
    }

    /// The dates the rule's calendars leave out or keep, if it has any.
    pub fn days(&self) -> Option<&DayFilter> {
        self.days.as_deref()
    }

    /// The same schedule, firing only on the dates `days` allows.
    pub fn with_days(mut self, days: Arc<DayFilter>) -> Self {
        self.days = Some(days);
        self
    }

    fn date_matches(&self, date: NaiveDate) -> bool {
        if !self.year_matches(date.year()) || !self.parsed.fields.months().includes(date.month()) {
            return false;
        }
        let dom = self.parsed.day_of_month.matches(
            date,
            self.parsed.fields.days_of_month().includes(date.day()),
        );
        // cron crate ordinals: 1 = Sunday.
        let dow = self.parsed.day_of_week.matches(
            date,
            self.parsed
                .fields
                .days_of_week()
                .includes(date.weekday().num_days_from_sunday() + 1),
        );
        let fields = if self.parsed.day_of_month.restricted && self.parsed.day_of_week.restricted {
            dom || dow
        } else {
            dom && dow
        };
        fields && self.days.as_ref().is_none_or(|days| days.allows(date))
    }

    fn year_matches(&self, year: i32) -> bool {
        self.parsed
            .years
            .as_ref()
            .is_none_or(|years| years.contains(&year))
    }

    /// The first day on or after `date` in a year the schedule fires in (`date` itself without a year
    /// field); `None` after its last year.
    fn first_date_from(&self, date: NaiveDate) -> Option<NaiveDate> {
        let Some(years) = &self.parsed.years else {
            return Some(date);
        };
        if years.contains(&date.year()) {
            return Some(date);
        }
        let year = *years.range(date.year()..).next()?;
        NaiveDate::from_ymd_opt(year, 1, 1)
    }

    /// The last day on or before `date` in a year the schedule fires in; `None` before its first year.
    fn last_date_upto(&self, date: NaiveDate) -> Option<NaiveDate> {
        let Some(years) = &self.parsed.years else {
            return Some(date);
        };
        if years.contains(&date.year()) {
            return Some(date);
        }
        let year = *years.range(..date.year()).next_back()?;
        NaiveDate::from_ymd_opt(year, 12, 31)
    }

    /// The first time of day (in seconds from midnight) at or after `from` that the time fields
    /// match, if any on this day.
    fn time_at_or_after(&self, from: u32) -> Option<u32> {
        let (fh, fm, fs) = (from / 3600, from / 60 % 60, from % 60);
        for h in self.parsed.fields.hours().range(fh..) {
            let m0 = if h == fh { fm } else { 0 };
            for m in self.parsed.fields.minutes().range(m0..) {
                let s0 = if h == fh && m == fm { fs } else { 0 };
                if let Some(s) = self.parsed.fields.seconds().range(s0..).next() {
                    return Some(h * 3600 + m * 60 + s);
                }
            }
        }
        None
    }

    /// The last time of day (in seconds from midnight) at or before `upto` that the time fields match.
    fn time_at_or_before(&self, upto: u32) -> Option<u32> {
        let (uh, um, us) = (upto / 3600, upto / 60 % 60, upto % 60);
        for h in self.parsed.fields.hours().range(..=uh).rev() {
            let m0 = if h == uh { um } else { 59 };
            for m in self.parsed.fields.minutes().range(..=m0).rev() {
                let s0 = if h == uh && m == um { us } else { 59 };
                if let Some(s) = self.parsed.fields.seconds().range(..=s0).next_back() {
                    return Some(h * 3600 + m * 60 + s);
                }
            }
        }
        None
    }

    /// The first firing strictly after `after`, in `zone`. `None` if it never fires (e.g. `0 0 30 2 *`).
    pub fn next_after(&self, after: DateTime<Utc>, zone: Tz) -> Option<DateTime<Utc>> {
        self.firings_after(after, None, zone).next()
    }

    /// The latest firing at or before `at`, in `zone`: the counterpart of [`Self::next_after`], found by
    /// searching backwards from `at`, as far back as `next_after` searches forward. `None` if it never
    /// fired in that span.
    pub fn prev_at_or_before(&self, at: DateTime<Utc>, zone: Tz) -> Option<DateTime<Utc>> {
        self.latest_in(None, at, zone)
    }

    /// The latest firing in `(after, at]` (`after` of `None`: as far back as the search goes).
    /// Searching backwards stops at `after`'s local date, so a short window costs a day or two.
    pub(crate) fn latest_in(
        &self,
        after: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
        zone: Tz,
    ) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&zone);
        // Firing instants grow with wall-clock time (see `resolve_local`), so the search starts at the
        // latest wall-clock time that fires at or before `at`: `at`'s own, or, when `at` is the second
        // occurrence of a repeated time, the end of the repetition (the times repeated since fire at
        // their first occurrence, before `at`).
        let mut upper = local.naive_local();
        if let LocalResult::Ambiguous(first, second) = zone.from_local_datetime(&upper)
            && second == local
        {
            let repeated =
                first.offset().fix().local_minus_utc() - second.offset().fix().local_minus_utc();
            upper += Duration::seconds(repeated.into());
        }
        let stop = after.map(|a| {
            a.with_timezone(&zone)
                .date_naive()
                .pred_opt()
                .unwrap_or(NaiveDate::MIN)
        });
        let mut date = upper.date();
        let mut upto = upper.time().num_seconds_from_midnight();
        for _ in 0..=SEARCH_DAYS {
            if stop.is_some_and(|stop| date < stop) {
                return None;
            }
            if !self.year_matches(date.year()) {
                date = self.last_date_upto(date)?;
                upto = SECONDS_PER_DAY - 1;
                continue;
            }
            let mut cursor = Some(upto);
            while let Some(secs) = cursor
                .filter(|_| self.date_matches(date))
                .and_then(|u| self.time_at_or_before(u))
            {
                let instant = resolve_local(&zone, date.and_time(time_of_day(secs)))?;
                if after.is_some_and(|after| instant <= after) {
                    return None;
                }
                if instant <= at {
                    return Some(instant);
                }
                // Not reached with the start above; kept so that a wrong start costs time, not a
                // wrong answer.
                cursor = secs.checked_sub(1);
            }
            date = date.pred_opt()?;
            upto = SECONDS_PER_DAY - 1;
        }
        None
    }

    /// Firings strictly after `after` and, with `until`, at most `until`: in order, each instant once
    /// (wall-clock times in a DST gap all fire at its end, together with the time at the end). Lazy:
    /// each step costs a few set lookups and one time zone conversion, plus one date check per day
    /// without firings. Without `until` it searches as far as [`Self::next_after`] does.
    pub fn firings_after(
        &self,
        after: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        zone: Tz,
    ) -> Firings<'_> {
        // Firing instants grow with wall-clock time (see `resolve_local`), and `after`'s own wall-clock
        // time fires at or before `after`: earlier times cannot fire after it.
        let start = after.with_timezone(&zone).naive_local();
        // A year field moves the start to its next year; the search spans as many days from there.
        let (date, next_second) = match self.first_date_from(start.date()) {
            Some(date) if date == start.date() => (date, start.time().num_seconds_from_midnight()),
            Some(date) => (date, 0),
            None => (NaiveDate::MAX, 0),
        };
        let last_date = if date == NaiveDate::MAX {
            NaiveDate::MIN
        } else {
            search_end(date, until, zone)
        };
        Firings {
            schedule: self,
            zone,
            after,
            until,
            date,
            last_date,
            next_second,
        }
    }

    /// Firings in `(after, until]`, in order, at most `limit`.
    pub fn firings_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        zone: Tz,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        self.firings_after(after, Some(until), zone)
            .take(limit)
            .collect()
    }
}

/// The plain-language summary of [`CronSchedule::describe`], or `None` for a shape it does not
/// cover.
fn describe(source: &str) -> Option<String> {
    let source = source.trim();
    let (fields, year) = if let Some(inner) = eventbridge_inner(source) {
        let (bare, _) = translate_eventbridge(inner).ok()?;
        let year = inner
            .strip_suffix(')')?
            .split_whitespace()
            .last()?
            .to_string();
        (bare, Some(year))
    } else if let Some(fields) = expand_macro(source).ok()? {
        (fields.to_string(), None)
    } else {
        (source.to_string(), None)
    };
    let fields: Vec<&str> = fields.split_whitespace().collect();
    let (second, rest) = match fields.len() {
        5 => ("0", &fields[..]),
        6 => (fields[0], &fields[1..]),
        _ => return None,
    };
    let (minute, hour, dom, month, dow) = (rest[0], rest[1], rest[2], rest[3], rest[4]);
    let time = describe_time(second, minute, hour)?;
    let interval = time.starts_with("every");
    let months = describe_months(month)?;
    let year = match year.as_deref() {
        None | Some("*") => None,
        Some(y) => Some(y.parse::<i32>().ok()?),
    };
    let mut out = time;
    let mut months_said = false;
    match describe_days(dom, dow)? {
        Days::Every if !interval && months.is_none() && year.is_none() => {
            out.push_str(" every day")
        }
        Days::Every => {}
        Days::Text(text) => {
            out.push(' ');
            out.push_str(&text);
        }
        Days::Dates(days) => match (&months, days.as_slice()) {
            (Some(Months::One(m)), [day]) => {
                out.push_str(&format!(" on {} {day}", MONTH_NAMES[*m as usize - 1]));
                months_said = true;
            }
            _ => {
                let days: Vec<String> = days.iter().map(|&d| ordinal(d)).collect();
                out.push_str(&format!(" on the {}", join_and(&days)));
                if months.is_none() {
                    out.push_str(" of the month");
                }
            }
        },
    }
    if let Some(months) = months.filter(|_| !months_said) {
        out.push_str(" in ");
        out.push_str(&months.text());
    }
    if let Some(year) = year {
        out.push_str(&format!(" in {year}"));
    }
    Some(out)
}

/// The days part of a summary.
enum Days {
    /// Every day (of the months and years said).
    Every,
    /// Said in full: "Mon–Fri", "on the last day of the month".
    Text(String),
    /// Days of the month, said with the months.
    Dates(Vec<u32>),
}

/// The months part of a summary: one month (which a single day of the month is said with), or the
/// months' text.
enum Months {
    One(u32),
    Some(String),
}

impl Months {
    fn text(&self) -> String {
        match self {
            Months::One(m) => MONTH_NAMES[*m as usize - 1].to_string(),
            Months::Some(text) => text.clone(),
        }
    }
}

const MONTH_NAMES: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The time of day part: "08:00", "08:00 and 20:00", "every 15 minutes", "every hour at :30".
fn describe_time(second: &str, minute: &str, hour: &str) -> Option<String> {
    let every = |field: &str| -> Option<u32> {
        match field {
            "*" => Some(1),
            _ => field.strip_prefix("*/")?.parse().ok().filter(|n| *n > 0),
        }
    };
    let plural = |n: u32, unit: &str| match n {
        1 => format!("every {unit}"),
        n => format!("every {n} {unit}s"),
    };
    if let (Some(n), "*", "*") = (every(second), minute, hour) {
        return Some(plural(n, "second"));
    }
    let second: u32 = second.parse().ok()?;
    let at = |h: u32, m: u32| match second {
        0 => format!("{h:02}:{m:02}"),
        s => format!("{h:02}:{m:02}:{s:02}"),
    };
    if let (Some(n), "*") = (every(minute), hour) {
        return (second == 0).then(|| plural(n, "minute"));
    }
    let minute: u32 = minute.parse().ok()?;
    let past = |text: String| match (minute, second) {
        (0, 0) => text,
        (m, 0) => format!("{text} at :{m:02}"),
        _ => format!("{text} at :{minute:02}:{second:02}"),
    };
    if let Some(n) = every(hour) {
        return Some(past(plural(n, "hour")));
    }
    if let Some((a, b)) = hour.split_once('-') {
        let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
        return Some(format!(
            "every hour from {} to {}",
            at(a, minute),
            at(b, minute)
        ));
    }
    let hours: Vec<u32> = hour
        .split(',')
        .map(|h| h.parse().ok())
        .collect::<Option<_>>()?;
    if hours.len() > 6 {
        return None;
    }
    let times: Vec<String> = hours.iter().map(|&h| at(h, minute)).collect();
    Some(join_and(&times))
}

/// The days part, from crontab's day fields (EventBridge's already translated).
fn describe_days(dom: &str, dow: &str) -> Option<Days> {
    let any = |field: &str| field == "*" || field == "?";
    match (any(dom), any(dow)) {
        (true, true) => Some(Days::Every),
        (false, true) => describe_day_of_month(dom),
        (true, false) => describe_day_of_week(dow),
        // Either one matching fires (crontab): said as written.
        (false, false) => None,
    }
}

fn describe_day_of_month(field: &str) -> Option<Days> {
    let upper = field.to_ascii_uppercase();
    if upper == "L" {
        return Some(Days::Text("on the last day of the month".into()));
    }
    if upper == "LW" {
        return Some(Days::Text("on the last weekday of the month".into()));
    }
    if let Some(n) = upper.strip_suffix('W') {
        let n: u32 = n.parse().ok()?;
        return Some(Days::Text(format!(
            "on the weekday nearest the {} of the month",
            ordinal(n)
        )));
    }
    let days: Vec<u32> = field
        .split(',')
        .map(|d| d.parse().ok())
        .collect::<Option<_>>()?;
    (days.len() <= 4).then_some(Days::Dates(days))
}

const WEEKDAY_NAMES: [(&str, &str); 7] = [
    ("Mon", "Mondays"),
    ("Tue", "Tuesdays"),
    ("Wed", "Wednesdays"),
    ("Thu", "Thursdays"),
    ("Fri", "Fridays"),
    ("Sat", "Saturdays"),
    ("Sun", "Sundays"),
];

const NTH: [&str; 5] = ["first", "second", "third", "fourth", "fifth"];

fn describe_day_of_week(field: &str) -> Option<Days> {
    let full = |d: Weekday| {
        WEEKDAY_NAMES[d.num_days_from_monday() as usize]
            .1
            .trim_end_matches('s')
    };
    if let Some((d, k)) = field.split_once('#') {
        let k: usize = k.parse().ok()?;
        return Some(Days::Text(format!(
            "on the {} {} of the month",
            NTH.get(k.checked_sub(1)?)?,
            full(weekday(d)?)
        )));
    }
    if let Some(d) = field.strip_suffix(['L', 'l']) {
        return Some(Days::Text(format!(
            "on the last {} of the month",
            full(weekday(d)?)
        )));
    }
    // The weekdays, from Monday: each item a day, or a range of days, numbers with steps.
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, step.parse::<usize>().ok().filter(|s| *s > 0)?),
            None => (item, 1),
        };
        let from_sunday: Vec<u32> = match range.split_once('-') {
            _ if range == "*" => (0..=7).step_by(step).collect(),
            Some((a, b)) => {
                // Numbers as written (0-7, 7 being Sunday again); names in the week's order.
                let number = |d: &str| d.parse::<u32>().ok().filter(|_| weekday(d).is_some());
                let (a, b) = match (number(a), number(b)) {
                    (Some(a), Some(b)) => (a, b),
                    _ => (
                        weekday(a)?.num_days_from_sunday(),
                        weekday(b)?.num_days_from_sunday(),
                    ),
                };
                (a..=b).step_by(step).collect()
            }
            None if step == 1 => vec![weekday(range)?.num_days_from_sunday()],
            None => return None,
        };
        for d in from_sunday {
            days[((d + 6) % 7) as usize] = true;
        }
    }
    let chosen: Vec<usize> = (0..7).filter(|&d| days[d]).collect();
    match chosen.as_slice() {
        [] => None,
        [_, _, _, _, _, _, _] => Some(Days::Every),
        [one] => Some(Days::Text(format!("on {}", WEEKDAY_NAMES[*one].1))),
        _ => Some(Days::Text(runs(&days, |d| WEEKDAY_NAMES[d].0))),
    }
}

/// The months part: `Some(None)` for every month; `None` for a field it does not cover.
fn describe_months(field: &str) -> Option<Option<Months>> {
    if field == "*" {
        return Some(None);
    }
    let month = |m: &str| -> Option<u32> {
        m.parse().ok().filter(|m| (1..=12).contains(m)).or_else(|| {
            let lower = m.to_ascii_lowercase();
            MONTH_NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(&lower))
                .map(|i| i as u32 + 1)
        })
    };
    let mut months = [false; 12];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, step.parse::<usize>().ok().filter(|s| *s > 0)?),
            None => (item, 1),
        };
        let (a, b) = match range.split_once('-') {
            _ if range == "*" => (1, 12),
            Some((a, b)) => (month(a)?, month(b)?),
            None if step == 1 => (month(range)?, month(range)?),
            None => (month(range)?, 12),
        };
        for m in (a..=b).step_by(step) {
            months[m as usize - 1] = true;
        }
    }
    let chosen: Vec<usize> = (0..12).filter(|&m| months[m]).collect();
    match chosen.as_slice() {
        [] => None,
        [one] => Some(Some(Months::One(*one as u32 + 1))),
        _ if chosen.len() == 12 => Some(None),
        _ => Some(Some(Months::Some(runs(&months, |m| MONTH_NAMES[m])))),
    }
}

/// Chosen items in order, runs of three or more as "first–last": "Mon–Fri", "Jan, Jul".
fn runs(chosen: &[bool], name: impl Fn(usize) -> &'static str) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < chosen.len() {
        if !chosen[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i + 1 < chosen.len() && chosen[i + 1] {
            i += 1;
        }
        if i - start >= 2 {
            parts.push(format!("{}\u{2013}{}", name(start), name(i)));
        } else {
            parts.extend((start..=i).map(|d| name(d).to_string()));
        }
        i += 1;
    }
    parts.join(", ")
}

fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// "a", "a and b", "a, b and c".
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

const SECONDS_PER_DAY: u32 = 86_400;

/// The last date a search for firings from `from` looks at: [`SEARCH_DAYS`] on, and, with `until`, no
/// further than the day after `until`'s date (which covers a repeated hour running past midnight).
fn search_end(from: NaiveDate, until: Option<DateTime<Utc>>, zone: Tz) -> NaiveDate {
    let end = from
        .checked_add_signed(Duration::days(SEARCH_DAYS))
        .unwrap_or(NaiveDate::MAX);
    match until {
        Some(until) => end.min(until.with_timezone(&zone).date_naive() + Duration::days(1)),
        None => end,
    }
}

fn time_of_day(secs: u32) -> NaiveTime {
    NaiveTime::from_num_seconds_from_midnight_opt(secs, 0).expect("less than a day")
}

/// The iterator of [`CronSchedule::firings_after`].
#[derive(Clone, Debug)]
pub struct Firings<'a> {
    schedule: &'a CronSchedule,
    zone: Tz,
    /// Every instant yielded is after this; it moves to each instant yielded.
    after: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    date: NaiveDate,
    last_date: NaiveDate,
    /// The time of day on `date` to look from, in seconds from midnight.
    next_second: u32,
}

impl Iterator for Firings<'_> {
    type Item = DateTime<Utc>;

    fn next(&mut self) -> Option<DateTime<Utc>> {
        while self.date <= self.last_date {
            if self.schedule.date_matches(self.date)
                && let Some(secs) = self.schedule.time_at_or_after(self.next_second)
            {
                self.next_second = secs + 1;
                let Some(instant) =
                    resolve_local(&self.zone, self.date.and_time(time_of_day(secs)))
                else {
                    break;
                };
                if self.until.is_some_and(|until| instant > until) {
                    break;
                }
                if instant > self.after {
                    self.after = instant;
                    return Some(instant);
                }
                continue;
            }
            let Some(next) = self.date.succ_opt() else {
                break;
            };
            let Some(first) = self.schedule.first_date_from(next) else {
                break;
            };
            if first != next {
                // Years without firings skipped: the search spans as many days from the next year.
                self.last_date = search_end(first, self.until, self.zone);
            }
            self.date = first;
            self.next_second = 0;
        }
        self.date = self.last_date.succ_opt().unwrap_or(NaiveDate::MAX);
        None
    }
}

/// The five fields a crontab macro (`@daily`...) stands for; `None` for an expression that is not one.
fn expand_macro(expression: &str) -> Result<Option<&'static str>, String> {
    if !expression.starts_with('@') {
        return Ok(None);
    }
    let fields = match expression.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        "@reboot" => {
            return Err(
                "@reboot is not supported: shiftd acts at instants, and occurrences due while \
                        it was not running are caught up (or reported as missed) when it starts"
                    .to_string(),
            );
        }
        _ => {
            return Err(format!(
                "unknown macro {expression:?}: expected one of @yearly, @annually, @monthly, @weekly, \
                 @daily, @midnight or @hourly, alone, or cron fields"
            ));
        }
    };
    Ok(Some(fields))
}

/// The fields inside EventBridge's `cron(...)` wrapper; `None` for an expression without it.
fn eventbridge_inner(expression: &str) -> Option<&str> {
    let head = expression.get(..5)?;
    if !head.eq_ignore_ascii_case("cron(") {
        return None;
    }
    Some(&expression[5..])
}

const EVENTBRIDGE_FIELDS: &str = "cron(minute hour day-of-month month day-of-week year)";

const EVENTBRIDGE_DAY_OF_WEEK: &str =
    "expected 1-7 (EventBridge counts 1 as Sunday, 7 as Saturday) or SUN-SAT, \"dL\" or \"d#k\"";

/// An EventBridge expression (the fields inside `cron(...)`) as a bare one with the same meaning, and
/// the years its year field allows (`None` for `*`).
fn translate_eventbridge(inner: &str) -> Result<(String, Option<BTreeSet<i32>>), String> {
    let inner = inner
        .strip_suffix(')')
        .filter(|inner| !inner.contains(['(', ')']))
        .ok_or_else(|| {
            format!("expected {EVENTBRIDGE_FIELDS}, with one closing parenthesis at the end")
        })?;
    let fields: Vec<&str> = inner.split_whitespace().collect();
    let [minute, hour, dom, month, dow, year] = fields[..] else {
        return Err(format!(
            "expected 6 fields in EventBridge's form {EVENTBRIDGE_FIELDS}, found {}",
            fields.len()
        ));
    };
    match (dom == "?", dow == "?") {
        (true, true) | (false, false) => {
            return Err(format!(
                "EventBridge needs \"?\" in exactly one of day-of-month ({dom:?}) and day-of-week \
                 ({dow:?}): the other one says which days, e.g. cron(0 8 ? * MON-FRI *)"
            ));
        }
        _ => {}
    }
    let dow = if dow == "?" {
        dow.to_string()
    } else {
        eventbridge_day_of_week(dow)?
    };
    let years = eventbridge_years(year)?;
    Ok((format!("{minute} {hour} {dom} {month} {dow}"), years))
}

/// EventBridge's day-of-week field (1 = Sunday .. 7 = Saturday; `L` alone: Saturday) in crontab's
/// numbers (0 = Sunday). Names pass through.
fn eventbridge_day_of_week(field: &str) -> Result<String, String> {
    let day = |item: &str, d: &str| -> Result<String, String> {
        match d.parse::<u32>() {
            Ok(n @ 1..=7) => Ok((n - 1).to_string()),
            Ok(_) => Err(format!(
                "day-of-week {item:?} is out of range; {EVENTBRIDGE_DAY_OF_WEEK}"
            )),
            Err(_) if weekday(d).is_some() => Ok(d.to_string()),
            Err(_) => Err(format!(
                "day-of-week {item:?} is not valid; {EVENTBRIDGE_DAY_OF_WEEK}"
            )),
        }
    };
    let mut items = Vec::new();
    for item in field.split(',') {
        let translated = if item.eq_ignore_ascii_case("L") {
            "6".to_string()
        } else if let Some((d, k)) = item.split_once('#') {
            format!("{}#{k}", day(item, d)?)
        } else if let Some(d) = item.strip_suffix(['L', 'l']).filter(|d| !d.is_empty()) {
            format!("{}L", day(item, d)?)
        } else {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => (range, Some(step)),
                None => (item, None),
            };
            // With a step, names become crontab's numbers: the range is then numeric throughout
            // (the parser takes no name in a stepped range).
            let day = |item: &str, d: &str| -> Result<String, String> {
                match (
                    step,
                    d.parse::<u32>().is_err().then(|| weekday(d)).flatten(),
                ) {
                    (Some(_), Some(w)) => Ok(w.num_days_from_sunday().to_string()),
                    _ => day(item, d),
                }
            };
            let range = match (range, range.split_once('-')) {
                ("*", _) if step.is_some() => "0-6".to_string(),
                ("*", _) => "*".to_string(),
                (_, Some((a, b))) => {
                    if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>())
                        && a > b
                    {
                        return Err(format!("day-of-week range {item:?} runs backwards"));
                    }
                    format!("{}-{}", day(item, a)?, day(item, b)?)
                }
                // Quartz: "a/n" runs from a to the end of the week.
                (a, None) if step.is_some() => format!("{}-6", day(item, a)?),
                (a, None) => day(item, a)?,
            };
            match step {
                Some(step) => format!("{range}/{step}"),
                None => range,
            }
        };
        items.push(translated);
    }
    Ok(items.join(","))
}

/// The first and last years EventBridge accepts.
const YEARS: (i32, i32) = (1970, 2199);

/// EventBridge's year field: `None` for `*`, otherwise the years it lists.
fn eventbridge_years(field: &str) -> Result<Option<BTreeSet<i32>>, String> {
    if field == "*" {
        return Ok(None);
    }
    let bad = |item: &str| {
        format!(
            "year {item:?} is not valid; expected {}-{}, with ranges (a-b), lists (a,b) and steps (*/n)",
            YEARS.0, YEARS.1
        )
    };
    let year = |item: &str, y: &str| {
        y.parse::<i32>()
            .ok()
            .filter(|y| (YEARS.0..=YEARS.1).contains(y))
            .ok_or_else(|| bad(item))
    };
    let mut years = BTreeSet::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step = step
                    .parse::<usize>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad(item))?;
                (range, Some(step))
            }
            None => (item, None),
        };
        let (first, last) = match range.split_once('-') {
            _ if range == "*" => YEARS,
            Some((a, b)) => (year(item, a)?, year(item, b)?),
            None if step.is_some() => (year(item, range)?, YEARS.1),
            None => {
                let y = year(item, range)?;
                (y, y)
            }
        };
        if first > last {
            return Err(format!("year range {item:?} runs backwards"));
        }
        years.extend((first..=last).step_by(step.unwrap_or(1)));
    }
    Ok(Some(years))
}

/// For a bare expression that reads as EventBridge's (six fields with `?` in EventBridge's day fields,
/// the third or fifth, or a year last), a message suggesting the `cron(...)` form. Neither can be a
/// valid bare expression: there the third field is the hour and the fifth the month.
fn looks_like_eventbridge(fields: &[&str]) -> Option<String> {
    let [first, second, third, fourth, fifth, last] = fields[..] else {
        return None;
    };
    // Quartz's form, seconds first, with `?` as its day-of-month and day-of-week numbers: read as
    // crontab it would fire on other days (Quartz's day-of-week 1 is Sunday). Names mean the same in
    // both, and so does `?` as the day-of-week.
    if fourth == "?" && has_weekday_numbers(last) {
        let hint = if first == "0" {
            format!("\"cron({second} {third} {fourth} {fifth} {last} *)\"")
        } else {
            "cron(minute hour day-of-month month day-of-week year)".to_string()
        };
        return Some(format!(
            "this looks like a Quartz expression (seconds minute hour day-of-month month day-of-week), \
             where day-of-week 1 is Sunday: write it in EventBridge's form, {hint}, whose day numbers \
             are Quartz's; bare expressions are crontab's (0 and 7 are Sunday, 1 is Monday)"
        ));
    }
    let year = |y: &str| y.len() == 4 && y.parse::<i32>().is_ok_and(|y| y >= YEARS.0);
    let year_like = year(last)
        || last
            .split_once('-')
            .is_some_and(|(a, b)| year(a) && year(b));
    if third != "?" && fifth != "?" && !year_like {
        return None;
    }
    // EventBridge needs exactly one `?`: put it where the expression has no restriction.
    let mut suggested: Vec<&str> = fields.to_vec();
    if third != "?" && fifth != "?" {
        if fifth == "*" {
            suggested[4] = "?";
        } else if third == "*" {
            suggested[2] = "?";
        }
    }
    Some(format!(
        "this looks like an EventBridge expression (minute hour day-of-month month day-of-week year): \
         write it with its wrapper, \"cron({})\", where day-of-week 1 is Sunday; bare expressions \
         are crontab's (minute hour day-of-month month day-of-week, optionally with seconds first)",
        suggested.join(" ")
    ))
}

/// Whether a day-of-week field names days by number (not the `k` of `d#k`): numbers mean other days
/// in crontab and in Quartz/EventBridge, names the same.
fn has_weekday_numbers(field: &str) -> bool {
    let mut after_hash = false;
    field.chars().any(|c| {
        let hashed = after_hash;
        after_hash = c == '#' || (after_hash && c.is_ascii_digit());
        c.is_ascii_digit() && !hashed
    })
}

/// Maps a local wall-clock time to the instant it fires at: the earlier of two occurrences, or the end of
/// a DST gap for a time that does not exist.
///
/// The instant never decreases as the wall-clock time increases: times before a repeated hour fire before
/// it, its times fire at their first occurrence (before the transition), the times after it fire after.
/// `next_after` and `prev_at_or_before` rely on this to start their searches at the given instant's
/// own wall-clock time.
fn resolve_local(zone: &Tz, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
    match zone.from_local_datetime(&naive) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(earliest, _) => Some(earliest.with_timezone(&Utc)),
        LocalResult::None => {
            // Walk forward to the first wall-clock minute that exists: the end of the gap. Gaps are at
            // most a day long (a zone skipping a date), so this is bounded.
            let mut probe = naive.with_second(0)?;
            for _ in 0..=(26 * 60) {
                probe += Duration::minutes(1);
                if let Some(t) = zone.from_local_datetime(&probe).earliest() {
                    // The first instant after the gap is the transition itself, which is `probe` minus
                    // however much of that minute lies past the transition (none, for whole-minute zones).
                    return Some(t.with_timezone(&Utc));
                }
            }
            None
        }
    }
}

/// Whether a field other than the day fields uses the day fields' `L`, `W` or `#`. Month names are
/// letters too: there only the day fields' own forms count (`L`, `LW`, `15W`, `#`).
fn has_day_syntax(field: &str, month: bool) -> bool {
    field.split([',', '-', '/']).any(|item| {
        let item = item.to_ascii_uppercase();
        item.contains('#')
            || item == "L"
            || item == "LW"
            || item
                .strip_suffix('W')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            || (!month && (item.contains('L') || item.contains('W')))
    })
}

const DAY_OF_MONTH_EXPECTED: &str = "expected days 1-31 (ranges, lists, steps), \"L\" (last day), \
     \"LW\" (last weekday) or \"nW\" (the weekday nearest day n)";

/// Splits a day-of-month field into its plain items (for the `cron` crate; `None` if there are none)
/// and its `L`, `LW` and `nW` items.
fn split_day_of_month(field: &str) -> Result<(Option<String>, Vec<SpecialDay>), String> {
    let mut plain = Vec::new();
    let mut special = Vec::new();
    for item in field.split(',') {
        let upper = item.to_ascii_uppercase();
        if upper.contains('#') {
            return Err(format!(
                "day-of-month {item:?}: \"#\" (the n-th weekday) is only for day-of-week, e.g. \"Mon#2\""
            ));
        }
        if upper == "L" {
            special.push(SpecialDay::LastDay);
        } else if upper == "LW" {
            special.push(SpecialDay::LastWeekday);
        } else if let Some(n) = upper.strip_suffix('W').filter(|n| !n.contains(['L', 'W'])) {
            match n.parse::<u32>() {
                Ok(n @ 1..=31) => special.push(SpecialDay::NearestWeekday(n)),
                _ => {
                    return Err(format!(
                        "day-of-month {item:?}: \"nW\" needs a day n from 1 to 31 (\"15W\": the weekday \
                         nearest the 15th)"
                    ));
                }
            }
        } else if upper.contains(['L', 'W']) {
            return Err(format!("day-of-month {item:?}: {DAY_OF_MONTH_EXPECTED}"));
        } else {
            plain.push(item);
        }
    }
    Ok(((!plain.is_empty()).then(|| plain.join(",")), special))
}

/// Splits a day-of-week field into its plain items (`None` if there are none) and its `dL` and `d#k`
/// items.
fn split_day_of_week(field: &str) -> Result<(Option<String>, Vec<SpecialDay>), String> {
    let mut plain = Vec::new();
    let mut special = Vec::new();
    for item in field.split(',') {
        if let Some((day, k)) = item.split_once('#') {
            let day = weekday(day).ok_or_else(|| {
                format!(
                    "day-of-week {item:?}: \"d#k\" needs a day d (0-7 or Sun-Sat) and k from 1 to 5, \
                     e.g. \"Mon#2\" for the second Monday"
                )
            })?;
            match k.parse::<u32>() {
                Ok(k @ 1..=5) => special.push(SpecialDay::Nth(day, k)),
                _ => {
                    return Err(format!(
                        "day-of-week {item:?}: a month has at most 5 of each day; use 1 to 5 after \"#\""
                    ));
                }
            }
        } else if let Some(day) = item.strip_suffix(['L', 'l']) {
            if day.is_empty() {
                return Err(format!(
                    "day-of-week {item:?}: say which day is the last of the month, e.g. \"FriL\" or \
                     \"5L\" for the last Friday"
                ));
            }
            let day = weekday(day).ok_or_else(|| {
                format!(
                    "day-of-week {item:?}: \"dL\" needs a day d (0-7 or Sun-Sat), e.g. \"FriL\" or \
                     \"5L\" for the last Friday of the month"
                )
            })?;
            special.push(SpecialDay::LastOf(day));
        } else if item.ends_with(['W', 'w']) {
            return Err(format!(
                "day-of-week {item:?}: \"W\" (nearest weekday) is only for day-of-month, e.g. \"15W\""
            ));
        } else {
            plain.push(item);
        }
    }
    Ok(((!plain.is_empty()).then(|| plain.join(",")), special))
}

/// A day of the week as crontab writes it: 0-7 (0 and 7 are Sunday) or a name.
fn weekday(text: &str) -> Option<Weekday> {
    const NAMES: [(&str, Weekday); 16] = [
        ("sun", Weekday::Sun),
        ("sunday", Weekday::Sun),
        ("mon", Weekday::Mon),
        ("monday", Weekday::Mon),
        ("tue", Weekday::Tue),
        ("tues", Weekday::Tue),
        ("tuesday", Weekday::Tue),
        ("wed", Weekday::Wed),
        ("wednesday", Weekday::Wed),
        ("thu", Weekday::Thu),
        ("thurs", Weekday::Thu),
        ("thursday", Weekday::Thu),
        ("fri", Weekday::Fri),
        ("friday", Weekday::Fri),
        ("sat", Weekday::Sat),
        ("saturday", Weekday::Sat),
    ];
    const BY_NUMBER: [Weekday; 8] = [
        Weekday::Sun,
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];
    if let Ok(n) = text.parse::<usize>() {
        return BY_NUMBER.get(n).copied();
    }
    let lower = text.to_ascii_lowercase();
    NAMES.iter().find(|(n, _)| *n == lower).map(|(_, d)| *d)
}

const DAY_NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

/// Rewrites a crontab day-of-week field (0..=7, Sunday = 0 and 7) into day names, which the `cron` crate
/// reads with its own numbering. Numeric items (`3`, `1-5`, `0-6/2`, `*/2`) are expanded; names pass through.
fn crontab_day_of_week_to_names(field: &str) -> Result<String, String> {
    let mut items = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 =
                    s.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        format!("day-of-week step {s:?} is not a positive number")
                    })?;
                (r, Some(step))
            }
            None => (item, None),
        };
        let numeric_bounds = if range == "*" {
            Some((0, 7))
        } else if let Some((a, b)) = range.split_once('-') {
            match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => Some((a, b)),
                _ => None,
            }
        } else {
            range
                .parse::<u32>()
                .ok()
                .map(|a| (a, if step.is_some() { 7 } else { a }))
        };
        match numeric_bounds {
            Some((a, b)) => {
                if a > 7 || b > 7 {
                    return Err(format!(
                        "day of week {item:?} out of range: use 0-7 (0 and 7 are Sunday) or Sun-Sat"
                    ));
                }
                if a > b {
                    return Err(format!("day-of-week range {item:?} runs backwards"));
                }
                let step = step.unwrap_or(1) as usize;
                items.extend(
                    (a..=b)
                        .step_by(step)
                        .map(|d| DAY_NAMES[d as usize].to_string()),
                );
            }
            None => items.push(item.to_string()),
        }
    }
    items.dedup();
    Ok(items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, zone: &str, after: &str) -> Option<String> {
        let zone: Tz = zone.parse().unwrap();
        CronSchedule::parse(expr)
            .unwrap()
            .next_after(utc(after), zone)
            .map(|t| t.with_timezone(&zone).to_rfc3339())
    }

    #[test]
    fn rules_writing_the_same_expression_share_its_parse_but_not_their_calendars() {
        let mut interner = Interner::default();
        let office = interner.parse("0 8 * * Mon-Fri").unwrap();
        let same = interner.parse("0 8 * * Mon-Fri").unwrap();
        let other = interner.parse("0 9 * * Mon-Fri").unwrap();
        assert!(Arc::ptr_eq(&office.parsed, &same.parsed));
        assert!(!Arc::ptr_eq(&office.parsed, &other.parsed));
        // One rule skips Monday 2026-11-30; the other, with the same expression, still fires then.
        let skip = DayFilter {
            skip: [NaiveDate::from_ymd_opt(2026, 11, 30).unwrap()].into(),
            only: None,
        };
        let skipping = same.with_days(Arc::new(skip));
        let after = utc("2026-11-29T12:00:00Z");
        assert_eq!(
            office.next_after(after, Tz::UTC),
            Some(utc("2026-11-30T08:00:00Z"))
        );
        assert_eq!(
            skipping.next_after(after, Tz::UTC),
            Some(utc("2026-12-01T08:00:00Z"))
        );
        assert_eq!(office.source(), skipping.source());
        // A bad expression is refused every time, not remembered as good.
        assert!(interner.parse("0 25 * * *").is_err());
        assert!(interner.parse("0 25 * * *").is_err());
    }

    #[test]
    fn next_firing_table() {
        // (expression, zone, after (UTC or offset), expected next firing in the zone's local time)
        let cases: &[(&str, &str, &str, Option<&str>)] = &[
            // Plain weekday rules; 2026-11-30 is a Monday.
            (
                "0 8 * * Mon-Fri",
                "Asia/Tokyo",
                "2026-11-29T00:00:00Z",
                Some("2026-11-30T08:00:00+09:00"),
            ),
            (
                "0 20 * * 1-5",
                "Asia/Tokyo",
                "2026-11-30T10:59:59Z",
                Some("2026-11-30T20:00:00+09:00"),
            ),
            (
                "0 20 * * 1-5",
                "Asia/Tokyo",
                "2026-12-04T11:00:00Z",
                Some("2026-12-07T20:00:00+09:00"),
            ),
            // Numeric day of week as in crontab: 0 and 7 are Sunday, 1 is Monday.
            (
                "0 9 * * 0",
                "UTC",
                "2026-11-30T00:00:00Z",
                Some("2026-12-06T09:00:00+00:00"),
            ),
            (
                "0 9 * * 7",
                "UTC",
                "2026-11-30T00:00:00Z",
                Some("2026-12-06T09:00:00+00:00"),
            ),
            (
                "0 9 * * 1",
                "UTC",
                "2026-11-29T00:00:00Z",
                Some("2026-11-30T09:00:00+00:00"),
            ),
            (
                "0 9 * * 5-7",
                "UTC",
                "2026-11-30T00:00:00Z",
                Some("2026-12-04T09:00:00+00:00"),
            ),
            (
                "0 9 * * 6",
                "UTC",
                "2026-11-29T00:00:00Z",
                Some("2026-12-05T09:00:00+00:00"),
            ),
            // Day-of-month and day-of-week both restricted: either fires (the 1st, or any Friday).
            (
                "0 0 1 * Fri",
                "UTC",
                "2026-11-29T00:00:00Z",
                Some("2026-12-01T00:00:00+00:00"),
            ),
            (
                "0 0 1 * 5",
                "UTC",
                "2026-12-01T00:00:00Z",
                Some("2026-12-04T00:00:00+00:00"),
            ),
            // Only one restricted: both must match (the 13th that is... any day, as dow is *).
            (
                "0 0 13 * *",
                "UTC",
                "2026-11-29T00:00:00Z",
                Some("2026-12-13T00:00:00+00:00"),
            ),
            // A stepped day-of-month starts with "*", so both must match (crontab): the 21st that is a Monday.
            (
                "0 0 */10 * Mon",
                "UTC",
                "2026-11-29T00:00:00Z",
                Some("2026-12-21T00:00:00+00:00"),
            ),
            // Names for months, steps, lists.
            (
                "30 6 1 Jan,Jul *",
                "UTC",
                "2026-11-29T00:00:00Z",
                Some("2027-01-01T06:30:00+00:00"),
            ),
            (
                "*/15 * * * *",
                "UTC",
                "2026-11-29T10:07:00Z",
                Some("2026-11-29T10:15:00+00:00"),
            ),
            // Six fields: leading seconds.
            (
                "*/5 * * * * *",
                "UTC",
                "2026-11-29T10:00:02Z",
                Some("2026-11-29T10:00:05+00:00"),
            ),
            (
                "30 0 12 * * *",
                "UTC",
                "2026-11-29T12:00:30Z",
                Some("2026-11-30T12:00:30+00:00"),
            ),
            // Strictly after: a firing exactly at `after` is not returned again.
            (
                "0 8 * * *",
                "UTC",
                "2026-11-29T08:00:00Z",
                Some("2026-11-30T08:00:00+00:00"),
            ),
            // Never fires.
            ("0 0 30 2 *", "UTC", "2026-11-29T00:00:00Z", None),
            // Leap day.
            (
                "0 0 29 2 *",
                "UTC",
                "2026-11-29T00:00:00Z",
                Some("2028-02-29T00:00:00+00:00"),
            ),
            // --- DST, spring forward: the missing local time fires once, at the end of the gap.
            // America/New_York 2027-03-14 02:00 -> 03:00.
            (
                "30 2 * * *",
                "America/New_York",
                "2027-03-14T05:00:00Z",
                Some("2027-03-14T03:00:00-04:00"),
            ),
            (
                "30 2 * * *",
                "America/New_York",
                "2027-03-14T07:00:00Z",
                Some("2027-03-15T02:30:00-04:00"),
            ),
            // Every 15 minutes through the gap: 01:45 then 03:00 (02:xx collapse into the gap's end) then 03:15.
            (
                "*/15 * * * *",
                "America/New_York",
                "2027-03-14T06:45:00Z",
                Some("2027-03-14T03:00:00-04:00"),
            ),
            (
                "*/15 * * * *",
                "America/New_York",
                "2027-03-14T07:00:00Z",
                Some("2027-03-14T03:15:00-04:00"),
            ),
            // Europe/Berlin 2027-03-28 02:00 -> 03:00.
            (
                "0 2 * * *",
                "Europe/Berlin",
                "2027-03-27T12:00:00Z",
                Some("2027-03-28T03:00:00+02:00"),
            ),
            // Australia/Lord_Howe: 30-minute DST, 2026-10-04 02:00 -> 02:30 (+10:30 -> +11:00).
            (
                "15 2 * * *",
                "Australia/Lord_Howe",
                "2026-10-03T12:00:00Z",
                Some("2026-10-04T02:30:00+11:00"),
            ),
            (
                "45 2 * * *",
                "Australia/Lord_Howe",
                "2026-10-03T12:00:00Z",
                Some("2026-10-04T02:45:00+11:00"),
            ),
            // --- DST, fall back: a repeated local time fires once, at its first occurrence.
            // America/New_York 2026-11-01 02:00 -> 01:00: 01:30 happens at 05:30Z and 06:30Z.
            (
                "30 1 * * *",
                "America/New_York",
                "2026-11-01T04:00:00Z",
                Some("2026-11-01T01:30:00-04:00"),
            ),
            (
                "30 1 * * *",
                "America/New_York",
                "2026-11-01T05:30:00Z",
                Some("2026-11-02T01:30:00-05:00"),
            ),
            // Hourly through the overlap: after the first 01:00 (EDT) comes 02:00 EST, not a second 01:00.
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T05:00:00Z",
                Some("2026-11-01T02:00:00-05:00"),
            ),
            // Lord_Howe falls back 30 minutes on 2027-04-04 02:00 -> 01:30: 01:45 fires once.
            (
                "45 1 * * *",
                "Australia/Lord_Howe",
                "2027-04-03T12:00:00Z",
                Some("2027-04-04T01:45:00+11:00"),
            ),
            (
                "45 1 * * *",
                "Australia/Lord_Howe",
                "2027-04-03T14:45:00Z",
                Some("2027-04-05T01:45:00+10:30"),
            ),
            // A zone without DST.
            (
                "0 8 * * Mon-Fri",
                "Asia/Kolkata",
                "2026-11-29T00:00:00Z",
                Some("2026-11-30T08:00:00+05:30"),
            ),
        ];
        for (expr, zone, after, want) in cases {
            assert_eq!(
                next(expr, zone, after).as_deref(),
                *want,
                "{expr} in {zone} after {after}"
            );
        }
    }

    #[test]
    fn fall_back_fires_each_occurrence_once_over_a_day() {
        let zone: Tz = "America/New_York".parse().unwrap();
        let s = CronSchedule::parse("*/30 * * * *").unwrap();
        let firings = s.firings_between(
            utc("2026-11-01T04:00:00Z"),
            utc("2026-11-02T05:00:00Z"),
            zone,
            1000,
        );
        // Local 00:30 on Nov 1 through 00:00 on Nov 2: 25 real hours, but the repeated hour 01:00-02:00
        // fires only once, so 24 local hours * 2.
        assert_eq!(firings.len(), 48);
        let mut sorted = firings.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), firings.len(), "no instant fires twice");
    }

    #[test]
    fn spring_forward_day_has_one_firing_per_existing_or_skipped_slot() {
        let zone: Tz = "Europe/Berlin".parse().unwrap();
        let s = CronSchedule::parse("0 * * * *").unwrap();
        let firings = s.firings_between(
            utc("2027-03-27T23:00:00Z"),
            utc("2027-03-28T22:00:00Z"),
            zone,
            1000,
        );
        // 23 real hours; 02:00 does not exist and fires at 03:00, together with 03:00 itself: once.
        assert_eq!(firings.len(), 23);
    }

    /// Local firings in `(after, until]`, as `YYYY-MM-DD HH:MM` in the zone.
    fn local_firings(expr: &str, zone: &str, after: &str, until: &str) -> Vec<String> {
        let zone: Tz = zone.parse().unwrap();
        CronSchedule::parse(expr)
            .unwrap()
            .firings_between(utc(after), utc(until), zone, 1000)
            .into_iter()
            .map(|t| t.with_timezone(&zone).format("%Y-%m-%d %H:%M").to_string())
            .collect()
    }

    #[test]
    fn question_mark_leaves_the_other_day_field_to_decide() {
        const WEEKDAYS: &[&str] = &["11-30", "12-01", "12-02", "12-03", "12-04"];
        const EVERY_DAY: &[&str] = &[
            "11-30", "12-01", "12-02", "12-03", "12-04", "12-05", "12-06",
        ];
        // A week from Monday 2026-11-30 in Berlin, December 2026 in Tokyo.
        let week = ("2026-11-29T12:00:00Z", "2026-12-06T23:00:00Z");
        let december = ("2026-11-30T15:00:00Z", "2026-12-31T15:00:00Z");
        // (expression, zone, (after, until), the 2026 dates it fires on at 08:00 local)
        let cases = [
            // EventBridge's "08:00 on weekdays": not the weekend.
            ("0 8 ? * Mon-Fri", "Europe/Berlin", week, WEEKDAYS),
            ("0 8 ? * 1-5", "Europe/Berlin", week, WEEKDAYS),
            ("0 0 8 ? * MON-FRI", "Europe/Berlin", week, WEEKDAYS),
            ("0 8 * * Mon-Fri", "Europe/Berlin", week, WEEKDAYS),
            ("0 8 ? * *", "Europe/Berlin", week, EVERY_DAY),
            // The 15th only, whatever its weekday.
            ("0 8 15 * ?", "Asia/Tokyo", december, &["12-15"]),
            ("0 8 15 * *", "Asia/Tokyo", december, &["12-15"]),
            ("0 8 15,31 * ?", "Asia/Tokyo", december, &["12-15", "12-31"]),
            // Both restricted, no "?": crontab's OR still applies (the 15th, and Sundays).
            (
                "0 8 15 * Sun",
                "Asia/Tokyo",
                december,
                &["12-06", "12-13", "12-15", "12-20", "12-27"],
            ),
            (
                "0 8 ? * 0",
                "Asia/Tokyo",
                december,
                &["12-06", "12-13", "12-20", "12-27"],
            ),
            (
                "0 8 ? * 7",
                "Asia/Tokyo",
                december,
                &["12-06", "12-13", "12-20", "12-27"],
            ),
        ];
        for (expr, zone, (after, until), dates) in cases {
            let want: Vec<String> = dates.iter().map(|d| format!("2026-{d} 08:00")).collect();
            assert_eq!(
                local_firings(expr, zone, after, until),
                want,
                "{expr} in {zone} over ({after}, {until}]"
            );
        }
    }

    /// Every firing of `s` whose wall-clock date is within two days of `t`'s, by brute force: each
    /// matching wall-clock time resolved on its own, without the searches' shortcuts.
    fn oracle(s: &CronSchedule, t: DateTime<Utc>, zone: Tz) -> BTreeSet<DateTime<Utc>> {
        let day = t.with_timezone(&zone).date_naive();
        let mut out = BTreeSet::new();
        for date in (-2..=2).map(|d| day + Duration::days(d)) {
            if !s.date_matches(date) {
                continue;
            }
            for h in s.parsed.fields.hours().iter() {
                for m in s.parsed.fields.minutes().iter() {
                    for sec in s.parsed.fields.seconds().iter() {
                        let naive = date.and_hms_opt(h, m, sec).unwrap();
                        out.insert(resolve_local(&zone, naive).unwrap());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn prev_at_or_before_is_the_latest_firing_at_or_before() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let expressions = [
            "0 8 * * Mon-Fri",
            "30 2 * * *",
            "15 2 * * *",
            "45 1 * * *",
            "*/15 * * * *",
            "0 * * * *",
            "* * * * *",
            "*/5 0-3 * * *",
            "0 1-3 * * *",
            "0 30 1,2,3 * * *",
            "10 0 0 * * *",
            "59 23 * * *",
            "0 0 1 * Fri",
            "0 12 ? * Sun",
            "0 0 29 2 *",
            "*/7 * * * * *",
            "* * * * * *",
            "* 2 * * * *",
            "0 8 LW * ?",
            "30 1 ? * Sun#1",
            "0 2 ? * SunL",
            "15 2 1W * ?",
        ];
        let zones = [
            "America/New_York",
            "Europe/Berlin",
            "Australia/Lord_Howe",
            "Asia/Kolkata",
            "UTC",
        ];
        // DST changes (in some of the zones) and plain days, to sample around.
        let centres = [
            "2026-11-01T06:00:00Z",
            "2027-03-14T07:00:00Z",
            "2026-10-25T01:00:00Z",
            "2027-03-28T01:00:00Z",
            "2026-10-03T15:30:00Z",
            "2027-04-03T15:00:00Z",
            "2027-06-15T12:00:00Z",
            "2028-02-29T00:00:00Z",
        ];
        let mut rng = StdRng::seed_from_u64(20261101);
        for expr in expressions {
            let s = CronSchedule::parse(expr).unwrap();
            let per_day = s.parsed.fields.hours().count()
                * s.parsed.fields.minutes().count()
                * s.parsed.fields.seconds().count();
            for zone in zones {
                let zone: Tz = zone.parse().unwrap();
                for _ in 0..40 {
                    let centre = utc(centres[rng.random_range(0..centres.len())]);
                    let mut t = centre + Duration::seconds(rng.random_range(-4 * 3600..4 * 3600));
                    match rng.random_range(0..3) {
                        0 => t += Duration::nanoseconds(rng.random_range(1..1_000_000_000)),
                        1 => t = t.with_second(0).unwrap(),
                        _ => {}
                    }
                    let what = format!("{expr} in {zone} at {t:?}");
                    let Some(p) = s.prev_at_or_before(t, zone) else {
                        panic!("{what}: fired within eight years")
                    };
                    // The latest at or before: a firing, and nothing fires after it up to `t`.
                    assert!(p <= t, "{what}: {p:?}");
                    assert_eq!(
                        s.next_after(p - Duration::nanoseconds(1), zone),
                        Some(p),
                        "{what}: {p:?} is a firing"
                    );
                    if p.timestamp_subsec_nanos() == 0 {
                        assert_eq!(
                            s.next_after(p - Duration::seconds(1), zone),
                            Some(p),
                            "{what}"
                        );
                    }
                    let n = s.next_after(t, zone).unwrap();
                    assert!(n > t, "{what}");
                    assert_eq!(s.next_after(p, zone), Some(n), "{what}: nothing in between");
                    assert_eq!(s.prev_at_or_before(n, zone), Some(n), "{what}");
                    assert_eq!(
                        s.prev_at_or_before(n - Duration::nanoseconds(1), zone),
                        Some(p),
                        "{what}"
                    );
                    // Against brute force, when the answer is near enough for it to see.
                    if per_day <= 1440 {
                        let all = oracle(&s, t, zone);
                        let day = Duration::days(1);
                        if let Some(want) = all.range(..=t).next_back().filter(|w| t - **w < day) {
                            assert_eq!(p, *want, "{what}: brute force");
                        }
                        if let Some(want) =
                            all.range(t..).find(|w| **w > t).filter(|w| **w - t < day)
                        {
                            assert_eq!(n, *want, "{what}: brute force");
                        }
                        let window: Vec<_> = all
                            .range(t - Duration::hours(12)..=t + Duration::hours(12))
                            .filter(|w| **w > t - Duration::hours(12))
                            .copied()
                            .collect();
                        assert_eq!(
                            s.firings_between(
                                t - Duration::hours(12),
                                t + Duration::hours(12),
                                zone,
                                usize::MAX
                            ),
                            window,
                            "{what}: firings in a day around it"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn prev_at_or_before_table() {
        // (expression, zone, at, expected latest firing at or before, in the zone's local time)
        let cases: &[(&str, &str, &str, Option<&str>)] = &[
            // At a firing: that firing.
            (
                "0 8 * * *",
                "UTC",
                "2026-11-29T08:00:00Z",
                Some("2026-11-29T08:00:00+00:00"),
            ),
            (
                "0 8 * * *",
                "UTC",
                "2026-11-29T07:59:59Z",
                Some("2026-11-28T08:00:00+00:00"),
            ),
            // Weekdays only: on Monday morning, Friday's.
            (
                "0 20 * * Mon-Fri",
                "Asia/Tokyo",
                "2026-11-30T00:00:00Z",
                Some("2026-11-27T20:00:00+09:00"),
            ),
            (
                "0 8 ? * Mon-Fri",
                "Europe/Berlin",
                "2026-12-06T12:00:00Z",
                Some("2026-12-04T08:00:00+01:00"),
            ),
            // Every second: the same second, sub-second part dropped.
            (
                "* * * * * *",
                "UTC",
                "2026-11-29T10:00:02.750Z",
                Some("2026-11-29T10:00:02+00:00"),
            ),
            // Spring forward (New York 02:00 -> 03:00): 02:30 fires at 03:00, the end of the gap.
            (
                "30 2 * * *",
                "America/New_York",
                "2027-03-14T07:00:00Z",
                Some("2027-03-14T03:00:00-04:00"),
            ),
            (
                "30 2 * * *",
                "America/New_York",
                "2027-03-14T06:59:59Z",
                Some("2027-03-13T02:30:00-05:00"),
            ),
            (
                "*/15 * * * *",
                "America/New_York",
                "2027-03-14T07:10:00Z",
                Some("2027-03-14T03:00:00-04:00"),
            ),
            // Fall back (New York 02:00 -> 01:00): during the repeated hour, its first occurrence.
            (
                "30 1 * * *",
                "America/New_York",
                "2026-11-01T06:45:00Z",
                Some("2026-11-01T01:30:00-04:00"),
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T06:59:59Z",
                Some("2026-11-01T01:00:00-04:00"),
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T07:00:00Z",
                Some("2026-11-01T02:00:00-05:00"),
            ),
            (
                "*/20 * * * *",
                "America/New_York",
                "2026-11-01T06:30:00Z",
                Some("2026-11-01T01:40:00-04:00"),
            ),
            // Lord Howe's 30-minute changes.
            (
                "15 2 * * *",
                "Australia/Lord_Howe",
                "2026-10-03T15:30:00Z",
                Some("2026-10-04T02:30:00+11:00"),
            ),
            (
                "45 1 * * *",
                "Australia/Lord_Howe",
                "2027-04-03T15:20:00Z",
                Some("2027-04-04T01:45:00+11:00"),
            ),
            // Leap day, four years back; never.
            (
                "0 0 29 2 *",
                "UTC",
                "2027-03-01T00:00:00Z",
                Some("2024-02-29T00:00:00+00:00"),
            ),
            ("0 0 30 2 *", "UTC", "2027-03-01T00:00:00Z", None),
        ];
        for (expr, zone, at, want) in cases {
            let zone: Tz = zone.parse().unwrap();
            let got = CronSchedule::parse(expr)
                .unwrap()
                .prev_at_or_before(utc(at), zone)
                .map(|t| t.with_timezone(&zone).to_rfc3339());
            assert_eq!(got.as_deref(), *want, "{expr} in {zone} at {at}");
        }
    }

    #[test]
    fn macros_fire_as_the_fields_they_stand_for() {
        // (macro, the fields it stands for)
        let cases = [
            ("@yearly", "0 0 1 1 *"),
            ("@annually", "0 0 1 1 *"),
            ("@monthly", "0 0 1 * *"),
            ("@weekly", "0 0 * * 0"),
            ("@daily", "0 0 * * *"),
            ("@midnight", "0 0 * * *"),
            ("@hourly", "0 * * * *"),
            (" @Daily ", "0 0 * * *"),
        ];
        let zone: Tz = "Europe/Berlin".parse().unwrap();
        let (after, until) = (utc("2026-11-29T00:00:00Z"), utc("2028-12-31T00:00:00Z"));
        for (m, fields) in cases {
            let got = CronSchedule::parse(m).unwrap();
            assert_eq!(got.source(), m);
            let want = CronSchedule::parse(fields).unwrap();
            let got = got.firings_between(after, until, zone, 100_000);
            assert!(!got.is_empty(), "{m}");
            assert_eq!(
                got,
                want.firings_between(after, until, zone, 100_000),
                "{m}"
            );
        }
        assert_eq!(
            next("@weekly", "UTC", "2026-11-30T00:00:00Z").as_deref(),
            Some("2026-12-06T00:00:00+00:00")
        );
    }

    #[test]
    fn last_nearest_weekday_and_nth_days() {
        const LAST_FRIDAYS: &[&str] = &[
            "05-29", "06-26", "07-31", "08-28", "09-25", "10-30", "11-27",
        ];
        const LAST_SUNDAYS: &[&str] = &[
            "05-31", "06-28", "07-26", "08-30", "09-27", "10-25", "11-29",
        ];
        const SECOND_MONDAYS: &[&str] = &[
            "05-11", "06-08", "07-13", "08-10", "09-14", "10-12", "11-09",
        ];
        const FIRST_MONDAYS_AND_LAST_FRIDAYS: &[&str] = &[
            "05-04", "05-29", "06-01", "06-26", "07-06", "07-31", "08-03", "08-28", "09-07",
            "09-25", "10-05", "10-30", "11-02", "11-27",
        ];
        const LAST_DAYS: &[&str] = &[
            "05-31", "06-30", "07-31", "08-31", "09-30", "10-31", "11-30",
        ];
        // May to November 2026 in Berlin, at 08:00: (expression, the dates it fires on).
        let cases: &[(&str, &[&str])] = &[
            ("0 8 L * ?", LAST_DAYS),
            ("0 8 l * *", LAST_DAYS),
            // The last weekday: Sunday 31 May -> Friday 29th, Saturday 31 October -> Friday 30th.
            (
                "0 8 LW * ?",
                &[
                    "05-29", "06-30", "07-31", "08-31", "09-30", "10-30", "11-30",
                ],
            ),
            // Saturday 1 August -> Monday 3rd (not Friday 31 July); Sunday 1 November -> Monday 2nd.
            (
                "0 8 1W * ?",
                &[
                    "05-01", "06-01", "07-01", "08-03", "09-01", "10-01", "11-02",
                ],
            ),
            // Saturday 15 August -> Friday 14th; Sunday 15 November -> Monday 16th.
            (
                "0 8 15W * ?",
                &[
                    "05-15", "06-15", "07-15", "08-14", "09-15", "10-15", "11-16",
                ],
            ),
            // Sunday 31 May -> Friday 29th (not Monday 1 June); no 31st in June, September, November.
            ("0 8 31W * ?", &["05-29", "07-31", "08-31", "10-30"]),
            // The last Friday, in numbers (crontab's: 5 is Friday) or by name.
            ("0 8 ? * 5L", LAST_FRIDAYS),
            ("0 8 ? * FriL", LAST_FRIDAYS),
            ("0 8 ? * fridayL", LAST_FRIDAYS),
            ("0 8 ? * 0L", LAST_SUNDAYS),
            ("0 8 ? * 7L", LAST_SUNDAYS),
            ("0 8 ? * SunL", LAST_SUNDAYS),
            ("0 8 ? * Mon#2", SECOND_MONDAYS),
            ("0 8 ? * 1#2", SECOND_MONDAYS),
            ("0 8 * * Mon#2", SECOND_MONDAYS),
            ("0 0 8 ? * MON#2", SECOND_MONDAYS),
            ("0 8 ? * Fri#5", &["05-29", "07-31", "10-30"]),
            // In lists, with plain items.
            (
                "0 8 1,L * ?",
                &[
                    "05-01", "05-31", "06-01", "06-30", "07-01", "07-31", "08-01", "08-31",
                    "09-01", "09-30", "10-01", "10-31", "11-01", "11-30",
                ],
            ),
            ("0 8 ? * Mon#1,FriL", FIRST_MONDAYS_AND_LAST_FRIDAYS),
            ("0 8 ? * FriL,Mon#1", FIRST_MONDAYS_AND_LAST_FRIDAYS),
            // Both day fields restricted: crontab's OR, as with plain days.
            (
                "0 8 L * Mon#1",
                &[
                    "05-04", "05-31", "06-01", "06-30", "07-06", "07-31", "08-03", "08-31",
                    "09-07", "09-30", "10-05", "10-31", "11-02", "11-30",
                ],
            ),
            // With a month: the last day of February is... not in these months.
            ("0 8 L 2 ?", &[]),
            ("0 8 L 5,Jul ?", &["05-31", "07-31"]),
        ];
        for (expr, dates) in cases {
            let want: Vec<String> = dates.iter().map(|d| format!("2026-{d} 08:00")).collect();
            assert_eq!(
                local_firings(
                    expr,
                    "Europe/Berlin",
                    "2026-04-30T22:00:00Z",
                    "2026-11-30T23:00:00Z"
                ),
                want,
                "{expr}"
            );
        }
        // Leap years, and a last weekday in winter.
        assert_eq!(
            local_firings(
                "0 8 L 2 ?",
                "UTC",
                "2027-01-01T00:00:00Z",
                "2029-01-01T00:00:00Z"
            ),
            ["2027-02-28 08:00", "2028-02-29 08:00"]
        );
        assert_eq!(
            local_firings(
                "0 8 LW * ?",
                "UTC",
                "2027-01-01T00:00:00Z",
                "2027-04-01T00:00:00Z"
            ),
            ["2027-01-29 08:00", "2027-02-26 08:00", "2027-03-31 08:00"]
        );
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("0 8 * *", "expected 5 fields"),
            ("0 8 * * * * *", "found 7"),
            ("0 8 * * 8", "out of range"),
            ("0 8 * * 5-2", "runs backwards"),
            (
                "61 8 * * *",
                "minute \"61\" is not valid: Minutes must be at most 59 ('61' specified); expected 0-59",
            ),
            // Pure syntax errors name the field as written (the crate only points a caret).
            ("1, * * * *", "minute \"1,\" is not valid; expected 0-59"),
            ("0 1--2 * * *", "hour \"1--2\" is not valid; expected 0-23"),
            ("4294967296 * * * *", "minute \"4294967296\" is not valid"),
            ("-1 * * * *", "minute \"-1\" is not valid; expected 0-59"),
            ("0 25 * * *", "Hours must be at most 23 ('25' specified)"),
            (
                "0 8 32 * *",
                "Days of Month must be at most 31 ('32' specified)",
            ),
            ("0 8 * * Funday", "'Funday' is not a valid day of the week;"),
            ("0 8 * Jam *", "'Jam' is not a valid month name;"),
            ("0 8 * * */0", "not a positive number"),
            (
                "@reboot",
                "@reboot is not supported: shiftd acts at instants, and occurrences due while it was \
                 not running are caught up (or reported as missed) when it starts",
            ),
            (
                "@fortnightly",
                "unknown macro \"@fortnightly\": expected one of @yearly, @annually, @monthly,",
            ),
            ("@daily 8", "unknown macro \"@daily 8\""),
            // L, W and #: where they belong, with what they need.
            (
                "0 8 W * ?",
                "day-of-month \"W\": \"nW\" needs a day n from 1 to 31 (\"15W\": the weekday nearest the 15th)",
            ),
            (
                "0 8 32W * ?",
                "day-of-month \"32W\": \"nW\" needs a day n from 1 to 31",
            ),
            (
                "0 8 0W * ?",
                "day-of-month \"0W\": \"nW\" needs a day n from 1 to 31",
            ),
            (
                "0 8 L-2 * ?",
                "day-of-month \"L-2\": expected days 1-31 (ranges, lists, steps), \"L\" (last day), \
                 \"LW\" (last weekday) or \"nW\" (the weekday nearest day n)",
            ),
            ("0 8 1-LW * ?", "day-of-month \"1-LW\": expected days 1-31"),
            (
                "0 8 1#2 * ?",
                "day-of-month \"1#2\": \"#\" (the n-th weekday) is only for day-of-week, e.g. \"Mon#2\"",
            ),
            (
                "0 8 ? * L",
                "day-of-week \"L\": say which day is the last of the month, e.g. \"FriL\" or \"5L\"",
            ),
            (
                "0 8 ? * 8L",
                "day-of-week \"8L\": \"dL\" needs a day d (0-7 or Sun-Sat)",
            ),
            ("0 8 ? * FunL", "day-of-week \"FunL\": \"dL\" needs a day d"),
            (
                "0 8 ? * Mon-FriL",
                "day-of-week \"Mon-FriL\": \"dL\" needs a day d",
            ),
            (
                "0 8 ? * Mon#6",
                "day-of-week \"Mon#6\": a month has at most 5 of each day; use 1 to 5 after \"#\"",
            ),
            (
                "0 8 ? * Mon#0",
                "day-of-week \"Mon#0\": a month has at most 5",
            ),
            (
                "0 8 ? * Mon#",
                "day-of-week \"Mon#\": a month has at most 5",
            ),
            (
                "0 8 ? * Funday#2",
                "day-of-week \"Funday#2\": \"d#k\" needs a day d (0-7 or Sun-Sat) and k from 1 to 5",
            ),
            (
                "0 8 ? * 15W",
                "day-of-week \"15W\": \"W\" (nearest weekday) is only for day-of-month, e.g. \"15W\"",
            ),
            (
                "L 8 * * *",
                "minute \"L\": \"L\", \"W\" and \"#\" are only for day-of-month and day-of-week",
            ),
            (
                "0 1W * * *",
                "hour \"1W\": \"L\", \"W\" and \"#\" are only for",
            ),
            (
                "0#2 0 8 * * *",
                "second \"0#2\": \"L\", \"W\" and \"#\" are only for",
            ),
            (
                "0 8 * L *",
                "month \"L\": \"L\", \"W\" and \"#\" are only for",
            ),
            (
                "0 8 * 15W *",
                "month \"15W\": \"L\", \"W\" and \"#\" are only for",
            ),
            (
                "0 8 * Jan-Jul#2 *",
                "month \"Jan-Jul#2\": \"L\", \"W\" and \"#\" are only for",
            ),
            // "?" only as a whole day field, and in one of them.
            (
                "0 8 ? * ?",
                "day-of-month and day-of-week are both \"?\": one of them must say which days",
            ),
            (
                "? 8 * * *",
                "minute \"?\": \"?\" (no specific value) is only for day-of-month or day-of-week",
            ),
            (
                "0 ? * * *",
                "hour \"?\": \"?\" (no specific value) is only for",
            ),
            (
                "0 8 * ? *",
                "month \"?\": \"?\" (no specific value) is only for",
            ),
            (
                "? 0 8 * * Mon",
                "second \"?\": \"?\" (no specific value) is only for",
            ),
            (
                "0 8 1,? * *",
                "day-of-month \"1,?\": \"?\" (no specific value) must be the whole field",
            ),
            (
                "0 8 * * ?/2",
                "day-of-week \"?/2\": \"?\" (no specific value) must be the whole field",
            ),
        ];
        for (expr, want) in cases {
            let err = CronSchedule::parse(expr).unwrap_err().to_string();
            assert!(err.contains(want), "{expr}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
            assert!(
                !err.contains("SUN,MON"),
                "nothing of shiftd's translation: {err}"
            );
        }
    }

    #[test]
    fn describe_says_common_schedules_in_plain_language() {
        let cases: &[(&str, &str)] = &[
            ("cron(0 8 ? * MON-FRI *)", "08:00 Mon\u{2013}Fri"),
            ("0 20 * * 1-5", "20:00 Mon\u{2013}Fri"),
            ("0 8 ? * Mon-Fri", "08:00 Mon\u{2013}Fri"),
            // EventBridge's 2-6 is Monday to Friday, crontab's Tuesday to Saturday.
            ("cron(0 8 ? * 2-6 *)", "08:00 Mon\u{2013}Fri"),
            ("0 8 * * 2-6", "08:00 Tue\u{2013}Sat"),
            ("@daily", "00:00 every day"),
            ("@midnight", "00:00 every day"),
            ("@hourly", "every hour"),
            ("@weekly", "00:00 on Sundays"),
            ("@monthly", "00:00 on the 1st of the month"),
            ("@yearly", "00:00 on Jan 1"),
            (
                "cron(0 9 ? * 2#1 *)",
                "09:00 on the first Monday of the month",
            ),
            ("0 9 * * Mon#2", "09:00 on the second Monday of the month"),
            ("30 18 L * ?", "18:30 on the last day of the month"),
            ("0 18 LW * ?", "18:00 on the last weekday of the month"),
            (
                "0 7 15W * ?",
                "07:00 on the weekday nearest the 15th of the month",
            ),
            (
                "cron(0 17 ? * 6L *)",
                "17:00 on the last Friday of the month",
            ),
            ("0 17 * * FriL", "17:00 on the last Friday of the month"),
            ("cron(0 10 ? * L *)", "10:00 on Saturdays"),
            ("*/15 * * * *", "every 15 minutes"),
            ("* * * * *", "every minute"),
            ("*/5 * * * * *", "every 5 seconds"),
            ("30 * * * *", "every hour at :30"),
            ("0 */2 * * *", "every 2 hours"),
            (
                "0 8-18 * * Mon-Fri",
                "every hour from 08:00 to 18:00 Mon\u{2013}Fri",
            ),
            ("*/15 * * * Sat,Sun", "every 15 minutes Sat, Sun"),
            ("0 8,20 * * *", "08:00 and 20:00 every day"),
            ("30 0 12 * * *", "12:00:30 every day"),
            ("0 8 * * 1,3,5", "08:00 Mon, Wed, Fri"),
            ("0 8 * * 0,6", "08:00 Sat, Sun"),
            ("0 8 * * */2", "08:00 Tue, Thu, Sat, Sun"),
            ("0 8 * * 0-7", "08:00 every day"),
            ("0 8 1,15 * *", "08:00 on the 1st and 15th of the month"),
            ("0 8 22 * *", "08:00 on the 22nd of the month"),
            ("0 8 1 Jan,Jul *", "08:00 on the 1st in Jan, Jul"),
            ("0 8 25 12 *", "08:00 on Dec 25"),
            (
                "0 8 * Mar-May Mon-Fri",
                "08:00 Mon\u{2013}Fri in Mar\u{2013}May",
            ),
            (
                "cron(0 8 1 * ? 2027)",
                "08:00 on the 1st of the month in 2027",
            ),
            ("cron(0 8 ? * MON-FRI 2027)", "08:00 Mon\u{2013}Fri in 2027"),
            // Shapes it does not cover: the expression itself.
            ("0 0 1 * Fri", "0 0 1 * Fri"),
            ("0,30 8 * * *", "0,30 8 * * *"),
            ("0 8 */2 * *", "0 8 */2 * *"),
            ("*/10 8-18 * * *", "*/10 8-18 * * *"),
            (
                "cron(0 8 ? * MON-FRI 2026-2028)",
                "cron(0 8 ? * MON-FRI 2026-2028)",
            ),
        ];
        for (expr, want) in cases {
            let got = CronSchedule::parse(expr).unwrap().describe();
            assert_eq!(got, *want, "{expr}");
        }
    }

    #[test]
    fn eventbridge_expressions_follow_eventbridge_rules() {
        const WEEKDAYS: &[&str] = &["11-30", "12-01", "12-02", "12-03", "12-04"];
        const TUE_SAT: &[&str] = &["12-01", "12-02", "12-03", "12-04", "12-05"];
        // A week from Monday 2026-11-30.
        let week = ("2026-11-29T12:00:00Z", "2026-12-06T12:00:00Z");
        let december = ("2026-11-30T15:00:00Z", "2026-12-31T15:00:00Z");
        // (expression, zone, (after, until), the 2026 dates it fires on at 08:00 local)
        type Case<'a> = (&'a str, &'a str, (&'a str, &'a str), &'a [&'a str]);
        let cases: &[Case] = &[
            ("cron(0 8 ? * MON-FRI *)", "Europe/Berlin", week, WEEKDAYS),
            (
                "cron(0 8 ? * mon-fri *)",
                "America/New_York",
                week,
                WEEKDAYS,
            ),
            ("CRON(0 8 ? * MON-FRI *)", "Asia/Tokyo", week, WEEKDAYS),
            (
                "cron(0 8 ? * MON-FRI 2026)",
                "Australia/Lord_Howe",
                week,
                WEEKDAYS,
            ),
            // EventBridge 2-6 is Monday to Friday; bare 2-6 is Tuesday to Saturday.
            ("cron(0 8 ? * 2-6 *)", "Europe/Berlin", week, WEEKDAYS),
            ("0 8 * * 2-6", "Europe/Berlin", week, TUE_SAT),
            ("cron(0 8 ? * 2,3,4,5,6 *)", "Europe/Berlin", week, WEEKDAYS),
            // 1 is Sunday, 7 Saturday; "L" alone is Saturday, the last day of the week.
            (
                "cron(0 8 ? * 1 *)",
                "Asia/Tokyo",
                december,
                &["12-06", "12-13", "12-20", "12-27"],
            ),
            ("cron(0 8 ? * 7 *)", "Asia/Tokyo", week, &["12-05"]),
            ("cron(0 8 ? * L *)", "Asia/Tokyo", week, &["12-05"]),
            // Steps start at Sunday (1): Sunday, Tuesday, Thursday, Saturday; "4/2" is Wed, Fri.
            (
                "cron(0 8 ? * */2 *)",
                "Asia/Tokyo",
                week,
                &["12-01", "12-03", "12-05", "12-06"],
            ),
            (
                "cron(0 8 ? * 4/2 *)",
                "Asia/Tokyo",
                week,
                &["12-02", "12-04"],
            ),
            // Names with steps: Monday, Wednesday, Friday.
            (
                "cron(0 8 ? * MON/2 *)",
                "Asia/Tokyo",
                week,
                &["11-30", "12-02", "12-04"],
            ),
            (
                "cron(0 8 ? * MON-FRI/2 *)",
                "Asia/Tokyo",
                week,
                &["11-30", "12-02", "12-04"],
            ),
            // dL and d#k in EventBridge's numbers: 6L is the last Friday, 2#1 the first Monday.
            ("cron(0 8 ? * 6L *)", "Europe/Berlin", december, &["12-25"]),
            ("cron(0 8 ? * 2#1 *)", "Europe/Berlin", december, &["12-07"]),
            (
                "cron(0 8 ? * MON#2 *)",
                "Europe/Berlin",
                december,
                &["12-14"],
            ),
            // Day-of-month decides when day-of-week is "?".
            ("cron(0 8 15 * ? *)", "Asia/Tokyo", december, &["12-15"]),
            ("cron(0 8 L * ? *)", "Asia/Tokyo", december, &["12-31"]),
            ("cron(0 8 LW * ? *)", "Asia/Tokyo", december, &["12-31"]),
            // The year field restricts years.
            ("cron(0 8 15 * ? 2027)", "Asia/Tokyo", december, &[]),
            (
                "cron(0 8 15 * ? 2025,2026)",
                "Asia/Tokyo",
                december,
                &["12-15"],
            ),
            (
                "cron(0 8 15 * ? 2020-2030/2)",
                "Asia/Tokyo",
                december,
                &["12-15"],
            ),
        ];
        for (expr, zone, (after, until), dates) in cases {
            let want: Vec<String> = dates.iter().map(|d| format!("2026-{d} 08:00")).collect();
            assert_eq!(
                local_firings(expr, zone, after, until),
                want,
                "{expr} in {zone} over ({after}, {until}]"
            );
        }
    }

    #[test]
    fn eventbridge_year_field_is_searched_in_both_directions() {
        // (expression, after, next firing (UTC), latest firing at or before `after`)
        let cases: &[(&str, &str, Option<&str>, Option<&str>)] = &[
            // Far ahead: beyond the eight years searched from `after`, the search starts at the year.
            (
                "cron(0 8 1 1 ? 2150)",
                "2026-06-01T00:00:00Z",
                Some("2150-01-01T08:00:00+00:00"),
                None,
            ),
            (
                "cron(0 8 1 1 ? 2027,2150)",
                "2027-06-01T00:00:00Z",
                Some("2150-01-01T08:00:00+00:00"),
                Some("2027-01-01T08:00:00+00:00"),
            ),
            (
                "cron(0 8 1 1 ? 1990)",
                "2026-06-01T00:00:00Z",
                None,
                Some("1990-01-01T08:00:00+00:00"),
            ),
            (
                "cron(0 8 ? * MON 2026-2027)",
                "2027-12-31T00:00:00Z",
                None,
                Some("2027-12-27T08:00:00+00:00"),
            ),
            (
                "cron(0 8 ? * MON 2026-2027)",
                "2025-12-31T00:00:00Z",
                Some("2026-01-05T08:00:00+00:00"),
                None,
            ),
        ];
        for (expr, after, next, prev) in cases {
            let s = CronSchedule::parse(expr).unwrap();
            let t = utc(after);
            let show = |x: Option<DateTime<Utc>>| x.map(|x| x.to_rfc3339());
            assert_eq!(
                show(s.next_after(t, Tz::UTC)).as_deref(),
                *next,
                "{expr} next after {after}"
            );
            assert_eq!(
                show(s.prev_at_or_before(t, Tz::UTC)).as_deref(),
                *prev,
                "{expr} latest at or before {after}"
            );
        }
    }

    #[test]
    fn eventbridge_errors_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            (
                "cron(0 8 * * MON-FRI *)",
                "EventBridge needs \"?\" in exactly one of day-of-month (\"*\") and day-of-week (\"MON-FRI\")",
            ),
            (
                "cron(0 8 ? * ? *)",
                "EventBridge needs \"?\" in exactly one of",
            ),
            (
                "cron(0 8 ? * MON-FRI)",
                "expected 6 fields in EventBridge's form cron(minute hour day-of-month month \
                 day-of-week year), found 5",
            ),
            ("cron(0 8 ? * MON-FRI * *)", "found 7"),
            (
                "cron(0 8 ? * MON-FRI *",
                "with one closing parenthesis at the end",
            ),
            (
                "cron(0 8 ? * (MON) *)",
                "with one closing parenthesis at the end",
            ),
            (
                "cron(0 8 ? * 0 *)",
                "day-of-week \"0\" is out of range; expected 1-7 (EventBridge counts 1 as Sunday, 7 as \
                 Saturday) or SUN-SAT",
            ),
            ("cron(0 8 ? * 1-8 *)", "day-of-week \"1-8\" is out of range"),
            ("cron(0 8 ? * 8L *)", "day-of-week \"8L\" is out of range"),
            ("cron(0 8 ? * 0#2 *)", "day-of-week \"0#2\" is out of range"),
            (
                "cron(0 8 ? * Funday *)",
                "day-of-week \"Funday\" is not valid",
            ),
            (
                "cron(0 8 ? * 6-2 *)",
                "day-of-week range \"6-2\" runs backwards",
            ),
            ("cron(0 8 ? * 2#6 *)", "a month has at most 5 of each day"),
            (
                "cron(0 8 15 * ? 1969)",
                "year \"1969\" is not valid; expected 1970-2199, with ranges (a-b), lists (a,b) and \
                 steps (*/n)",
            ),
            ("cron(0 8 15 * ? 2200)", "year \"2200\" is not valid"),
            (
                "cron(0 8 15 * ? 2030-2027)",
                "year range \"2030-2027\" runs backwards",
            ),
            ("cron(0 8 15 * ? */0)", "year \"*/0\" is not valid"),
            ("cron(0 8 15 * ? MMXXVI)", "year \"MMXXVI\" is not valid"),
            (
                "cron(61 8 15 * ? *)",
                "minute \"61\" is not valid: Minutes must be at most 59",
            ),
            ("cron(0 8 32 * ? *)", "Days of Month must be at most 31"),
            // Bare expressions that read as EventBridge's.
            (
                "0 8 ? * MON-FRI *",
                "this looks like an EventBridge expression (minute hour day-of-month month \
                 day-of-week year): write it with its wrapper, \"cron(0 8 ? * MON-FRI *)\", where \
                 day-of-week 1 is Sunday",
            ),
            (
                "0 8 15 * ? *",
                "write it with its wrapper, \"cron(0 8 15 * ? *)\"",
            ),
            (
                "0 8 * * 1 2027",
                "write it with its wrapper, \"cron(0 8 ? * 1 2027)\"",
            ),
            (
                "0 0 8 ? * 2-6",
                "this looks like a Quartz expression (seconds minute hour day-of-month month \
                 day-of-week), where day-of-week 1 is Sunday: write it in EventBridge's form, \
                 \"cron(0 8 ? * 2-6 *)\"",
            ),
            ("0 0 8 ? * 1#2", "this looks like a Quartz expression"),
            (
                "0 8 * * 1 2026-2030",
                "this looks like an EventBridge expression",
            ),
        ];
        for (expr, want) in cases {
            let err = CronSchedule::parse(expr).unwrap_err().to_string();
            assert!(err.contains(want), "{expr}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
            assert!(
                err.starts_with(&format!("invalid cron expression {expr:?}: ")),
                "names the expression as written: {err}"
            );
        }
        // Quartz's six fields with seconds first stay valid.
        CronSchedule::parse("0 0 8 ? * MON-FRI").unwrap();
        CronSchedule::parse("0 0 8 15 * ?").unwrap();
    }
}

/// Differential property test: for random expressions over the whole grammar, the evaluator's firings
/// agree with a brute-force reference that walks every wall-clock minute (every second, for six
/// fields) of a zone and decides each from the generator's own syntax tree, never from the parser.
/// The tree is rendered to text for the parser; the reference reads the tree.
///
/// `PROPTEST_CASES` sets the number of cases (512 by default here: about a second in release).
#[cfg(test)]
mod differential {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::Config as ProptestConfig;

    // ----------------------------------------------------------------------------------------------
    // The syntax tree, and its text.
    // ----------------------------------------------------------------------------------------------

    /// One item of a list: the values it stands for among a field's `first..=last`.
    #[derive(Clone, Copy, Debug)]
    enum Item {
        /// `*`
        All,
        /// `*/s`: first, first + s, ...
        Every(u32),
        /// `n`
        One(u32),
        /// `a-b`
        Range(u32, u32),
        /// `a-b/s`
        RangeStep(u32, u32, u32),
        /// `a/s`: a, a + s, ... up to the field's last value.
        From(u32, u32),
    }

    impl Item {
        fn covers(self, v: u32, first: u32, last: u32) -> bool {
            match self {
                Item::All => true,
                Item::Every(s) => v >= first && (v - first).is_multiple_of(s),
                Item::One(n) => v == n,
                Item::Range(a, b) => a <= v && v <= b,
                Item::RangeStep(a, b, s) => a <= v && v <= b && (v - a).is_multiple_of(s),
                Item::From(a, s) => a <= v && v <= last && (v - a).is_multiple_of(s),
            }
        }

        fn starts_with_star(self) -> bool {
            matches!(self, Item::All | Item::Every(_))
        }
    }

    /// An item and how to write it: with names where the field has them (`names[v]`), in a case.
    #[derive(Clone, Copy, Debug)]
    struct Written {
        item: Item,
        named: bool,
        case: u8,
    }

    fn cased(name: &str, case: u8) -> String {
        match case {
            0 => name.to_string(),
            1 => name.to_ascii_uppercase(),
            _ => name.to_ascii_lowercase(),
        }
    }

    impl Written {
        /// The item's text; `names` maps a value to its name (`None` for fields without names, or
        /// values without one that keeps a range in order).
        fn render(self, names: &dyn Fn(u32) -> Option<&'static str>) -> String {
            let name = |v: u32| names(v).filter(|_| self.named).map(|n| cased(n, self.case));
            let pair = |a: u32, b: u32| match (name(a), name(b)) {
                (Some(first), Some(last)) => format!("{first}-{last}"),
                _ => format!("{a}-{b}"),
            };
            match self.item {
                Item::All => "*".to_string(),
                Item::Every(s) => format!("*/{s}"),
                Item::One(n) => name(n).unwrap_or_else(|| n.to_string()),
                Item::Range(a, b) => pair(a, b),
                Item::RangeStep(a, b, s) => format!("{}/{s}", pair(a, b)),
                Item::From(a, s) => format!("{a}/{s}"),
            }
        }
    }

    fn list(items: &[Written], names: &dyn Fn(u32) -> Option<&'static str>) -> String {
        items
            .iter()
            .map(|w| w.render(names))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn no_names(_: u32) -> Option<&'static str> {
        None
    }

    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

    fn month_name(v: u32) -> Option<&'static str> {
        MONTHS.get(v as usize - 1).copied()
    }

    /// Crontab's day numbers (0 and 7 Sunday). Only 0-6 are named, so that a named range stays in
    /// order (`Mon-Sun` would run backwards).
    fn crontab_day_name(v: u32) -> Option<&'static str> {
        DAYS.get(v as usize).copied()
    }

    /// EventBridge's day numbers (1 Sunday .. 7 Saturday).
    fn eventbridge_day_name(v: u32) -> Option<&'static str> {
        DAYS.get(v as usize - 1).copied()
    }

    #[derive(Clone, Copy, Debug)]
    enum DomItem {
        Plain(Written),
        /// `L`
        Last,
        /// `LW`
        LastWeekday,
        /// `nW`
        Nearest(u32),
    }

    #[derive(Clone, Copy, Debug)]
    enum DowItem {
        Plain(Written),
        /// `dL`: the last day d of the month.
        LastOf(u32, bool),
        /// `d#k`: the k-th day d.
        Nth(u32, u32, bool),
        /// EventBridge's `L` alone: Saturday.
        Saturday,
    }

    /// A day field: `None` is `?`.
    type Days<T> = Option<Vec<T>>;

    #[derive(Clone, Debug)]
    enum Expr {
        /// Five fields, or six with `seconds`.
        Crontab {
            seconds: Option<Vec<Written>>,
            minute: Vec<Written>,
            hour: Vec<Written>,
            dom: Days<DomItem>,
            month: Vec<Written>,
            dow: Days<DowItem>,
        },
        /// `@daily`... (index into MACROS), in a case.
        Macro(usize, u8),
        /// `cron(min hour dom month dow year)`.
        EventBridge {
            minute: Vec<Written>,
            hour: Vec<Written>,
            dom: Days<DomItem>,
            month: Vec<Written>,
            dow: Days<DowItem>,
            year: Vec<Written>,
        },
    }

    /// Each macro and what it stands for: (minute, hour, day-of-month, month, day-of-week), `None`
    /// for `*`.
    type MacroMeaning = (u32, Option<u32>, Option<u32>, Option<u32>, Option<u32>);
    const MACROS: [(&str, MacroMeaning); 7] = [
        ("@yearly", (0, Some(0), Some(1), Some(1), None)),
        ("@annually", (0, Some(0), Some(1), Some(1), None)),
        ("@monthly", (0, Some(0), Some(1), None, None)),
        ("@weekly", (0, Some(0), None, None, Some(0))),
        ("@daily", (0, Some(0), None, None, None)),
        ("@midnight", (0, Some(0), None, None, None)),
        ("@hourly", (0, None, None, None, None)),
    ];

    fn render_dom(items: &Days<DomItem>) -> String {
        let Some(items) = items else {
            return "?".to_string();
        };
        items
            .iter()
            .map(|i| match i {
                DomItem::Plain(w) => w.render(&no_names),
                DomItem::Last => "L".to_string(),
                DomItem::LastWeekday => "LW".to_string(),
                DomItem::Nearest(n) => format!("{n}W"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn render_dow(items: &Days<DowItem>, names: &dyn Fn(u32) -> Option<&'static str>) -> String {
        let Some(items) = items else {
            return "?".to_string();
        };
        let day = |d: u32, named: bool| match names(d).filter(|_| named) {
            Some(n) => n.to_string(),
            None => d.to_string(),
        };
        items
            .iter()
            .map(|i| match *i {
                DowItem::Plain(w) => w.render(names),
                DowItem::LastOf(d, named) => format!("{}L", day(d, named)),
                DowItem::Nth(d, k, named) => format!("{}#{k}", day(d, named)),
                DowItem::Saturday => "L".to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    impl Expr {
        fn render(&self) -> String {
            match self {
                Expr::Crontab {
                    seconds,
                    minute,
                    hour,
                    dom,
                    month,
                    dow,
                } => {
                    let mut fields = Vec::new();
                    if let Some(seconds) = seconds {
                        fields.push(list(seconds, &no_names));
                    }
                    fields.push(list(minute, &no_names));
                    fields.push(list(hour, &no_names));
                    fields.push(render_dom(dom));
                    fields.push(list(month, &month_name));
                    fields.push(render_dow(dow, &crontab_day_name));
                    fields.join(" ")
                }
                Expr::Macro(i, case) => cased(MACROS[*i].0, *case),
                Expr::EventBridge {
                    minute,
                    hour,
                    dom,
                    month,
                    dow,
                    year,
                } => format!(
                    "cron({} {} {} {} {} {})",
                    list(minute, &no_names),
                    list(hour, &no_names),
                    render_dom(dom),
                    list(month, &month_name),
                    render_dow(dow, &eventbridge_day_name),
                    list(year, &no_names),
                ),
            }
        }

        fn has_seconds(&self) -> bool {
            matches!(
                self,
                Expr::Crontab {
                    seconds: Some(_),
                    ..
                }
            )
        }
    }

    // ----------------------------------------------------------------------------------------------
    // The reference: which wall-clock times the tree matches.
    // ----------------------------------------------------------------------------------------------

    fn plain(items: &[Item]) -> Vec<Written> {
        items
            .iter()
            .map(|&item| Written {
                item,
                named: false,
                case: 0,
            })
            .collect()
    }

    /// The tree as fields of one shape: macros as the fields they stand for.
    struct Model {
        seconds: Option<Vec<Written>>,
        minute: Vec<Written>,
        hour: Vec<Written>,
        dom: Days<DomItem>,
        month: Vec<Written>,
        dow: Days<DowItem>,
        /// Day-of-week in EventBridge's numbers (1 Sunday .. 7 Saturday), not crontab's.
        eventbridge: bool,
        year: Option<Vec<Written>>,
    }

    impl Model {
        fn of(expr: &Expr) -> Model {
            match expr.clone() {
                Expr::Crontab {
                    seconds,
                    minute,
                    hour,
                    dom,
                    month,
                    dow,
                } => Model {
                    seconds,
                    minute,
                    hour,
                    dom,
                    month,
                    dow,
                    eventbridge: false,
                    year: None,
                },
                Expr::Macro(i, _) => {
                    let (minute, hour, dom, month, dow) = MACROS[i].1;
                    let one = |v: Option<u32>| plain(&[v.map_or(Item::All, Item::One)]);
                    Model {
                        seconds: None,
                        minute: one(Some(minute)),
                        hour: one(hour),
                        dom: Some(one(dom).into_iter().map(DomItem::Plain).collect()),
                        month: one(month),
                        dow: Some(one(dow).into_iter().map(DowItem::Plain).collect()),
                        eventbridge: false,
                        year: None,
                    }
                }
                Expr::EventBridge {
                    minute,
                    hour,
                    dom,
                    month,
                    dow,
                    year,
                } => Model {
                    seconds: None,
                    minute,
                    hour,
                    dom,
                    month,
                    dow,
                    eventbridge: true,
                    year: Some(year),
                },
            }
        }

        /// The weekday a day number of the day-of-week field stands for.
        fn weekday(&self, d: u32) -> Weekday {
            let from_sunday = if self.eventbridge { d - 1 } else { d % 7 };
            [
                Weekday::Sun,
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri,
                Weekday::Sat,
            ][from_sunday as usize]
        }

        fn date_matches(&self, date: NaiveDate) -> bool {
            let any = |items: &[Written], v: u32, first: u32, last: u32| {
                items.iter().any(|w| w.item.covers(v, first, last))
            };
            if let Some(year) = &self.year
                && !any(year, date.year() as u32, 1970, 2199)
            {
                return false;
            }
            if !any(&self.month, date.month(), 1, 12) {
                return false;
            }
            let last = days_in_month(date);
            let dom = |item: &DomItem| match *item {
                DomItem::Plain(w) => w.item.covers(date.day(), 1, 31),
                DomItem::Last => date.day() == last,
                DomItem::LastWeekday => {
                    is_weekday(date) && (date.day() + 1..=last).all(|d| !is_weekday(on(date, d)))
                }
                // The weekday (Monday to Friday) of the month closest to day n (two weekend days
                // in a row: never a tie).
                DomItem::Nearest(n) => {
                    n <= last
                        && (1..=last)
                            .filter(|&d| is_weekday(on(date, d)))
                            .min_by_key(|&d| d.abs_diff(n))
                            == Some(date.day())
                }
            };
            let from_sunday = date.weekday().num_days_from_sunday();
            let dow = |item: &DowItem| match *item {
                DowItem::Plain(w) if self.eventbridge => w.item.covers(from_sunday + 1, 1, 7),
                DowItem::Plain(w) => {
                    w.item.covers(from_sunday, 0, 7) || (from_sunday == 0 && w.item.covers(7, 0, 7))
                }
                DowItem::LastOf(d, _) => date.weekday() == self.weekday(d) && date.day() + 7 > last,
                DowItem::Nth(d, k, _) => {
                    date.weekday() == self.weekday(d)
                        && (1..=date.day())
                            .filter(|&x| on(date, x).weekday() == date.weekday())
                            .count()
                            == k as usize
                }
                DowItem::Saturday => date.weekday() == Weekday::Sat,
            };
            // `?`: no say. Crontab: with both day fields restricted (not starting with `*`), either
            // one matching is enough.
            let dom_match = self.dom.as_ref().is_none_or(|items| items.iter().any(dom));
            let dow_match = self.dow.as_ref().is_none_or(|items| items.iter().any(dow));
            let dom_restricted = self.dom.as_ref().is_some_and(|items| match items[0] {
                DomItem::Plain(w) => !w.item.starts_with_star(),
                _ => true,
            });
            let dow_restricted = self.dow.as_ref().is_some_and(|items| match items[0] {
                DowItem::Plain(w) => !w.item.starts_with_star(),
                _ => true,
            });
            if dom_restricted && dow_restricted {
                dom_match || dow_match
            } else {
                dom_match && dow_match
            }
        }

        /// The times of day (in seconds) the time fields match, in order.
        fn times(&self) -> Vec<u32> {
            let any = |items: &[Written], v: u32, last: u32| {
                items.iter().any(|w| w.item.covers(v, 0, last))
            };
            let mut out = Vec::new();
            for h in (0..24).filter(|&h| any(&self.hour, h, 23)) {
                for m in (0..60).filter(|&m| any(&self.minute, m, 59)) {
                    for s in 0..60 {
                        let fires = match &self.seconds {
                            Some(seconds) => any(seconds, s, 59),
                            None => s == 0,
                        };
                        if fires {
                            out.push(h * 3600 + m * 60 + s);
                        }
                    }
                }
            }
            out
        }
    }

    fn days_in_month(date: NaiveDate) -> u32 {
        (28..=31)
            .filter(|&d| date.with_day(d).is_some())
            .max()
            .expect("every month has 28 days")
    }

    fn on(date: NaiveDate, day: u32) -> NaiveDate {
        date.with_day(day).expect("a day of the month")
    }

    fn is_weekday(date: NaiveDate) -> bool {
        !matches!(date.weekday(), Weekday::Sat | Weekday::Sun)
    }

    // ----------------------------------------------------------------------------------------------
    // The reference's time zone: offsets found by converting UTC instants only, and the DST rules
    // applied to them explicitly.
    // ----------------------------------------------------------------------------------------------

    /// From each instant on, an offset (seconds east of UTC), until the next.
    struct Offsets {
        zone: Tz,
        segments: Vec<(DateTime<Utc>, i64)>,
        end: DateTime<Utc>,
    }

    impl Offsets {
        fn offset_at(zone: Tz, t: DateTime<Utc>) -> i64 {
            t.with_timezone(&zone)
                .offset()
                .fix()
                .local_minus_utc()
                .into()
        }

        /// The offsets of `zone` over `[start, end)` (from `start`'s hour), by looking at every hour
        /// and then, where it changed, at every minute of that hour.
        fn over(zone: Tz, start: DateTime<Utc>, end: DateTime<Utc>) -> Offsets {
            // On whole hours, so that the minutes looked at are those changes happen at.
            let start = start
                .with_minute(0)
                .and_then(|t| t.with_second(0))
                .expect("a whole hour");
            let mut segments = vec![(start, Self::offset_at(zone, start))];
            let mut t = start;
            while t < end {
                let next = t + Duration::hours(1);
                let (_, current) = *segments.last().expect("one at least");
                if Self::offset_at(zone, next) != current {
                    let change = (1..=60)
                        .map(|m| t + Duration::minutes(m))
                        .find(|&m| Self::offset_at(zone, m) != current)
                        .expect("the change is within the hour");
                    segments.push((change, Self::offset_at(zone, change)));
                }
                t = next;
            }
            Offsets {
                zone,
                segments,
                end,
            }
        }

        fn transitions(&self) -> impl Iterator<Item = DateTime<Utc>> + '_ {
            self.segments.iter().skip(1).map(|(t, _)| *t)
        }

        /// The instant a wall-clock time fires at. A time that occurs once: then. Twice (fall back):
        /// the earlier. Never (spring forward): the first instant after the gap, the transition.
        fn fire(&self, wall: NaiveDateTime) -> DateTime<Utc> {
            let ends = self
                .segments
                .iter()
                .skip(1)
                .map(|(t, _)| *t)
                .chain([self.end]);
            let occurrences: Vec<DateTime<Utc>> = self
                .segments
                .iter()
                .zip(ends)
                .map(|(&(start, offset), end)| (wall - Duration::seconds(offset), start, end))
                .map(|(t, start, end)| (t.and_utc(), start, end))
                .filter(|&(t, start, end)| start <= t && t < end)
                .map(|(t, _, _)| t)
                .collect();
            if let Some(earliest) = occurrences.iter().min() {
                return *earliest;
            }
            for pair in self.segments.windows(2) {
                let [(_, before), (change, after)] = pair else {
                    unreachable!()
                };
                let gap_start = change.naive_utc() + Duration::seconds(*before);
                let gap_end = change.naive_utc() + Duration::seconds(*after);
                if gap_start <= wall && wall < gap_end {
                    return *change;
                }
            }
            panic!(
                "{wall} in {}: neither an instant nor a gap of the reference's offsets",
                self.zone
            );
        }
    }

    /// The first `limit` firings in `(after, until]`, by walking every wall-clock date from the day
    /// before `after`'s to the day after `until`'s, and on each matching date every wall-clock minute
    /// (second) the time fields match. Firing instants never decrease as wall-clock time grows (the
    /// DST rules keep the order), so the walk stops once it has `limit` of them.
    fn reference(
        model: &Model,
        offsets: &Offsets,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let times = model.times();
        let mut found = BTreeSet::new();
        let first = after.with_timezone(&offsets.zone).date_naive() - Duration::days(1);
        let last = until.with_timezone(&offsets.zone).date_naive() + Duration::days(1);
        let mut date = first;
        while date <= last && found.len() < limit {
            if model.date_matches(date) {
                for &secs in &times {
                    let t = offsets.fire(date.and_time(time_of_day(secs)));
                    if after < t && t <= until {
                        found.insert(t);
                    }
                }
            }
            date = date.succ_opt().expect("a date in range");
        }
        found.into_iter().take(limit).collect()
    }

    // ----------------------------------------------------------------------------------------------
    // Generators.
    // ----------------------------------------------------------------------------------------------

    /// An item of a field with values `first..=last`, steps up to `max_step`.
    fn item(first: u32, last: u32, max_step: u32) -> impl Strategy<Value = Item> {
        let v = first..=last;
        let s = 1..=max_step;
        prop_oneof![
            2 => Just(Item::All),
            1 => s.clone().prop_map(Item::Every),
            4 => v.clone().prop_map(Item::One),
            2 => (v.clone(), v.clone()).prop_map(|(a, b)| Item::Range(a.min(b), a.max(b))),
            1 => (v.clone(), v.clone(), s.clone())
                .prop_map(|(a, b, s)| Item::RangeStep(a.min(b), a.max(b), s)),
            1 => (v, s).prop_map(|(a, s)| Item::From(a, s)),
        ]
    }

    fn written(item: impl Strategy<Value = Item>) -> impl Strategy<Value = Written> {
        (item, any::<bool>(), 0u8..3).prop_map(|(item, named, case)| Written { item, named, case })
    }

    fn field(
        first: u32,
        last: u32,
        max_step: u32,
        len: std::ops::RangeInclusive<usize>,
    ) -> impl Strategy<Value = Vec<Written>> {
        prop::collection::vec(written(item(first, last, max_step)), len)
    }

    fn dom_item() -> impl Strategy<Value = DomItem> {
        prop_oneof![
            6 => written(item(1, 31, 31)).prop_map(DomItem::Plain),
            1 => Just(DomItem::Last),
            1 => Just(DomItem::LastWeekday),
            1 => (1u32..=31).prop_map(DomItem::Nearest),
        ]
    }

    /// Day-of-week items with days `first..=last` (crontab 0-7, EventBridge 1-7).
    fn dow_item(first: u32, last: u32) -> impl Strategy<Value = DowItem> {
        prop_oneof![
            6 => written(item(first, last, 7)).prop_map(DowItem::Plain),
            1 => (first..=last, any::<bool>()).prop_map(|(d, named)| DowItem::LastOf(d, named)),
            1 => (first..=last, 1u32..=5, any::<bool>())
                .prop_map(|(d, k, named)| DowItem::Nth(d, k, named)),
        ]
    }

    /// Day fields: lists, or `?` in one of them. The first item is often `*`, as in most schedules.
    fn day_fields(
        dow: impl Strategy<Value = DowItem>,
    ) -> impl Strategy<Value = (Days<DomItem>, Days<DowItem>)> {
        let all = Written {
            item: Item::All,
            named: false,
            case: 0,
        };
        let dom = prop_oneof![
            3 => Just(Some(vec![DomItem::Plain(all)])),
            1 => Just(None),
            4 => prop::collection::vec(dom_item(), 1..=3).prop_map(Some),
        ];
        let dow = prop_oneof![
            3 => Just(Some(vec![DowItem::Plain(all)])),
            1 => Just(None),
            4 => prop::collection::vec(dow, 1..=3).prop_map(Some),
        ];
        (dom, dow).prop_map(move |(dom, dow)| match (dom, dow) {
            (None, None) => (None, Some(vec![DowItem::Plain(all)])),
            fields => fields,
        })
    }

    /// Minutes and hours mostly single values, so that most schedules fire a few times a day.
    fn minute() -> impl Strategy<Value = Vec<Written>> {
        prop_oneof![3 => field(0, 59, 59, 1..=1), 1 => field(0, 59, 59, 1..=3)]
    }

    fn hour() -> impl Strategy<Value = Vec<Written>> {
        prop_oneof![3 => field(0, 23, 23, 1..=1), 1 => field(0, 23, 23, 1..=3)]
    }

    fn month() -> impl Strategy<Value = Vec<Written>> {
        prop_oneof![
            3 => Just(plain(&[Item::All])),
            1 => field(1, 12, 12, 1..=3),
        ]
    }

    fn crontab() -> impl Strategy<Value = Expr> {
        (
            prop::option::weighted(0.3, field(0, 59, 59, 1..=3)),
            minute(),
            hour(),
            day_fields(dow_item(0, 7)),
            month(),
        )
            .prop_map(|(seconds, minute, hour, (dom, dow), month)| Expr::Crontab {
                seconds,
                minute,
                hour,
                dom,
                month,
                dow,
            })
    }

    fn year() -> impl Strategy<Value = Vec<Written>> {
        let item = prop_oneof![
            2 => Just(Item::All),
            1 => (1u32..=10).prop_map(Item::Every),
            3 => (2024u32..=2030).prop_map(Item::One),
            1 => (2024u32..=2030, 2024u32..=2030).prop_map(|(a, b)| Item::Range(a.min(b), a.max(b))),
            1 => (2020u32..=2030, 1u32..=3).prop_map(|(a, s)| Item::From(a, s)),
        ];
        prop::collection::vec(written(item), 1..=2)
    }

    fn eventbridge() -> impl Strategy<Value = Expr> {
        let dow = prop_oneof![6 => dow_item(1, 7), 1 => Just(DowItem::Saturday)];
        let days = (
            any::<bool>(),
            prop::collection::vec(dom_item(), 1..=3),
            prop::collection::vec(dow, 1..=3),
        )
            .prop_map(|(by_dom, dom, dow)| {
                if by_dom {
                    (Some(dom), None)
                } else {
                    (None, Some(dow))
                }
            });
        (minute(), hour(), days, month(), year()).prop_map(
            |(minute, hour, (dom, dow), month, year)| Expr::EventBridge {
                minute,
                hour,
                dom,
                month,
                dow,
                year,
            },
        )
    }

    fn expression() -> impl Strategy<Value = Expr> {
        prop_oneof![
            6 => crontab(),
            1 => (0..MACROS.len(), 0u8..3).prop_map(|(i, case)| Expr::Macro(i, case)),
            4 => eventbridge(),
        ]
    }

    const ZONES: [Tz; 4] = [
        Tz::UTC,
        chrono_tz::America::New_York,
        chrono_tz::Europe::Berlin,
        chrono_tz::Australia::Lord_Howe,
    ];

    fn config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(512);
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// How many firings are compared: a year of sparse schedules, a day or so of dense ones.
    const LIMIT: usize = 1500;

    fn show(t: Option<&DateTime<Utc>>, zone: Tz) -> String {
        t.map_or("none".to_string(), |t| {
            format!(
                "{} ({})",
                t.with_timezone(&zone).to_rfc3339(),
                t.to_rfc3339()
            )
        })
    }

    /// Compares the evaluator with the reference for `expr` in `ZONES[zone]`, from an instant chosen
    /// by `start` (near one of the zone's DST changes when `near_change`), over a year (two days
    /// for six fields, walked second by second).
    fn compare(expr: &Expr, zone: usize, near_change: bool, start: u32) -> Result<(), String> {
        let zone = ZONES[zone];
        let text = expr.render();
        let fields: Vec<&str> = text.split_whitespace().collect();
        let quartz_numbers =
            fields.len() == 6 && fields[3] == "?" && has_weekday_numbers(fields[5]);
        let schedule = match CronSchedule::parse(&text) {
            Ok(s) if quartz_numbers => {
                return Err(format!(
                    "{text:?}: Quartz's seconds form with weekday numbers accepted ({s:?})"
                ));
            }
            Ok(s) => s,
            // Refused on purpose: read as crontab, its weekday numbers would mean other days.
            Err(e)
                if quartz_numbers && e.to_string().contains("looks like a Quartz expression") =>
            {
                return Ok(());
            }
            Err(e) => return Err(format!("a valid expression refused: {text:?}: {e}")),
        };
        let year_2026 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let changes: Vec<DateTime<Utc>> =
            Offsets::over(zone, year_2026, year_2026 + Duration::days(365))
                .transitions()
                .collect();
        let after = match changes.get(start as usize % changes.len().max(1)) {
            Some(change) if near_change => {
                *change - Duration::seconds(i64::from(start % (2 * 86_400)))
            }
            _ => year_2026 + Duration::seconds(i64::from(start % (365 * 86_400))),
        };
        let span = if expr.has_seconds() {
            Duration::days(2)
        } else {
            Duration::days(366)
        };
        let until = after + span;
        let offsets = Offsets::over(zone, after - Duration::days(3), until + Duration::days(3));
        let want = reference(&Model::of(expr), &offsets, after, until, LIMIT);
        let got: Vec<DateTime<Utc>> = schedule
            .firings_after(after, Some(until), zone)
            .take(LIMIT)
            .collect();
        let context = format!("{text:?} in {zone}, after {}", show(Some(&after), zone));
        if let Some(i) = (0..want.len().max(got.len())).find(|&i| want.get(i) != got.get(i)) {
            return Err(format!(
                "{context}: firing #{i} (of {} by the reference): evaluator {}, reference {}",
                want.len(),
                show(got.get(i), zone),
                show(want.get(i), zone)
            ));
        }
        let next = schedule.next_after(after, zone);
        let next_ok = match want.first() {
            Some(first) => next == Some(*first),
            None => next.is_none_or(|n| n > until),
        };
        if !next_ok {
            return Err(format!(
                "{context}: next_after {}, reference {}",
                show(next.as_ref(), zone),
                show(want.first(), zone)
            ));
        }
        // The latest firing at or before a firing is that firing; a second before it, the one before
        // (or none after `after`).
        for i in [0, want.len() / 2, want.len().saturating_sub(1)] {
            let Some(&t) = want.get(i) else { continue };
            let at = schedule.prev_at_or_before(t, zone);
            let before = schedule.prev_at_or_before(t - Duration::seconds(1), zone);
            let before_ok = match i.checked_sub(1).and_then(|j| want.get(j)) {
                Some(&previous) => before == Some(previous),
                None => before.is_none_or(|b| b <= after),
            };
            if at != Some(t) || !before_ok {
                return Err(format!(
                    "{context}: prev_at_or_before {} is {}, and a second before it {} (firing #{i})",
                    show(Some(&t), zone),
                    show(at.as_ref(), zone),
                    show(before.as_ref(), zone)
                ));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn evaluator_agrees_with_a_brute_force_walk(
            expr in expression(),
            zone in 0..ZONES.len(),
            near_change in any::<bool>(),
            start in any::<u32>(),
        ) {
            if let Err(e) = compare(&expr, zone, near_change, start) {
                prop_assert!(false, "{}", e);
            }
        }
    }
}
