//! Wall-clock instants as the wire writes them: ISO 8601 UTC with 7 fractional digits and `Z`.
//!
//! The core never reads a clock: callers pass a [`Timestamp`] in.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::ProtoError;

/// Ticks (the wire's 100 ns) per second.
const TICKS_PER_SEC: i64 = 10_000_000;
/// Nanoseconds per tick.
const NANOS_PER_TICK: i64 = 100;
/// 0001-01-01T00:00:00Z in seconds since the Unix epoch.
const MIN_SECS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z in seconds since the Unix epoch.
const MAX_SECS: i64 = 253_402_300_799;

/// An instant in UTC from [`Timestamp::MIN`] (0001-01-01T00:00:00Z) to [`Timestamp::MAX`]
/// (9999-12-31T23:59:59.9999999Z) at the wire's 100 ns resolution: every instant a DPS or IoT
/// Hub body can carry, from the .NET minimum the hub writes for "never" to the `notAfter` of a
/// certificate without expiry (RFC 5280 §4.1.2.5).
///
/// Stored as 100 ns ticks since the Unix epoch in an `i64` (8 bytes, `Copy`, ordered as the
/// instants are). Constructors and arithmetic saturate at [`Timestamp::MIN`] and
/// [`Timestamp::MAX`]; finer input (nanoseconds, more than seven fractional digits) is rounded
/// down to 100 ns.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// The earliest instant: 0001-01-01T00:00:00Z (.NET `DateTime.MinValue`).
    pub const MIN: Timestamp = Timestamp(MIN_SECS * TICKS_PER_SEC);

    /// The latest instant: 9999-12-31T23:59:59.9999999Z (.NET `DateTime.MaxValue`).
    pub const MAX: Timestamp = Timestamp(MAX_SECS * TICKS_PER_SEC + (TICKS_PER_SEC - 1));

    /// From ticks, saturating at [`Timestamp::MIN`] and [`Timestamp::MAX`].
    const fn from_ticks(ticks: i128) -> Self {
        if ticks < Self::MIN.0 as i128 {
            Self::MIN
        } else if ticks > Self::MAX.0 as i128 {
            Self::MAX
        } else {
            Self(ticks as i64)
        }
    }

    /// From nanoseconds since the Unix epoch, rounded down to 100 ns. Every `i64` is in range
    /// (1677-09-21 to 2262-04-11).
    pub const fn from_unix_nanos(nanos: i64) -> Self {
        Self(nanos.div_euclid(NANOS_PER_TICK))
    }

    /// From whole seconds since the Unix epoch, saturating at [`Timestamp::MIN`] and
    /// [`Timestamp::MAX`].
    pub const fn from_unix_secs(secs: i64) -> Self {
        if secs < MIN_SECS {
            Self::MIN
        } else if secs > MAX_SECS {
            Self::MAX
        } else {
            Self(secs * TICKS_PER_SEC)
        }
    }

    /// Nanoseconds since the Unix epoch. An `i64` of nanoseconds reaches only from
    /// 1677-09-21T00:12:43.145224192Z to 2262-04-11T23:47:16.854775807Z: instants before give
    /// `i64::MIN`, instants after `i64::MAX` (saturated, still ordered). Use
    /// [`Timestamp::unix_secs`] where the whole range matters.
    pub const fn unix_nanos(self) -> i64 {
        self.0.saturating_mul(NANOS_PER_TICK)
    }

    /// Whole seconds since the Unix epoch (rounded down); exact over the whole range.
    pub const fn unix_secs(self) -> i64 {
        self.0.div_euclid(TICKS_PER_SEC)
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        if self.0 <= earlier.0 {
            return Duration::ZERO;
        }
        let ticks = self.0.abs_diff(earlier.0);
        let (secs, sub_ticks) = (ticks / TICKS_PER_SEC.unsigned_abs(), ticks % TICKS_PER_SEC.unsigned_abs());
        // `sub_ticks` < 10^7, so its nanoseconds < 10^9 fit a u32.
        Duration::new(secs, u32::try_from(sub_ticks * NANOS_PER_TICK.unsigned_abs()).unwrap_or(0))
    }

    /// Parses ISO 8601 / RFC 3339 (any number of fractional digits, rounded down to 100 ns; any
    /// offset).
    ///
    /// # Errors
    /// [`ProtoError::InvalidTimestamp`] when the text is not a valid instant, or names an
    /// instant outside years 0001 to 9999 in UTC.
    pub fn parse(s: &str) -> Result<Self, ProtoError> {
        let dt = OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|e| ProtoError::InvalidTimestamp(format!("{s:?}: {e}")))?;
        let ticks = dt.unix_timestamp_nanos().div_euclid(i128::from(NANOS_PER_TICK));
        if ticks < i128::from(Self::MIN.0) || ticks > i128::from(Self::MAX.0) {
            return Err(ProtoError::InvalidTimestamp(format!(
                "{s:?} is out of range (years 0001 to 9999 UTC)"
            )));
        }
        Ok(Self::from_ticks(ticks))
    }

    /// `self` moved by `nanos`, rounded down to 100 ns, saturating.
    fn offset_by_nanos(self, nanos: i128) -> Timestamp {
        let at = i128::from(self.0) * i128::from(NANOS_PER_TICK) + nanos;
        Self::from_ticks(at.div_euclid(i128::from(NANOS_PER_TICK)))
    }
}

/// A `Duration` in signed nanoseconds: `u128` nanoseconds are below 2^94, far inside `i128`.
fn duration_nanos(d: Duration) -> i128 {
    i128::try_from(d.as_nanos()).unwrap_or(i128::MAX / 2)
}

impl fmt::Display for Timestamp {
    /// `2022-08-27T17:53:19.5143497Z`: seven fractional digits, as DPS writes them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Years 1..=9999 need no `large-dates` feature of the `time` crate.
        let dt = OffsetDateTime::from_unix_timestamp(self.unix_secs()).map_err(|_| fmt::Error)?;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            self.0.rem_euclid(TICKS_PER_SEC)
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    /// Later by `d` (rounded down to 100 ns), at most [`Timestamp::MAX`].
    fn add(self, d: Duration) -> Timestamp {
        self.offset_by_nanos(duration_nanos(d))
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    /// Earlier by `d` (rounded down to 100 ns), at least [`Timestamp::MIN`].
    fn sub(self, d: Duration) -> Timestamp {
        self.offset_by_nanos(-duration_nanos(d))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn seven_digit_round_trip() {
        let s = "2022-08-27T17:53:19.5143497Z";
        let t = Timestamp::parse(s).unwrap();
        assert_eq!(t.to_string(), s);
        assert_eq!(Timestamp::from_unix_secs(0).to_string(), "1970-01-01T00:00:00.0000000Z");
        assert_eq!(Timestamp::parse("2019-06-10T10:50:14Z").unwrap().unix_secs(), 1_560_163_814);
    }

    /// 0001-01-01T00:00:00Z: the hub's "never" (.NET `DateTime.MinValue`).
    const YEAR_1_SECS: i64 = -62_135_596_800;
    /// 9999-12-31T23:59:59Z: `notAfter` of a certificate that never expires (RFC 5280 §4.1.2.5).
    const YEAR_9999_SECS: i64 = 253_402_300_799;

    #[test]
    fn years_1_and_9999_round_trip_through_display() {
        for (text, written) in [
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.0000000Z"),
            ("0001-01-01T00:00:00.0000001Z", "0001-01-01T00:00:00.0000001Z"),
            ("1677-09-21T00:12:43.1452241Z", "1677-09-21T00:12:43.1452241Z"),
            ("2262-04-11T23:47:16.8547759Z", "2262-04-11T23:47:16.8547759Z"),
            ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59.0000000Z"),
            ("9999-12-31T23:59:59.9999999Z", "9999-12-31T23:59:59.9999999Z"),
        ] {
            let t = Timestamp::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(t.to_string(), written, "{text}");
            assert_eq!(Timestamp::parse(written).unwrap(), t, "{written}");
        }
        assert_eq!(Timestamp::parse("0001-01-01T00:00:00Z").unwrap().unix_secs(), YEAR_1_SECS);
        assert_eq!(Timestamp::parse("9999-12-31T23:59:59Z").unwrap().unix_secs(), YEAR_9999_SECS);
        assert_eq!(Timestamp::from_unix_secs(YEAR_9999_SECS).to_string(), "9999-12-31T23:59:59.0000000Z");
        assert_eq!(Timestamp::from_unix_secs(YEAR_1_SECS).to_string(), "0001-01-01T00:00:00.0000000Z");
        // An offset that keeps the instant inside year 9999 (or 1) in UTC is fine.
        assert_eq!(
            Timestamp::parse("9999-12-31T23:59:59+01:00").unwrap().to_string(),
            "9999-12-31T22:59:59.0000000Z"
        );
        assert_eq!(
            Timestamp::parse("0001-01-01T00:00:00-00:30").unwrap().to_string(),
            "0001-01-01T00:30:00.0000000Z"
        );
    }

    #[test]
    fn instants_outside_years_1_to_9999_are_refused() {
        for text in
            ["0000-12-31T23:59:59.9999999Z", "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59.9999999-00:01"]
        {
            let e = Timestamp::parse(text).unwrap_err().to_string();
            assert!(e.contains("out of range"), "{text}: {e}");
        }
    }

    #[test]
    fn min_and_max_are_the_net_date_time_bounds_and_everything_saturates_at_them() {
        assert_eq!(Timestamp::MIN.to_string(), "0001-01-01T00:00:00.0000000Z");
        assert_eq!(Timestamp::MAX.to_string(), "9999-12-31T23:59:59.9999999Z");
        assert_eq!(Timestamp::from_unix_secs(i64::MIN), Timestamp::MIN);
        assert_eq!(Timestamp::from_unix_secs(YEAR_1_SECS - 1), Timestamp::MIN);
        assert_eq!(Timestamp::from_unix_secs(i64::MAX), Timestamp::MAX);
        assert_eq!(Timestamp::from_unix_secs(YEAR_9999_SECS + 1), Timestamp::MAX);
        assert_eq!(Timestamp::MAX + Duration::MAX, Timestamp::MAX);
        assert_eq!(Timestamp::MIN - Duration::MAX, Timestamp::MIN);
        assert_eq!(Timestamp::MIN + Duration::MAX, Timestamp::MAX);
        assert_eq!(
            Timestamp::MAX - Duration::from_nanos(100),
            Timestamp::parse("9999-12-31T23:59:59.9999998Z").unwrap()
        );
        assert_eq!(
            Timestamp::MAX.saturating_since(Timestamp::MIN),
            Duration::new((YEAR_9999_SECS - YEAR_1_SECS + 1).unsigned_abs(), 0) - Duration::from_nanos(100)
        );
    }

    #[test]
    fn unix_nanos_is_exact_inside_its_range_and_saturates_outside() {
        for nanos in [0, 1_700_000_000_123_456_700, -1_700_000_000_123_456_700, i64::MAX - 7] {
            assert_eq!(Timestamp::from_unix_nanos(nanos).unix_nanos(), nanos, "{nanos}");
        }
        // Finer than 100 ns is rounded down (towards the past, also before 1970).
        assert_eq!(Timestamp::from_unix_nanos(199), Timestamp::from_unix_nanos(100));
        assert_eq!(Timestamp::from_unix_nanos(-1).unix_nanos(), -100);
        assert_eq!(Timestamp::from_unix_nanos(i64::MAX).unix_nanos(), i64::MAX - 7);
        assert_eq!(Timestamp::from_unix_nanos(i64::MIN).unix_nanos(), i64::MIN);
        assert_eq!(Timestamp::MAX.unix_nanos(), i64::MAX);
        assert_eq!(Timestamp::MIN.unix_nanos(), i64::MIN);
        assert_eq!(Timestamp::parse("2262-04-11T23:47:16.8547758Z").unwrap().unix_nanos(), i64::MAX - 7);
        assert_eq!(Timestamp::parse("2262-04-11T23:47:16.8547759Z").unwrap().unix_nanos(), i64::MAX);
        assert_eq!(Timestamp::parse("1677-09-21T00:12:43.1452242Z").unwrap().unix_nanos(), i64::MIN + 8);
        assert_eq!(Timestamp::parse("1677-09-21T00:12:43.1452241Z").unwrap().unix_nanos(), i64::MIN);
        assert_eq!(Timestamp::MAX.unix_secs(), YEAR_9999_SECS);
        assert_eq!(Timestamp::MIN.unix_secs(), YEAR_1_SECS);
    }

    #[test]
    fn more_than_seven_fractional_digits_are_rounded_down_to_100_ns() {
        let seven = Timestamp::parse("2022-08-27T17:53:19.5143497Z").unwrap();
        for text in ["2022-08-27T17:53:19.51434979Z", "2022-08-27T17:53:19.514349799999Z"] {
            assert_eq!(Timestamp::parse(text).unwrap(), seven, "{text}");
        }
        assert_eq!(
            Timestamp::parse("2022-08-27T17:53:19.5Z").unwrap().to_string(),
            "2022-08-27T17:53:19.5000000Z"
        );
        assert_eq!(
            Timestamp::parse("1969-12-31T23:59:59.99999999Z").unwrap().to_string(),
            "1969-12-31T23:59:59.9999999Z"
        );
        assert_eq!(Timestamp::from_unix_secs(10) + Duration::from_nanos(99), Timestamp::from_unix_secs(10));
        assert_eq!(
            Timestamp::from_unix_secs(10) - Duration::from_nanos(1),
            Timestamp::from_unix_secs(10) - Duration::from_nanos(100)
        );
    }

    proptest! {
        #[test]
        fn display_then_parse_gives_the_same_instant_over_the_whole_range(
            secs in YEAR_1_SECS..=YEAR_9999_SECS,
            ticks in 0u32..10_000_000,
        ) {
            let t = Timestamp::from_unix_secs(secs) + Duration::from_nanos(u64::from(ticks) * 100);
            let text = t.to_string();
            prop_assert_eq!(text.len(), 28, "{}", text);
            prop_assert_eq!(Timestamp::parse(&text).unwrap(), t);
            prop_assert_eq!(t.unix_secs(), secs);
            prop_assert_eq!(t.saturating_since(Timestamp::from_unix_secs(secs)).subsec_nanos(), ticks * 100);
        }

        #[test]
        fn the_written_form_sorts_as_the_instants_do(
            a in YEAR_1_SECS..=YEAR_9999_SECS,
            b in YEAR_1_SECS..=YEAR_9999_SECS,
            ticks in 0u64..10_000_000,
        ) {
            let (a, b) = (Timestamp::from_unix_secs(a), Timestamp::from_unix_secs(b) + Duration::from_nanos(ticks * 100));
            prop_assert_eq!(a.cmp(&b), a.to_string().cmp(&b.to_string()));
        }
    }

    #[test]
    fn arithmetic() {
        let t = Timestamp::from_unix_secs(10);
        assert_eq!((t + Duration::from_secs(5)).unix_secs(), 15);
        assert_eq!((t - Duration::from_secs(5)).unix_secs(), 5);
        assert_eq!(t.saturating_since(Timestamp::from_unix_secs(20)), Duration::ZERO);
    }
}
