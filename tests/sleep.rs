//! Builds survive the laptop: the real supervisor (`daemon::serve`) with a fake VM and
//! a fake host power manager (`tests/support`), driven by the real binary.
//!
//! * the power assertion follows the build connections: taken on the first, renamed
//!   as they come and go, released on the last close, when the VM stops and when the
//!   supervisor exits; never taken with `preventSleep = false`;
//! * the guest's clock is set from the host's at every boot and after every wake of
//!   the host, to a running guest only (the fake guest's port 1025 records what it
//!   received).

mod support;

use std::process::Child;
use std::time::{Duration, SystemTime};

use darwin_vz_nix::config::ConfigLayer;
use darwin_vz_nix::control::protocol::VmState;
use support::*;

/// A proxied connection that has reached the guest's sshd; open until dropped.
struct Connection(Child);

impl Connection {
    fn open(fixture: &Fixture) -> Connection {
        let mut proxy = spawn_proxy(fixture);
        assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
        Connection(proxy)
    }

    fn close(mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_held(harness: &Harness, held: Option<&str>) {
    wait_for(
        Duration::from_secs(10),
        &format!("the assertion {held:?}"),
        || harness.power.held().as_deref() == held,
    );
}

const ONE: &str = "darwin-vz-nix: 1 Linux build connection";
const TWO: &str = "darwin-vz-nix: 2 Linux build connections";

#[test]
fn the_assertion_is_taken_on_the_first_connection_kept_across_overlapping_ones_and_released_on_the_last_close()
 {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    // A booted VM with no connection keeps nothing awake.
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    assert_eq!(harness.power.held(), None);

    let first = Connection::open(&fixture);
    wait_held(&harness, Some(ONE));
    let second = Connection::open(&fixture);
    wait_held(&harness, Some(TWO));

    let report = status(&fixture);
    let sleep = report.sleep.expect("status reports the assertion");
    assert!(sleep.enabled);
    let assertion = sleep.assertion.expect("held");
    assert_eq!(assertion.reason, TWO);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 60.0..=now).contains(&assertion.since_unix_secs),
        "held since the first connection: {assertion:?}"
    );
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains("sleep         idle sleep prevented for "),
        "{text}"
    );
    assert!(text.contains(&format!("\"{TWO}\"")), "{text}");

    first.close();
    wait_held(&harness, Some(ONE));
    second.close();
    wait_held(&harness, None);

    // Renamed as the count changed, never let go in between.
    assert_eq!(
        harness.power.calls(),
        [
            PowerCall::Hold(ONE.into()),
            PowerCall::Hold(TWO.into()),
            PowerCall::Hold(ONE.into()),
            PowerCall::Release,
        ]
    );
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains("sleep         the Mac may idle-sleep (no build connection open)\n"),
        "{text}"
    );
}

#[test]
fn the_assertion_is_released_when_the_vm_stops_under_an_open_connection() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let connection = Connection::open(&fixture);
    wait_held(&harness, Some(ONE));

    let out = fixture.cli(&["stop", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    wait_held(&harness, None);
    assert_eq!(harness.power.calls().last(), Some(&PowerCall::Release));
    assert_eq!(status(&fixture).state, VmState::Stopped);
    drop(connection);
}

#[test]
fn the_assertion_is_released_when_the_supervisor_exits() {
    let fixture = Fixture::new();
    let mut harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let connection = Connection::open(&fixture);
    wait_held(&harness, Some(ONE));

    harness.shut_down();
    assert_eq!(harness.power.held(), None);
    let calls = harness.power.calls();
    assert_eq!(calls, [PowerCall::Hold(ONE.into()), PowerCall::Release]);
    drop(connection);
}

#[test]
fn prevent_sleep_false_never_takes_the_assertion() {
    let fixture = Fixture::new();
    let config = fixture.config(ConfigLayer {
        prevent_sleep: Some(false),
        ..Default::default()
    });
    let harness = Harness::start_with(
        &fixture,
        config,
        FakeVmBehaviour::default(),
        fixture.options(None),
    );
    let first = Connection::open(&fixture);
    let second = Connection::open(&fixture);
    wait_for(Duration::from_secs(10), "two sessions", || {
        status(&fixture).connections == 2
    });
    let sleep = status(&fixture).sleep.unwrap();
    assert!(!sleep.enabled);
    assert_eq!(sleep.assertion, None);
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains(
            "sleep         the Mac may idle-sleep during builds (preventSleep = false)\n"
        ),
        "{text}"
    );
    first.close();
    second.close();
    assert_eq!(harness.power.calls(), []);
}

/// The seconds of a `DVN-TIME 1 <seconds>.<nanoseconds>` line.
fn request_seconds(line: &str) -> u64 {
    let time = line
        .strip_prefix("DVN-TIME 1 ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("not a clock request: {line:?}"));
    let (secs, nanos) = time.split_once('.').unwrap();
    assert_eq!(nanos.len(), 9, "{line:?}");
    assert!(nanos.bytes().all(|b| b.is_ascii_digit()), "{line:?}");
    secs.parse().unwrap()
}

#[test]
fn a_wake_syncs_the_running_guests_clock_exactly_once_and_a_stopped_one_not_at_all() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));

    // Every boot sets the clock, with the host's time.
    wait_for(Duration::from_secs(10), "the boot's clock sync", || {
        status(&fixture).clock_sync.is_some()
    });
    let sync = status(&fixture).clock_sync.unwrap();
    assert_eq!(
        (sync.reason.as_str(), sync.offset_secs, sync.error),
        ("boot", Some(0.0), None)
    );
    let requests = harness.vm.clock_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sent = request_seconds(&requests[0]);
    assert!(now - 30 <= sent && sent <= now, "{sent} vs {now}");

    // A wake: exactly one more.
    harness.power.wake();
    wait_for(Duration::from_secs(10), "the wake's clock sync", || {
        status(&fixture).clock_sync.unwrap().reason == "wake"
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(harness.vm.clock_requests().len(), 2);
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains("clock         set from the host's ")
            && text.contains(" ago, after the Mac woke: in step (off by less than 1 ms)\n"),
        "{text}"
    );

    // A wake while the VM is off: heard, and nothing is sent.
    assert_eq!(fixture.cli(&["stop"]).status.code(), Some(0));
    std::thread::sleep(Duration::from_secs(2));
    harness.power.wake();
    wait_for(
        Duration::from_secs(10),
        "the second wake to be heard",
        || status(&fixture).host_woke_secs_ago.unwrap() < 1.5,
    );
    // Longer than a sync's connection attempts would take.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(harness.vm.clock_requests().len(), 2);
    let sync = status(&fixture).clock_sync.unwrap();
    assert_eq!(
        (sync.reason.as_str(), sync.offset_secs, sync.error),
        ("wake", Some(0.0), None),
        "still the running guest's sync"
    );

    // The next boot sets it.
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    wait_for(
        Duration::from_secs(10),
        "the second boot's clock sync",
        || harness.vm.clock_requests().len() >= 3,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(harness.vm.clock_requests().len(), 3);
}

#[test]
fn a_guest_that_refuses_the_time_or_has_no_clock_setter_is_reported_in_status() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        clock_reply: Some("ERR stale: 5 is before 1735689600\n".into()),
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    wait_for(Duration::from_secs(10), "the boot's clock sync", || {
        status(&fixture).clock_sync.is_some()
    });
    let sync = status(&fixture).clock_sync.unwrap();
    assert_eq!(sync.offset_secs, None);
    assert_eq!(
        sync.error.as_deref(),
        Some("the guest refused the time: stale: 5 is before 1735689600")
    );
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains(" ago, at boot: the guest refused the time: stale: 5 is before 1735689600\n"),
        "{text}"
    );

    // A guest without the clock setter (built before it existed).
    harness.vm.set_behaviour(FakeVmBehaviour {
        clock_reply: None,
        ..Default::default()
    });
    harness.power.wake();
    wait_for(Duration::from_secs(20), "the wake's clock sync", || {
        status(&fixture).clock_sync.unwrap().reason == "wake"
    });
    let error = status(&fixture).clock_sync.unwrap().error.unwrap();
    assert!(
        error.starts_with("the guest's clock setter on vsock port 1025 did not answer"),
        "{error}"
    );
    // It is no session: the VM stays idle-able, and the Mac may sleep.
    assert_eq!(status(&fixture).connections, 0);
    assert_eq!(harness.power.calls(), []);
}

#[test]
fn a_clock_setter_that_comes_up_a_moment_late_still_gets_the_time() {
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        clock_reply: None,
        ..Default::default()
    };
    let harness = Harness::start(&fixture, behaviour, None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    wait_for(Duration::from_secs(20), "the boot's clock sync", || {
        status(&fixture).clock_sync.is_some()
    });
    assert!(status(&fixture).clock_sync.unwrap().error.is_some());

    // The sync after a wake tries for about two seconds; the setter answers
    // from its second attempt on.
    harness.power.wake();
    std::thread::sleep(Duration::from_millis(500));
    harness.vm.set_behaviour(FakeVmBehaviour::default());
    wait_for(Duration::from_secs(20), "the wake's clock sync", || {
        status(&fixture).clock_sync.unwrap().reason == "wake"
    });
    let sync = status(&fixture).clock_sync.unwrap();
    assert_eq!((sync.offset_secs, sync.error), (Some(0.0), None));
}

/// A build connection on the aarch64-linux alias while no guest exists: it reaches
/// the bootstrap builder (issue 12), not the VM.
fn bootstrap_connection(fixture: &Fixture) -> Connection {
    let mut proxy = spawn_proxy_with(fixture, &["--alias", "darwin-vz-nix"]);
    assert_eq!(first_line(&mut proxy), "SSH-2.0-fake-bootstrap\r\n");
    Connection(proxy)
}

#[test]
fn build_connections_to_the_bootstrap_builder_hold_the_assertion_until_they_end_or_it_goes_away() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.hold();
    let bootstrap = nix.bootstrap_vm();
    let mut options = fixture.options(None);
    // Open sessions keep the builder only this long after the guest's build ended.
    options.bootstrap.drain_timeout = Duration::from_secs(1);
    let harness = Harness::start_with(
        &fixture,
        fixture.lazy_config(&guest, bootstrap.layer()),
        FakeVmBehaviour::default(),
        options,
    );
    wait_for(Duration::from_secs(20), "the bootstrap builder", || {
        bootstrap_phase(&fixture) == "running"
    });
    // Running with no build on it keeps nothing awake.
    assert_eq!(harness.power.held(), None);

    let first = bootstrap_connection(&fixture);
    wait_held(&harness, Some(ONE));
    let second = bootstrap_connection(&fixture);
    wait_held(&harness, Some(TWO));
    first.close();
    wait_held(&harness, Some(ONE));

    // The guest is built; the builder goes after the drain bound, its last session
    // with it, and so does the assertion.
    guest.release();
    wait_for(
        Duration::from_secs(30),
        "the bootstrap builder to go",
        || bootstrap_phase(&fixture) == "off",
    );
    wait_held(&harness, None);
    assert_eq!(harness.vm.boots(), 0, "no guest VM was involved");
    assert_eq!(
        harness.power.calls(),
        [
            PowerCall::Hold(ONE.into()),
            PowerCall::Hold(TWO.into()),
            PowerCall::Hold(ONE.into()),
            PowerCall::Release,
        ]
    );
    drop(second);
}

#[test]
fn a_supervisor_that_exits_under_an_open_bootstrap_build_lets_the_mac_sleep() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.hold();
    let bootstrap = nix.bootstrap_vm();
    let mut harness = Harness::start_with(
        &fixture,
        fixture.lazy_config(&guest, bootstrap.layer()),
        FakeVmBehaviour::default(),
        fixture.options(None),
    );
    wait_for(Duration::from_secs(20), "the bootstrap builder", || {
        bootstrap_phase(&fixture) == "running"
    });
    let build = bootstrap_connection(&fixture);
    wait_held(&harness, Some(ONE));

    // No guest VM runs, so stopping one releases nothing: the exit itself must.
    harness.shut_down();
    assert_eq!(harness.power.held(), None);
    assert_eq!(
        harness.power.calls(),
        [PowerCall::Hold(ONE.into()), PowerCall::Release]
    );
    drop(build);
    guest.release();
}
