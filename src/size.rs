//! Disk sizes as people write them: `100G`, `512M`, `1T`.
//!
//! Units are binary (1G = 1024 MiB) because the guest and `ls -l` both count that way
//! and a raw disk image is sized in bytes anyway.

use std::fmt;
use std::str::FromStr;

const KIB: u64 = 1024;
const MIB: u64 = KIB * 1024;
const GIB: u64 = MIB * 1024;
const TIB: u64 = GIB * 1024;

/// A size in bytes that parses from and prints as `<number><unit>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not a size: {reason}; write a whole number with a unit, e.g. 100G, 512M or 1T"
)]
pub struct SizeParseError {
    input: String,
    reason: &'static str,
}

impl ByteSize {
    pub const fn from_bytes(bytes: u64) -> Self {
        ByteSize(bytes)
    }

    pub const fn from_mib(mib: u64) -> Self {
        ByteSize(mib * MIB)
    }

    pub const fn from_gib(gib: u64) -> Self {
        ByteSize(gib * GIB)
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }

    pub const fn mib(self) -> u64 {
        self.0 / MIB
    }
}

impl FromStr for ByteSize {
    type Err = SizeParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason| SizeParseError {
            input: input.to_string(),
            reason,
        };
        let text = input.trim();
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits_end);
        if number.is_empty() {
            return Err(fail("it does not start with a number"));
        }
        let multiplier = match unit.trim() {
            "" => return Err(fail("the unit is missing")),
            "K" | "k" | "KiB" | "KB" => KIB,
            "M" | "m" | "MiB" | "MB" => MIB,
            "G" | "g" | "GiB" | "GB" => GIB,
            "T" | "t" | "TiB" | "TB" => TIB,
            _ => return Err(fail("the unit is not one of K, M, G, T")),
        };
        let number: u64 = number
            .parse()
            .map_err(|_| fail("the number is too large"))?;
        if number == 0 {
            return Err(fail("it is zero"));
        }
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| fail("it is too large"))
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size exactly, so `100G` prints as `100G`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!("100G".parse::<ByteSize>().unwrap(), ByteSize::from_gib(100));
        assert_eq!("512M".parse::<ByteSize>().unwrap(), ByteSize::from_mib(512));
        assert_eq!("1T".parse::<ByteSize>().unwrap(), ByteSize::from_gib(1024));
        assert_eq!("64GiB".parse::<ByteSize>().unwrap(), ByteSize::from_gib(64));
        assert_eq!(" 2g ".parse::<ByteSize>().unwrap(), ByteSize::from_gib(2));
    }

    #[test]
    fn rejects_garbage_with_the_reason() {
        let cases = [
            ("", "it does not start with a number"),
            ("G", "it does not start with a number"),
            ("100", "the unit is missing"),
            ("100X", "the unit is not one of K, M, G, T"),
            ("1.5G", "the unit is not one of K, M, G, T"),
            ("-1G", "it does not start with a number"),
            ("0G", "it is zero"),
            ("99999999999999999999G", "the number is too large"),
            ("99999999999T", "it is too large"),
        ];
        for (input, reason) in cases {
            let err = input.parse::<ByteSize>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "`{input}` is not a size: {reason}; write a whole number with a unit, e.g. 100G, 512M or 1T"
                ),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn prints_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::from_gib(100).to_string(), "100G");
        assert_eq!(ByteSize::from_gib(1024).to_string(), "1T");
        assert_eq!(ByteSize::from_mib(1536).to_string(), "1536M");
        assert_eq!(ByteSize::from_bytes(1000).to_string(), "1000B");
    }
}
