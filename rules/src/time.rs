//! Calendar arithmetic for the time functions: Unix time ⇄ proleptic Gregorian UTC date,
//! RFC 3339 parsing and formatting, and the `strftime` subset of `format_date`.
//!
//! It is integer arithmetic only (Howard Hinnant's `days_from_civil`), so it cannot fail
//! on any input: out-of-range values are reported as errors, never wrapped or panicked on.
//! It reads no clock: "now" is the event's receive time, supplied by the caller.

/// The unit of a Unix timestamp, as EMQX spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Second,
    Millisecond,
    Microsecond,
    Nanosecond,
}

impl Unit {
    pub(crate) fn parse(name: &str) -> Option<Unit> {
        match name {
            "second" => Some(Unit::Second),
            "millisecond" => Some(Unit::Millisecond),
            "microsecond" => Some(Unit::Microsecond),
            "nanosecond" => Some(Unit::Nanosecond),
            _ => None,
        }
    }

    pub(crate) fn per_second(self) -> i64 {
        match self {
            Unit::Second => 1,
            Unit::Millisecond => 1_000,
            Unit::Microsecond => 1_000_000,
            Unit::Nanosecond => 1_000_000_000,
        }
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (days since 1970-01-01).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A broken-down time at some UTC offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub nanos: u32,
    /// Offset from UTC in seconds (east positive).
    pub offset_s: i64,
}

/// Years 0–9999 only: what RFC 3339 can spell, and far from any overflow.
const MIN_SECONDS: i64 = -62_167_219_200; // 0000-01-01T00:00:00Z
const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z

impl DateTime {
    /// The broken-down time of `ts` (in `unit`) at `offset_s`.
    pub(crate) fn from_unix(ts: i64, unit: Unit, offset_s: i64) -> Result<DateTime, String> {
        let per = unit.per_second();
        let seconds = ts.div_euclid(per);
        let sub = ts.rem_euclid(per);
        let local = seconds.checked_add(offset_s).filter(|s| (MIN_SECONDS..=MAX_SECONDS).contains(s));
        let Some(local) = local else {
            return Err(format!("timestamp {ts} is outside the years 0–9999"));
        };
        let (year, month, day) = civil_from_days(local.div_euclid(86_400));
        let secs_of_day = local.rem_euclid(86_400);
        Ok(DateTime {
            year,
            month,
            day,
            hour: u32::try_from(secs_of_day / 3600).unwrap_or(0),
            minute: u32::try_from(secs_of_day % 3600 / 60).unwrap_or(0),
            second: u32::try_from(secs_of_day % 60).unwrap_or(0),
            nanos: u32::try_from(sub * (1_000_000_000 / per)).unwrap_or(0),
            offset_s,
        })
    }

    /// Unix time in `unit`; `None` if it does not fit in an `i64`.
    pub(crate) fn to_unix(self, unit: Unit) -> Option<i64> {
        let days = days_from_civil(self.year, self.month, self.day);
        let seconds =
            days * 86_400 + i64::from(self.hour * 3600 + self.minute * 60 + self.second) - self.offset_s;
        let per = unit.per_second();
        seconds.checked_mul(per)?.checked_add(i64::from(self.nanos) / (1_000_000_000 / per))
    }

    /// RFC 3339 with as many fractional digits as the unit has (none for seconds), and `Z`
    /// for UTC.
    pub(crate) fn rfc3339(&self, unit: Unit) -> String {
        let mut out = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
        match unit {
            Unit::Second => {}
            Unit::Millisecond => out.push_str(&format!(".{:03}", self.nanos / 1_000_000)),
            Unit::Microsecond => out.push_str(&format!(".{:06}", self.nanos / 1_000)),
            Unit::Nanosecond => out.push_str(&format!(".{:09}", self.nanos)),
        }
        out.push_str(&format_offset(self.offset_s, true, true));
        out
    }

    /// `strftime`-style formatting, the subset EMQX's `format_date` documents: `%Y %m %d
    /// %H %M %S %N` (nanoseconds) `%3N %6N %9N %z` (+hhmm) `%:z` (+hh:mm) `%::z` (+hh:mm:ss)
    /// `%Z` (same as `%:z`) `%%`. Anything else is an error naming the directive.
    pub(crate) fn strftime(&self, format: &str) -> Result<String, String> {
        let mut out = String::with_capacity(format.len() + 16);
        let mut chars = format.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let mut directive = String::from("%");
            loop {
                let Some(d) = chars.next() else {
                    return Err(format!("format ends in the middle of `{directive}`"));
                };
                directive.push(d);
                if d != ':' && !d.is_ascii_digit() {
                    break;
                }
            }
            let text = match directive.as_str() {
                "%Y" => format!("{:04}", self.year),
                "%m" => format!("{:02}", self.month),
                "%d" => format!("{:02}", self.day),
                "%H" => format!("{:02}", self.hour),
                "%M" => format!("{:02}", self.minute),
                "%S" => format!("{:02}", self.second),
                "%N" | "%9N" => format!("{:09}", self.nanos),
                "%3N" => format!("{:03}", self.nanos / 1_000_000),
                "%6N" => format!("{:06}", self.nanos / 1_000),
                "%z" => format_offset(self.offset_s, false, false),
                "%:z" | "%Z" => format_offset(self.offset_s, true, false),
                "%::z" => {
                    let sign = if self.offset_s < 0 { '-' } else { '+' };
                    let abs = self.offset_s.unsigned_abs();
                    format!("{sign}{:02}:{:02}:{:02}", abs / 3600, abs % 3600 / 60, abs % 60)
                }
                "%%" => "%".to_owned(),
                other => {
                    return Err(format!(
                        "unsupported format directive `{other}`; supported: %Y %m %d %H %M %S %N %3N %6N %9N %z %:z %::z %Z %%"
                    ));
                }
            };
            out.push_str(&text);
        }
        Ok(out)
    }
}

fn format_offset(offset_s: i64, colon: bool, z_for_utc: bool) -> String {
    if offset_s == 0 && z_for_utc {
        return "Z".to_owned();
    }
    let sign = if offset_s < 0 { '-' } else { '+' };
    let abs = offset_s.unsigned_abs();
    let (hours, minutes) = (abs / 3600, abs % 3600 / 60);
    if colon { format!("{sign}{hours:02}:{minutes:02}") } else { format!("{sign}{hours:02}{minutes:02}") }
}

/// Parses an offset as EMQX's `emqx_utils_calendar:offset_second` reads text: `Z`/`z`,
/// `+hh:mm`, `+hh:mm:ss`, `-hhmm` (an integer number of seconds is an integer argument, see
/// [`offset_seconds`]). `local` is refused: the engine has no time zone database (the error
/// says so).
pub(crate) fn parse_offset(text: &str) -> Result<i64, String> {
    if text == "Z" || text == "z" {
        return Ok(0);
    }
    if text == "local" {
        return Err("offset `local` is not supported: the gateway has no time zone database; give the offset, e.g. '+08:00'".to_owned());
    }
    let bad = || format!("offset `{text}` is not `Z`, `+hh:mm`, `+hh:mm:ss`, `-hhmm` or seconds");
    let sign = match text.as_bytes().first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(bad()),
    };
    let rest = text.get(1..).ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (h, m, s) = match parts.as_slice() {
        [h, m] => (*h, *m, "0"),
        [h, m, s] => (*h, *m, *s),
        [hhmm] if hhmm.len() == 4 => (hhmm.get(..2).unwrap_or(""), hhmm.get(2..).unwrap_or(""), "0"),
        _ => return Err(bad()),
    };
    let num = |part: &str| -> Result<i64, String> {
        if !part.is_empty() && part.len() <= 2 && part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (hours, minutes, seconds) = (num(h)?, num(m)?, num(s)?);
    if hours > 23 || minutes > 59 || seconds > 59 {
        return Err(format!("offset `{text}` is out of range"));
    }
    Ok(sign * (hours * 3600 + minutes * 60 + seconds))
}

/// An offset given as an integer number of seconds (EMQX takes any integer; a day or more
/// is refused here, as no calendar offset is that large).
pub(crate) fn offset_seconds(seconds: i64) -> Result<i64, String> {
    if seconds.abs() < 86_400 {
        Ok(seconds)
    } else {
        Err(format!("offset {seconds} seconds is a day or more"))
    }
}

/// `date_to_unix_ts`'s parser, as EMQX's `formatted_datetime_to_system_time` reads a date:
/// each directive takes a fixed number of characters (`%Y` 4, `%m %d %H %M %S` 2, `%3N` 3,
/// `%6N` 6, `%N` 9, `%z` 5, `%:z` 6, `%::z` 9) and each literal character of the format
/// skips one character of the input without comparing it (so `%H-%M-%S` reads
/// `10:40:12`, as in EMQX). Year, month, day, hour, minute and second are required. The
/// result is in `unit`, before any offset the caller subtracts.
pub(crate) fn parse_formatted(format: &str, input: &str, unit: Unit) -> Result<i64, String> {
    let mut rest = input;
    let mut parts: [Option<i64>; 6] = [None; 6];
    let (mut nanos, mut offset) = (0i64, 0i64);
    let mut chars = format.chars().peekable();
    let take = |rest: &mut &str, n: usize| -> Result<String, String> {
        let taken: String = rest.chars().take(n).collect();
        if taken.chars().count() < n {
            return Err(format!("`{input}` is shorter than the format `{format}`"));
        }
        *rest = rest.get(taken.len()..).unwrap_or("");
        Ok(taken)
    };
    let int = |text: &str| -> Result<i64, String> {
        let digits = text.strip_prefix('+').unwrap_or(text);
        if !digits.is_empty()
            && digits.bytes().enumerate().all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
        {
            digits.parse().map_err(|_| format!("`{text}` in `{input}` is not a number"))
        } else {
            Err(format!("`{text}` in `{input}` does not match the format `{format}`"))
        }
    };
    while let Some(c) = chars.next() {
        if rest.is_empty() {
            break;
        }
        if c != '%' {
            take(&mut rest, 1)?;
            continue;
        }
        let mut directive = String::from("%");
        for d in chars.by_ref() {
            directive.push(d);
            if d != ':' && !d.is_ascii_digit() {
                break;
            }
        }
        let (slot, width) = match directive.as_str() {
            "%Y" => (Some(0), 4),
            "%m" => (Some(1), 2),
            "%d" => (Some(2), 2),
            "%H" => (Some(3), 2),
            "%M" => (Some(4), 2),
            "%S" => (Some(5), 2),
            "%3N" => (None, 3),
            "%6N" => (None, 6),
            "%N" | "%9N" => (None, 9),
            "%z" => (None, 5),
            "%:z" => (None, 6),
            "%::z" => (None, 9),
            other => return Err(format!("unsupported format directive `{other}`")),
        };
        let text = take(&mut rest, width)?;
        match (slot, directive.as_str()) {
            (Some(i), _) => parts[i] = Some(int(&text)?),
            (None, "%3N") => nanos = int(&text)? * 1_000_000,
            (None, "%6N") => nanos = int(&text)? * 1_000,
            (None, "%N" | "%9N") => nanos = int(&text)?,
            _ => offset = parse_offset(&text)?,
        }
    }
    const NAMES: [&str; 6] = ["year", "month", "day", "hour", "minute", "second"];
    let mut values = [0i64; 6];
    for (i, part) in parts.iter().enumerate() {
        values[i] = part
            .ok_or_else(|| format!("the format `{format}` has no {} (EMQX: missing_date_part)", NAMES[i]))?;
    }
    let [year, month, day, hour, minute, second] = values;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    };
    if !(0..=9999).contains(&year)
        || day < 1
        || day > days_in_month
        || !(0..24).contains(&hour)
        || !(0..60).contains(&minute)
        || !(0..60).contains(&second)
    {
        return Err(format!("`{input}` is not a valid date"));
    }
    let small = |v: i64| u32::try_from(v).unwrap_or(0);
    let dt = DateTime {
        year,
        month: small(month),
        day: small(day),
        hour: small(hour),
        minute: small(minute),
        second: small(second),
        nanos: small(nanos.clamp(0, 999_999_999)),
        offset_s: offset,
    };
    dt.to_unix(unit).ok_or_else(|| format!("`{input}` does not fit in a timestamp"))
}

/// Parses an RFC 3339 timestamp such as `2024-02-23T07:00:00.5+08:00` (a space may stand
/// for the `T`; the offset is required).
pub(crate) fn parse_rfc3339(text: &str) -> Result<DateTime, String> {
    let bad = || format!("`{text}` is not an RFC 3339 timestamp (e.g. `2024-02-23T07:00:00Z`)");
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<u32, String> {
        let part = text.get(range).ok_or_else(bad)?;
        if part.bytes().all(|c| c.is_ascii_digit()) { part.parse().map_err(|_| bad()) } else { Err(bad()) }
    };
    if b.len() < 20
        || b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !matches!(b.get(10), Some(b'T' | b't' | b' '))
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
    {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = text.get(19..).ok_or_else(bad)?;
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let n_digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n_digits == 0 {
            return Err(bad());
        }
        let digits = fraction.get(..n_digits.min(9)).ok_or_else(bad)?;
        nanos = digits.parse::<u32>().map_err(|_| bad())?
            * 10u32.pow(9 - u32::try_from(digits.len()).unwrap_or(9));
        rest = fraction.get(n_digits..).ok_or_else(bad)?;
    }
    let offset_s = parse_offset(rest).map_err(|_| bad())?;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    Ok(DateTime { year: i64::from(year), month, day, hour, minute, second: second.min(59), nanos, offset_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_calendar() {
        for ts in [0, 1_708_671_600_123, -1, 951_782_400_000, 253_402_300_799_999] {
            let dt = DateTime::from_unix(ts, Unit::Millisecond, 0).unwrap();
            assert_eq!(dt.to_unix(Unit::Millisecond), Some(ts));
            let parsed = parse_rfc3339(&dt.rfc3339(Unit::Millisecond)).unwrap();
            assert_eq!(parsed.to_unix(Unit::Millisecond), Some(ts));
        }
        let dt = DateTime::from_unix(1_708_671_600, Unit::Second, 8 * 3600).unwrap();
        assert_eq!(dt.rfc3339(Unit::Second), "2024-02-23T15:00:00+08:00");
        assert!(DateTime::from_unix(i64::MAX, Unit::Second, 0).is_err());
        assert!(DateTime::from_unix(i64::MIN, Unit::Nanosecond, 0).is_ok());
    }

    #[test]
    fn parses_offsets_and_fractions() {
        let dt = parse_rfc3339("2024-02-23T15:00:00.5+08:00").unwrap();
        assert_eq!(dt.to_unix(Unit::Millisecond), Some(1_708_671_600_500));
        assert!(parse_rfc3339("2024-02-30T00:00:00Z").is_err());
        assert!(parse_rfc3339("2024-02-23T15:00:00").is_err(), "the offset is required");
        assert!(parse_rfc3339("2024-02-23T15:00:00é").is_err());
        assert_eq!(parse_offset("-05:30"), Ok(-19_800));
    }

    #[test]
    fn strftime_subset() {
        let dt = DateTime::from_unix(1_708_671_600_123, Unit::Millisecond, 3600).unwrap();
        assert_eq!(dt.strftime("%Y-%m-%d %H:%M:%S.%3N%z %%").unwrap(), "2024-02-23 08:00:00.123+0100 %");
        assert!(dt.strftime("%Q").unwrap_err().contains("`%Q`"));
        assert!(dt.strftime("%").is_err());
    }
}
