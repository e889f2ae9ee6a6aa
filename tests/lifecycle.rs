//! The VM's lifecycle as the README promises it, through the real binary against the
//! real supervisor with the fake VM of tests/support: `start --no-wait`/`--json`,
//! `stop --json`/`--timeout`, one stop shared by concurrent requests, the idle
//! poweroff in minutes and its countdown in `status`, the forced stop after
//! `stopTimeout` on idle, `wait-ready`, `bench`, and `ssh -l`.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use darwin_vz_nix::config::ConfigLayer;
use darwin_vz_nix::control::protocol::{ErrorCode, Reply, Request, VmState};
use darwin_vz_nix::control::{ClientError, ControlClient};
use darwin_vz_nix::daemon::DaemonOptions;
use support::*;

fn json(out: &std::process::Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

/// The number after `label` in `text` (`"plan built after 0.05 s"` → 0.05).
fn number_after(text: &str, label: &str) -> f64 {
    let rest = text
        .split_once(label)
        .unwrap_or_else(|| panic!("{label:?} is not in {text:?}"))
        .1;
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Checks a boot line: `ready in X s (plan built after A s, VM started after B s,
/// guest sshd answered C s later)`, with A ≤ B ≤ X.
fn assert_boot_line(line: &str) {
    assert!(line.starts_with("ready in "), "{line}");
    let ready = number_after(line, "ready in ");
    let planned = number_after(line, "plan built after ");
    let started = number_after(line, "VM started after ");
    let answered = number_after(line, "guest sshd answered ");
    assert!(line.ends_with(" s later)"), "{line}");
    assert!(
        planned <= started && started <= ready + 0.05 && answered >= 0.0,
        "{line}"
    );
}

#[test]
fn start_no_wait_returns_while_the_vm_boots_and_json_says_which_state() {
    let fixture = Fixture::new();
    // The guest's sshd answers 5 s after its VM starts: `--no-wait` must not wait.
    let behaviour = FakeVmBehaviour {
        listen_delay: Duration::from_secs(5),
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);

    let out = fixture.cli(&["start", "--no-wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "booting; `darwin-vz-nix status` shows when it is ready\n"
    );
    assert_eq!(status(&fixture).state, VmState::Starting, "not yet ready");
    let out = fixture.cli(&["start", "--no-wait", "--json"]);
    assert_eq!(json(&out), serde_json::json!({ "state": "starting" }));

    wait_for(Duration::from_secs(20), "the boot to finish", || {
        status(&fixture).state == VmState::Running
    });
    let out = fixture.cli(&["start", "--no-wait"]);
    assert_eq!(stdout(&out), "already running\n");
    let out = fixture.cli(&["start", "--no-wait", "--json"]);
    assert_eq!(json(&out), serde_json::json!({ "state": "running" }));
    assert_eq!(
        harness.vm.boots(),
        1,
        "the second --no-wait joined the boot"
    );
}

#[test]
fn start_and_status_report_when_the_plan_was_built_and_json_carries_the_timing() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);

    let out = fixture.cli(&["start", "--json"]);
    let report = json(&out);
    assert_eq!(report["state"], "running");
    assert_eq!(report["alreadyRunning"], false);
    let boot = &report["boot"];
    let (planned, started, ready) = (
        boot["plannedSecs"].as_f64().unwrap(),
        boot["vmStartedSecs"].as_f64().unwrap(),
        boot["readySecs"].as_f64().unwrap(),
    );
    assert!(
        0.0 < planned && planned <= started && started <= ready,
        "{boot}"
    );

    let out = fixture.cli(&["start", "--json"]);
    let again = json(&out);
    assert_eq!(again["alreadyRunning"], true);
    assert_eq!(again["boot"], *boot, "the same boot's timing");

    // The human forms: `start` on a stopped VM, and `status`'s "last boot".
    assert_eq!(fixture.cli(&["stop"]).status.code(), Some(0));
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_boot_line(stdout(&out).trim_end());
    let out = fixture.cli(&["status"]);
    let text = stdout(&out);
    let last_boot = text
        .lines()
        .find_map(|l| l.strip_prefix("last boot     "))
        .unwrap_or_else(|| panic!("{text}"));
    assert_boot_line(last_boot);
}

#[test]
fn stop_json_reports_each_outcome_and_whether_the_daemon_exited() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    assert_eq!(
        json(&fixture.cli(&["stop", "--json"])),
        serde_json::json!({ "outcome": "graceful", "daemonExited": false })
    );
    assert_eq!(
        json(&fixture.cli(&["stop", "--json"])),
        serde_json::json!({ "outcome": "already-stopped", "daemonExited": false })
    );
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    assert_eq!(
        json(&fixture.cli(&["stop", "--force", "--json"])),
        serde_json::json!({ "outcome": "forced", "daemonExited": false })
    );
    assert_eq!(
        json(&fixture.cli(&["stop", "--daemon", "--json"])),
        serde_json::json!({ "outcome": "already-stopped", "daemonExited": true })
    );
    drop(harness);
    assert_eq!(
        json(&fixture.cli(&["stop", "--json"])),
        serde_json::json!({ "outcome": "not-running" })
    );
}

#[test]
fn stop_timeout_is_the_supervisors_wait_for_the_guest() {
    let fixture = Fixture::new();
    // The guest ignores the power button, and the supervisor's own stopTimeout is
    // 30 s: only a `--timeout` that reaches it makes the stop quick.
    let behaviour = FakeVmBehaviour {
        ignore_graceful_stop: true,
        ..Default::default()
    };
    let mut options = fixture.options(None);
    options.stop_timeout = Duration::from_secs(30);
    let config = fixture.config(ConfigLayer::default());
    let harness = Harness::start_with(&fixture, config, behaviour, options);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));

    let t0 = Instant::now();
    let out = fixture.cli(&["stop", "--timeout", "1"]);
    let took = t0.elapsed();
    assert_eq!(
        stdout(&out),
        "stopped (forced: the guest did not power off within 1 s)\n",
        "{}",
        stderr(&out)
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(15),
        "stop --timeout 1 took {took:?}"
    );
    let ops: Vec<Op> = harness.vm.calls().iter().map(|c| c.op).collect();
    assert_eq!(ops, [Op::Start, Op::RequestStop, Op::ForceStop]);
}

#[test]
fn concurrent_stops_share_one_stop() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        ignore_graceful_stop: true,
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));

    let spawn_stop = || {
        fixture
            .cli_command(&["stop", "--timeout", "3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn_stop();
    wait_for(Duration::from_secs(10), "the first stop to begin", || {
        status(&fixture).state == VmState::Stopping
    });
    let second = spawn_stop();
    let third = spawn_stop();
    for stop in [first, second, third] {
        let out = stop.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert_eq!(status(&fixture).state, VmState::Stopped);
    let ops: Vec<Op> = harness.vm.calls().iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        [Op::Start, Op::RequestStop, Op::ForceStop],
        "one power-button press and one forced stop for three requests"
    );
}

#[test]
fn the_idle_timeout_is_in_minutes_and_status_counts_it_down() {
    let fixture = Fixture::new();
    let config = fixture.config(ConfigLayer {
        idle_timeout: Some(2),
        stop_timeout: Some(7),
        ..Default::default()
    });
    // What `darwin-vz-nix daemon` runs with, from the configuration.
    let mut options = DaemonOptions::from_config(&config);
    assert_eq!(options.idle_timeout, Some(Duration::from_secs(120)));
    assert_eq!(options.stop_timeout, Duration::from_secs(7));
    assert_eq!(
        options.boot_timeout,
        Duration::from_secs(120),
        "the README's boot deadline"
    );
    let never = fixture.config(ConfigLayer {
        idle_timeout: Some(0),
        ..Default::default()
    });
    assert_eq!(DaemonOptions::from_config(&never).idle_timeout, None);

    options.host_store = fixture.dir.path().to_path_buf();
    options.handle_signals = false;
    let _harness = Harness::start_with(&fixture, config, FakeVmBehaviour::default(), options);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));

    // Running with no session: the clock runs, from 2 minutes down.
    let remaining =
        |fixture: &Fixture| json(&fixture.cli(&["status", "--json"]))["idleRemainingSecs"].as_f64();
    let left = remaining(&fixture).expect("the idle clock runs");
    assert!((100.0..=120.0).contains(&left), "{left} s left");
    let text = stdout(&fixture.cli(&["status"]));
    let idle = text
        .lines()
        .find_map(|l| l.strip_prefix("idle          "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        idle.starts_with("power off in 1 min ") && idle.ends_with(" s unless a connection opens"),
        "{idle}"
    );

    // A session stops the clock; its end starts it again from the top.
    std::thread::sleep(Duration::from_millis(1100));
    let mut proxy = spawn_proxy(&fixture);
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
    assert_eq!(remaining(&fixture), None);
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains("idle          after the last connection closes, plus 2 min\n"),
        "{text}"
    );
    drop(proxy.stdin.take());
    assert!(proxy.wait().unwrap().success());
    wait_for(Duration::from_secs(10), "the idle clock to restart", || {
        remaining(&fixture).is_some()
    });
    let left = remaining(&fixture).unwrap();
    assert!(
        (110.0..=120.0).contains(&left),
        "{left} s left after restart"
    );
    assert_eq!(status(&fixture).state, VmState::Running);
}

#[test]
fn an_idle_poweroff_is_forced_after_the_stop_timeout_when_the_guest_ignores_it() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        ignore_graceful_stop: true,
        ..Default::default()
    };
    let mut options = fixture.options(Some(Duration::from_millis(300)));
    options.stop_timeout = Duration::from_secs(1);
    let config = fixture.config(ConfigLayer::default());
    let harness = Harness::start_with(&fixture, config, behaviour, options);

    let mut proxy = spawn_proxy(&fixture);
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
    // The session ends after this instant, so the idle clock starts after it too.
    let closed = Instant::now();
    drop(proxy.stdin.take());
    assert!(proxy.wait().unwrap().success());
    wait_for(Duration::from_secs(15), "the idle poweroff", || {
        status(&fixture).state == VmState::Stopped
    });
    let took = closed.elapsed();
    assert!(
        took >= Duration::from_millis(1300),
        "idle 0.3 s + stopTimeout 1 s, but stopped after {took:?}"
    );
    let ops: Vec<Op> = harness.vm.calls().iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        [Op::Start, Op::RequestStop, Op::ForceStop],
        "the power button first, the plug after stopTimeout"
    );
    assert_eq!(status(&fixture).last_error, None);
}

#[test]
fn wait_ready_waits_for_a_boot_without_starting_one() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        listen_delay: Duration::from_millis(1500),
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);
    let wait_ready = |timeout_ms: u64| {
        ControlClient::connect(&fixture.state_dir).unwrap().call(
            Request::WaitReady {
                timeout_ms: Some(timeout_ms),
            },
            Duration::from_secs(60),
        )
    };

    // A stopped VM stays stopped: wait-ready times out after its timeoutMs.
    let t0 = Instant::now();
    match wait_ready(500) {
        Err(ClientError::Remote {
            code: ErrorCode::Timeout,
            message,
        }) => assert_eq!(
            message,
            "timed out after 500 ms waiting for the VM to become ready"
        ),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(500));
    let report = status(&fixture);
    assert_eq!((report.state, report.boots), (VmState::Stopped, 0));
    assert_eq!(harness.vm.boots(), 0);

    // During a boot someone else asked for, it returns once the guest answers.
    assert_eq!(fixture.cli(&["start", "--no-wait"]).status.code(), Some(0));
    match wait_ready(30_000) {
        Ok(Reply::Ready { boot: Some(boot) }) => assert!(boot.ready_secs >= 1.5, "{boot:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(status(&fixture).state, VmState::Running);

    // On a running VM, at once; and it never started a boot of its own.
    let t0 = Instant::now();
    assert!(matches!(wait_ready(30_000), Ok(Reply::Ready { .. })));
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(harness.vm.boots(), 1);
}

#[test]
fn wait_ready_on_a_failed_boot_answers_at_once_with_the_failure() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        fail_boot: Some("no VM today".into()),
        ..Default::default()
    };
    let _harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(1));
    assert_eq!(status(&fixture).state, VmState::Failed);

    let t0 = Instant::now();
    let answer = ControlClient::connect(&fixture.state_dir).unwrap().call(
        Request::WaitReady {
            timeout_ms: Some(30_000),
        },
        Duration::from_secs(60),
    );
    match answer {
        Err(ClientError::Remote {
            code: ErrorCode::BootFailed,
            message,
        }) => assert!(message.contains("no VM today"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn a_stop_unless_in_use_is_refused_while_a_session_is_open_and_a_plain_stop_is_not() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let stop_unless_in_use = || {
        ControlClient::connect(&fixture.state_dir).unwrap().call(
            Request::Stop {
                force: false,
                timeout_ms: None,
                exit: false,
                unless_in_use: true,
            },
            Duration::from_secs(30),
        )
    };
    let mut session = spawn_proxy(&fixture);
    assert!(first_line(&mut session).starts_with("SSH-2.0-"));
    assert_eq!(status(&fixture).connections, 1);

    match stop_unless_in_use() {
        Err(ClientError::Remote {
            code: ErrorCode::Busy,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(status(&fixture).state, VmState::Running);

    drop(session.stdin.take());
    session.wait().unwrap();
    wait_for(Duration::from_secs(10), "the session to end", || {
        status(&fixture).connections == 0
    });
    assert!(matches!(stop_unless_in_use(), Ok(Reply::Stopped { .. })));
    assert_eq!(status(&fixture).state, VmState::Stopped);

    // A plain stop does not ask: it stops the VM under an open session.
    let mut session = spawn_proxy(&fixture);
    assert!(first_line(&mut session).starts_with("SSH-2.0-"));
    let out = fixture.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(status(&fixture).state, VmState::Stopped);
    assert_eq!(harness.vm.boots(), 2);
    drop(session.stdin.take());
    session.wait().unwrap();
}

#[test]
fn bench_prints_min_median_max_over_the_runs_asked_for() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let out = fixture.cli(&["bench", "boot", "--runs", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "cold boots against the supervisor of {} (3 runs)…",
            fixture.state_dir.display()
        )
    );
    for (line, label) in lines[1..].iter().zip(["VM started", "guest sshd ready"]) {
        assert!(line.starts_with(label), "{text}");
        assert!(
            line.contains(" min ") && line.contains("  median "),
            "{line}"
        );
        assert!(line.ends_with("  (3 runs)"), "{line}");
    }
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(harness.vm.boots(), 3, "three cold boots");

    let out = fixture.cli(&["bench", "control", "--runs", "80"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("control round-trip (status)   min ")
            && lines[0].ends_with("  (80 runs)"),
        "{text}"
    );
    // A fortieth as many cold connects: 2.
    assert!(
        lines[1].starts_with("connect on a stopped VM to first guest byte   min ")
            && lines[1].ends_with("  (2 runs)"),
        "{text}"
    );
    assert_eq!(harness.vm.boots(), 5);
}

#[test]
fn ssh_l_logs_in_as_the_user_given() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let me = current_user();
    let out = fixture.cli(&["ssh", "-l", &me, "--", "id", "-un"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{me}\n"));

    // The configured user (this one) would get in; the one given must be tried.
    let out = fixture.cli(&["ssh", "-l", "dvn-no-such-user", "--", "true"]);
    assert_eq!(out.status.code(), Some(255), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("dvn-no-such-user@darwin-vz-nix: Permission denied"),
        "{}",
        stderr(&out)
    );
}

/// Inodes of the sockets `pid` holds open.
#[cfg(target_os = "linux")]
fn socket_inodes(pid: u32) -> std::collections::BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?.to_string();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Inodes of every TCP, UDP and raw IP socket in this network namespace.
#[cfg(target_os = "linux")]
fn ip_socket_inodes() -> std::collections::BTreeSet<u64> {
    ["tcp", "tcp6", "udp", "udp6", "raw", "raw6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/self/net/{table}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| line.split_whitespace().nth(9)?.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn neither_the_supervisor_nor_the_proxy_opens_a_tcp_or_udp_socket() {
    let fixture = Fixture::new();
    // The supervisor runs in this test process; the proxy in its own.
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let mut proxy = spawn_proxy(&fixture);
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
    assert_eq!(status(&fixture).connections, 1);

    let ours = socket_inodes(std::process::id());
    let the_proxys = socket_inodes(proxy.id());
    assert!(
        !ours.is_empty() && !the_proxys.is_empty(),
        "both hold sockets (the control socket, the guest stream)"
    );
    let ip = ip_socket_inodes();
    assert!(
        ours.is_disjoint(&ip),
        "the supervisor's process holds an IP socket"
    );
    assert!(the_proxys.is_disjoint(&ip), "the proxy holds an IP socket");
    drop(proxy.stdin.take());
    assert!(proxy.wait().unwrap().success());
}

#[test]
fn control_clients_served_at_once_are_a_quarter_of_the_descriptor_limit_from_16_to_1024() {
    use darwin_vz_nix::control::server::ServerOptions;
    use darwin_vz_nix::state::Access;
    let served = |open_files: u64| ServerOptions::for_limit(Access::OwnerOnly, open_files);
    assert_eq!(served(256).max_clients, 64, "a macOS shell's 256");
    assert_eq!(served(10_240).max_clients, 1024, "at most 1024");
    assert_eq!(served(4_000).max_clients, 1000);
    assert_eq!(served(40).max_clients, 16, "at least 16");
    assert_eq!(served(u64::MAX).max_clients, 1024);
    assert_eq!(
        served(256).request_timeout,
        Duration::from_secs(5),
        "the README's 5 s for a request line"
    );
}
