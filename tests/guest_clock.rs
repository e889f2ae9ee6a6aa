//! The guest's clock setter (`nix/nixos/scripts/clock-set.sh`) against hostile input,
//! run with bash as systemd runs it for one connection (`Accept=yes`): its standard
//! input and output are one end of a Unix stream socket standing in for the vsock
//! connection, `$REMOTE_ADDR` names the peer, and the command that would set the
//! clock is a recorder — this machine's clock is never touched.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

const HOST: &str = "vsock:2";
/// 2025-01-01T00:00:00Z and 2100-01-01T00:00:00Z, as nix/nixos/clock.nix passes them.
const EARLIEST: u64 = 1_735_689_600;
const LATEST: u64 = 4_102_444_800;
/// Seconds the setter waits for its line (the guest's own is 5).
const TIMEOUT: &str = "2";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nix/nixos/scripts/clock-set.sh")
}

/// A stand-in for `date -s`: records its arguments, one call per line; fails when
/// `fail` exists beside it.
struct Recorder {
    dir: tempfile::TempDir,
}

impl Recorder {
    fn new() -> Recorder {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("set-clock");
        std::fs::write(
            &program,
            "#!/bin/sh\nd=$(dirname \"$0\")\necho \"$*\" >> \"$d/calls\"\necho \"(recorded)\"\n[ ! -e \"$d/fail\" ]\n",
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        Recorder { dir }
    }

    fn program(&self) -> PathBuf {
        self.dir.path().join("set-clock")
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

/// The setter serving one connection from `peer`; returns it and the host's end.
fn connect(recorder: &Recorder, peer: Option<&str>) -> (Child, UnixStream) {
    let (host, guest) = UnixStream::pair().unwrap();
    let mut command = Command::new("bash");
    command
        .arg(script())
        .args([HOST, &EARLIEST.to_string(), &LATEST.to_string(), TIMEOUT])
        .arg(recorder.program())
        .env_remove("REMOTE_ADDR")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(
            guest.try_clone().unwrap(),
        )))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(guest)))
        .stderr(Stdio::piped());
    if let Some(peer) = peer {
        command.env("REMOTE_ADDR", peer);
    }
    (command.spawn().unwrap(), host)
}

/// What the setter answered and logged for `request`, sent by the host.
struct Exchange {
    answer: String,
    log: String,
    status: Option<i32>,
    took: Duration,
}

fn finish(child: Child, mut host: UnixStream, started: Instant) -> Exchange {
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = host.read_to_end(&mut answer);
    let Output { status, stderr, .. } = child.wait_with_output().unwrap();
    Exchange {
        answer: String::from_utf8_lossy(&answer).into_owned(),
        log: String::from_utf8_lossy(&stderr).into_owned(),
        status: status.code(),
        took: started.elapsed(),
    }
}

fn send(recorder: &Recorder, request: &[u8]) -> Exchange {
    let started = Instant::now();
    let (child, mut host) = connect(recorder, Some(HOST));
    // The setter may stop reading (and close) before all of an oversized request
    // is written.
    let _ = host.write_all(request);
    finish(child, host, started)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The step an `OK` answer reports, in seconds.
fn answered_step(answer: &str) -> f64 {
    let step = answer
        .strip_prefix("OK ")
        .and_then(|s| s.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("not OK: {answer:?}"));
    let (_, nanos) = step.split_once('.').unwrap();
    assert_eq!(nanos.len(), 9, "{answer:?}");
    assert!(step.starts_with('+') || step.starts_with('-'), "{answer:?}");
    step.parse().unwrap()
}

#[test]
fn a_valid_request_sets_the_clock_once_and_answers_the_step_it_made() {
    let recorder = Recorder::new();
    let target = now() + 3600;
    let out = send(
        &recorder,
        format!("DVN-TIME 1 {target}.000000005\n").as_bytes(),
    );
    assert_eq!(out.status, Some(0), "{}", out.log);
    assert_eq!(recorder.calls(), [format!("@{target}.000000005")]);
    let step = answered_step(&out.answer);
    assert!((3590.0..=3601.0).contains(&step), "{step}: {}", out.answer);
    assert!(
        out.log.contains("set the clock from ") && out.log.contains("(a step of +"),
        "{}",
        out.log
    );
    // What the setting command prints goes to the log, never into the answer.
    assert!(out.log.contains("(recorded)"), "{}", out.log);
    assert!(!out.answer.contains("recorded"), "{}", out.answer);

    // A guest ahead of the host is stepped back; bytes after the line are not read.
    let target = now() - 100;
    let out = send(
        &recorder,
        format!("DVN-TIME 1 {target}.500000000\nDVN-TIME 1 1.0\n").as_bytes(),
    );
    assert_eq!(out.status, Some(0), "{}", out.log);
    let step = answered_step(&out.answer);
    assert!((-110.0..=-99.0).contains(&step), "{step}");
    assert_eq!(recorder.calls().len(), 2);
    assert_eq!(recorder.calls()[1], format!("@{target}.500000000"));
}

#[test]
fn stale_and_future_times_are_refused_and_the_clock_is_not_touched() {
    let recorder = Recorder::new();
    for (request, answer) in [
        (
            "DVN-TIME 1 1000.000000000\n".to_string(),
            "ERR stale: 1000 is before 1735689600\n".to_string(),
        ),
        (
            format!("DVN-TIME 1 {}.999999999\n", EARLIEST - 1),
            format!("ERR stale: {} is before 1735689600\n", EARLIEST - 1),
        ),
        (
            format!("DVN-TIME 1 {}.000000000\n", LATEST + 1),
            format!("ERR in the future: {} is after 4102444800\n", LATEST + 1),
        ),
        (
            "DVN-TIME 1 999999999999.999999999\n".to_string(),
            "ERR in the future: 999999999999 is after 4102444800\n".to_string(),
        ),
    ] {
        let out = send(&recorder, request.as_bytes());
        assert_eq!(
            (out.answer.as_str(), out.status),
            (answer.as_str(), Some(1))
        );
        assert!(
            out.log.starts_with("refused to set the clock: "),
            "{}",
            out.log
        );
    }
    assert_eq!(recorder.calls(), Vec::<String>::new());
}

#[test]
fn malformed_requests_are_refused_and_the_clock_is_not_touched() {
    let recorder = Recorder::new();
    let t = now();
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            format!("DVN-TIME 1 {t}\n").into(),
            format!("ERR malformed request: DVN-TIME 1 {t}\n"),
        ),
        (
            format!("DVN-TIME 1 {t}.5\n").into(),
            format!("ERR malformed request: DVN-TIME 1 {t}.5\n"),
        ),
        (
            format!("DVN-TIME 1 {t}.0000000001\n").into(),
            format!("ERR malformed request: DVN-TIME 1 {t}.0000000001\n"),
        ),
        (
            format!("DVN-TIME 1 -{t}.000000000\n").into(),
            format!("ERR malformed request: DVN-TIME 1 -{t}.000000000\n"),
        ),
        (
            format!("DVN-TIME 1 {t}.000000000 \n").into(),
            format!("ERR malformed request: DVN-TIME 1 {t}.000000000 \n"),
        ),
        (
            format!("DVN-TIME  1 {t}.000000000\n").into(),
            format!("ERR malformed request: DVN-TIME  1 {t}.000000000\n"),
        ),
        (
            format!("DVN-TIME 1 0{t}00.000000000\n").into(),
            format!("ERR malformed request: DVN-TIME 1 0{t}00.000000000\n"),
        ),
        // Carriage returns, NUL bytes, lower case and anything else outside the
        // request's alphabet are shown as `?`: never dropped, never echoed raw.
        (
            format!("DVN-TIME 1 {t}.000000000\r\n").into(),
            format!("ERR malformed request: DVN-TIME 1 {t}.000000000?\n"),
        ),
        (
            [&b"DVN-TIME 1 17"[..], b"\0", b"67225600.000000000\n"].concat(),
            "ERR malformed request: DVN-TIME 1 17?67225600.000000000\n".into(),
        ),
        (
            format!("dvn-time 1 {t}.000000000\n").into(),
            format!("ERR malformed request: ???-???? 1 {t}.000000000\n"),
        ),
        (
            b"\x1b[2J$(reboot)\n".to_vec(),
            "ERR malformed request: ??2J?????????\n".into(),
        ),
        (b"\n".to_vec(), "ERR malformed request: \n".into()),
        (
            format!("DVN-TIME 2 {t}.000000000\n").into(),
            "ERR protocol version 2 is not supported; this guest speaks version 1\n".into(),
        ),
    ];
    for (request, answer) in cases {
        let out = send(&recorder, &request);
        assert_eq!(
            (out.answer.as_str(), out.status),
            (answer.as_str(), Some(1)),
            "{request:?}"
        );
    }
    assert_eq!(recorder.calls(), Vec::<String>::new());
}

#[test]
fn oversized_requests_are_refused_without_reading_them_all() {
    let recorder = Recorder::new();
    let t = now();
    // A valid line pushed past the bound by padding in front of it.
    let padded = format!("{}DVN-TIME 1 {t}.000000000\n", "0".repeat(40));
    for request in [
        padded.into_bytes(),
        vec![b'A'; 65],
        // A megabyte without a newline: the setter reads 64 bytes of it.
        vec![b'9'; 1 << 20],
        [vec![b'A'; 1 << 20], b"\n".to_vec()].concat(),
    ] {
        let out = send(&recorder, &request);
        assert_eq!(
            (out.answer.as_str(), out.status),
            ("ERR request longer than 64 bytes\n", Some(1)),
            "{} bytes",
            request.len()
        );
        assert!(out.took < Duration::from_secs(10), "{:?}", out.took);
    }
    assert_eq!(recorder.calls(), Vec::<String>::new());
}

#[test]
fn slow_silent_and_cut_off_connections_are_refused_within_the_timeout() {
    let recorder = Recorder::new();

    // Half a line, then silence: the setter gives up after its timeout.
    let started = Instant::now();
    let (child, mut host) = connect(&recorder, Some(HOST));
    host.write_all(b"DVN-TIME 1 17").unwrap();
    let out = finish(child, host, started);
    assert_eq!(
        (out.answer.as_str(), out.status),
        ("ERR no complete request within 2 s\n", Some(1))
    );
    assert!(
        out.took >= Duration::from_secs(2) && out.took < Duration::from_secs(15),
        "{:?}",
        out.took
    );

    // A byte a second, never a line: the timeout bounds the whole line, not each read.
    let started = Instant::now();
    let (child, host) = connect(&recorder, Some(HOST));
    let mut trickle = host.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..8 {
            if trickle.write_all(b"9").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(700));
        }
    });
    let out = finish(child, host, started);
    writer.join().unwrap();
    assert_eq!(out.answer, "ERR no complete request within 2 s\n");
    assert!(out.took < Duration::from_secs(5), "{:?}", out.took);

    // Nothing at all.
    let started = Instant::now();
    let (child, host) = connect(&recorder, Some(HOST));
    let out = finish(child, host.try_clone().unwrap(), started);
    drop(host);
    assert_eq!(out.answer, "ERR no complete request within 2 s\n");

    // A connection that ends before its newline.
    let started = Instant::now();
    let (child, mut host) = connect(&recorder, Some(HOST));
    host.write_all(b"DVN-TIME 1 1767225600.000000000").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let out = finish(child, host, started);
    assert_eq!(
        out.answer,
        "ERR incomplete request: the connection ended before its newline\n"
    );
    assert_eq!(recorder.calls(), Vec::<String>::new());
}

#[test]
fn only_the_host_may_set_the_clock() {
    let recorder = Recorder::new();
    let request = format!("DVN-TIME 1 {}.000000000\n", now());
    for (peer, answer) in [
        (
            Some("vsock:1"),
            "ERR only vsock:2 may set the clock, not vsock:1\n",
        ),
        (
            Some("vsock:3"),
            "ERR only vsock:2 may set the clock, not vsock:3\n",
        ),
        (
            None,
            "ERR only vsock:2 may set the clock, not an unknown peer\n",
        ),
    ] {
        let started = Instant::now();
        let (child, mut host) = connect(&recorder, peer);
        let _ = host.write_all(request.as_bytes());
        let out = finish(child, host, started);
        assert_eq!((out.answer.as_str(), out.status), (answer, Some(1)));
    }
    assert_eq!(recorder.calls(), Vec::<String>::new());
}

#[test]
fn a_failing_clock_command_is_reported_to_the_host() {
    let recorder = Recorder::new();
    std::fs::write(recorder.dir.path().join("fail"), "").unwrap();
    let out = send(
        &recorder,
        format!("DVN-TIME 1 {}.000000000\n", now()).as_bytes(),
    );
    assert_eq!(
        (out.answer.as_str(), out.status),
        ("ERR setting the clock failed\n", Some(1))
    );
    assert_eq!(recorder.calls().len(), 1);
}

#[test]
fn bad_arguments_are_a_usage_error_before_anything_is_read() {
    let recorder = Recorder::new();
    for args in [
        vec![HOST, "1", "2"],
        vec![HOST, "x", "2", "5"],
        vec![HOST, "3", "2", "5"],
        vec![HOST, "1", "99999999999", "5"],
        vec![HOST, "1", "2", "0"],
    ] {
        let out = Command::new("bash")
            .arg(script())
            .args(&args)
            .arg(recorder.program())
            .env("REMOTE_ADDR", HOST)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("usage: clock-set "),
            "{args:?}"
        );
    }
    assert_eq!(recorder.calls(), Vec::<String>::new());
}
