//! The supervisor end to end: the real supervisor (`daemon::serve`) with a fake VM
//! whose guest port 22 is a real `sshd -i`, driven by the real `darwin-vz-nix` binary
//! as client and as ProxyCommand.

mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use darwin_vz_nix::control::ControlClient;
use darwin_vz_nix::control::protocol::{ErrorCode, Reply, Request, VmState};
use nix::sys::signal::Signal;
use support::*;

fn status(fixture: &Fixture) -> darwin_vz_nix::control::protocol::StatusReport {
    let mut client = ControlClient::connect(&fixture.state_dir).unwrap();
    match client
        .call(Request::Status, Duration::from_secs(5))
        .unwrap()
    {
        Reply::Status(report) => *report,
        other => panic!("unexpected {other:?}"),
    }
}

fn wait_state(fixture: &Fixture, state: VmState, timeout: Duration) {
    wait_for(timeout, state.as_str(), || status(fixture).state == state);
}

/// `darwin-vz-nix proxy` with its stdin kept open; returns the child.
fn spawn_proxy(fixture: &Fixture) -> Child {
    fixture
        .cli_command(&["proxy"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Opens a proxied connection, reads the guest's SSH banner, closes it.
fn one_session_through_the_proxy(fixture: &Fixture) {
    let mut proxy = spawn_proxy(fixture);
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
    drop(proxy.stdin.take());
    assert!(proxy.wait().unwrap().success());
}

#[test]
fn start_status_stop_through_the_cli() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);

    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("state         stopped\n"),
        "{}",
        stdout(&out)
    );

    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("ready in "), "{text}");
    assert!(text.contains("guest sshd answered"), "{text}");

    let out = fixture.cli(&["start"]);
    assert_eq!(stdout(&out), "already running\n");

    let out = fixture.cli(&["status", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["state"], "running");
    assert_eq!(report["boots"], 1);
    assert_eq!(report["connections"], 0);
    assert!(report["lastBoot"]["readySecs"].as_f64().unwrap() > 0.0);
    assert!(report["vmUptimeSecs"].as_f64().is_some());

    let out = fixture.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "stopped (the guest powered off)\n");
    assert_eq!(status(&fixture).state, VmState::Stopped);

    let out = fixture.cli(&["stop"]);
    assert_eq!(stdout(&out), "the VM was not running\n");
}

#[test]
fn the_control_socket_and_state_are_private() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fixture.state_dir), 0o700);
    assert_eq!(mode(&fixture.state_dir.join("control.sock")), 0o600);
    assert_eq!(mode(&fixture.state_dir.join("keys/client_ed25519")), 0o600);
    assert_eq!(mode(&fixture.state_dir.join("keys")), 0o700);
}

#[test]
fn stop_falls_back_to_force_when_the_guest_ignores_the_power_button() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        ignore_graceful_stop: true,
        ..Default::default()
    };
    let _harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));

    let t0 = Instant::now();
    let out = fixture.cli(&["stop", "--timeout", "1"]);
    assert_eq!(
        stdout(&out),
        "stopped (forced: the guest did not power off within 1 s)\n",
        "{}",
        stderr(&out)
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "waited for the guest first"
    );
    assert_eq!(status(&fixture).state, VmState::Stopped);

    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let t0 = Instant::now();
    let out = fixture.cli(&["stop", "--force"]);
    assert_eq!(stdout(&out), "stopped (forced)\n");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "--force does not wait"
    );
}

#[test]
fn connect_boots_on_demand_and_concurrent_connects_share_one_boot() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        boot_delay: Duration::from_millis(400),
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(status(&fixture).state, VmState::Stopped);

    let mut proxies: Vec<Child> = (0..4).map(|_| spawn_proxy(&fixture)).collect();
    for proxy in &mut proxies {
        let banner = first_line(proxy);
        assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner:?}");
    }
    assert_eq!(harness.vm.boots(), 1, "one boot for all four connections");
    let report = status(&fixture);
    assert_eq!(
        (report.state, report.connections, report.boots),
        (VmState::Running, 4, 1)
    );

    for mut proxy in proxies {
        drop(proxy.stdin.take());
        assert!(proxy.wait().unwrap().success());
    }
    wait_for(Duration::from_secs(5), "connections to close", || {
        status(&fixture).connections == 0
    });
}

#[test]
fn idle_poweroff_after_the_last_connection_and_reboot_on_the_next() {
    let fixture = Fixture::new();
    let idle = Duration::from_millis(300);
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), Some(idle));

    let mut proxy = spawn_proxy(&fixture);
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
    // An open connection keeps the VM up past the idle timeout.
    std::thread::sleep(idle * 3);
    let report = status(&fixture);
    assert_eq!((report.state, report.connections), (VmState::Running, 1));
    assert_eq!(report.idle_remaining_secs, None);

    drop(proxy.stdin.take());
    proxy.wait().unwrap();
    wait_for(Duration::from_secs(2), "the idle clock", || {
        status(&fixture).idle_remaining_secs.is_some()
    });
    wait_state(&fixture, VmState::Stopped, Duration::from_secs(5));
    assert_eq!(harness.vm.boots(), 1);

    // The daemon stays; the next connection boots again.
    one_session_through_the_proxy(&fixture);
    assert_eq!(harness.vm.boots(), 2);
}

#[test]
fn a_crash_is_reported_and_the_next_connection_boots_again() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    harness.vm.crash("internal virtualization error");
    wait_state(&fixture, VmState::Failed, Duration::from_secs(2));
    let out = fixture.cli(&["status"]);
    assert!(
        stdout(&out).contains("state         failed\n"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("last error    the VM stopped with an error: internal virtualization error; see the guest console log"),
        "{}",
        stdout(&out)
    );

    one_session_through_the_proxy(&fixture);
    assert_eq!(harness.vm.boots(), 2);
}

#[test]
fn a_guest_poweroff_is_a_clean_stop() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    harness.vm.guest_poweroff();
    wait_state(&fixture, VmState::Stopped, Duration::from_secs(2));
    assert_eq!(status(&fixture).last_error, None);
}

#[test]
fn boot_failures_reach_start_and_proxy_as_one_line() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        fail_boot: Some("VZErrorDomain code 1: invalid kernel".into()),
        ..Default::default()
    };
    let _harness = Harness::start(&fixture, behaviour, None);

    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).lines().last().unwrap(),
        "darwin-vz-nix: the VM failed to start: VZErrorDomain code 1: invalid kernel"
    );

    let out = fixture
        .cli_command(&["proxy"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "the proxy writes nothing but the stream to stdout"
    );
    assert_eq!(
        stderr(&out),
        "darwin-vz-nix: the VM failed to start: VZErrorDomain code 1: invalid kernel\n"
    );
}

#[test]
fn a_guest_that_never_answers_times_out_pointing_at_the_console_log() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        listen_delay: Duration::from_secs(3600),
        ..Default::default()
    };
    let mut options = fixture.options(None);
    options.boot_timeout = Duration::from_secs(1);
    let config = fixture.config(Default::default());
    let harness = Harness::start_with(&fixture, config, behaviour, options);

    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    let console = fixture.state_dir.join("logs/console.log");
    assert_eq!(
        stderr(&out).lines().last().unwrap(),
        format!(
            "darwin-vz-nix: the guest's sshd did not answer on vsock port 22 within 1 s; see the guest console log {}",
            console.display()
        )
    );
    assert_eq!(status(&fixture).state, VmState::Failed);
    drop(harness);
}

#[test]
fn configuration_problems_found_at_boot_are_reported_to_the_client() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    // The guest disappears after the daemon started (e.g. garbage-collected).
    std::fs::remove_file(fixture.guest_dir.join("kernel")).unwrap();
    let out = fixture
        .cli_command(&["proxy"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(
            "darwin-vz-nix: invalid configuration: `guest` in test: cannot read kernel "
        ),
        "{err}"
    );
}

#[test]
fn malformed_requests_get_error_replies_and_never_wedge_the_supervisor() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);

    // A client that connects and says nothing must not block others.
    let _silent =
        std::os::unix::net::UnixStream::connect(fixture.state_dir.join("control.sock")).unwrap();

    let mut client = ControlClient::connect(&fixture.state_dir).unwrap();
    let cases: [(&[u8], ErrorCode); 4] = [
        (b"this is not json\n", ErrorCode::BadRequest),
        (b"{\"v\":1,\"op\":\"frobnicate\"}\n", ErrorCode::BadRequest),
        (b"{\"v\":99,\"op\":\"status\"}\n", ErrorCode::Version),
        (b"{\"v\":1,\"op\":\"connect\"}\n", ErrorCode::BadRequest),
    ];
    for (line, expected) in cases {
        client.send_raw(line).unwrap();
        match client.receive_raw(Duration::from_secs(5)) {
            Err(darwin_vz_nix::control::ClientError::Remote { code, .. }) => {
                assert_eq!(code, expected, "{line:?}")
            }
            other => panic!("{line:?}: {other:?}"),
        }
    }
    // The same connection still works after errors.
    assert!(matches!(
        client.call(Request::Status, Duration::from_secs(5)),
        Ok(Reply::Status(_))
    ));

    // An oversized line is refused and the connection closed.
    let mut big = ControlClient::connect(&fixture.state_dir).unwrap();
    big.send_raw(&vec![b'x'; 70 * 1024]).unwrap();
    match big.receive_raw(Duration::from_secs(5)) {
        Err(darwin_vz_nix::control::ClientError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::TooLarge);
            assert_eq!(
                message,
                "request longer than 65536 bytes; closing the connection"
            );
        }
        other => panic!("{other:?}"),
    }

    // And the supervisor serves everyone else as before.
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    assert_eq!(status(&fixture).state, VmState::Running);
}

#[test]
fn two_starts_at_once_end_with_one_vm() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        boot_delay: Duration::from_millis(300),
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);
    let starts: Vec<Child> = (0..2)
        .map(|_| {
            fixture
                .cli_command(&["start"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for start in starts {
        let out = start.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert_eq!(harness.vm.boots(), 1);
    assert_eq!(status(&fixture).boots, 1);
}

#[test]
fn start_refuses_settings_the_running_supervisor_does_not_have() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let out = fixture.cli(&["start", "--memory", "2048"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("uses memory 1024 MiB (asked 2048); to change settings run `darwin-vz-nix stop --daemon`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn stop_daemon_ends_the_supervisor() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let out = fixture.cli(&["stop", "--daemon"]);
    assert_eq!(
        stdout(&out),
        "stopped (the guest powered off); the supervisor has exited\n"
    );
    drop(harness);
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn reset_through_the_supervisor_replaces_keys_and_disk() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let key = fixture.state_dir.join("keys/client_ed25519");
    let before = std::fs::read(&key).unwrap();
    assert!(fixture.state_dir.join("disk.img").exists());

    let out = fixture.cli(&["destroy"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("re-run with --yes"));
    assert_eq!(
        std::fs::read(&key).unwrap(),
        before,
        "nothing deleted without --yes"
    );

    let out = fixture.cli(&["destroy", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!(
        "deleted {}",
        fixture.state_dir.join("disk.img").display()
    )));
    assert!(!fixture.state_dir.join("disk.img").exists());
    assert_ne!(std::fs::read(&key).unwrap(), before, "new keys");
    assert_eq!(status(&fixture).state, VmState::Stopped);

    // The next boot makes a fresh disk and works with the new keys.
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    assert!(fixture.state_dir.join("disk.img").exists());
}

#[test]
fn commands_say_so_when_nothing_runs() {
    let fixture = Fixture::new();
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        stdout(&out),
        format!(
            "not running (no supervisor for {})\nstart one with `darwin-vz-nix start`, or let a build start it (nix-darwin's services.darwin-vz)\n",
            fixture.state_dir.display()
        )
    );
    let out = fixture.cli(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "not-running");

    let out = fixture.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).ends_with("; nothing to stop\n"));

    let out = fixture
        .cli_command(&["proxy"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: no supervisor is running for {} (no one answers on {}); start one with `darwin-vz-nix start`, or enable services.darwin-vz in nix-darwin\n",
            fixture.state_dir.display(),
            fixture.state_dir.join("control.sock").display()
        )
    );
}

// --- A supervisor in its own process, for tests that kill it. ---

/// Runs only when re-executed by `spawn_child_supervisor`: hosts the real supervisor
/// with the fake VM until SIGTERM, like `darwin-vz-nix daemon` would on a Mac.
#[test]
#[ignore = "helper process for other tests"]
fn child_supervisor() {
    let Ok(state_dir) = std::env::var("DVN_CHILD_STATE_DIR") else {
        return;
    };
    let fixture_dir = std::path::PathBuf::from(std::env::var("DVN_CHILD_FIXTURE_DIR").unwrap());
    let fixture = Fixture {
        dir: tempfile::tempdir().unwrap(),
        state_dir: state_dir.into(),
        guest_dir: fixture_dir.join("guest"),
    };
    let config = fixture.config(Default::default());
    let prepared = match darwin_vz_nix::daemon::prepare(&config) {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("child supervisor: {e}");
            std::process::exit(4);
        }
    };
    darwin_vz_nix::daemon::init_logging(&prepared.state, darwin_vz_nix::config::LogLevel::Info)
        .unwrap();
    prepare_sshd_privsep_dir();
    let vm = FakeVm::new(&fixture.state_dir, FakeVmBehaviour::default());
    let mut options = fixture.options(None);
    options.handle_signals = true;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(darwin_vz_nix::daemon::serve(
            prepared,
            config,
            darwin_vz_nix::host::HostInfo::detect(),
            vm,
            options,
        ))
        .unwrap();
    std::process::exit(0);
}

fn signal(child: &Child, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

fn spawn_child_supervisor(fixture: &Fixture) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_supervisor",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DVN_CHILD_STATE_DIR", &fixture.state_dir)
        .env("DVN_CHILD_FIXTURE_DIR", fixture.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_answering(fixture: &Fixture) {
    wait_for(Duration::from_secs(20), "the child supervisor", || {
        ControlClient::connect(&fixture.state_dir).is_ok()
    });
}

#[test]
fn a_supervisor_killed_with_sigkill_leaves_nothing_that_blocks_the_next_start() {
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor(&fixture);
    wait_answering(&fixture);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));

    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    let socket = fixture.state_dir.join("control.sock");
    assert!(socket.exists(), "the stale socket is still there");
    assert!(
        fixture.state_dir.join("supervisor.pid").exists(),
        "the pid file is still there"
    );

    // Liveness, not existence: the stale socket answers nobody.
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));

    let mut next = spawn_child_supervisor(&fixture);
    wait_answering(&fixture);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    assert_eq!(status(&fixture).state, VmState::Running);
    signal(&next, Signal::SIGTERM);
    assert!(next.wait().unwrap().success());
}

#[test]
fn sigterm_powers_the_vm_off_gracefully_before_exit() {
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor(&fixture);
    wait_answering(&fixture);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(fixture.state_dir.join("logs/daemon.log")).unwrap();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("VM stop: Graceful"), "{log}");
    assert!(
        !fixture.state_dir.join("control.sock").exists(),
        "socket removed on a clean exit"
    );
}

#[test]
fn two_supervisors_at_once_end_with_one_owner() {
    let fixture = Fixture::new();
    let children: Vec<Child> = (0..2).map(|_| spawn_child_supervisor(&fixture)).collect();
    wait_answering(&fixture);
    std::thread::sleep(Duration::from_millis(500));
    let mut exited = Vec::new();
    let mut running = Vec::new();
    for mut child in children {
        match child.try_wait().unwrap() {
            Some(status) => exited.push((status, child)),
            None => running.push(child),
        }
    }
    assert_eq!(
        (exited.len(), running.len()),
        (1, 1),
        "exactly one supervisor owns the directory"
    );
    let (status, loser) = exited.pop().unwrap();
    assert_eq!(status.code(), Some(4));
    let err = loser.wait_with_output().unwrap().stderr;
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("another supervisor (pid "), "{err}");
    assert!(err.contains("already owns"), "{err}");
    let mut winner = running.pop().unwrap();
    signal(&winner, Signal::SIGTERM);
    assert!(winner.wait().unwrap().success());
}

#[test]
fn logs_show_the_daemon_log() {
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor(&fixture);
    wait_answering(&fixture);
    let out = fixture.cli(&["logs", "-n", "5"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("ready on"), "{}", stdout(&out));
    let out = fixture.cli(&["logs", "--console"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "no console before the first boot"
    );
    signal(&child, Signal::SIGTERM);
    child.wait().unwrap();
    let _ = std::io::stdout().flush();
}

#[test]
fn proxy_fdpass_hands_the_stream_over_and_keeps_the_session_counted() {
    use std::io::{IoSliceMut, Read};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);

    // Play ssh with ProxyUseFdpass: stdout is a socket on which the descriptor arrives.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut proxy = fixture
        .cli_command(&["proxy", "--fdpass"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .unwrap();
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut byte)];
    let message = nix::sys::socket::recvmsg::<()>(
        ours.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    let fd = message
        .cmsgs()
        .unwrap()
        .find_map(|c| match c {
            nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
        .expect("a descriptor came with the byte");
    // SAFETY: a fresh descriptor from SCM_RIGHTS, owned by nobody else.
    let mut guest = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });

    // ssh waits for its ProxyCommand to exit before going on; it must, at once.
    assert!(proxy.wait().unwrap().success());
    let mut banner = [0u8; 8];
    guest.read_exact(&mut banner).unwrap();
    assert_eq!(
        &banner, b"SSH-2.0-",
        "the guest's sshd, straight through the handed-over descriptor"
    );
    // A detached watcher keeps the session counted while "ssh" (this process) lives.
    assert_eq!(status(&fixture).connections, 1);
}

#[test]
fn proxy_fdpass_falls_back_to_copying_when_stdout_is_a_pipe() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let mut proxy = fixture
        .cli_command(&["proxy", "--fdpass"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-OpenSSH"));
    drop(proxy.stdin.take());
    assert!(proxy.wait().unwrap().success());
}
