//! The CLI's defaults as the real binary states and uses them:
//!
//! * `start`, `bootstrap` and `proxy` wait an hour by default (`timeoutMs` 3600000),
//!   long enough for a first guest that is built before it boots: a stand-in control
//!   socket records the requests; nothing boots;
//! * every subcommand's `--help` states each default once, with its unit and range.

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

/// The subcommands `--help` lists.
fn subcommands(fixture: &Fixture) -> Vec<String> {
    let help = stdout(&fixture.cli(&["--help"]));
    let commands = help
        .split("Commands:\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("a Commands section");
    commands
        .lines()
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Each option's text in a help page: from its flag line to the next flag line.
fn options(help: &str) -> Vec<String> {
    let mut options: Vec<String> = Vec::new();
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        if (2..=6).contains(&indent) && line.trim_start().starts_with('-') {
            options.push(String::new());
        }
        if let Some(option) = options.last_mut() {
            option.push_str(line);
            option.push('\n');
        }
    }
    options
}

#[test]
fn every_subcommands_help_states_each_default_once() {
    let fixture = Fixture::new();
    let names = subcommands(&fixture);
    for expected in ["start", "bootstrap", "proxy", "machines", "rotate-keys"] {
        assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
    }
    let mut helps: Vec<(String, String)> = Vec::new();
    for name in &names {
        let out = fixture.cli(&[name, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{name} --help");
        helps.push((name.clone(), stdout(&out)));
    }
    for sub in ["boot", "control"] {
        helps.push((
            format!("bench {sub}"),
            stdout(&fixture.cli(&["bench", sub, "--help"])),
        ));
    }
    for (name, help) in &helps {
        assert!(help.contains("Usage: darwin-vz-nix"), "{name}:\n{help}");
        // Clap would add a second `[default: …]` after our own.
        for option in options(help) {
            assert!(
                option.matches("[default:").count() <= 1,
                "{name} states a default twice:\n{option}"
            );
        }
    }
    // Words as they read, whatever the line breaks.
    let help = |name: &str| {
        let text = &helps.iter().find(|(n, _)| n == name).unwrap().1;
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    for name in ["start", "bootstrap", "proxy"] {
        assert!(
            help(name).contains("[default: 3600, an hour; 1 to 86400]"),
            "{name}:\n{}",
            help(name)
        );
    }
    assert!(help("start").contains("[default: 100G; 512M to 64T]"));
    assert!(help("logs").contains("[default: 50; 0 to 100000]"));
    assert!(help("bench boot").contains("[default: 5; 1 to 100]"));
    assert!(help("proxy").contains("[default: 22, the guest's sshd]"));
    assert!(help("status").contains("`guestReport`"));
}
