//! Sizes ("4GiB", "512K", 1048576) and durations ("5s", "250ms", 3).

use std::time::Duration;

/// Why a text is not a size or a duration; the message quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("'{0}' is not a size (expected e.g. 4096, \"512MiB\", \"4GiB\")")]
    NotASize(String),
    #[error("'{0}': number too large")]
    TooLarge(String),
    #[error("'{0}': unknown unit '{1}' (use B, KiB, MiB, GiB, TiB or kB, MB, GB, TB)")]
    SizeUnit(String, String),
    #[error("'{0}' does not fit in 64 bits")]
    Overflow(String),
    #[error("'{0}' is not a duration (expected e.g. \"5s\", \"250ms\")")]
    NotADuration(String),
    #[error("'{0}': unknown unit '{1}' (use us, ms, s or m)")]
    DurationUnit(String, String),
    #[error("'{0}' is out of range")]
    OutOfRange(String),
}

/// Parses a size. Binary suffixes K/M/G/T/P (with optional "iB") multiply by
/// powers of 1024, as in LVM and qemu-img; decimal "kB"/"MB"/"GB"/"TB" by
/// powers of 1000. A bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(UnitError::NotASize(text.into()));
    }
    let n: u64 = digits.parse().map_err(|_| UnitError::TooLarge(text.into()))?;
    let mult: u64 = match suffix.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "P" | "PiB" => 1 << 50,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(UnitError::SizeUnit(text.into(), other.into())),
    };
    n.checked_mul(mult).ok_or_else(|| UnitError::Overflow(text.into()))
}

/// Parses a duration: "250ms", "5s", "2m", or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| UnitError::NotADuration(text.into()))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "us" | "µs" => n / 1_000_000.0,
        "m" | "min" => n * 60.0,
        other => return Err(UnitError::DurationUnit(text.into(), other.into())),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(UnitError::OutOfRange(text.into()));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("4 XB").is_err());
        assert!(parse_size("99999999999999P").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
