//! Reading the RFC 3339 timestamps of stored records. chrono's own `Deserialize` goes through
//! its relaxed parser (spaces, lower-case `t`, …), which cost ~1 200 instructions per
//! timestamp; a record has two to four, read on every cache miss (callgrind,
//! `instructions.sh` with `MISS`). What keygate writes is strict RFC 3339, so the strict
//! parser is tried first; anything it refuses goes to the relaxed one, so exactly the same
//! texts are accepted as before, with the same errors. Writing is chrono's, unchanged.

use chrono::{DateTime, FixedOffset, Utc};
use serde::Deserializer;
use serde::de::{Error, Visitor};
use std::fmt;

pub fn parse(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| text.parse::<DateTime<FixedOffset>>())
        .map(|t| t.with_timezone(&Utc))
}

/// `#[serde(deserialize_with = "timestamp::deserialize")]`
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    d.deserialize_str(TimestampVisitor)
}

/// The same for an optional timestamp (`null` or absent: `None`).
pub fn deserialize_option<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    d.deserialize_option(OptionVisitor)
}

struct TimestampVisitor;

impl Visitor<'_> for TimestampVisitor {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an RFC 3339 date and time")
    }

    fn visit_str<E: Error>(self, text: &str) -> Result<Self::Value, E> {
        parse(text).map_err(E::custom)
    }
}

struct OptionVisitor;

impl<'de> Visitor<'de> for OptionVisitor {
    type Value = Option<DateTime<Utc>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an RFC 3339 date and time, or null")
    }

    fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        deserialize(d).map(Some)
    }
}

/// The earlier of an expiry (`None`: never) and the end of a grace period in Unix milliseconds.
pub fn earlier_expiry(own: Option<DateTime<Utc>>, until_ms: i64) -> Option<DateTime<Utc>> {
    let end = DateTime::<Utc>::from_timestamp_millis(until_ms);
    match (own, end) {
        (Some(own), Some(end)) => Some(own.min(end)),
        (own, end) => own.or(end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(serde::Deserialize)]
    struct Chrono {
        at: DateTime<Utc>,
    }

    #[derive(serde::Deserialize)]
    struct Ours {
        #[serde(deserialize_with = "deserialize")]
        at: DateTime<Utc>,
    }

    #[derive(serde::Deserialize)]
    struct OursOption {
        #[serde(default, deserialize_with = "deserialize_option")]
        at: Option<DateTime<Utc>>,
    }

    /// Both readers' answer for `text`: the time, or the error's text.
    fn both(text: &str) -> (Result<DateTime<Utc>, String>, Result<DateTime<Utc>, String>) {
        let json = serde_json::json!({ "at": text }).to_string();
        let chrono = serde_json::from_str::<Chrono>(&json).map(|c| c.at);
        let ours = serde_json::from_str::<Ours>(&json).map(|o| o.at);
        (
            chrono.map_err(|e| e.to_string()),
            ours.map_err(|e| e.to_string()),
        )
    }

    #[test]
    fn reads_what_chrono_reads_and_refuses_what_it_refuses() {
        for text in [
            "2026-11-23T17:47:08.123456789Z",
            "2026-11-23T17:47:08Z",
            "2026-11-23T17:47:08+02:00",
            "2026-11-23t17:47:08z",
            "2026-11-23 17:47:08Z",
            "2026-11-23T17:47:08",
            "2026-02-30T00:00:00Z",
            "yesterday",
            "",
        ] {
            let (chrono, ours) = both(text);
            assert_eq!(ours, chrono, "{text:?}");
        }
    }

    #[test]
    fn optional_timestamps_read_null_absent_and_text() {
        let read = |json: &str| serde_json::from_str::<OursOption>(json).map(|o| o.at);
        assert_eq!(read(r#"{"at":null}"#).unwrap(), None);
        assert_eq!(read("{}").unwrap(), None);
        assert_eq!(
            read(r#"{"at":"2026-11-23T17:47:08Z"}"#).unwrap(),
            Some(parse("2026-11-23T17:47:08Z").unwrap())
        );
        assert!(read(r#"{"at":"soon"}"#).is_err());
        assert!(read(r#"{"at":5}"#).is_err());
    }

    proptest! {
        /// Written by chrono (as keygate stores them) and read back: the same instant.
        #[test]
        fn what_chrono_writes_reads_back(secs in 0i64..4_102_444_800, nanos in 0u32..1_000_000_000) {
            let t = DateTime::<Utc>::from_timestamp(secs, nanos).unwrap();
            let json = serde_json::to_string(&serde_json::json!({ "at": t })).unwrap();
            prop_assert_eq!(serde_json::from_str::<Ours>(&json).unwrap().at, t);
        }

        /// Any text: the same answer as chrono's own reader.
        #[test]
        fn any_text_gets_chronos_answer(text in "[0-9T:.+ Zz-]{0,40}") {
            let (chrono, ours) = both(&text);
            prop_assert_eq!(ours, chrono);
        }
    }
}
