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

/// The bootstrap builder for real: nixpkgs' darwin.linux-builder from
/// cache.nixos.org, run unprivileged from a state directory, SSH on 127.0.0.1
/// only, its host key pinned, our client key accepted, and all of it gone after.
/// Needs Apple Silicon, network and about 3 GiB (once):
///
///   export DARWIN_VZ_NIX_BOOTSTRAP_DRV=$(nix eval --raw .#packages.aarch64-darwin.bootstrap-builder.drvPath)
///   export DARWIN_VZ_NIX_BOOTSTRAP_HOST_KEY=$(nix eval --raw .#packages.aarch64-darwin.bootstrap-builder.hostKey)
///   cargo test --test macos -- --ignored --test-threads=1 bootstrap_builder
///
/// What it cannot show: root's nix-daemon sending a build through its hook (that
/// needs the machines line and ssh_config installed as root; the README's Mac
/// recipe has the manual check).
#[test]
#[ignore = "needs Apple Silicon, network and ~3 GiB: fetches and boots nixpkgs' darwin.linux-builder"]
fn bootstrap_builder_from_the_cache_answers_ssh_on_loopback_with_the_pinned_key_and_goes_away() {
    use darwin_vz_nix::bootstrap::{Bootstrap, BootstrapOptions, BootstrapSpec, Phase};
    use darwin_vz_nix::guest::nix::NixStore;
    use darwin_vz_nix::state::{Access, StateDir};

    assert!(
        darwin_vz_nix::vm_backend_available(),
        "run this on macOS on Apple Silicon"
    );
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("set {name} (see this test's comment)"))
    };
    let drv = PathBuf::from(var("DARWIN_VZ_NIX_BOOTSTRAP_DRV"));
    let host_key = var("DARWIN_VZ_NIX_BOOTSTRAP_HOST_KEY");
    let nix_store = NixStore::find(std::env::var_os("PATH").as_deref());

    // It comes from the cache: its dry run builds nothing for aarch64-linux.
    let home = PathBuf::from(std::env::var("HOME").unwrap());
    let dry = darwin_vz_nix::guest::run_dry(&nix_store, &drv, &home).unwrap();
    let linux: Vec<_> = dry
        .to_build
        .iter()
        .filter(|d| {
            darwin_vz_nix::guest::nix::derivation_system(d).is_ok_and(|s| s == "aarch64-linux")
        })
        .collect();
    assert!(linux.is_empty(), "not cached: {linux:?}");

    let dir = tempfile::Builder::new()
        .prefix("dvn-")
        .tempdir_in("/tmp")
        .unwrap();
    let state = StateDir::new(dir.path());
    state.create(Access::OwnerOnly).unwrap();
    darwin_vz_nix::keys::ensure(&state).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let bootstrap = Bootstrap::new(
            BootstrapSpec {
                drv,
                host_key,
                cores: 2,
                memory_mib: 3072,
                ssh_user: "builder".into(),
            },
            state.clone(),
            nix_store,
            BootstrapOptions::default(),
        );
        let claim = bootstrap.up().await.unwrap();
        let status = bootstrap.status();
        assert_eq!(status.phase, Phase::Running);
        let endpoint = status.endpoint.unwrap();
        let port = endpoint.strip_prefix("127.0.0.1:").unwrap().to_string();

        // QEMU listens on loopback only.
        let lsof = Command::new("lsof")
            .args(["-nP", &format!("-iTCP:{port}"), "-sTCP:LISTEN"])
            .output()
            .unwrap();
        let listening = String::from_utf8_lossy(&lsof.stdout);
        assert!(
            listening.contains(&format!("127.0.0.1:{port}")),
            "{listening}"
        );
        assert!(!listening.contains(&format!("*:{port}")), "{listening}");

        // ssh with the pinned host key and our client key, as Nix's would.
        let out = Command::new("ssh")
            .args(["-F", "/dev/null", "-p", &port])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                state.bootstrap_known_hosts().display()
            ))
            .args([
                "-o",
                "HostKeyAlias=darwin-vz-nix",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-i")
            .arg(state.client_key())
            .args(["builder@127.0.0.1", "uname", "-m"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "aarch64",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        bootstrap.retire(claim).await;
        assert_eq!(bootstrap.phase(), Phase::Off);
    });
    assert!(!state.bootstrap_dir().exists());
    assert!(!state.bootstrap_known_hosts().exists());
    let lsof = Command::new("lsof")
        .args(["-nP", "-iTCP", "-sTCP:LISTEN"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&lsof.stdout).contains("qemu"));
}
