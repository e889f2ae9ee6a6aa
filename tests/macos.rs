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

#[test]
fn the_guest_substitutes_a_host_path_from_the_host_store_cache_over_vsock() {
    let Some(mac) = mac() else {
        return;
    };
    assert!(mac.run(&["start"]).status.success());
    // The guest directory is a host store path the guest's own database does not
    // know (only its system closure is registered there).
    let guest_dir = std::fs::canonicalize(&mac.guest).unwrap();
    let path = guest_dir.display().to_string();
    assert_eq!(
        mac.ssh(&format!("nix-store --realise {path} 2>&1 | tail -n 1")),
        path
    );
    let sigs = mac.ssh(&format!(
        "nix --extra-experimental-features nix-command path-info --sigs {path}"
    ));
    assert!(
        sigs.contains(" darwin-vz-nix-"),
        "signed by the host cache: {sigs}"
    );
    let out = mac.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["hostCache"]["narsServed"].as_u64().unwrap() >= 1,
        "{status}"
    );
}
