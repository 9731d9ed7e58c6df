//! Wall-clock instants as milliseconds since the Unix epoch, with RFC 3339 text in `no_std`.
//!
//! The core never reads a clock: every input that depends on time carries a [`Timestamp`],
//! and drivers get one from the [`Clock`] they were given.

use core::fmt;
use core::time::Duration;

/// An instant in UTC, in milliseconds since 1970-01-01T00:00:00Z.
///
/// The range is the one RFC 3339 can write with a four-digit year: from the epoch to
/// 9999-12-31T23:59:59.999Z. Arithmetic saturates at both ends instead of wrapping, so a
/// deadline far in the future stays far in the future.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    millis: u64,
}

/// A source of the current time, injected by whoever drives the core.
///
/// The core itself never calls it; drivers (and tests, with a manual clock) do.
pub trait Clock {
    /// The current wall-clock time.
    fn now(&self) -> Timestamp;
}

/// Why a string is not an RFC 3339 UTC timestamp this crate accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampError {
    /// The text does not have the `YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM]` shape.
    Syntax,
    /// A field is out of its range (month 13, February 30th, hour 24, second 60, ...).
    OutOfRange,
    /// The instant is before 1970-01-01T00:00:00Z or after 9999-12-31T23:59:59.999Z.
    Unrepresentable,
}

impl core::error::Error for TimestampError {}

impl fmt::Display for TimestampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimestampError::Syntax => "expected an RFC 3339 timestamp like 2024-01-15T10:30:00Z",
            TimestampError::OutOfRange => "a date or time field is out of range",
            TimestampError::Unrepresentable => {
                "timestamp is outside 1970-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999Z"
            }
        })
    }
}

const MILLIS_PER_DAY: u64 = 86_400_000;
/// Days from 1970-01-01 to 10000-01-01.
const DAYS_TO_YEAR_10000: u64 = 2_932_897;

impl Timestamp {
    /// 1970-01-01T00:00:00Z.
    pub const EPOCH: Timestamp = Timestamp { millis: 0 };
    /// 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can write.
    pub const MAX: Timestamp = Timestamp {
        millis: DAYS_TO_YEAR_10000 * MILLIS_PER_DAY - 1,
    };

    /// The instant `millis` milliseconds after the epoch, clamped to [`Timestamp::MAX`].
    pub const fn from_millis(millis: u64) -> Timestamp {
        if millis > Self::MAX.millis {
            Self::MAX
        } else {
            Timestamp { millis }
        }
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    /// Whole seconds since the epoch (what the RFC 3339 text shows).
    pub const fn as_secs(self) -> u64 {
        self.millis / 1000
    }

    /// `self + d`, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        let add = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp::from_millis(self.millis.saturating_add(add))
    }

    /// `self - d`, saturating at [`Timestamp::EPOCH`].
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        let sub = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp {
            millis: self.millis.saturating_sub(sub),
        }
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub const fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.millis.saturating_sub(earlier.millis))
    }

    /// Parses RFC 3339: `YYYY-MM-DDTHH:MM:SS`, an optional fraction (kept to the
    /// millisecond, further digits truncated), and `Z` or a `±HH:MM` offset.
    ///
    /// Total: every input gives a value or an error, never a panic.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, TimestampError> {
        let b = text.as_bytes();
        if b.len() < 20 {
            return Err(TimestampError::Syntax);
        }
        let year = digits(b, 0, 4)?;
        expect(b, 4, b'-')?;
        let month = digits(b, 5, 2)?;
        expect(b, 7, b'-')?;
        let day = digits(b, 8, 2)?;
        if !matches!(b[10], b'T' | b't') {
            return Err(TimestampError::Syntax);
        }
        let hour = digits(b, 11, 2)?;
        expect(b, 13, b':')?;
        let minute = digits(b, 14, 2)?;
        expect(b, 16, b':')?;
        let second = digits(b, 17, 2)?;

        let mut pos = 19;
        let mut millis = 0u64;
        if b[pos] == b'.' {
            pos += 1;
            let start = pos;
            while pos < b.len() && b[pos].is_ascii_digit() {
                if pos - start < 3 {
                    millis = millis * 10 + u64::from(b[pos] - b'0');
                }
                pos += 1;
            }
            let n = pos - start;
            if n == 0 {
                return Err(TimestampError::Syntax);
            }
            for _ in n..3 {
                millis *= 10;
            }
        }
        let offset_minutes: i64 = match b.get(pos) {
            Some(b'Z' | b'z') if pos + 1 == b.len() => 0,
            Some(&sign @ (b'+' | b'-')) if pos + 6 == b.len() => {
                let oh = digits(b, pos + 1, 2)?;
                expect(b, pos + 3, b':')?;
                let om = digits(b, pos + 4, 2)?;
                if oh > 23 || om > 59 {
                    return Err(TimestampError::OutOfRange);
                }
                let m = (oh * 60 + om) as i64;
                if sign == b'+' { m } else { -m }
            }
            _ => return Err(TimestampError::Syntax),
        };

        if !(1..=12).contains(&month)
            || day == 0
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return Err(TimestampError::OutOfRange);
        }
        // Local time minus the offset is UTC.
        let days = days_from_civil(year, month, day);
        let local_ms = days * MILLIS_PER_DAY as i64
            + ((hour * 3600 + minute * 60 + second) as i64) * 1000
            + millis as i64;
        let utc_ms = local_ms - offset_minutes * 60_000;
        if utc_ms < 0 || utc_ms as u64 > Self::MAX.millis {
            return Err(TimestampError::Unrepresentable);
        }
        Ok(Timestamp {
            millis: utc_ms as u64,
        })
    }

    /// The RFC 3339 text at second precision, `YYYY-MM-DDTHH:MM:SSZ` (20 bytes), written
    /// into `buf` without allocating.
    pub fn format_rfc3339(self, buf: &mut [u8; 20]) -> &str {
        let days = self.millis / MILLIS_PER_DAY;
        let secs_of_day = (self.millis % MILLIS_PER_DAY) / 1000;
        let (year, month, day) = civil_from_days(days);
        write2(buf, 0, year / 100);
        write2(buf, 2, year % 100);
        buf[4] = b'-';
        write2(buf, 5, month);
        buf[7] = b'-';
        write2(buf, 8, day);
        buf[10] = b'T';
        write2(buf, 11, (secs_of_day / 3600) as u32);
        buf[13] = b':';
        write2(buf, 14, ((secs_of_day / 60) % 60) as u32);
        buf[16] = b':';
        write2(buf, 17, (secs_of_day % 60) as u32);
        buf[19] = b'Z';
        // Every byte written above is ASCII.
        core::str::from_utf8(buf).unwrap_or("")
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 20];
        f.write_str(self.format_rfc3339(&mut buf))
    }
}

impl core::str::FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Timestamp::parse_rfc3339(s)
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 20];
        serializer.serialize_str(self.format_rfc3339(&mut buf))
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 UTC timestamp like 2024-01-15T10:30:00Z")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

fn expect(b: &[u8], pos: usize, want: u8) -> Result<(), TimestampError> {
    if b.get(pos) == Some(&want) {
        Ok(())
    } else {
        Err(TimestampError::Syntax)
    }
}

fn digits(b: &[u8], pos: usize, n: usize) -> Result<u32, TimestampError> {
    let field = b.get(pos..pos + n).ok_or(TimestampError::Syntax)?;
    field.iter().try_fold(0u32, |acc, &c| {
        if c.is_ascii_digit() {
            Ok(acc * 10 + u32::from(c - b'0'))
        } else {
            Err(TimestampError::Syntax)
        }
    })
}

fn write2(buf: &mut [u8; 20], pos: usize, v: u32) {
    buf[pos] = b'0' + (v / 10 % 10) as u8;
    buf[pos + 1] = b'0' + (v % 10) as u8;
}

const fn is_leap(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

const fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + u64::from(month <= 2)) as u32;
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    fn text(t: Timestamp) -> heapless::String<20> {
        let mut buf = [0u8; 20];
        heapless::String::try_from(t.format_rfc3339(&mut buf)).unwrap()
    }

    #[test]
    fn reference_example_round_trips() {
        let t = ts("2024-01-15T10:30:00Z");
        assert_eq!(t.as_secs(), 1_705_314_600);
        assert_eq!(text(t), "2024-01-15T10:30:00Z");
    }

    #[test]
    fn epoch_and_max() {
        assert_eq!(ts("1970-01-01T00:00:00Z"), Timestamp::EPOCH);
        assert_eq!(text(Timestamp::EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(ts("9999-12-31T23:59:59.999Z"), Timestamp::MAX);
        assert_eq!(text(Timestamp::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(Timestamp::from_millis(u64::MAX), Timestamp::MAX);
        assert_eq!(
            Timestamp::MAX.saturating_add(Duration::from_secs(1)),
            Timestamp::MAX
        );
        assert_eq!(
            Timestamp::EPOCH.saturating_sub(Duration::from_secs(1)),
            Timestamp::EPOCH
        );
    }

    #[test]
    fn leap_years() {
        assert!(Timestamp::parse_rfc3339("2024-02-29T00:00:00Z").is_ok());
        assert!(Timestamp::parse_rfc3339("2000-02-29T00:00:00Z").is_ok());
        assert_eq!(
            Timestamp::parse_rfc3339("2023-02-29T00:00:00Z"),
            Err(TimestampError::OutOfRange)
        );
        assert_eq!(
            Timestamp::parse_rfc3339("1900-02-29T00:00:00Z"),
            Err(TimestampError::OutOfRange)
        );
        assert_eq!(
            ts("2024-03-01T00:00:00Z").as_millis() - ts("2024-02-28T00:00:00Z").as_millis(),
            2 * MILLIS_PER_DAY
        );
    }

    #[test]
    fn every_day_round_trips() {
        // Walk 1970..2500 one day (plus an odd second) at a time.
        let mut millis = 0u64;
        while millis < ts("2500-01-01T00:00:00Z").as_millis() {
            let t = Timestamp::from_millis(millis);
            assert_eq!(ts(text(t).as_str()).as_secs(), t.as_secs());
            millis += MILLIS_PER_DAY + 1_001;
        }
    }

    #[test]
    fn fractions_and_offsets() {
        assert_eq!(ts("2024-01-15T10:30:00.5Z").as_millis() % 1000, 500);
        assert_eq!(ts("2024-01-15T10:30:00.123456789Z").as_millis() % 1000, 123);
        assert_eq!(ts("2024-01-15T12:30:00+02:00"), ts("2024-01-15T10:30:00Z"));
        assert_eq!(ts("2024-01-15T05:00:00-05:30"), ts("2024-01-15T10:30:00Z"));
        assert_eq!(ts("2024-01-15t10:30:00z"), ts("2024-01-15T10:30:00Z"));
    }

    #[test]
    fn malformed_strings_are_errors() {
        for bad in [
            "",
            "2024",
            "2024-01-15",
            "2024-01-15 10:30:00Z",
            "2024-01-15T10:30:00",
            "2024-01-15T10:30:00ZZ",
            "2024-1-15T10:30:00Z",
            "2024-01-15T10:30:00.Z",
            "2024-01-15T10:30:00+0200",
            "+2024-01-15T10:30:00Z",
            "２024-01-15T10:30:00Z",
            "2024-01-15T10:30:00Z\0",
        ] {
            assert_eq!(
                Timestamp::parse_rfc3339(bad),
                Err(TimestampError::Syntax),
                "{bad:?}"
            );
        }
        for bad in [
            "2024-13-01T00:00:00Z",
            "2024-00-01T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "2024-01-00T00:00:00Z",
            "2024-01-15T24:00:00Z",
            "2024-01-15T10:60:00Z",
            "2024-01-15T10:30:60Z",
            "2024-01-15T10:30:00+24:00",
        ] {
            assert_eq!(
                Timestamp::parse_rfc3339(bad),
                Err(TimestampError::OutOfRange),
                "{bad:?}"
            );
        }
        for bad in [
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:00:00+00:01",
            "9999-12-31T23:59:59-00:01",
        ] {
            assert_eq!(
                Timestamp::parse_rfc3339(bad),
                Err(TimestampError::Unrepresentable),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn serde_is_the_rfc3339_string() {
        let t = ts("2024-01-15T10:30:00Z");
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"2024-01-15T10:30:00Z\""
        );
        assert_eq!(
            serde_json::from_str::<Timestamp>("\"2024-01-15T10:30:00Z\"").unwrap(),
            t
        );
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
        assert!(serde_json::from_str::<Timestamp>("17").is_err());
    }
}
