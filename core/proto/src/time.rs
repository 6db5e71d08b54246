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

/// An instant in UTC with 100 ns resolution on the wire (stored as nanoseconds since the Unix
/// epoch).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// From nanoseconds since the Unix epoch.
    pub const fn from_unix_nanos(nanos: i64) -> Self {
        Self(nanos)
    }

    /// From whole seconds since the Unix epoch.
    pub const fn from_unix_secs(secs: i64) -> Self {
        Self(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn unix_nanos(self) -> i64 {
        self.0
    }

    /// Whole seconds since the Unix epoch (rounded down).
    pub const fn unix_secs(self) -> i64 {
        self.0.div_euclid(1_000_000_000)
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        if self.0 <= earlier.0 {
            Duration::ZERO
        } else {
            Duration::from_nanos((self.0 - earlier.0) as u64)
        }
    }

    /// Parses ISO 8601 / RFC 3339 (any number of fractional digits, any offset).
    ///
    /// # Errors
    /// [`ProtoError::InvalidTimestamp`] when the text is not a valid instant.
    pub fn parse(s: &str) -> Result<Self, ProtoError> {
        let dt = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| ProtoError::InvalidTimestamp(format!("{s:?}: {e}")))?;
        let nanos = i64::try_from(dt.unix_timestamp_nanos())
            .map_err(|_| ProtoError::InvalidTimestamp(format!("{s:?} is out of range")))?;
        Ok(Self(nanos))
    }
}

fn to_datetime(ts: Timestamp) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts.0)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl fmt::Display for Timestamp {
    /// `2022-08-27T17:53:19.5143497Z`: seven fractional digits, as DPS writes them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dt = to_datetime(*self);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            dt.nanosecond() / 100
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
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)))
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)))
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
    use super::*;

    #[test]
    fn seven_digit_round_trip() {
        let s = "2022-08-27T17:53:19.5143497Z";
        let t = Timestamp::parse(s).unwrap();
        assert_eq!(t.to_string(), s);
        assert_eq!(Timestamp::from_unix_secs(0).to_string(), "1970-01-01T00:00:00.0000000Z");
        assert_eq!(Timestamp::parse("2019-06-10T10:50:14Z").unwrap().unix_secs(), 1_560_163_814);
    }

    #[test]
    fn arithmetic() {
        let t = Timestamp::from_unix_secs(10);
        assert_eq!((t + Duration::from_secs(5)).unix_secs(), 15);
        assert_eq!((t - Duration::from_secs(5)).unix_secs(), 5);
        assert_eq!(t.saturating_since(Timestamp::from_unix_secs(20)), Duration::ZERO);
    }
}
