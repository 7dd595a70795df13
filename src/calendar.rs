//! Holiday calendars: the dates an iCalendar (RFC 5545) file's events cover.
//!
//! Pure: the caller reads the file (with the configuration's hardened reader) and hands over its text.
//! - VEVENTs only; other components (VTIMEZONE, VTODO...) are passed over.
//! - An all-day event (`DTSTART;VALUE=DATE:20270101`) covers its start date up to its `DTEND`, which is
//!   exclusive, or one day without one (or `DURATION`, whole days and weeks).
//! - A timed event covers every date from its start to its end, as written (local time with or without
//!   `TZID`, or UTC with `Z`); `DTEND` is exclusive, so an event ending at midnight does not cover the day
//!   it ends on.
//! - Recurrence (`RRULE`, `RDATE`, `EXDATE`) is refused with its line: no maintained crate reads it
//!   the way shiftd would need, and ignoring it would silently drop dates.

use std::collections::BTreeSet;

use chrono::{Duration, NaiveDate, NaiveDateTime, NaiveTime};

/// An event may span at most this many days: longer ones are mistakes (or would fill memory).
pub const MAX_EVENT_DAYS: i64 = 366;

/// A problem in an iCalendar file, at a 1-based line and column.
#[derive(Debug, PartialEq, Eq)]
pub struct IcsError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// One content line, unfolded, with where it starts in the file.
struct ContentLine<'a> {
    line: usize,
    text: std::borrow::Cow<'a, str>,
}

/// Unfolds the file's lines (a line starting with a space or a tab continues the one before it).
fn content_lines(text: &str) -> Vec<ContentLine<'_>> {
    let mut out: Vec<ContentLine> = Vec::new();
    for (i, physical) in text.split('\n').enumerate() {
        let physical = physical.strip_suffix('\r').unwrap_or(physical);
        if let Some(rest) = physical.strip_prefix([' ', '\t'])
            && let Some(last) = out.last_mut()
        {
            last.text.to_mut().push_str(rest);
            continue;
        }
        if physical.trim().is_empty() {
            continue;
        }
        out.push(ContentLine {
            line: i + 1,
            text: physical.into(),
        });
    }
    out
}

/// A property: its name (upper case), its parameters as written, its value, and the column (1-based,
/// in characters) its value starts at.
struct Property<'a> {
    name: String,
    params: &'a str,
    value: &'a str,
    value_column: usize,
}

fn property(text: &str) -> Option<Property<'_>> {
    let mut quoted = false;
    let colon = text.char_indices().find_map(|(i, c)| match c {
        '"' => {
            quoted = !quoted;
            None
        }
        ':' if !quoted => Some(i),
        _ => None,
    })?;
    let (head, value) = (&text[..colon], &text[colon + 1..]);
    let (name, params) = head.split_once(';').unwrap_or((head, ""));
    Some(Property {
        name: name.to_ascii_uppercase(),
        params,
        value,
        value_column: text[..colon].chars().count() + 2,
    })
}

/// A DTSTART or DTEND: a date, or a date and time as written.
#[derive(Clone, Copy, Debug)]
enum When {
    Date(NaiveDate),
    DateTime(NaiveDateTime),
}

fn when(p: &Property<'_>) -> Result<When, String> {
    let value = p.value.trim();
    let is_date = p
        .params
        .split(';')
        .any(|param| param.eq_ignore_ascii_case("VALUE=DATE"));
    let date = |s: &str| {
        (s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| NaiveDate::parse_from_str(s, "%Y%m%d").ok())
            .flatten()
    };
    let bad = || {
        format!(
            "{} {value:?} is not a date or date-time: expected YYYYMMDD (a real date) or \
             YYYYMMDDTHHMMSS, optionally with Z",
            p.name
        )
    };
    if is_date || value.len() == 8 {
        return date(value).map(When::Date).ok_or_else(bad);
    }
    let (d, t) = value.split_once(['T', 't']).ok_or_else(bad)?;
    let t = t.strip_suffix(['Z', 'z']).unwrap_or(t);
    let time = (t.len() == 6 && t.bytes().all(|b| b.is_ascii_digit()))
        .then(|| NaiveTime::parse_from_str(t, "%H%M%S").ok())
        .flatten();
    match (date(d), time) {
        (Some(d), Some(t)) => Ok(When::DateTime(d.and_time(t))),
        _ => Err(bad()),
    }
}

/// `DURATION`'s value (`P1D`, `P2W`, `PT1H30M`, `P1DT2H`), as a duration.
fn duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let rest = value.strip_prefix('+').unwrap_or(value).strip_prefix('P')?;
    let (days_part, time_part) = rest.split_once('T').unwrap_or((rest, ""));
    let mut total = Duration::zero();
    let mut parse = |part: &str, units: &[(char, i64)]| -> Option<()> {
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let (_, seconds) = units.iter().find(|(u, _)| *u == c)?;
            let n: i64 = number.parse().ok()?;
            total += Duration::seconds(n.checked_mul(*seconds)?.min(MAX_EVENT_DAYS * 86_400 * 2));
            number.clear();
        }
        number.is_empty().then_some(())
    };
    parse(days_part, &[('W', 7 * 86_400), ('D', 86_400)])?;
    parse(time_part, &[('H', 3600), ('M', 60), ('S', 1)])?;
    Some(total)
}

/// One VEVENT being read.
#[derive(Default)]
struct Event {
    line: usize,
    start: Option<(When, usize, usize)>,
    end: Option<(When, usize, usize)>,
    duration: Option<(Duration, usize, usize)>,
}

impl Event {
    /// The dates the event covers.
    fn dates(&self) -> Result<Vec<NaiveDate>, IcsError> {
        let err = |line, column, message: String| IcsError {
            line,
            column,
            message,
        };
        let Some((start, line, column)) = self.start else {
            return Err(err(
                self.line,
                1,
                "VEVENT without DTSTART: expected the date it is on".to_string(),
            ));
        };
        let end = match (self.end, self.duration) {
            (Some((end, ..)), _) => Some(end),
            (None, Some((d, ..))) => Some(match start {
                When::Date(s) => When::Date(s + Duration::days(d.num_days())),
                When::DateTime(s) => When::DateTime(s + d),
            }),
            (None, None) => None,
        };
        let (first, last) = match (start, end) {
            (When::Date(s), None) => (s, s),
            (When::DateTime(s), None) => (s.date(), s.date()),
            (When::Date(s), Some(When::Date(e))) if e > s => (s, e - Duration::days(1)),
            (When::Date(s), Some(When::Date(_))) => (s, s),
            (When::DateTime(s), Some(When::DateTime(e))) if e > s => {
                // DTEND is exclusive: an event ending at midnight does not cover that day.
                let last = if e.time() == NaiveTime::MIN {
                    e.date() - Duration::days(1)
                } else {
                    e.date()
                };
                (s.date(), last.max(s.date()))
            }
            (When::DateTime(s), Some(When::DateTime(_))) => (s.date(), s.date()),
            _ => {
                let (_, line, column) = self.end.unwrap_or((start, line, column));
                return Err(err(
                    line,
                    column,
                    "DTEND is a date where DTSTART has a time, or the other way round: expected both \
                     dates (an all-day event) or both date-times"
                        .to_string(),
                ));
            }
        };
        if (last - first).num_days() >= MAX_EVENT_DAYS {
            let (line, column) = self
                .end
                .map(|(_, l, c)| (l, c))
                .or(self.duration.map(|(_, l, c)| (l, c)))
                .unwrap_or((line, column));
            return Err(err(
                line,
                column,
                format!(
                    "the event spans {} days, from {first} to {last}: expected at most {MAX_EVENT_DAYS}",
                    (last - first).num_days() + 1
                ),
            ));
        }
        Ok(first.iter_days().take_while(|d| *d <= last).collect())
    }
}

/// The dates the VEVENTs of an iCalendar file's `text` cover, or the first problem found.
pub fn parse_ics(text: &str) -> Result<BTreeSet<NaiveDate>, IcsError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut dates = BTreeSet::new();
    let mut event: Option<Event> = None;
    let mut depth = 0usize;
    let mut seen_calendar = false;
    for cl in content_lines(text) {
        let err = |column, message: String| IcsError {
            line: cl.line,
            column,
            message,
        };
        let Some(p) = property(&cl.text) else {
            return Err(err(
                1,
                format!(
                    "{:?} is not an iCalendar content line: expected NAME:VALUE",
                    cl.text.chars().take(40).collect::<String>()
                ),
            ));
        };
        let value = p.value.trim().to_ascii_uppercase();
        match p.name.as_str() {
            "BEGIN" => {
                if depth == 0 && value != "VCALENDAR" {
                    return Err(err(
                        p.value_column,
                        format!("BEGIN:{value} outside a calendar: expected BEGIN:VCALENDAR first"),
                    ));
                }
                seen_calendar = true;
                depth += 1;
                if value == "VEVENT" {
                    event = Some(Event {
                        line: cl.line,
                        ..Event::default()
                    });
                }
            }
            "END" => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| err(1, format!("END:{value} without a matching BEGIN")))?;
                if value == "VEVENT"
                    && let Some(e) = event.take()
                {
                    dates.extend(e.dates()?);
                }
            }
            "RRULE" | "RDATE" | "EXDATE" if event.is_some() => {
                return Err(err(
                    1,
                    format!(
                        "{} (recurrence) is not supported: list each date as its own event, or in the \
                         calendar's `dates`",
                        p.name
                    ),
                ));
            }
            "DTSTART" | "DTEND" if event.is_some() => {
                let w = when(&p).map_err(|m| err(p.value_column, m))?;
                let e = event.as_mut().expect("checked");
                let slot = if p.name == "DTSTART" {
                    &mut e.start
                } else {
                    &mut e.end
                };
                *slot = Some((w, cl.line, p.value_column));
            }
            "DURATION" if event.is_some() => {
                let d = duration(p.value).ok_or_else(|| {
                    err(
                        p.value_column,
                        format!(
                            "DURATION {:?} is not a duration: expected e.g. P1D, P2W or PT1H30M",
                            p.value
                        ),
                    )
                })?;
                event.as_mut().expect("checked").duration = Some((d, cl.line, p.value_column));
            }
            _ => {}
        }
    }
    if !seen_calendar {
        return Err(IcsError {
            line: 1,
            column: 1,
            message: "no BEGIN:VCALENDAR: expected an iCalendar (RFC 5545) file".to_string(),
        });
    }
    if depth != 0 {
        return Err(IcsError {
            line: text.lines().count().max(1),
            column: 1,
            message: "the file ends inside a component: expected END:VCALENDAR".to_string(),
        });
    }
    Ok(dates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ics(events: &str) -> String {
        format!("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n{events}END:VCALENDAR\r\n")
    }

    fn dates(text: &str) -> Vec<String> {
        parse_ics(text)
            .unwrap()
            .into_iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn events_cover_the_dates_they_span() {
        let cases: &[(&str, &[&str])] = &[
            // All-day, DTEND exclusive.
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270101\r\nDTEND;VALUE=DATE:20270102\r\nSUMMARY:New Year\r\nEND:VEVENT\r\n",
                &["2027-01-01"],
            ),
            // All-day without DTEND: one day. VALUE=DATE may be left out for 8 digits.
            (
                "BEGIN:VEVENT\r\nDTSTART:20270111\r\nEND:VEVENT\r\n",
                &["2027-01-11"],
            ),
            // Multi-day, across a month end.
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20261230\r\nDTEND;VALUE=DATE:20270103\r\nEND:VEVENT\r\n",
                &["2026-12-30", "2026-12-31", "2027-01-01", "2027-01-02"],
            ),
            // DURATION in days.
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270429\r\nDURATION:P2D\r\nEND:VEVENT\r\n",
                &["2027-04-29", "2027-04-30"],
            ),
            // Timed: the dates from start to end; ending at midnight does not cover that day.
            (
                "BEGIN:VEVENT\r\nDTSTART;TZID=Asia/Tokyo:20270105T220000\r\nDTEND;TZID=Asia/Tokyo:20270107T020000\r\nEND:VEVENT\r\n",
                &["2027-01-05", "2027-01-06", "2027-01-07"],
            ),
            (
                "BEGIN:VEVENT\r\nDTSTART:20270105T090000Z\r\nDTEND:20270107T000000Z\r\nEND:VEVENT\r\n",
                &["2027-01-05", "2027-01-06"],
            ),
            (
                "BEGIN:VEVENT\r\nDTSTART:20270105T090000\r\nEND:VEVENT\r\n",
                &["2027-01-05"],
            ),
            // Folded lines, parameters with quoted colons, other components passed over.
            (
                "BEGIN:VTIMEZONE\r\nTZID:Asia/Tokyo\r\nBEGIN:STANDARD\r\nDTSTART:19700101T000000\r\nEND:STANDARD\r\nEND:VTIMEZONE\r\nBEGIN:VEVENT\r\nSUMMARY;ALTREP=\"cid:x\":Coming\r\n  of Age Day\r\nDTSTART;VALUE=DATE:2027\r\n 0111\r\nEND:VEVENT\r\n",
                &["2027-01-11"],
            ),
        ];
        for (events, want) in cases {
            assert_eq!(dates(&ics(events)), *want, "{events}");
        }
        // LF line ends, several events, duplicates once.
        let text = "BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART;VALUE=DATE:20270101\nEND:VEVENT\nBEGIN:VEVENT\nDTSTART;VALUE=DATE:20270101\nEND:VEVENT\nEND:VCALENDAR\n";
        assert_eq!(dates(text), ["2027-01-01"]);
    }

    #[test]
    fn problems_are_refused_with_their_line_and_column() {
        let cases: &[(&str, usize, usize, &str)] = &[
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270230\r\nEND:VEVENT\r\n",
                5,
                20,
                "DTSTART \"20270230\" is not a date or date-time",
            ),
            (
                "BEGIN:VEVENT\r\nDTSTART:20270101T250000\r\nEND:VEVENT\r\n",
                5,
                9,
                "is not a date or date-time",
            ),
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270101\r\nRRULE:FREQ=YEARLY\r\nEND:VEVENT\r\n",
                6,
                1,
                "RRULE (recurrence) is not supported",
            ),
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270101\r\nRDATE;VALUE=DATE:20280101\r\nEND:VEVENT\r\n",
                6,
                1,
                "RDATE (recurrence) is not supported",
            ),
            (
                "BEGIN:VEVENT\r\nSUMMARY:x\r\nEND:VEVENT\r\n",
                4,
                1,
                "VEVENT without DTSTART",
            ),
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270101\r\nDTEND:20270102T000000\r\nEND:VEVENT\r\n",
                6,
                7,
                "DTEND is a date where DTSTART has a time",
            ),
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270101\r\nDTEND;VALUE=DATE:20300101\r\nEND:VEVENT\r\n",
                6,
                18,
                "the event spans 1096 days",
            ),
            (
                "BEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20270101\r\nDURATION:1D\r\nEND:VEVENT\r\n",
                6,
                10,
                "DURATION \"1D\" is not a duration",
            ),
            (
                "BEGIN:VEVENT\r\nnonsense\r\n",
                5,
                1,
                "is not an iCalendar content line",
            ),
            ("BEGIN:VEVENT\r\n", 5, 1, "the file ends inside a component"),
        ];
        for (events, line, column, want) in cases {
            let e = parse_ics(&ics(events)).unwrap_err();
            assert!(e.message.contains(want), "{events}: {e:?}");
            assert_eq!((e.line, e.column), (*line, *column), "{events}: {e:?}");
        }
        let e = parse_ics("SUMMARY:x\n").unwrap_err();
        assert!(e.message.contains("BEGIN:VCALENDAR"), "{e:?}");
        let e = parse_ics("").unwrap_err();
        assert!(e.message.contains("no BEGIN:VCALENDAR"), "{e:?}");
    }
}
