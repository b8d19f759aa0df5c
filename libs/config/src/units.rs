//! Values as people write them in YAML: sizes like `4GB`, durations like `30s` or a bare
//! number in the unit the key documents, lists as YAML sequences or comma-separated strings.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A number of bytes: an integer, or a string such as `512MB`, `4GB`, `2GiB`, `1g`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size such as 512MB or 4GB"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "ki" | "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mi" | "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gi" | "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "ti" | "tib" => 1 << 40,
            other => return Err(format!("unknown size unit `{other}` in `{text}`")),
        };
        Ok(ByteSize((number * multiplier as f64) as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes or a string such as 4GB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

fn parse_duration(text: &str, bare_unit: Duration) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 500ms, 30s or 5m"))?;
    let unit = match unit.trim() {
        "" => bare_unit,
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(24 * 3600),
        other => return Err(format!("unknown duration unit `{other}` in `{text}`")),
    };
    times(unit, number).map_err(|problem| format!("`{text}`: {problem}"))
}

/// `count` times `unit`. `Duration::mul_f64` would panic where the product is negative, NaN or
/// past `Duration::MAX`, and a file or a variable can ask for that (`cloneTimeout: 1e300`,
/// `99999999999999999999h`).
fn times(unit: Duration, count: f64) -> Result<Duration, &'static str> {
    if count.is_nan() {
        return Err("a duration must be a number");
    }
    if count < 0.0 {
        return Err("a duration cannot be negative");
    }
    Duration::try_from_secs_f64(unit.as_secs_f64() * count)
        .map_err(|_| "longer than any duration this system can wait")
}

macro_rules! duration_setting {
    ($name:ident, $unit:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name(pub Duration);

        impl $name {
            pub fn get(self) -> Duration {
                self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct DurationVisitor;
                impl Visitor<'_> for DurationVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($doc)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$name, E> {
                        Ok($name($unit * u32::try_from(v).map_err(E::custom)?))
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$name, E> {
                        let v = u64::try_from(v)
                            .map_err(|_| E::custom("a duration cannot be negative"))?;
                        self.visit_u64(v)
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$name, E> {
                        times($unit, v).map($name).map_err(E::custom)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        parse_duration(v, $unit).map($name).map_err(E::custom)
                    }
                }
                deserializer.deserialize_any(DurationVisitor)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&format!("{}ms", self.0.as_millis()))
            }
        }
    };
}

duration_setting!(
    Millis,
    Duration::from_millis(1),
    "a duration: milliseconds as a bare number, or a string such as 500ms, 30s, 5m"
);
duration_setting!(
    Seconds,
    Duration::from_secs(1),
    "a duration: seconds as a bare number, or a string such as 500ms, 30s, 5m"
);

/// A list of strings: a YAML sequence, or one comma-separated string (handy in environment
/// variables).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            List(Vec<String>),
            Joined(String),
        }
        Ok(StringList(match Either::deserialize(deserializer)? {
            Either::List(items) => items,
            Either::Joined(text) => text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_decimal_and_binary_units() {
        assert_eq!(ByteSize::parse("4GB").unwrap(), ByteSize(4_000_000_000));
        assert_eq!(ByteSize::parse("2GiB").unwrap(), ByteSize(2 << 30));
        assert_eq!(ByteSize::parse("512m").unwrap(), ByteSize(512_000_000));
        assert_eq!(ByteSize::parse("1024").unwrap(), ByteSize(1024));
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("4 parsecs").is_err());
    }

    #[test]
    fn durations_with_and_without_units() {
        assert_eq!(
            parse_duration("300000", Duration::from_millis(1)).unwrap(),
            Duration::from_secs(300)
        );
        assert_eq!(
            parse_duration("1.5s", Duration::from_millis(1)).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_duration("5m", Duration::from_secs(1)).unwrap(),
            Duration::from_secs(300)
        );
        assert!(parse_duration("soon", Duration::from_secs(1)).is_err());
    }

    /// These panicked in `Duration::mul_f64` before they were checked.
    #[test]
    fn durations_past_the_largest_or_not_a_number_are_errors() {
        let err = parse_duration("99999999999999999999999h", Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("longer than any duration"), "{err}");
        assert!(parse_duration(&"9".repeat(400), Duration::from_millis(1)).is_err());
        assert!(times(Duration::from_secs(1), 1e300).is_err());
        assert!(times(Duration::from_secs(1), f64::INFINITY).is_err());
        assert!(times(Duration::from_secs(1), f64::NAN).is_err());
        assert!(times(Duration::from_secs(1), -1.0).is_err());
        assert_eq!(times(Duration::from_secs(1), -0.0), Ok(Duration::ZERO));
    }
}
