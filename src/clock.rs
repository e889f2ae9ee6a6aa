//! Setting the guest's clock from the host's: the exchange on guest vsock port
//! [`crate::contract::CLOCK_VSOCK_PORT`].
//!
//! A VZ guest's clock stands still while the Mac sleeps, so after a wake it lags by
//! the time slept (TLS to a binary cache fails, `make` sees files from the future).
//! The supervisor connects at every boot and after every wake and sends one line;
//! the guest (`nix/nixos/scripts/clock-set.sh`, socket-activated) steps its clock to
//! it at once and answers with the step it made:
//!
//! ```text
//! host  -> guest   DVN-TIME 1 <seconds>.<nanoseconds>\n     Unix time, UTC: 1 to 12 digits, a dot, exactly 9 digits
//! guest -> host    OK <+|-><seconds>.<nanoseconds>\n        new time minus old: positive when the guest was behind
//!                  ERR <reason>\n                            the clock was not touched
//! ```
//!
//! The guest reads at most [`MAX_REQUEST_BYTES`] within a few seconds, refuses
//! anything but one such line, and takes it only from the host (vsock CID 2). NTP
//! (systemd-timesyncd) still corrects the drift between wakes.

use std::time::{Duration, SystemTime};

/// The request's fixed start: the protocol name and version.
pub const REQUEST_PREFIX: &str = "DVN-TIME 1 ";

/// The most the guest reads of a request, newline included; a valid one is at
/// most 34 bytes.
pub const MAX_REQUEST_BYTES: usize = 64;

/// The most the host reads of a reply; `ERR` reasons are short.
pub const MAX_REPLY_BYTES: usize = 256;

/// Why there is nothing to send or nothing to believe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error("the host's clock is before 1970: {0}")]
    HostClock(String),
    #[error("the guest refused the time: {0}")]
    Refused(String),
    #[error("the guest's answer is not one this version understands: {0}")]
    Malformed(String),
}

/// The request line for the host time `now`, with its newline.
pub fn request_line(now: SystemTime) -> Result<String, ClockError> {
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| ClockError::HostClock(e.to_string()))?;
    Ok(format!(
        "{REQUEST_PREFIX}{}.{:09}\n",
        since_epoch.as_secs(),
        since_epoch.subsec_nanos()
    ))
}

/// What the guest did to its clock: new time minus old, in nanoseconds (positive
/// when the guest was behind, as after a sleep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockStep {
    pub nanos: i64,
}

impl ClockStep {
    pub fn as_secs_f64(self) -> f64 {
        let size = Duration::from_nanos(self.nanos.unsigned_abs()).as_secs_f64();
        if self.nanos < 0 { -size } else { size }
    }
}

/// Parses the guest's answer: one line, `OK <step>` or `ERR <reason>`.
pub fn parse_reply(reply: &[u8]) -> Result<ClockStep, ClockError> {
    let malformed = || ClockError::Malformed(printable(reply));
    let line = reply.strip_suffix(b"\n").ok_or_else(malformed)?;
    let line = std::str::from_utf8(line).map_err(|_| malformed())?;
    if let Some(reason) = line.strip_prefix("ERR ") {
        return Err(ClockError::Refused(printable(reason.as_bytes())));
    }
    let step = line.strip_prefix("OK ").ok_or_else(malformed)?;
    parse_step(step)
        .map(|nanos| ClockStep { nanos })
        .ok_or_else(malformed)
}

/// `+12.000000001` or `-0.500000000` as nanoseconds; `None` unless exactly that
/// shape and within ±292 years (what an i64 of nanoseconds holds).
fn parse_step(text: &str) -> Option<i64> {
    let (negative, rest) = match text.as_bytes().first()? {
        b'+' => (false, text.get(1..)?),
        b'-' => (true, text.get(1..)?),
        _ => return None,
    };
    let (secs, nanos) = rest.split_once('.')?;
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(secs, 12) || nanos.len() != 9 || !digits(nanos, 9) {
        return None;
    }
    let total = secs
        .parse::<i64>()
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(nanos.parse::<i64>().ok()?)?;
    Some(if negative { -total } else { total })
}

/// At most 120 characters of what the guest said, anything but printable ASCII
/// shown as `?`: it goes into logs and `status`.
fn printable(bytes: &[u8]) -> String {
    let mut text: String = bytes
        .iter()
        .take(120)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect();
    if bytes.len() > 120 {
        text.push('…');
    }
    text
}

/// "the guest was 3 h 2 min behind", "in step (off by less than 1 ms)".
pub fn describe_step(step_secs: f64) -> String {
    let size = step_secs.abs();
    if !size.is_finite() {
        return "an unknown step".into();
    }
    if size < 0.001 {
        return "in step (off by less than 1 ms)".into();
    }
    let amount = Duration::try_from_secs_f64(size).unwrap_or(Duration::MAX);
    let amount = if amount < Duration::from_secs(1) {
        format!("{} ms", amount.as_millis())
    } else if amount < Duration::from_secs(60) {
        format!("{:.1} s", amount.as_secs_f64())
    } else {
        let secs = amount.as_secs();
        match secs {
            0..3600 => format!("{} min {} s", secs / 60, secs % 60),
            3600..86_400 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
            _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
        }
    };
    let side = if step_secs > 0.0 { "behind" } else { "ahead" };
    format!("the guest was {amount} {side}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_one_line_of_seconds_and_nine_digits_of_nanoseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_767_225_600, 5);
        let line = request_line(t).unwrap();
        assert_eq!(line, "DVN-TIME 1 1767225600.000000005\n");
        assert!(line.len() <= MAX_REQUEST_BYTES);
        // The longest the guest accepts (12 digits of seconds, a dot, 9 digits and
        // the newline) still fits.
        let longest = format!("{REQUEST_PREFIX}{}.{}\n", "9".repeat(12), "0".repeat(9));
        assert!(longest.len() <= MAX_REQUEST_BYTES, "{longest:?}");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert!(matches!(
            request_line(before),
            Err(ClockError::HostClock(_))
        ));
    }

    #[test]
    fn replies_are_parsed_strictly() {
        assert_eq!(
            parse_reply(b"OK +3600.000000001\n"),
            Ok(ClockStep {
                nanos: 3_600_000_000_001
            })
        );
        assert_eq!(
            parse_reply(b"OK -0.250000000\n"),
            Ok(ClockStep {
                nanos: -250_000_000
            })
        );
        assert_eq!(
            parse_reply(b"ERR stale: 1 is before 1735689600\n"),
            Err(ClockError::Refused("stale: 1 is before 1735689600".into()))
        );
        for bad in [
            &b"OK +1.5\n"[..],
            b"OK 1.000000000\n",
            b"OK +1.000000000",
            b"OK +.000000000\n",
            b"OK +1.0000000000\n",
            b"OK +x.000000000\n",
            b"OK +999999999999.000000000\n",
            b"ok +1.000000000\n",
            b"\xff\n",
            b"",
        ] {
            assert!(
                matches!(parse_reply(bad), Err(ClockError::Malformed(_))),
                "{bad:?}"
            );
        }
        // What the guest says is shown, but only as printable text, and short.
        let long = [b'A'; 500];
        let Err(ClockError::Malformed(shown)) = parse_reply(&long) else {
            panic!()
        };
        assert_eq!(shown.chars().count(), 121);
        let Err(ClockError::Refused(shown)) = parse_reply(b"ERR \x1b[2Jboom\n") else {
            panic!()
        };
        assert_eq!(shown, "?[2Jboom");
    }

    #[test]
    fn steps_are_described_for_people() {
        assert_eq!(
            describe_step(3.0 * 3600.0 + 120.5),
            "the guest was 3 h 2 min behind"
        );
        assert_eq!(describe_step(-0.25), "the guest was 250 ms ahead");
        assert_eq!(describe_step(12.34), "the guest was 12.3 s behind");
        assert_eq!(describe_step(0.0004), "in step (off by less than 1 ms)");
        assert_eq!(
            describe_step(2.0 * 86_400.0),
            "the guest was 2 d 0 h behind"
        );
        assert_eq!(
            ClockStep {
                nanos: -1_500_000_000
            }
            .as_secs_f64(),
            -1.5
        );
    }
}
