//! The control protocol between the supervisor and its clients.
//!
//! One JSON object per line in each direction, every message carrying the protocol
//! version `v`. A request is answered by exactly one reply; a last request without
//! its newline is answered too. A successful `connect` reply carries the guest
//! stream's file descriptor (`SCM_RIGHTS`) and ends the control connection: from then
//! on the stream itself is the session (the supervisor watches its own copy of it), so
//! the client may close the control connection, fork, or hand the descriptor on.
//!
//! Requests are checked strictly: a key given twice, an unknown field, or a number
//! outside its range (see [`WAIT_TIMEOUT_MS`], [`STOP_TIMEOUT_MS`], [`PORTS`]) gets
//! a `bad-request` reply naming the field.
//!
//! ```text
//! -> {"v":1,"op":"status"}
//! <- {"v":1,"reply":"status","state":"running",...}
//! -> {"v":1,"op":"connect","port":22,"timeoutMs":120000}
//! <- {"v":1,"reply":"connected","port":22}            + fd
//! -> {"v":1,"op":"frobnicate"}
//! <- {"v":1,"reply":"error","code":"bad-request","message":"..."}
//! ```

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; a supervisor refuses other versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request line longer than this is refused and the connection closed.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// `timeoutMs` of `start`, `wait-ready` and `connect`: 1 ms to 24 h. Absent means
/// the supervisor's default wait (180 s).
pub const WAIT_TIMEOUT_MS: RangeInclusive<u64> = 1..=86_400_000;

/// `timeoutMs` of `stop`: 0 (force right after asking) to 1 h, the longest graceful
/// poweroff the supervisor waits for. Absent means the configured `stopTimeout`.
pub const STOP_TIMEOUT_MS: RangeInclusive<u64> = 0..=3_600_000;

/// `port` of `connect`: any vsock port but 0 and `VMADDR_PORT_ANY` (2^32 - 1).
pub const PORTS: RangeInclusive<u32> = 1..=u32::MAX - 1;

/// A duration as whole milliseconds for `timeoutMs`, saturating instead of wrapping
/// (an out-of-range value is then refused by the supervisor, naming the field).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

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
    /// at once. With `exit`, the supervisor process ends afterwards. With
    /// `unlessInUse`, refused (`busy`) while a session is open.
    Stop {
        #[serde(default)]
        force: bool,
        timeout_ms: Option<u64>,
        #[serde(default)]
        exit: bool,
        #[serde(default)]
        unless_in_use: bool,
    },
    /// A stream to a guest vsock port; boots the VM on demand and waits until ready.
    /// With `allowBootstrap` (the aarch64-linux alias), while no guest exists and
    /// the bootstrap builder runs for the first guest's build, a stream to it.
    Connect {
        port: u32,
        timeout_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        allow_bootstrap: bool,
    },
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
            Request::Stop { exit: true, .. } => "stop --daemon",
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
    /// The VM is in use (sessions open) and the request asked not to disturb it.
    Busy,
    /// This peer may not ask for this operation (see the README's authorization table).
    Forbidden,
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
    /// Sessions: connections waiting for a boot, and open guest streams (each `ssh`
    /// or Nix connection through `proxy`, wherever ssh moved it).
    pub connections: usize,
    /// Seconds until the idle poweroff, when running with no connection.
    pub idle_remaining_secs: Option<f64>,
    pub boots: u64,
    pub last_boot: Option<BootTiming>,
    pub last_error: Option<String>,
    /// Warnings worth a look (e.g. a key that was missing and was made afresh),
    /// oldest first.
    #[serde(default)]
    pub notices: Vec<NoticeReport>,
    pub config: ConfigSummary,
    /// What the guest of the current (or last) boot reported about itself: nested
    /// virtualization and `/dev/kvm` (absent before the first boot, and from older
    /// supervisors). `guest` is the lazy guest's build, not this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_report: Option<GuestSummary>,
    /// The power assertion that keeps the Mac awake during builds.
    #[serde(default)]
    pub sleep: Option<SleepReport>,
    /// The last time the guest's clock was set from the host's (or failed to be).
    #[serde(default)]
    pub clock_sync: Option<ClockSyncReport>,
    /// Seconds since the Mac last woke from sleep, as far as the supervisor heard.
    #[serde(default)]
    pub host_woke_secs_ago: Option<f64>,
    /// The lazy guest's lifecycle (`guestDrv`), when the daemon builds the guest
    /// itself; what a booted guest says about itself is `guest_report`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestLifecycle>,
    /// The host store's binary cache for the guest, when it is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cache: Option<HostCacheReport>,
}

/// Nested virtualization and `/dev/kvm` in the guest of one boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestSummary {
    pub boot: u64,
    /// The boot asked for nested virtualization.
    pub nested_virtualization: bool,
    /// What the guest said about `/dev/kvm`; absent while it has not said yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm: Option<crate::nested::Kvm>,
    /// The guest's kernel release, as it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Set when nested virtualization is on but the guest has no `/dev/kvm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SleepReport {
    /// `preventSleep`: whether builds keep the Mac from idle sleep.
    pub enabled: bool,
    /// The assertion held now, if any.
    pub assertion: Option<AssertionReport>,
    /// Why the last attempt to take or release it failed.
    pub last_error: Option<String>,
    /// Why the Mac's wake-ups are not heard (then the clock is set at boot only).
    pub wake_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssertionReport {
    /// Its name, as `pmset -g assertions` shows it.
    pub reason: String,
    /// Held since, in seconds since 1970 (UTC).
    pub since_unix_secs: f64,
    /// Held for this many seconds.
    pub held_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClockSyncReport {
    /// `boot` (a boot became ready) or `wake` (the Mac woke up).
    pub reason: String,
    /// Seconds since it happened.
    pub age_secs: f64,
    /// What the guest corrected: new time minus old, positive when it was behind.
    pub offset_secs: Option<f64>,
    /// Why the clock was not set.
    pub error: Option<String>,
}

/// The bootstrap builder (see `crate::bootstrap`), while it is not off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapReport {
    /// `fetching`, `booting`, `running`, `stopping` or `failed`.
    pub phase: String,
    pub progress: Option<String>,
    /// `127.0.0.1:PORT` while it runs.
    pub endpoint: Option<String>,
    pub sessions: usize,
    pub console_log: PathBuf,
    pub error: Option<String>,
}

/// The lazy guest's lifecycle (see `crate::guest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestLifecycle {
    /// `missing`, `building`, `ready` or `failed`.
    pub phase: String,
    pub drv: PathBuf,
    pub out: PathBuf,
    /// The guest directory the next boot uses: `out` once ready, else the guest
    /// booted before, if any.
    pub next_boot: Option<PathBuf>,
    /// While building: `3 of 41 derivations built, 120 of 800 paths fetched`.
    pub progress: Option<String>,
    /// After a failure: what failed, the log and the fix, on one line.
    pub error: Option<String>,
    /// Nix's output of the last realisation.
    pub log: PathBuf,
    /// Seconds it has been building, or since it failed.
    pub for_secs: Option<f64>,
    /// The bootstrap builder, while it is not off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapReport>,
}

/// What the host store's cache has served since the supervisor started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostCacheReport {
    /// Narinfo queries answered with a path / with "not here".
    pub narinfo_hits: u64,
    pub narinfo_misses: u64,
    pub nars_served: u64,
    pub nar_bytes: u64,
    /// NARs cut short or refused: the path vanished or changed on the host.
    pub nars_aborted: u64,
    /// Guest streams closed at once because too many were open.
    pub streams_refused: u64,
    /// The latest problem (the database unreadable, a path that changed), if any.
    pub last_problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoticeReport {
    pub message: String,
    /// Seconds since it was noted.
    pub age_secs: f64,
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
    /// The `nestedVirtualization` setting (absent from older supervisors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_virtualization: Option<crate::nested::NestedVirtualization>,
}

/// Why a request line could not be understood; becomes an error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub code: ErrorCode,
    pub message: String,
}

/// Parses one request line, checking the version before anything else so that an old
/// client gets "wrong version" rather than a confusing field error; then the fields,
/// their ranges, and that no key is given twice.
pub fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    let bad = |code, message: String| BadRequest { code, message };
    let value = match serde_json::from_slice::<StrictJson>(line) {
        Ok(StrictJson(value)) => value,
        Err(e) if e.to_string().starts_with(DUPLICATE_KEY) => {
            return Err(bad(
                ErrorCode::BadRequest,
                format!("{e}; send each field once"),
            ));
        }
        Err(e) => {
            return Err(bad(
                ErrorCode::BadRequest,
                format!("not a JSON object: {e}"),
            ));
        }
    };
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
    check_numbers(object).map_err(|message| bad(ErrorCode::BadRequest, message))?;
    serde_json::from_value::<RequestLine>(value)
        .map(|line| line.request)
        .map_err(|e| {
            bad(
                ErrorCode::BadRequest,
                format!("{e}; known ops: status, start, wait-ready, stop, connect, reset"),
            )
        })
}

/// The documented range of a numeric field of an operation, if it has one.
fn field_range(op: &str, field: &str) -> Option<RangeInclusive<u64>> {
    match (op, field) {
        ("stop", "timeoutMs") => Some(STOP_TIMEOUT_MS),
        ("start" | "wait-ready" | "connect", "timeoutMs") => Some(WAIT_TIMEOUT_MS),
        ("connect", "port") => Some(u64::from(*PORTS.start())..=u64::from(*PORTS.end())),
        _ => None,
    }
}

/// Every numeric field a whole number within its documented range (`null` means
/// "not given"), checked before serde so that the error names the field.
fn check_numbers(object: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    let Some(op) = object.get("op").and_then(|op| op.as_str()) else {
        return Ok(());
    };
    let shown = if op == "stop" && object.get("exit") == Some(&serde_json::Value::Bool(true)) {
        "stop --daemon"
    } else {
        op
    };
    for (field, value) in object {
        let Some(range) = field_range(op, field) else {
            continue;
        };
        match value.as_u64() {
            Some(n) if range.contains(&n) => {}
            None if value.is_null() => {}
            _ => {
                return Err(format!(
                    "`{field}` of `{shown}` is {value}, not a whole number in {}..={}",
                    range.start(),
                    range.end()
                ));
            }
        }
    }
    Ok(())
}

const DUPLICATE_KEY: &str = "duplicate key";

/// A JSON value parsed like `serde_json::Value`, except that an object with the same
/// key twice is an error (serde_json silently keeps the last one).
struct StrictJson(serde_json::Value);

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<StrictJson, E> {
        Ok(StrictJson(v.into()))
    }
    fn visit_unit<E>(self) -> Result<StrictJson, E> {
        Ok(StrictJson(serde_json::Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictJson, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(StrictJson(items.into()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictJson, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("{DUPLICATE_KEY} `{key}`")));
            }
            let StrictJson(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(StrictJson(object.into()))
    }
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
            allow_bootstrap: false,
        });
        assert_eq!(
            line,
            b"{\"v\":1,\"op\":\"connect\",\"port\":22,\"timeoutMs\":5000}\n"
        );
        assert_eq!(
            parse_request(&line[..line.len() - 1]).unwrap(),
            Request::Connect {
                port: 22,
                timeout_ms: Some(5000),
                allow_bootstrap: false,
            }
        );
        let line = request_line(Request::Connect {
            port: 22,
            timeout_ms: None,
            allow_bootstrap: true,
        });
        assert_eq!(
            line,
            b"{\"v\":1,\"op\":\"connect\",\"port\":22,\"timeoutMs\":null,\"allowBootstrap\":true}\n"
        );
        assert_eq!(
            parse_request(br#"{"v":1,"op":"stop"}"#).unwrap(),
            Request::Stop {
                force: false,
                timeout_ms: None,
                exit: false,
                unless_in_use: false,
            }
        );
    }

    #[test]
    fn a_key_given_twice_is_refused_naming_it() {
        for (line, key) in [
            (
                &br#"{"v":1,"op":"stop","force":false,"force":true}"#[..],
                "force",
            ),
            (br#"{"v":1,"v":1,"op":"status"}"#, "v"),
            (br#"{"v":1,"op":"status","op":"reset"}"#, "op"),
        ] {
            let err = parse_request(line).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest);
            assert!(
                err.message
                    .starts_with(&format!("duplicate key `{key}` at line 1 column ")),
                "{}",
                err.message
            );
            assert!(
                err.message.ends_with("; send each field once"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn every_number_is_checked_against_its_documented_range() {
        let cases: [(&[u8], &str); 8] = [
            (
                br#"{"v":1,"op":"connect","port":22,"timeoutMs":0}"#,
                "`timeoutMs` of `connect` is 0, not a whole number in 1..=86400000",
            ),
            (
                br#"{"v":1,"op":"connect","port":22,"timeoutMs":86400001}"#,
                "`timeoutMs` of `connect` is 86400001, not a whole number in 1..=86400000",
            ),
            (
                br#"{"v":1,"op":"connect","port":0}"#,
                "`port` of `connect` is 0, not a whole number in 1..=4294967294",
            ),
            (
                br#"{"v":1,"op":"connect","port":4294967295}"#,
                "`port` of `connect` is 4294967295, not a whole number in 1..=4294967294",
            ),
            (
                br#"{"v":1,"op":"start","wait":true,"timeoutMs":18446744073709551615}"#,
                "`timeoutMs` of `start` is 18446744073709551615, not a whole number in 1..=86400000",
            ),
            (
                br#"{"v":1,"op":"wait-ready","timeoutMs":-5}"#,
                "`timeoutMs` of `wait-ready` is -5, not a whole number in 1..=86400000",
            ),
            (
                br#"{"v":1,"op":"stop","timeoutMs":3600001}"#,
                "`timeoutMs` of `stop` is 3600001, not a whole number in 0..=3600000",
            ),
            (
                br#"{"v":1,"op":"stop","exit":true,"timeoutMs":1.5}"#,
                "`timeoutMs` of `stop --daemon` is 1.5, not a whole number in 0..=3600000",
            ),
        ];
        for (line, message) in cases {
            let err = parse_request(line).unwrap_err();
            assert_eq!(
                (err.code, err.message.as_str()),
                (ErrorCode::BadRequest, message)
            );
        }
        // Beyond u64 (JSON reads it as a float): refused, naming the field.
        let err =
            parse_request(br#"{"v":1,"op":"stop","timeoutMs":18446744073709551616}"#).unwrap_err();
        assert_eq!(
            err.message,
            "`timeoutMs` of `stop` is 1.8446744073709552e+19, not a whole number in 0..=3600000"
        );
        // The edges are accepted.
        for line in [
            &br#"{"v":1,"op":"connect","port":1,"timeoutMs":1}"#[..],
            br#"{"v":1,"op":"connect","port":4294967294,"timeoutMs":86400000}"#,
            br#"{"v":1,"op":"stop","timeoutMs":0}"#,
            br#"{"v":1,"op":"stop","timeoutMs":3600000}"#,
        ] {
            parse_request(line).unwrap();
        }
        assert_eq!(
            Duration::from_millis(*STOP_TIMEOUT_MS.end()),
            crate::supervisor::MAX_STOP_TIMEOUT
        );
        assert_eq!(millis(Duration::MAX), u64::MAX, "saturates, never wraps");
        assert_eq!(
            millis(Duration::from_secs(18_446_744_073_709_552)),
            u64::MAX
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
