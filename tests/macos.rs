//! Apple Silicon only, opt-in: boots a real guest with Virtualization.framework.
//!
//!   DARWIN_VZ_NIX_MAC_TESTS=1 DARWIN_VZ_NIX_TEST_GUEST=$(nix build --print-out-paths .#packages.aarch64-linux.guest) \
//!     cargo test --test macos -- --test-threads=1
//!
//! The binary must carry the virtualization entitlement: run `scripts/codesign.sh`
//! after `cargo build` (see the README). The x86_64 test needs Rosetta and network
//! access from the guest (it fetches an x86_64 coreutils from cache.nixos.org).
//! Without the variables every test here returns at once, so `cargo test` stays green
//! on machines that cannot run them.

use std::path::PathBuf;
use std::process::{Command, Output};

struct Mac {
    state: tempfile::TempDir,
    guest: PathBuf,
}

/// `None` unless the opt-in variables are set.
fn mac() -> Option<Mac> {
    if std::env::var("DARWIN_VZ_NIX_MAC_TESTS").as_deref() != Ok("1") {
        return None;
    }
    if !darwin_vz_nix::vm_backend_available() {
        panic!("DARWIN_VZ_NIX_MAC_TESTS=1 needs macOS on Apple Silicon");
    }
    let guest = std::env::var("DARWIN_VZ_NIX_TEST_GUEST")
        .expect("set DARWIN_VZ_NIX_TEST_GUEST to a guest built with `nix build .#packages.aarch64-linux.guest`");
    // Short: the control socket path must fit in 103 bytes.
    let state = tempfile::Builder::new()
        .prefix("dvn-")
        .tempdir_in("/tmp")
        .unwrap();
    Some(Mac {
        state,
        guest: guest.into(),
    })
}

impl Mac {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"))
            .arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .env("DARWIN_VZ_NIX_GUEST", &self.guest)
            .env("DARWIN_VZ_NIX_IDLE_TIMEOUT", "0")
            .output()
            .unwrap();
        eprintln!(
            "$ darwin-vz-nix {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ssh(&self, command: &str) -> String {
        let out = self.run(&["ssh", "--", command]);
        assert!(out.status.success(), "ssh -- {command} failed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Mac {
    fn drop(&mut self) {
        let _ = self.run(&["stop", "--daemon", "--timeout", "20"]);
    }
}

#[test]
fn boots_answers_ssh_runs_x86_64_reads_the_host_store_and_stops_gracefully() {
    let Some(mac) = mac() else {
        return;
    };
    let out = mac.run(&["doctor"]);
    assert!(out.status.success(), "doctor found a problem");

    let out = mac.run(&["start"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ready in "));

    assert_eq!(mac.ssh("uname -m"), "aarch64");

    // The guest's system lives in the host's store, shared read-only.
    let registration = std::fs::canonicalize(mac.guest.join("registration")).unwrap();
    let host_lines = std::fs::read_to_string(&registration)
        .unwrap()
        .lines()
        .count();
    let guest_lines = mac.ssh(&format!("wc -l < {}", registration.display()));
    assert_eq!(guest_lines, host_lines.to_string());

    // x86_64-linux through Rosetta.
    let uname = mac.ssh(
        "nix --extra-experimental-features 'nix-command flakes' shell nixpkgs#legacyPackages.x86_64-linux.coreutils -c uname -m",
    );
    assert_eq!(uname, "x86_64");

    let out = mac.run(&["stop", "--timeout", "30"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "stopped (the guest powered off)\n"
    );
}

#[test]
fn cold_boot_figures() {
    let Some(mac) = mac() else {
        return;
    };
    assert!(mac.run(&["start"]).status.success());
    let out = mac.run(&["bench", "boot", "--runs", "3"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("guest sshd ready"));
}

/// The opt-in variables, required: these tests are run on purpose (`--ignored`).
fn mac_required() -> Mac {
    mac().expect(
        "set DARWIN_VZ_NIX_MAC_TESTS=1 and DARWIN_VZ_NIX_TEST_GUEST (see the top of this file)",
    )
}

fn status_json(mac: &Mac) -> serde_json::Value {
    let out = mac.run(&["status", "--json"]);
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_until(what: &str, within: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[test]
#[ignore = "needs Apple Silicon: a real VM, IOKit's power assertions and pmset"]
fn pmset_shows_the_assertion_while_an_ssh_session_is_open() {
    use std::time::Duration;
    let mac = mac_required();
    assert!(mac.run(&["start"]).status.success());
    let name = "darwin-vz-nix: 1 Linux build connection";
    let listed = || {
        let out = Command::new("pmset")
            .args(["-g", "assertions"])
            .output()
            .expect("pmset runs");
        String::from_utf8_lossy(&out.stdout).contains(name)
    };
    assert!(!listed(), "no session, no assertion");

    let mut session = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"))
        .arg("--state-dir")
        .arg(mac.state.path())
        .args(["ssh", "--", "sleep", "15"])
        .env("DARWIN_VZ_NIX_GUEST", &mac.guest)
        .env("DARWIN_VZ_NIX_IDLE_TIMEOUT", "0")
        .spawn()
        .unwrap();
    wait_until(
        "pmset to list the assertion",
        Duration::from_secs(12),
        listed,
    );
    assert_eq!(
        status_json(&mac)["sleep"]["assertion"]["reason"],
        serde_json::Value::from(name)
    );
    assert!(session.wait().unwrap().success());
    wait_until(
        "the assertion to go with the session",
        Duration::from_secs(20),
        || !listed(),
    );
}

#[test]
#[ignore = "needs Apple Silicon: a real VM whose guest runs the clock setter"]
fn the_guest_clock_is_set_from_the_host_at_boot() {
    use std::time::{Duration, SystemTime};
    let mac = mac_required();
    assert!(mac.run(&["start"]).status.success());
    wait_until("the boot's clock sync", Duration::from_secs(20), || {
        !status_json(&mac)["clockSync"].is_null()
    });
    let sync = status_json(&mac)["clockSync"].clone();
    assert_eq!(sync["reason"], "boot", "{sync}");
    assert!(sync["error"].is_null(), "{sync}");
    assert!(sync["offsetSecs"].is_f64(), "{sync}");
    let guest: u64 = mac.ssh("date +%s").parse().unwrap();
    let host = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(guest.abs_diff(host) <= 5, "guest {guest}, host {host}");
}
