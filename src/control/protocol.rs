//! The control protocol between the supervisor and its clients.
//!
//! One JSON object per line in each direction, every message carrying the protocol
//! version `v`. A request is answered by exactly one reply. A successful `connect`
//! reply carries the guest stream's file descriptor (`SCM_RIGHTS`) and the client keeps
//! the control connection open for as long as it uses the stream: closing it is how
//! the supervisor learns that the connection ended (which drives the idle poweroff).
//!
//! ```text
//! -> {"v":1,"op":"status"}
//! <- {"v":1,"reply":"status","state":"running",...}
//! -> {"v":1,"op":"connect","port":22,"timeoutMs":120000}
//! <- {"v":1,"reply":"connected","port":22}            + fd
//! -> {"v":1,"op":"frobnicate"}
//! <- {"v":1,"reply":"error","code":"bad-request","message":"..."}
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; a supervisor refuses other versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request line longer than this is refused and the connection closed.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", rename_all_fields = "camelCase")]
pub enum Request {
    /// What the supervisor and its VM are doing.
    Status,
    /// Boots the VM if it is not running. With `wait`, replies once the guest's sshd
    /// answers (bounded by `timeoutMs`); otherwise at once.
    Start {
        #[serde(default)]
        wait: bool,
        timeout_ms: Option<u64>,
    },
    /// Waits until the VM is ready (without booting it).
    WaitReady { timeout_ms: Option<u64> },
    /// Powers the VM off: graceful first (ACPI), forced after `timeoutMs`; or forced
    /// at once. With `exit`, the supervisor process ends afterwards.
    Stop {
        #[serde(default)]
        force: bool,
        timeout_ms: Option<u64>,
        #[serde(default)]
        exit: bool,
    },
    /// A stream to a guest vsock port; boots the VM on demand and waits until ready.
    Connect { port: u32, timeout_ms: Option<u64> },
    /// Stops the VM and deletes state: everything (`keysOnly: false`: disk, keys, MAC)
    /// or just the keys, which are made afresh.
    Reset {
        #[serde(default)]
        keys_only: bool,
    },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Start { .. } => "start",
            Request::WaitReady { .. } => "wait-ready",
            Request::Stop { .. } => "stop",
            Request::Connect { .. } => "connect",
            Request::Reset { .. } => "reset",
        }
    }
}

/// A request with its version, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLine {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "reply",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum Reply {
    Status(Box<StatusReport>),
    /// The VM is booting (`wait: false`) or ready (`wait: true`, with its timing).
    Started {
        already_running: bool,
        boot: Option<BootTiming>,
    },
    Ready {
        boot: Option<BootTiming>,
    },
    Stopped {
        outcome: StopOutcome,
    },
    /// The stream's descriptor travels with this reply.
    Connected {
        port: u32,
    },
    Reset {
        removed: Vec<PathBuf>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyLine {
    pub v: u32,
    #[serde(flatten)]
    pub reply: Reply,
}

/// Machine-readable class of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not JSON, unknown op, missing fields.
    BadRequest,
    /// Longer than `MAX_LINE_BYTES`.
    TooLarge,
    /// Another protocol version.
    Version,
    /// The VM failed to boot or the guest never answered.
    BootFailed,
    /// Timed out waiting.
    Timeout,
    /// The guest refused the connection.
    ConnectFailed,
    /// The operation needs a stopped or a running VM.
    WrongState,
    /// Anything else inside the supervisor.
    Internal,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopOutcome {
    /// Nothing was running.
    AlreadyStopped,
    /// The guest powered off when asked.
    Graceful,
    /// The guest did not power off in time, or `force` was asked: pulled the plug.
    Forced,
}

/// The lifecycle of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Failed => "failed",
        }
    }
}

/// How long the last boot took, from the moment it was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootTiming {
    /// The plan was built and checked (config, artifacts, disk, keys).
    pub planned_secs: f64,
    /// The backend reported the VM started.
    pub vm_started_secs: f64,
    /// The guest's sshd answered on vsock port 22.
    pub ready_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub state: VmState,
    pub backend: String,
    pub supervisor_pid: u32,
    pub supervisor_uptime_secs: f64,
    /// Seconds since the VM became ready, while it runs.
    pub vm_uptime_secs: Option<f64>,
    /// Open proxied connections (each `ssh` or Nix session through `proxy`).
    pub connections: usize,
    /// Seconds until the idle poweroff, when running with no connection.
    pub idle_remaining_secs: Option<f64>,
    pub boots: u64,
    pub last_boot: Option<BootTiming>,
    pub last_error: Option<String>,
    pub config: ConfigSummary,
}

/// The settings a client may want to compare or show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigSummary {
    pub cores: u32,
    pub memory_mib: u64,
    pub disk_size: String,
    pub rosetta: bool,
    pub idle_timeout_minutes: u64,
    pub state_dir: PathBuf,
    pub console_log: PathBuf,
    pub daemon_log: PathBuf,
}

/// Why a request line could not be understood; becomes an error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub code: ErrorCode,
    pub message: String,
}

/// Parses one request line, checking the version before anything else so that an old
/// client gets "wrong version" rather than a confusing field error.
pub fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    let bad = |code, message: String| BadRequest { code, message };
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| bad(ErrorCode::BadRequest, format!("not a JSON object: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(bad(ErrorCode::BadRequest, "not a JSON object".into()));
    };
    match object.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(bad(
                ErrorCode::Version,
                format!(
                    "protocol version {v} is not supported; this supervisor speaks version {PROTOCOL_VERSION} — restart the daemon after upgrading darwin-vz-nix"
                ),
            ));
        }
        None => {
            return Err(bad(
                ErrorCode::BadRequest,
                "missing protocol version `v`".into(),
            ));
        }
    }
    serde_json::from_value::<RequestLine>(value)
        .map(|line| line.request)
        .map_err(|e| {
            bad(
                ErrorCode::BadRequest,
                format!("{e}; known ops: status, start, wait-ready, stop, connect, reset"),
            )
        })
}

/// Serialises a reply as one line (with its newline).
pub fn reply_line(reply: Reply) -> Vec<u8> {
    let mut line = serde_json::to_vec(&ReplyLine {
        v: PROTOCOL_VERSION,
        reply,
    })
    .expect("replies serialise");
    line.push(b'\n');
    line
}

/// Serialises a request as one line (with its newline).
pub fn request_line(request: Request) -> Vec<u8> {
    let mut line = serde_json::to_vec(&RequestLine {
        v: PROTOCOL_VERSION,
        request,
    })
    .expect("requests serialise");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_in_the_documented_shape() {
        let line = request_line(Request::Connect {
            port: 22,
            timeout_ms: Some(5000),
        });
        assert_eq!(
            line,
            b"{\"v\":1,\"op\":\"connect\",\"port\":22,\"timeoutMs\":5000}\n"
        );
        assert_eq!(
            parse_request(&line[..line.len() - 1]).unwrap(),
            Request::Connect {
                port: 22,
                timeout_ms: Some(5000)
            }
        );
        assert_eq!(
            parse_request(br#"{"v":1,"op":"stop"}"#).unwrap(),
            Request::Stop {
                force: false,
                timeout_ms: None,
                exit: false
            }
        );
    }

    #[test]
    fn bad_requests_are_classified() {
        let cases: [(&[u8], ErrorCode, &str); 5] = [
            (
                b"hello",
                ErrorCode::BadRequest,
                "not a JSON object: expected value at line 1 column 1",
            ),
            (b"[1]", ErrorCode::BadRequest, "not a JSON object"),
            (
                br#"{"op":"status"}"#,
                ErrorCode::BadRequest,
                "missing protocol version `v`",
            ),
            (
                br#"{"v":2,"op":"status"}"#,
                ErrorCode::Version,
                "protocol version 2 is not supported; this supervisor speaks version 1 — restart the daemon after upgrading darwin-vz-nix",
            ),
            (
                br#"{"v":1,"op":"frobnicate"}"#,
                ErrorCode::BadRequest,
                "unknown variant `frobnicate`, expected one of `status`, `start`, `wait-ready`, `stop`, `connect`, `reset`; known ops: status, start, wait-ready, stop, connect, reset",
            ),
        ];
        for (line, code, message) in cases {
            let err = parse_request(line).unwrap_err();
            assert_eq!((err.code, err.message.as_str()), (code, message));
        }
    }

    #[test]
    fn replies_are_one_line_with_the_version() {
        let line = reply_line(Reply::Error {
            code: ErrorCode::Timeout,
            message: "late".into(),
        });
        assert_eq!(
            line,
            b"{\"v\":1,\"reply\":\"error\",\"code\":\"timeout\",\"message\":\"late\"}\n"
        );
        let parsed: ReplyLine = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            parsed.reply,
            Reply::Error {
                code: ErrorCode::Timeout,
                message: "late".into()
            }
        );
    }
}
