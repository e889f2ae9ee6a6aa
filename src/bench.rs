//! Measurements that print figures, never pass/fail: cold boots, control round-trips
//! and connect-to-first-byte, against whatever supervisor runs for a state directory.
//! `darwin-vz-nix bench` runs them on a Mac; `cargo bench` runs them against the test
//! backend.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::control::protocol::{self, BootTiming, Reply, Request};
use crate::control::{ClientError, ControlClient};

/// Summary of repeated measurements, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub runs: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let n = sorted.len();
        let median = match n {
            0 => return None,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Stats {
            runs: n,
            min: sorted[0],
            median,
            max: sorted[n - 1],
        })
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = |s: f64| {
            if s < 0.01 {
                format!("{:.1} µs", s * 1e6)
            } else {
                format!("{s:.3} s")
            }
        };
        write!(
            f,
            "min {}  median {}  max {}  ({} runs)",
            unit(self.min),
            unit(self.median),
            unit(self.max),
            self.runs
        )
    }
}

/// `runs` cold boots: force-stop, then start and wait until SSH answers. Without
/// `force`, each stop is refused (and the bench ends with that error) while a session
/// is open: measuring must never pull the plug under someone's build.
pub fn cold_boots(
    state_dir: &Path,
    runs: usize,
    timeout: Duration,
    force: bool,
) -> Result<Vec<BootTiming>, ClientError> {
    let mut timings = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut client = ControlClient::connect(state_dir)?;
        force_off(&mut client, force)?;
        let reply = client.call(
            Request::Start {
                wait: true,
                timeout_ms: Some(protocol::millis(timeout)),
            },
            timeout.saturating_add(Duration::from_secs(5)),
        )?;
        if let Reply::Started {
            boot: Some(boot), ..
        } = reply
        {
            timings.push(boot);
        }
    }
    Ok(timings)
}

/// Pulls the plug, unless a session is open and `force` was not given.
fn force_off(client: &mut ControlClient, force: bool) -> Result<(), ClientError> {
    client.call(
        Request::Stop {
            force: true,
            timeout_ms: None,
            exit: false,
            unless_in_use: !force,
        },
        crate::supervisor::FORCED_STOP_REPLY_BOUND,
    )?;
    Ok(())
}

/// Open sessions (connections) the supervisor counts now.
pub fn open_sessions(state_dir: &Path) -> Result<usize, ClientError> {
    match ControlClient::connect(state_dir)?.call(Request::Status, Duration::from_secs(10))? {
        Reply::Status(report) => Ok(report.connections),
        other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
    }
}

/// `runs` `status` round-trips over one control connection.
pub fn control_round_trips(state_dir: &Path, runs: usize) -> Result<Vec<f64>, ClientError> {
    let mut client = ControlClient::connect(state_dir)?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        client.call(Request::Status, Duration::from_secs(10))?;
        samples.push(t0.elapsed().as_secs_f64());
    }
    Ok(samples)
}

/// `runs` times: stop the VM (see `cold_boots` for `force`), then time a `connect` to
/// guest `port` until the first byte from the guest (the SSH banner) arrives — what a
/// build waits after idle. Each stream is shut down after its byte, and the next
/// round waits until the supervisor has counted it closed.
pub fn connect_to_first_byte(
    state_dir: &Path,
    port: u32,
    runs: usize,
    timeout: Duration,
    force: bool,
) -> Result<Vec<f64>, ClientError> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let before = open_sessions(state_dir)?;
        force_off(&mut ControlClient::connect(state_dir)?, force)?;
        let t0 = Instant::now();
        let mut client = ControlClient::connect(state_dir)?;
        let fd = client.connect_port(port, timeout)?;
        let mut stream = std::fs::File::from(fd);
        let mut byte = [0u8; 1];
        let read = stream.read_exact(&mut byte);
        samples.push(t0.elapsed().as_secs_f64());
        // The supervisor holds its own copy of the stream: closing ours would not end
        // the session, shutting the stream down does.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            nix::sys::socket::Shutdown::Both,
        );
        read.map_err(|source| ClientError::Io {
            socket: "guest stream".into(),
            source,
        })?;
        wait_sessions_at_most(state_dir, before, Duration::from_secs(10))?;
    }
    Ok(samples)
}

/// Waits until the supervisor counts at most `sessions` open sessions.
fn wait_sessions_at_most(
    state_dir: &Path,
    sessions: usize,
    bound: Duration,
) -> Result<(), ClientError> {
    let t0 = Instant::now();
    loop {
        let open = open_sessions(state_dir)?;
        if open <= sessions {
            return Ok(());
        }
        if t0.elapsed() > bound {
            return Err(ClientError::Protocol(format!(
                "{open} session(s) still open {} s after the bench closed its own",
                bound.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_min_median_max() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.runs), (1.0, 2.0, 3.0, 3));
        assert_eq!(Stats::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Stats::of(&[]).is_none());
        assert_eq!(
            Stats::of(&[0.5]).unwrap().to_string(),
            "min 0.500 s  median 0.500 s  max 0.500 s  (1 runs)"
        );
    }
}
