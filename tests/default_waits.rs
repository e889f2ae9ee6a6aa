//! The clients' default waits, as the real binary sends them: `start`, `bootstrap`
//! and `proxy` wait an hour by default (`timeoutMs` 3600000), long enough for a
//! first guest that is built before it boots. A stand-in control socket records the
//! requests; nothing boots.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use darwin_vz_nix::control::protocol::{ErrorCode, Reply, ReplyLine, Request, RequestLine};
use support::*;

/// A control socket at the fixture's state directory that answers every request
/// without a supervisor behind it, and records what it was asked.
struct StandIn {
    requests: Arc<Mutex<Vec<Request>>>,
}

impl StandIn {
    fn listen(fixture: &Fixture) -> StandIn {
        std::fs::create_dir_all(&fixture.state_dir).unwrap();
        std::fs::set_permissions(&fixture.state_dir, std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let listener = UnixListener::bind(fixture.state_dir.join("control.sock")).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let recorded = recorded.clone();
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().unwrap();
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { return };
                        let request: RequestLine = serde_json::from_str(&line).unwrap();
                        let reply = match &request.request {
                            // Not a status report: the client skips its settings check.
                            Request::Status => Reply::Ready { boot: None },
                            Request::Start { .. } => Reply::Started {
                                already_running: true,
                                boot: None,
                            },
                            _ => Reply::Error {
                                code: ErrorCode::Internal,
                                message: "stand-in".into(),
                            },
                        };
                        recorded.lock().unwrap().push(request.request);
                        let mut text = serde_json::to_string(&ReplyLine { v: 1, reply }).unwrap();
                        text.push('\n');
                        if writer.write_all(text.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        StandIn { requests }
    }

    /// The `timeoutMs` of every request other than `status`.
    fn waits(&self) -> Vec<Option<u64>> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter_map(|request| match request {
                Request::Status => None,
                Request::Start { timeout_ms, .. }
                | Request::Connect { timeout_ms, .. }
                | Request::WaitReady { timeout_ms }
                | Request::Stop { timeout_ms, .. } => Some(*timeout_ms),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }
}

const AN_HOUR_MS: Option<u64> = Some(3_600_000);

#[test]
fn start_waits_an_hour_for_the_guest_by_default() {
    let fixture = Fixture::new();
    let stand_in = StandIn::listen(&fixture);
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stand_in.waits(), [AN_HOUR_MS]);
    assert!(
        stderr(&out).contains("waiting up to 3600 s"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bootstrap_waits_an_hour_for_the_guest_by_default() {
    let fixture = Fixture::new();
    let stand_in = StandIn::listen(&fixture);
    let out = fixture.cli(&["bootstrap"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stand_in.waits(), [AN_HOUR_MS]);
}

#[test]
fn proxy_waits_an_hour_for_an_on_demand_boot_by_default() {
    let fixture = Fixture::new();
    let stand_in = StandIn::listen(&fixture);
    let out = fixture.cli(&["proxy"]);
    // The stand-in refuses the stream; what the proxy asked for is the point.
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(stand_in.waits(), [AN_HOUR_MS]);
}

#[test]
fn an_explicit_timeout_replaces_the_default_wait() {
    let fixture = Fixture::new();
    let stand_in = StandIn::listen(&fixture);
    let out = fixture.cli(&["start", "--timeout", "90"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stand_in.waits(), [Some(90_000)]);
}
