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

    let out = run_proxy(&fixture, &[]);
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
    let out = run_proxy(&fixture, &[]);
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

    let out = run_proxy(&fixture, &[]);
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
/// with the fake VM until a stop signal, like `darwin-vz-nix daemon` would on a Mac.
/// `DVN_CHILD_*` variables adjust it (see `ChildOptions`).
#[test]
#[ignore = "helper process for other tests"]
fn child_supervisor() {
    let Ok(state_dir) = std::env::var("DVN_CHILD_STATE_DIR") else {
        return;
    };
    let var = |name: &str| std::env::var(name).ok();
    let fixture_dir = std::path::PathBuf::from(var("DVN_CHILD_FIXTURE_DIR").unwrap());
    let fixture = Fixture {
        dir: tempfile::tempdir().unwrap(),
        state_dir: state_dir.into(),
        guest_dir: fixture_dir.join("guest"),
    };
    let config = fixture.config(darwin_vz_nix::config::ConfigLayer {
        control_group: var("DVN_CHILD_CONTROL_GROUP"),
        ..Default::default()
    });
    let prepared = match darwin_vz_nix::daemon::prepare(&config) {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("child supervisor: {e}");
            std::process::exit(4);
        }
    };
    let level = match var("DVN_CHILD_LOG_LEVEL").as_deref() {
        Some("debug") => darwin_vz_nix::config::LogLevel::Debug,
        _ => darwin_vz_nix::config::LogLevel::Info,
    };
    let log_max = var("DVN_CHILD_LOG_MAX").map_or(10 << 20, |v| v.parse().unwrap());
    darwin_vz_nix::daemon::init_logging_with(&prepared.state, level, log_max).unwrap();
    prepare_sshd_privsep_dir();
    let behaviour = FakeVmBehaviour {
        ignore_graceful_stop: var("DVN_CHILD_IGNORE_GRACEFUL").is_some(),
        ..Default::default()
    };
    let vm = FakeVm::new(&fixture.state_dir, behaviour);
    let mut options = fixture.options(None);
    options.handle_signals = true;
    if let Some(secs) = var("DVN_CHILD_STOP_TIMEOUT_SECS") {
        options.stop_timeout = Duration::from_secs(secs.parse().unwrap());
    }
    if let Some(ms) = var("DVN_CHILD_REQUEST_TIMEOUT_MS") {
        options.request_timeout = Duration::from_millis(ms.parse().unwrap());
    }
    if let Some(max) = var("DVN_CHILD_MAX_CLIENTS") {
        options.max_clients = Some(max.parse().unwrap());
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let served = runtime.block_on(darwin_vz_nix::daemon::serve(
        prepared,
        config,
        darwin_vz_nix::host::HostInfo::detect(),
        vm,
        options,
    ));
    if let Err(e) = served {
        eprintln!("child supervisor: {e}");
        std::process::exit(5);
    }
    std::process::exit(0);
}

fn pid_of(child: &Child) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap())
}

fn signal(child: &Child, signal: Signal) {
    nix::sys::signal::kill(pid_of(child), signal).unwrap();
}

/// How to run a child supervisor.
#[derive(Default)]
struct ChildOptions {
    /// `DVN_CHILD_*` settings.
    env: Vec<(&'static str, String)>,
    /// RLIMIT_NOFILE (soft, hard) to start it with.
    open_files: Option<(u64, u64)>,
    /// Another copy of this test binary to run (one another account may execute).
    exe: Option<std::path::PathBuf>,
    /// Run as this uid and gid (the test must be root).
    user: Option<(u32, u32)>,
}

fn spawn_child_supervisor(fixture: &Fixture) -> Child {
    spawn_child_supervisor_with(fixture, ChildOptions::default())
}

fn spawn_child_supervisor_with(fixture: &Fixture, options: ChildOptions) -> Child {
    use std::os::unix::process::CommandExt;
    let exe = options
        .exe
        .unwrap_or_else(|| std::env::current_exe().unwrap());
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            "child_supervisor",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DVN_CHILD_STATE_DIR", &fixture.state_dir)
        .env("DVN_CHILD_FIXTURE_DIR", fixture.dir.path())
        .envs(options.env)
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((uid, gid)) = options.user {
        command.uid(uid).gid(gid);
    }
    if let Some((soft, hard)) = options.open_files {
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    soft,
                    hard,
                )
                .map_err(std::io::Error::from)
            });
        }
    }
    command.spawn().unwrap()
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
    // The stream, now held by "ssh" (this process), keeps the session counted.
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

// --- Raw control connections, for what the client library never sends. ---

/// Sends `bytes` on a fresh control connection and returns the first reply line.
fn raw_reply(fixture: &Fixture, bytes: &[u8]) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut stream =
        std::os::unix::net::UnixStream::connect(fixture.state_dir.join("control.sock")).unwrap();
    stream.write_all(bytes).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Reads one reply line and the descriptor that came with it.
fn receive_with_fd(
    stream: &std::os::unix::net::UnixStream,
) -> (String, Option<std::os::fd::OwnedFd>) {
    use std::io::IoSliceMut;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    let mut bytes = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut bytes)];
    let message = nix::sys::socket::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    let fd = message.cmsgs().unwrap().find_map(|c| match c {
        nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
        _ => None,
    });
    let n = message.bytes;
    // SAFETY: a fresh descriptor from SCM_RIGHTS, owned by nobody else.
    let fd = fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    (String::from_utf8_lossy(&bytes[..n]).into_owned(), fd)
}

fn shut_down(fd: &impl std::os::fd::AsRawFd) {
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

// --- Issue 10.1: a superseded boot never stops a newer VM. ---

use darwin_vz_nix::backend::BootId;

/// A guest that answers 1.5 s after its VM starts, and readiness probes that take
/// 0.8 s to fail until then: a boot task is mostly inside a probe, so one that is
/// superseded notices only after a newer boot has started its VM.
fn slow_to_answer() -> FakeVmBehaviour {
    FakeVmBehaviour {
        listen_delay: Duration::from_millis(1500),
        refuse_delay: Duration::from_millis(800),
        ..Default::default()
    }
}

#[test]
fn a_guest_that_powers_off_while_booting_fails_the_boot_at_once_naming_the_console_log() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, slow_to_answer(), None);
    let start = fixture.cli_in_background(&["start"]);
    wait_for(Duration::from_secs(10), "boot 1's VM to run", || {
        harness.vm.running_boot() == Some(BootId(1))
    });
    let t0 = Instant::now();
    harness.vm.guest_poweroff();

    let out = start.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = format!(
        "the guest powered off while booting; see the guest console log {}",
        fixture.state_dir.join("logs/console.log").display()
    );
    assert!(stderr(&out).contains(&message), "{}", stderr(&out));
    let report = status(&fixture);
    assert_eq!(
        (report.state, report.last_error),
        (VmState::Failed, Some(message))
    );
}

#[test]
fn a_crash_during_boot_then_an_immediate_retry_boots_normally() {
    let fixture = Fixture::new();
    let behaviour = slow_to_answer();
    let harness = Harness::start(&fixture, behaviour, None);
    let out = fixture.cli(&["start", "--no-wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    wait_for(Duration::from_secs(10), "boot 1's VM to run", || {
        harness.vm.running_boot() == Some(BootId(1))
    });
    // The boot task is polling for the guest's sshd when the VM dies.
    harness.vm.crash("guest kernel panic");
    wait_state(&fixture, VmState::Failed, Duration::from_secs(5));

    let t0 = Instant::now();
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ready in "), "{}", stdout(&out));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the retry took {:?}: the old boot stopped the new VM",
        t0.elapsed()
    );
    let report = status(&fixture);
    assert_eq!((report.state, report.boots), (VmState::Running, 2));
    assert_eq!(harness.vm.running_boot(), Some(BootId(2)));
    let calls = harness.vm.calls();
    assert!(
        calls
            .iter()
            .filter(|c| c.boot == BootId(2))
            .all(|c| c.op == Op::Start),
        "nothing but its start reached boot 2: {calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.boot == BootId(1) && c.op == Op::ForceStop),
        "the superseded boot stopped its own VM: {calls:?}"
    );
}

#[test]
fn a_stop_during_boot_then_a_start_boots_normally() {
    let fixture = Fixture::new();
    let behaviour = slow_to_answer();
    let harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start", "--no-wait"]).status.code(), Some(0));
    wait_for(Duration::from_secs(10), "boot 1's VM to run", || {
        harness.vm.running_boot() == Some(BootId(1))
    });
    let out = fixture.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(status(&fixture).state, VmState::Stopped);

    let t0 = Instant::now();
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let report = status(&fixture);
    assert_eq!((report.state, report.boots), (VmState::Running, 2));
    assert_eq!(harness.vm.running_boot(), Some(BootId(2)));
    assert!(
        !harness
            .vm
            .calls()
            .iter()
            .any(|c| c.boot == BootId(2) && c.op == Op::ForceStop),
        "boot 2 was never force-stopped"
    );
    one_session_through_the_proxy(&fixture);
}

#[test]
fn fifty_rounds_of_start_stop_start_end_with_the_current_boot_running() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        boot_delay: Duration::from_millis(5),
        listen_delay: Duration::from_millis(300),
        refuse_delay: Duration::from_millis(200),
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);
    let mut client = ControlClient::connect(&fixture.state_dir).unwrap();
    let start = Request::Start {
        wait: false,
        timeout_ms: None,
    };
    let stop = Request::Stop {
        force: true,
        timeout_ms: None,
        exit: false,
        unless_in_use: false,
    };
    for _ in 0..50 {
        for request in [start.clone(), stop.clone(), start.clone()] {
            client.call(request, Duration::from_secs(30)).unwrap();
        }
    }
    let t0 = Instant::now();
    while status(&fixture).state != VmState::Running && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = status(&fixture);
    assert_eq!(
        report.state,
        VmState::Running,
        "no leftover starting: {report:?}"
    );
    assert_eq!(
        harness.vm.running_boot(),
        Some(BootId(report.boots)),
        "the VM that runs is the supervisor's latest boot"
    );
    let calls = harness.vm.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.boot == BootId(report.boots) && c.op != Op::Start),
        "nothing stopped the latest boot: {calls:?}"
    );
    let started: Vec<u64> = calls
        .iter()
        .filter(|c| c.op == Op::Start)
        .map(|c| c.boot.0)
        .collect();
    assert!(
        started.windows(2).all(|pair| pair[0] < pair[1]),
        "no superseded boot started after a newer one: {started:?}"
    );
    one_session_through_the_proxy(&fixture);
}

// --- Issue 10.2: a deleted socket never strands the supervisor. ---

#[test]
fn a_deleted_control_socket_is_made_again_and_clients_reach_the_supervisor() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let socket = fixture.state_dir.join("control.sock");
    std::fs::remove_file(&socket).unwrap();

    // The client waits for the supervisor to notice (every 2 s) instead of saying
    // "not running".
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("state         running"),
        "{}",
        stdout(&out)
    );
    assert!(socket.exists());
}

#[test]
fn while_a_live_supervisors_socket_is_missing_clients_say_so_and_never_not_running() {
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor(&fixture);
    wait_answering(&fixture);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    // Stopped, the supervisor cannot make its socket again: the clients' view.
    signal(&child, Signal::SIGSTOP);
    std::fs::remove_file(fixture.state_dir.join("control.sock")).unwrap();

    let expected = format!(
        "darwin-vz-nix: a supervisor (pid {}) owns {} but its control socket {} is missing; it makes the socket again within 2 s",
        child.id(),
        fixture.state_dir.display(),
        fixture.state_dir.join("control.sock").display()
    );
    let commands: [&[&str]; 5] = [
        &["status"],
        &["status", "--json"],
        &["stop", "--daemon"],
        &["start"],
        &["proxy"],
    ];
    let running: Vec<Child> = commands
        .iter()
        .map(|args| {
            fixture
                .cli_command(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (args, process) in commands.iter().zip(running) {
        let out = process.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stdout(&out));
        assert!(
            stderr(&out).starts_with(&expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!stdout(&out).contains("not running"), "{args:?}");
        assert!(!stdout(&out).contains("nothing to stop"), "{args:?}");
        if args == &["status", "--json"] {
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(json["state"], "unreachable");
        } else {
            assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
        }
    }

    signal(&child, Signal::SIGCONT);
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("state         running"),
        "{}",
        stdout(&out)
    );
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_second_supervisor_never_removes_a_socket_that_answers() {
    use std::os::unix::fs::MetadataExt;
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let socket = fixture.state_dir.join("control.sock");
    let inode = std::fs::metadata(&socket).unwrap().ino();
    // Whatever lets a second supervisor past the lock (here: the lock file deleted),
    // it must not take over a socket its owner still answers on.
    let _ = std::fs::remove_file(fixture.state_dir.join("lock"));
    let second = spawn_child_supervisor(&fixture);
    let out = second.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("already owns") || err.contains("something already answers on"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&socket).unwrap().ino(), inode);
    assert_eq!(fixture.cli(&["status"]).status.code(), Some(0));
}

#[test]
fn a_supervisor_removes_only_its_own_socket_when_it_exits() {
    use std::os::unix::fs::MetadataExt;
    let fixture = Fixture::new();
    let socket = fixture.state_dir.join("control.sock");
    let mut harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    harness.shut_down();
    assert!(!socket.exists(), "its own socket is removed on exit");

    // Something else took the path over (and answers there): the exiting supervisor
    // must leave it alone. The stop goes through a connection made before.
    let mut harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let mut client = darwin_vz_nix::control::ControlClient::connect(&fixture.state_dir).unwrap();
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let inode = std::fs::metadata(&socket).unwrap().ino();
    client.call(forced_exit(), Duration::from_secs(10)).unwrap();
    harness.wait_for_exit();
    assert_eq!(
        std::fs::metadata(&socket).map(|m| m.ino()).ok(),
        Some(inode),
        "another's socket survives the supervisor's exit"
    );
    drop(other);
}

#[test]
fn a_socket_replaced_by_a_dead_file_is_made_again_and_a_live_one_is_left_alone() {
    use std::os::unix::fs::MetadataExt;
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor(&fixture);
    wait_answering(&fixture);
    let socket = fixture.state_dir.join("control.sock");
    let inode = || std::fs::metadata(&socket).map(|m| m.ino()).ok();
    let log = || std::fs::read_to_string(fixture.state_dir.join("logs/daemon.log")).unwrap();

    // Its own socket, over two checks: left as it is, nothing said about it.
    let own = inode();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(inode(), own);
    assert!(!log().contains("replaced"), "{}", log());

    // A dead socket file in its place (bound, then closed): made again.
    std::fs::remove_file(&socket).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    // (Nothing answers on it: a client connects again only once it is made again.)
    wait_for(Duration::from_secs(8), "the socket made again", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    assert!(log().contains("had been deleted or replaced; made it again"));

    // A socket something else answers on: left alone, and said so.
    std::fs::remove_file(&socket).unwrap();
    let live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let theirs = inode();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(inode(), theirs);
    assert!(log().contains("something else answers on; leaving it"));
    drop(live);
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
    assert_eq!(
        inode(),
        theirs,
        "not its own, so not removed on exit either"
    );
}

#[test]
fn clients_that_hang_up_before_their_reply_cost_the_supervisor_nothing_after() {
    use std::io::Read;
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor(&fixture);
    wait_answering(&fixture);
    let socket = fixture.state_dir.join("control.sock");
    for _ in 0..30 {
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
        drop(stream); // gone before the reply: the supervisor's write fails
    }
    std::thread::sleep(Duration::from_millis(500));
    // CPU time of the supervisor over two quiet seconds: a task still trying to
    // write to a dead client would spin.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu() - before;
    assert!(
        ticks < 50,
        "{ticks} clock ticks of CPU in 2 s with no client"
    );
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
    let mut reply = [0u8; 16];
    assert!(stream.read(&mut reply).unwrap() > 0, "it still answers");
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_request_line_is_refused_as_soon_as_it_is_too_long_and_one_of_exactly_the_limit_is_read() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);

    // Sent in pieces that never add up to the limit exactly, with no newline and the
    // connection kept open: refused once the limit is passed, without waiting for
    // an end that may never come.
    let mut slow = ControlClient::connect(&fixture.state_dir).unwrap();
    for _ in 0..20 {
        // Once it has refused the line it closes the connection: writes then fail.
        if slow.send_raw(&[b' '; 5000]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    match slow.receive_raw(Duration::from_secs(10)) {
        Err(darwin_vz_nix::control::ClientError::Remote { code, .. }) => {
            assert_eq!(code, ErrorCode::TooLarge)
        }
        other => panic!("{other:?}"),
    }

    // A request of exactly MAX_LINE_BYTES (padded with spaces), its newline sent
    // after the supervisor has read the rest: within the limit, so answered.
    let request = br#"{"v":1,"op":"status"}"#;
    let mut line = vec![b' '; darwin_vz_nix::control::protocol::MAX_LINE_BYTES - request.len()];
    line.extend_from_slice(request);
    let mut exact = ControlClient::connect(&fixture.state_dir).unwrap();
    exact.send_raw(&line).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    exact.send_raw(b"\n").unwrap();
    match exact.receive_raw(Duration::from_secs(10)) {
        Ok(Reply::Status(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_directory_in_the_sockets_place_is_reported_and_kept() {
    let fixture = Fixture::new();
    let socket = fixture.state_dir.join("control.sock");
    std::fs::create_dir_all(socket.join("something")).unwrap();
    let out = spawn_child_supervisor(&fixture).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    // The reason is why it could not be removed, not a bind that failed after.
    assert!(err.contains("control.sock"), "{err}");
    assert!(!err.contains("in use"), "{err}");
    assert!(socket.join("something").is_dir(), "nothing of it deleted");
}

// --- Issue 10.5: bounded resources. ---

#[test]
fn silent_and_half_sent_clients_are_dropped_and_status_still_answers() {
    use std::io::Read;
    let fixture = Fixture::new();
    let mut options = fixture.options(None);
    options.request_timeout = Duration::from_secs(1);
    let config = fixture.config(Default::default());
    let _harness = Harness::start_with(&fixture, config, FakeVmBehaviour::default(), options);
    let socket = fixture.state_dir.join("control.sock");
    let mut silent: Vec<std::os::unix::net::UnixStream> = (0..50)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let mut half = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    half.write_all(b"{\"v\":1,").unwrap();
    silent.push(half);

    let t0 = Instant::now();
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    for mut stream in silent {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let reply: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(reply["code"], "timeout");
        assert_eq!(
            reply["message"],
            "no complete request line within 1 s; closing the connection"
        );
    }
}

#[test]
fn a_client_waiting_for_the_boot_it_asked_for_is_not_dropped() {
    let fixture = Fixture::new();
    let mut options = fixture.options(None);
    options.request_timeout = Duration::from_secs(1);
    let behaviour = FakeVmBehaviour {
        boot_delay: Duration::from_millis(2500),
        ..Default::default()
    };
    let config = fixture.config(Default::default());
    let _harness = Harness::start_with(&fixture, config, behaviour, options);
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ready in "), "{}", stdout(&out));
}

#[test]
fn the_idle_timer_is_one_task_however_often_sessions_open_and_close() {
    let fixture = Fixture::new();
    let harness = Harness::start(
        &fixture,
        FakeVmBehaviour::default(),
        Some(Duration::from_secs(3600)),
    );
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let tasks = || harness.runtime.metrics().num_alive_tasks();
    let before = tasks();
    for _ in 0..300 {
        let mut client = ControlClient::connect(&fixture.state_dir).unwrap();
        let stream = client
            .connect_port(ECHO_PORT, Duration::from_secs(10))
            .unwrap();
        shut_down(&stream);
    }
    wait_for(Duration::from_secs(10), "every session to end", || {
        status(&fixture).connections == 0
    });
    assert!(
        status(&fixture).idle_remaining_secs.unwrap() > 3000.0,
        "the idle clock runs"
    );
    // Before, each drop to zero spawned a timer sleeping the whole idle timeout.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tasks() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(tasks() <= before, "{} live tasks, {before} before", tasks());
}

#[test]
fn three_hundred_silent_clients_at_a_256_descriptor_soft_limit_do_not_block_status() {
    let fixture = Fixture::new();
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let mut child = spawn_child_supervisor_with(
        &fixture,
        ChildOptions {
            open_files: Some((256, hard)),
            ..Default::default()
        },
    );
    wait_answering(&fixture);
    let socket = fixture.state_dir.join("control.sock");
    let silent: Vec<std::os::unix::net::UnixStream> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let t0 = Instant::now();
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    if hard >= 2048 {
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    }
    if cfg!(target_os = "linux") {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let soft: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert_eq!(soft, hard.min(10240), "{line}");
    }
    drop(silent);
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
}

#[test]
fn out_of_descriptors_the_supervisor_pauses_accepting_and_its_log_stays_small() {
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor_with(
        &fixture,
        ChildOptions {
            open_files: Some((64, 64)),
            env: vec![
                ("DVN_CHILD_MAX_CLIENTS", "1000".into()),
                ("DVN_CHILD_REQUEST_TIMEOUT_MS", "1500".into()),
            ],
            ..Default::default()
        },
    );
    wait_answering(&fixture);
    let socket = fixture.state_dir.join("control.sock");
    let silent: Vec<std::os::unix::net::UnixStream> = (0..120)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let log = std::fs::read_to_string(fixture.state_dir.join("logs/daemon.log")).unwrap();
    let failures = log.lines().filter(|l| l.contains("accept failed")).count();
    assert!(failures >= 1, "the limit was hit: {log}");
    assert!(
        failures <= 4,
        "{failures} accept failures logged in 3 s:\n{log}"
    );
    drop(silent);
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_daemon_log_is_rotated_by_size_while_running_and_repeats_are_left_out() {
    use std::io::{BufRead, BufReader};
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor_with(
        &fixture,
        ChildOptions {
            env: vec![
                ("DVN_CHILD_LOG_MAX", "4096".into()),
                ("DVN_CHILD_LOG_LEVEL", "debug".into()),
            ],
            ..Default::default()
        },
    );
    wait_answering(&fixture);
    let stream =
        std::os::unix::net::UnixStream::connect(fixture.state_dir.join("control.sock")).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut ask = |line: &str| {
        writer.write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
    };
    // 300 identical bad requests: one line, then a count.
    for _ in 0..300 {
        ask("{\"v\":1,\"op\":\"same\"}\n");
    }
    ask("{\"v\":1,\"op\":\"different\"}\n");
    let log = fixture.state_dir.join("logs/daemon.log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("unknown variant `same`").count(), 1, "{text}");
    assert!(
        text.contains("the previous message was repeated 299 more time(s)"),
        "{text}"
    );
    // Distinct lines past the bound: the file is rotated while the daemon runs.
    for i in 0..200 {
        ask(&format!("{{\"v\":1,\"op\":\"op{i}\"}}\n"));
    }
    let rotated = fixture.state_dir.join("logs/daemon.log.1");
    assert!(rotated.exists());
    assert!(std::fs::metadata(&log).unwrap().len() <= 4096);
    assert!(std::fs::metadata(&rotated).unwrap().len() <= 4096);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("unknown variant `op199`")
    );
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
}

// --- Issue 10.6 and 10.8: protocol input. ---

#[test]
fn out_of_range_numbers_get_a_bad_request_naming_the_field_and_change_nothing() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let cases = [
        (
            "{\"v\":1,\"op\":\"stop\",\"timeoutMs\":18446744073709551615}\n",
            "`timeoutMs` of `stop` is 18446744073709551615, not a whole number in 0..=3600000",
        ),
        (
            "{\"v\":1,\"op\":\"connect\",\"port\":22,\"timeoutMs\":0}\n",
            "`timeoutMs` of `connect` is 0, not a whole number in 1..=86400000",
        ),
        (
            "{\"v\":1,\"op\":\"connect\",\"port\":0}\n",
            "`port` of `connect` is 0, not a whole number in 1..=4294967294",
        ),
        (
            "{\"v\":1,\"op\":\"start\",\"wait\":true,\"timeoutMs\":18446744073709552000}\n",
            "`timeoutMs` of `start` is 1.8446744073709552e+19, not a whole number in 1..=86400000",
        ),
    ];
    for (line, message) in cases {
        let reply = raw_reply(&fixture, line.as_bytes());
        assert_eq!(reply["code"], "bad-request", "{line}");
        assert_eq!(reply["message"], message, "{line}");
    }
    let report = status(&fixture);
    assert_eq!((report.state, report.boots), (VmState::Running, 1));
}

#[test]
fn a_stop_timeout_of_u64_max_neither_panics_nor_hangs_the_shutdown() {
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor_with(
        &fixture,
        ChildOptions {
            env: vec![("DVN_CHILD_STOP_TIMEOUT_SECS", u64::MAX.to_string())],
            ..Default::default()
        },
    );
    wait_answering(&fixture);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    // No timeoutMs: the supervisor's own (huge) stop timeout applies.
    let reply = raw_reply(&fixture, b"{\"v\":1,\"op\":\"stop\"}\n");
    assert_eq!(reply["reply"], "stopped", "{reply}");
    assert_eq!(reply["outcome"], "graceful", "{reply}");
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let t0 = Instant::now();
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success());
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let log = std::fs::read_to_string(fixture.state_dir.join("logs/daemon.log")).unwrap();
    assert!(log.contains("VM stop: Graceful"), "{log}");
}

#[test]
fn a_last_request_without_its_newline_is_answered() {
    use std::io::Read;
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let mut stream =
        std::os::unix::net::UnixStream::connect(fixture.state_dir.join("control.sock")).unwrap();
    stream.write_all(b"{\"v\":1,\"op\":\"status\"}").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let reply: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(reply["reply"], "status", "{text}");
    assert_eq!(reply["state"], "stopped");
}

#[test]
fn a_request_with_a_key_given_twice_is_refused_and_does_nothing() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let reply = raw_reply(
        &fixture,
        b"{\"v\":1,\"op\":\"stop\",\"force\":false,\"force\":true}\n",
    );
    assert_eq!(reply["code"], "bad-request");
    assert_eq!(
        reply["message"],
        "duplicate key `force` at line 1 column 40; send each field once"
    );
    assert_eq!(status(&fixture).state, VmState::Running);
}

// --- Issue 17.1: a session is its stream. ---

#[test]
fn a_session_ends_with_its_vm_even_when_its_stream_is_not_closed() {
    let fixture = Fixture::new();
    let idle = Duration::from_millis(400);
    let harness = Harness::start(
        &fixture,
        FakeVmBehaviour {
            streams_outlive_the_vm: true,
            ..Default::default()
        },
        Some(idle),
    );
    let mut client = ControlClient::connect(&fixture.state_dir).unwrap();
    let stream = client
        .connect_port(ECHO_PORT, Duration::from_secs(10))
        .unwrap();
    assert_eq!(status(&fixture).connections, 1);
    harness.vm.guest_poweroff();
    wait_for(
        Duration::from_secs(5),
        "the session to end with its VM",
        || {
            let report = status(&fixture);
            report.state == VmState::Stopped && report.connections == 0
        },
    );
    // Nothing of the old session keeps the next boot up: it idles off.
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    wait_for(Duration::from_secs(10), "the idle poweroff", || {
        vm_state(&fixture) == VmState::Stopped
    });
    assert_eq!(harness.vm.boots(), 2);
    drop(stream);
}

#[test]
fn a_stream_stays_counted_after_its_control_connection_is_half_closed() {
    use std::io::Read;
    let fixture = Fixture::new();
    let idle = Duration::from_millis(400);
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), Some(idle));
    let control =
        std::os::unix::net::UnixStream::connect(fixture.state_dir.join("control.sock")).unwrap();
    (&control)
        .write_all(b"{\"v\":1,\"op\":\"connect\",\"port\":22}\n")
        .unwrap();
    control.shutdown(std::net::Shutdown::Write).unwrap();
    let (reply, fd) = receive_with_fd(&control);
    assert!(reply.contains("\"reply\":\"connected\""), "{reply}");
    let mut guest = std::fs::File::from(fd.expect("the stream came with the reply"));
    let mut banner = [0u8; 8];
    guest.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    drop(control);

    std::thread::sleep(idle * 3);
    let report = status(&fixture);
    assert_eq!((report.state, report.connections), (VmState::Running, 1));

    shut_down(&guest);
    wait_state(&fixture, VmState::Stopped, Duration::from_secs(10));
}

// --- Issue 17.3: every catchable ending signal powers the guest off gracefully. ---

fn signal_stops_gracefully(which: Signal) {
    let fixture = Fixture::new();
    let mut child = spawn_child_supervisor(&fixture);
    wait_answering(&fixture);
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{which}: {}", stderr(&out));
    signal(&child, which);
    let status = child.wait().unwrap();
    assert!(status.success(), "{which}: {status}");
    let log = std::fs::read_to_string(fixture.state_dir.join("logs/daemon.log")).unwrap();
    assert!(
        log.contains(&format!("{which}: powering the VM off gracefully")),
        "{which}: {log}"
    );
    assert!(log.contains("VM stop: Graceful"), "{which}: {log}");
    let calls = std::fs::read_to_string(fixture.state_dir.join("fake-vm-calls.log")).unwrap();
    assert!(calls.contains("RequestStop 1 Done"), "{which}: {calls}");
    assert!(!calls.contains("ForceStop 1 Done"), "{which}: {calls}");
}

#[test]
fn sighup_powers_the_vm_off_gracefully_and_the_daemon_exits_0() {
    signal_stops_gracefully(Signal::SIGHUP);
}

#[test]
fn every_documented_stop_signal_powers_the_vm_off_gracefully() {
    let signals: Vec<Signal> = darwin_vz_nix::daemon::stop_signals()
        .into_iter()
        .filter(|s| *s != Signal::SIGHUP)
        .collect();
    for batch in signals.chunks(4) {
        let threads: Vec<_> = batch
            .iter()
            .map(|&which| std::thread::spawn(move || signal_stops_gracefully(which)))
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }
}

// --- Issue 17.4: measurement never disturbs work. ---

#[test]
fn bench_refuses_to_run_under_open_sessions_unless_forced() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let mut session = spawn_proxy(&fixture);
    assert!(first_line(&mut session).starts_with("SSH-2.0-"));
    assert_eq!(status(&fixture).connections, 1);

    for (args, name) in [
        (&["bench", "boot", "--runs", "1"][..], "bench boot"),
        (&["bench", "control", "--runs", "2"][..], "bench control"),
    ] {
        let out = fixture.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            stderr(&out),
            format!(
                "darwin-vz-nix: `{name}` forces the VM off between runs, and 1 session(s) are open (a build may be running); nothing was stopped. Wait until `darwin-vz-nix status` shows 0 connections, or pass --force to force the VM off under them\n"
            )
        );
    }
    let report = status(&fixture);
    assert_eq!((report.state, report.boots), (VmState::Running, 1));
    assert_eq!(harness.vm.boots(), 1, "the VM was never stopped");

    let out = fixture.cli(&["bench", "boot", "--runs", "1", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(harness.vm.boots(), 2);
    let _ = session.kill();
    let _ = session.wait();
}

// --- Issue 10.4: the control group may look and build, not destroy. ---

/// Runs only when re-executed by a test: sends `DVN_CLIENT_LINE` on the control
/// socket `DVN_CLIENT_SOCKET` (as whichever user runs it) and prints the reply.
#[test]
#[ignore = "helper process for other tests"]
fn child_client() {
    use std::io::{BufRead, BufReader};
    let Ok(socket) = std::env::var("DVN_CLIENT_SOCKET") else {
        return;
    };
    let line = std::env::var("DVN_CLIENT_LINE").unwrap();
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    println!("REPLY {}", reply.trim());
}

/// Throwaway accounts and groups, deleted on drop.
struct Accounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    fn new() -> Accounts {
        Accounts {
            users: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// `useradd` and friends lock /etc/passwd; other tests may hold the lock.
    fn run(program: &str, args: &[&str]) {
        for _ in 0..50 {
            let out = Command::new(program).args(args).output().unwrap();
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{program} {args:?} kept failing");
    }

    fn group(&mut self, name: String) -> u32 {
        Self::run("groupadd", &[&name]);
        self.groups.push(name.clone());
        nix::unistd::Group::from_name(&name)
            .unwrap()
            .unwrap()
            .gid
            .as_raw()
    }

    fn user(&mut self, name: String, group: &str) -> u32 {
        Self::run("useradd", &["-M", "-N", "-g", group, &name]);
        self.users.push(name.clone());
        nix::unistd::User::from_name(&name)
            .unwrap()
            .unwrap()
            .uid
            .as_raw()
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = Command::new("userdel").arg(user).status();
        }
        for group in &self.groups {
            let _ = Command::new("groupdel").arg(group).status();
        }
    }
}

#[test]
fn each_cell_of_the_authorization_table_holds_through_the_real_binary() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::getuid().is_root() {
        skipped(
            "each_cell_of_the_authorization_table_holds_through_the_real_binary",
            "needs root, to create throwaway accounts (useradd) and run the binary as them",
        );
        return;
    }
    let tag = format!("dvnt{}", std::process::id());
    let mut accounts = Accounts::new();
    let control_group = format!("{tag}g");
    let gid = accounts.group(control_group.clone());
    let outsiders = format!("{tag}h");
    let other_gid = accounts.group(outsiders.clone());
    let owner = accounts.user(format!("{tag}o"), &control_group);
    let member = accounts.user(format!("{tag}m"), &control_group);
    let outsider = accounts.user(format!("{tag}x"), &outsiders);

    // The daemon runs as `owner`, in a directory it owns; the others can traverse
    // to it and run copies of the binaries.
    let fixture = Fixture::new();
    let dir = fixture.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(dir, Some(owner.into()), Some(gid.into())).unwrap();
    let tests_exe = dir.join("supervisor-tests");
    std::fs::copy(std::env::current_exe().unwrap(), &tests_exe).unwrap();
    let cli_exe = dir.join("darwin-vz-nix");
    std::fs::copy(env!("CARGO_BIN_EXE_darwin-vz-nix"), &cli_exe).unwrap();
    let mut daemon = spawn_child_supervisor_with(
        &fixture,
        ChildOptions {
            env: vec![("DVN_CHILD_CONTROL_GROUP", control_group.clone())],
            exe: Some(tests_exe.clone()),
            user: Some((owner, gid)),
            ..Default::default()
        },
    );
    wait_answering(&fixture);
    let socket = fixture.state_dir.join("control.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.uid(), meta.gid()),
        (0o660, owner, gid)
    );

    let cli = |who: Option<(u32, u32)>, args: &[&str]| {
        let mut command = Command::new(&cli_exe);
        command
            .arg("--state-dir")
            .arg(&fixture.state_dir)
            .args(args)
            .env_remove("DARWIN_VZ_NIX_CONFIG")
            .env("DARWIN_VZ_NIX_GUEST", &fixture.guest_dir)
            .env("DARWIN_VZ_NIX_SSH_USER", "builder")
            .env("HOME", dir)
            .current_dir("/")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = who {
            command.uid(uid).gid(gid);
        }
        command.output().unwrap()
    };
    let as_member = Some((member, gid));
    let refused = |args: &[&str], op: &str| {
        let out = cli(as_member, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stdout(&out));
        assert!(
            stderr(&out).starts_with(&format!(
                "darwin-vz-nix: `{op}` is refused for uid {member}: only the daemon's user, {tag}o (uid {owner}), and root may"
            )),
            "{args:?}: {}",
            stderr(&out)
        );
    };

    // A member of the control group: status, start, connect, wait-ready…
    let out = cli(as_member, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli(as_member, &["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ready in "), "{}", stdout(&out));
    let mut proxy = Command::new(&cli_exe)
        .arg("--state-dir")
        .arg(&fixture.state_dir)
        .arg("proxy")
        .env("HOME", dir)
        .current_dir("/")
        .uid(member)
        .gid(gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
    drop(proxy.stdin.take());
    assert!(proxy.wait().unwrap().success());
    let out = Command::new(&tests_exe)
        .args(["--exact", "child_client", "--ignored", "--nocapture"])
        .env("DVN_CLIENT_SOCKET", &socket)
        .env(
            "DVN_CLIENT_LINE",
            "{\"v\":1,\"op\":\"wait-ready\",\"timeoutMs\":5000}\n",
        )
        .current_dir("/")
        .uid(member)
        .gid(gid)
        .output()
        .unwrap();
    let reply = stdout(&out);
    assert!(
        reply.contains("REPLY {\"v\":1,\"reply\":\"ready\""),
        "{reply}"
    );

    // …but never stop, end the supervisor, or reset state.
    refused(&["stop"], "stop");
    refused(&["stop", "--force"], "stop");
    refused(&["stop", "--daemon"], "stop --daemon");
    refused(&["destroy", "--yes"], "reset");
    refused(&["rotate-keys"], "reset");
    // The guest's clock setter runs as root there: not the group's to reach.
    refused(&["proxy", "--port", "1025"], "connect");
    // Asking for the bootstrap builder (the aarch64-linux alias) changes nothing.
    refused(
        &["proxy", "--port", "1025", "--alias", "darwin-vz-nix"],
        "connect",
    );
    assert!(fixture.state_dir.join("disk.img").exists());
    assert_eq!(status(&fixture).state, VmState::Running);

    // Anyone else: the socket's mode keeps them out.
    let out = cli(Some((outsider, other_gid)), &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("permission denied on the control socket"),
        "{}",
        stderr(&out)
    );

    // The daemon's own user: everything.
    let as_owner = Some((owner, gid));
    let out = cli(as_owner, &["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli(as_owner, &["rotate-keys"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Root: everything, down to ending the supervisor.
    let out = cli(None, &["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli(None, &["destroy", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli(None, &["stop", "--daemon"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(daemon.wait().unwrap().success());
    drop(accounts);
}

#[test]
fn at_most_max_clients_are_served_at_once_and_the_rest_wait_their_turn() {
    let fixture = Fixture::new();
    let mut options = fixture.options(None);
    options.max_clients = Some(2);
    options.request_timeout = Duration::from_millis(1500);
    let config = fixture.config(Default::default());
    let _harness = Harness::start_with(&fixture, config, FakeVmBehaviour::default(), options);
    let socket = fixture.state_dir.join("control.sock");
    // Give the supervisor a moment to have served the harness's own readiness check.
    std::thread::sleep(Duration::from_millis(100));
    let silent: Vec<std::os::unix::net::UnixStream> = (0..2)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "served at once ({waited:?}) although two clients held both places"
    );
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    drop(silent);
}

// ---- bounded backend calls (issue 14, part 1) ---------------------------------

/// The backend never calls back from `start` (VZ's completion handler that never
/// comes): the boot fails within the bound, the supervisor asks for that boot's VM
/// to go, and the daemon still shuts down at once.
#[test]
fn a_start_the_backend_never_finishes_fails_within_the_bound_and_the_daemon_still_exits() {
    use darwin_vz_nix::backend::BootId;
    let fixture = Fixture::new();
    let options = darwin_vz_nix::daemon::DaemonOptions {
        backend_timeout: Duration::from_secs(1),
        ..fixture.options(None)
    };
    let behaviour = FakeVmBehaviour {
        start_hangs: true,
        ..Default::default()
    };
    let harness = Harness::start_with(
        &fixture,
        fixture.config(Default::default()),
        behaviour,
        options,
    );

    let started = Instant::now();
    let out = fixture.cli(&["start", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).lines().last().unwrap(),
        "darwin-vz-nix: the VM backend did not confirm the start within 1 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let report = status(&fixture);
    assert_eq!(report.state, VmState::Failed);
    assert_eq!(
        report.last_error.as_deref(),
        Some("the VM backend did not confirm the start within 1 s")
    );
    wait_for(Duration::from_secs(10), "a stop of boot 1's VM", || {
        harness
            .vm
            .calls()
            .iter()
            .any(|c| c.op == Op::ForceStop && c.boot == BootId(1))
    });

    let shutdown = Instant::now();
    drop(harness);
    assert!(
        shutdown.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        shutdown.elapsed()
    );
}

/// A supervisor whose backend gives up after `backend_timeout`, with a running VM
/// whose forced stop the backend never confirms.
fn running_vm_whose_forced_stop_hangs(fixture: &Fixture, backend_timeout: Duration) -> Harness {
    let options = darwin_vz_nix::daemon::DaemonOptions {
        backend_timeout,
        ..fixture.options(None)
    };
    let harness = Harness::start_with(
        fixture,
        fixture.config(Default::default()),
        FakeVmBehaviour::default(),
        options,
    );
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    harness.vm.set_behaviour(FakeVmBehaviour {
        force_stop_hangs: true,
        ..Default::default()
    });
    harness
}

/// The backend never confirms a forced stop: `stop --force` fails within the bound
/// with the reason, the VM counts as failed (not "stopping" forever), and the
/// daemon's own shutdown is bounded too.
#[test]
fn a_forced_stop_the_backend_never_confirms_fails_within_the_bound_and_shutdown_does_not_hang() {
    let fixture = Fixture::new();
    let harness = running_vm_whose_forced_stop_hangs(&fixture, Duration::from_secs(1));

    let started = Instant::now();
    let out = fixture.cli(&["stop", "--force"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).lines().last().unwrap(),
        "darwin-vz-nix: the VM backend did not confirm the stop within 1 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status(&fixture).state, VmState::Failed);

    let shutdown = Instant::now();
    drop(harness);
    assert!(
        shutdown.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        shutdown.elapsed()
    );
}

/// The guest powers itself off while the backend still has not confirmed a forced
/// stop: the stop reports the backend's silence, but the VM is stopped, not failed.
#[test]
fn a_guest_that_powers_off_during_an_unconfirmed_forced_stop_counts_as_stopped() {
    let fixture = Fixture::new();
    let harness = running_vm_whose_forced_stop_hangs(&fixture, Duration::from_secs(2));
    let stop = fixture.cli_in_background(&["stop", "--force"]);
    wait_state(&fixture, VmState::Stopping, Duration::from_secs(10));
    harness.vm.guest_poweroff();
    wait_state(&fixture, VmState::Stopped, Duration::from_secs(10));

    let out = stop.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = status(&fixture);
    assert_eq!((report.state, report.last_error), (VmState::Stopped, None));
}

/// The guest crashes while it powers off: `stop` says so instead of "stopped".
#[test]
fn a_vm_that_fails_during_a_graceful_stop_makes_the_stop_fail_with_the_reason() {
    let fixture = Fixture::new();
    let harness = Harness::start(
        &fixture,
        FakeVmBehaviour {
            ignore_graceful_stop: true,
            ..Default::default()
        },
        None,
    );
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let stop = fixture.cli_in_background(&["stop", "--timeout", "60"]);
    wait_state(&fixture, VmState::Stopping, Duration::from_secs(10));
    harness.vm.crash("the hypervisor fell over");

    let out = stop.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the hypervisor fell over"),
        "{}",
        stderr(&out)
    );
    assert_eq!(status(&fixture).state, VmState::Failed);
}

/// The boot's probe reaches the guest's sshd only after a stop began (VZ's
/// `connectToPort` takes its time): the stop wins, and the VM is not marked running.
#[test]
fn a_probe_that_succeeds_after_a_stop_began_does_not_mark_the_vm_running() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        listen_delay: Duration::ZERO,
        accept_delay: Duration::from_millis(1500),
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start", "--no-wait"]).status.code(), Some(0));
    wait_for(Duration::from_secs(10), "the VM to start", || {
        harness.vm.boots() == 1
    });
    // The probe is now waiting for its connection.
    std::thread::sleep(Duration::from_millis(300));
    let out = fixture.cli(&["stop", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Long enough for the probe's connection to be made and its banner read.
    std::thread::sleep(Duration::from_secs(3));
    let report = status(&fixture);
    assert_eq!((report.state, report.boots), (VmState::Stopped, 1));
}

/// A stop arrives while the backend is still starting the VM, and the start then
/// fails: the stop took over, so the VM ends stopped, not failed with the late error.
#[test]
fn a_start_that_fails_after_a_stop_took_over_leaves_the_vm_stopped() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        boot_delay: Duration::from_millis(1500),
        fail_boot: Some("the late failure".into()),
        ..Default::default()
    };
    let _harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start", "--no-wait"]).status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(&fixture).state, VmState::Starting);
    let out = fixture.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = status(&fixture);
    assert_eq!((report.state, report.last_error), (VmState::Stopped, None));
}

// ---- nested virtualization: what the guest says, and what Nix is told ----------

/// A Mac with nested virtualization (an M3 or later with macOS 15), as VZ would
/// describe it.
fn mac_with_nested_virtualization() -> darwin_vz_nix::host::HostInfo {
    darwin_vz_nix::host::HostInfo {
        macos_version: Some((15, 2)),
        nested_virtualization: Some(true),
        ..darwin_vz_nix::host::HostInfo::detect()
    }
}

/// The builder's line as root's `darwin-vz-nix machines` makes it on `host`, and
/// the warnings it prints.
fn machines_line(
    config: &darwin_vz_nix::config::Config,
    host: &darwin_vz_nix::host::HostInfo,
) -> (String, Vec<String>) {
    use darwin_vz_nix::machines::{MachineLine, nested_facts};
    let state = darwin_vz_nix::state::StateDir::new(&config.state_dir);
    let (facts, warnings) = nested_facts(config, host, &state);
    (
        MachineLine::new(config, &state, &facts).to_string(),
        warnings,
    )
}

fn guest_report(fixture: &Fixture) -> Option<darwin_vz_nix::nested::GuestReport> {
    let state = darwin_vz_nix::state::StateDir::new(&fixture.state_dir);
    darwin_vz_nix::nested::read_report(&state.guest_report()).unwrap()
}

/// The whole path, end to end: a boot with nested virtualization whose guest says
/// it has no /dev/kvm is reported loudly (status, the daemon's log), recorded in the
/// state directory, and the line root writes for Nix loses kvm and nixos-test; the
/// next boot's guest has /dev/kvm, and they come back.
#[test]
fn a_guest_without_dev_kvm_is_said_loudly_and_its_report_takes_kvm_out_of_the_machines_line() {
    use darwin_vz_nix::nested::{Kvm, NestedVirtualization};
    let fixture = Fixture::new();
    let mac = mac_with_nested_virtualization();
    let config = fixture.config(darwin_vz_nix::config::ConfigLayer {
        nested_virtualization: Some(NestedVirtualization::On),
        ..Default::default()
    });

    // Before any boot, root offers what the setting and the Mac give.
    let (line, warnings) = machines_line(&config, &mac);
    assert!(
        line.contains(" benchmark,big-parallel,kvm,nixos-test - -"),
        "{line}"
    );
    assert!(warnings.is_empty(), "{warnings:?}");

    let behaviour = FakeVmBehaviour {
        guest_kvm: Some(false),
        ..Default::default()
    };
    let harness = Harness::start_on(
        &fixture,
        config.clone(),
        behaviour,
        fixture.options(None),
        mac.clone(),
    );
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    wait_for(Duration::from_secs(15), "the guest report", || {
        guest_report(&fixture).is_some()
    });
    let report = guest_report(&fixture).unwrap();
    assert_eq!(
        (report.boot, report.nested_virtualization, report.kvm),
        (1, true, Kvm::Absent)
    );
    assert_eq!(report.kernel.as_deref(), Some("6.12.5"));

    let loud = "nested virtualization is on, but the guest of boot 1 (Linux 6.12.5) has no /dev/kvm: kvm and nixos-test are not offered to Nix";
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains(&format!("nested virt   on: WARNING — {loud}")),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&fixture.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["guestReport"]["kvm"], "absent");
    assert_eq!(json["guestReport"]["nestedVirtualization"], true);
    assert_eq!(json["config"]["nestedVirtualization"], "on");
    // Noted as a warning: logged (daemon.log in the real daemon) and kept for status.
    let notices = json["notices"].as_array().unwrap();
    assert!(
        notices
            .iter()
            .any(|n| n["message"].as_str().unwrap().starts_with(loud)),
        "{notices:?}"
    );

    let (line, warnings) = machines_line(&config, &mac);
    assert!(line.contains(" benchmark,big-parallel - -"), "{line}");
    assert!(!line.contains("kvm"), "{line}");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with(loud), "{warnings:?}");

    // The next boot's guest has /dev/kvm: the report says so and kvm is back.
    harness.vm.set_behaviour(FakeVmBehaviour {
        guest_kvm: Some(true),
        ..Default::default()
    });
    assert_eq!(fixture.cli(&["stop"]).status.code(), Some(0));
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    wait_for(Duration::from_secs(15), "boot 2's report", || {
        guest_report(&fixture).is_some_and(|r| r.boot == 2)
    });
    assert_eq!(guest_report(&fixture).unwrap().kvm, Kvm::Present);
    let (line, warnings) = machines_line(&config, &mac);
    assert!(
        line.contains(" benchmark,big-parallel,kvm,nixos-test - -"),
        "{line}"
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains("nested virt   on: on for boot 2; the guest has /dev/kvm (Linux 6.12.5): kvm and nixos-test are offered"),
        "{text}"
    );
}

/// A lazy guest (`guestDrv`/`guestOut`, what the nix-darwin module passes) has no
/// kernel to read until the daemon builds it: under `auto`, root's line offers kvm
/// and nixos-test only once `guestOut` exists with a kernel KVM can use (the line
/// root writes again after the first boot's report).
#[test]
fn the_machines_line_reads_a_lazy_guests_kernel_once_its_output_is_built() {
    let fixture = Fixture::new();
    let mac = mac_with_nested_virtualization();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    let config = fixture.lazy_config(&guest, Default::default());

    let (line, warnings) = machines_line(&config, &mac);
    assert!(line.contains(" benchmark,big-parallel - -"), "{line}");
    assert!(!line.contains("kvm"), "not built yet: {line}");
    assert!(warnings.is_empty(), "{warnings:?}");

    darwin_vz_nix::artifacts::write_fake_guest(&guest.out, "").unwrap();
    let mut kernel = std::fs::read(guest.out.join("kernel")).unwrap();
    kernel.extend_from_slice(b"Linux version 6.12.5 (nixbld@localhost) #1-NixOS SMP\n");
    std::fs::write(guest.out.join("kernel"), kernel).unwrap();
    let (line, warnings) = machines_line(&config, &mac);
    assert!(
        line.contains(" benchmark,big-parallel,kvm,nixos-test - -"),
        "built, Linux 6.12.5: {line}"
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// The guest says whether it has /dev/kvm only a moment after its sshd answered
/// (its console is slow): the supervisor keeps reading until it does.
#[test]
fn a_guest_that_says_late_whether_it_has_kvm_is_still_heard() {
    use darwin_vz_nix::nested::Kvm;
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        guest_kvm: None,
        ..Default::default()
    };
    let _harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        guest_report(&fixture),
        None,
        "nothing said, nothing recorded"
    );
    let line = format!(
        "{} present (Linux 6.12.5)\r\n",
        darwin_vz_nix::contract::CONSOLE_MARKER_KVM
    );
    let mut console = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(fixture.state_dir.join("logs/console.log"))
        .unwrap();
    std::io::Write::write_all(&mut console, line.as_bytes()).unwrap();
    wait_for(Duration::from_secs(8), "the guest report", || {
        guest_report(&fixture).is_some()
    });
    assert_eq!(guest_report(&fixture).unwrap().kvm, Kvm::Present);
}

/// A guest that never says whether it has /dev/kvm (one built without kvm.nix) is
/// "unknown" after the wait, and unknown is not offered; a boot without nested
/// virtualization (auto, and a guest kernel whose version cannot be read) reports
/// that too, and its report takes nothing away from a later decision.
#[test]
fn a_guest_that_never_says_is_unknown_and_not_offered_and_a_boot_without_nesting_takes_nothing_away()
 {
    use darwin_vz_nix::nested::{Kvm, NestedVirtualization};
    let fixture = Fixture::new();
    let mac = mac_with_nested_virtualization();
    let config = fixture.config(darwin_vz_nix::config::ConfigLayer {
        nested_virtualization: Some(NestedVirtualization::On),
        ..Default::default()
    });
    let options = darwin_vz_nix::daemon::DaemonOptions {
        guest_report_wait: Duration::from_millis(500),
        ..fixture.options(None)
    };
    let behaviour = FakeVmBehaviour {
        guest_kvm: None,
        ..Default::default()
    };
    let harness = Harness::start_on(&fixture, config.clone(), behaviour, options, mac.clone());
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    wait_for(Duration::from_secs(15), "the guest report", || {
        guest_report(&fixture).is_some()
    });
    assert_eq!(guest_report(&fixture).unwrap().kvm, Kvm::Unknown);
    let (line, warnings) = machines_line(&config, &mac);
    assert!(!line.contains("kvm"), "{line}");
    assert!(
        warnings[0].contains("did not say whether it has /dev/kvm"),
        "{warnings:?}"
    );
    drop(harness);

    // auto: the fake guest's kernel has no readable version, so this boot runs
    // without nested virtualization; its report says so and removes nothing.
    std::fs::remove_file(fixture.state_dir.join("guest-report.json")).unwrap();
    let auto = fixture.config(Default::default());
    let behaviour = FakeVmBehaviour {
        guest_kvm: Some(false),
        ..Default::default()
    };
    let _harness = Harness::start_on(
        &fixture,
        auto.clone(),
        behaviour,
        fixture.options(None),
        mac.clone(),
    );
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    wait_for(Duration::from_secs(15), "the guest report", || {
        guest_report(&fixture).is_some()
    });
    let report = guest_report(&fixture).unwrap();
    assert_eq!(
        (report.nested_virtualization, report.kvm),
        (false, Kvm::Absent)
    );
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains("nested virt   auto: off for boot 1; kvm and nixos-test are not offered"),
        "{text}"
    );
    // Asked for with `on`, root would offer kvm again: a report from a boot without
    // nested virtualization says nothing about one with it.
    let (line, warnings) = machines_line(&config, &mac);
    assert!(line.contains(",kvm,nixos-test "), "{line}");
    assert!(warnings.is_empty(), "{warnings:?}");
}
