//! Apple Silicon only: boots real guests with Virtualization.framework. Every test
//! here is ignored elsewhere and says why; on a Mac run them with
//!
//!   DARWIN_VZ_NIX_TEST_GUEST=$(nix build --print-out-paths .#packages.aarch64-linux.guest) \
//!     cargo test --test macos -- --ignored --test-threads=1
//!
//! The nested-virtualization test also needs an Apple M3 or later with macOS 15 or
//! later, and the guest with the kernel KVM can use:
//! `DARWIN_VZ_NIX_TEST_KVM_GUEST=$(nix build --print-out-paths .#packages.aarch64-linux.guest-kvm)`.
//!
//! The binary under test is signed before its first use (ad hoc, with
//! resources/entitlements.plist): `cargo test` relinks target/debug/darwin-vz-nix
//! with the dev-dependencies' features, replacing a copy that scripts/codesign.sh
//! signed, and Virtualization.framework refuses a binary without the entitlement.
//! The x86_64 test needs Rosetta and network access from the guest (it fetches an
//! x86_64 coreutils from cache.nixos.org).
//!
//! The bootstrap-builder test boots no VZ guest and runs no binary (it drives
//! `darwin_vz_nix::bootstrap` in-process, and QEMU needs no entitlement); it needs
//! network, about 3 GiB and the two variables its comment names.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The binary under test, signed with the virtualization entitlement (once).
fn signed_binary() -> &'static Path {
    static SIGNED: OnceLock<PathBuf> = OnceLock::new();
    SIGNED.get_or_init(|| {
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_darwin-vz-nix"));
        sign(&exe, true);
        exe
    })
}

/// Signs `exe` ad hoc, with the entitlements or (to test the refusal) without.
fn sign(exe: &Path, entitlements: bool) {
    let mut command = Command::new("codesign");
    command.args(["--force", "--sign", "-"]);
    if entitlements {
        command
            .arg("--entitlements")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/entitlements.plist"));
    }
    let out = command
        .arg(exe)
        .output()
        .expect("codesign runs (install the Xcode command line tools)");
    assert!(
        out.status.success(),
        "codesign {}: {}",
        exe.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Mac {
    state: tempfile::TempDir,
    guest: PathBuf,
    exe: PathBuf,
}

/// A fresh state directory and the guest named by `variable`.
fn mac_with(variable: &str, how: &str) -> Mac {
    assert!(
        darwin_vz_nix::vm_backend_available(),
        "the macOS tests need macOS on Apple Silicon"
    );
    let guest = std::env::var(variable)
        .unwrap_or_else(|_| panic!("set {variable} to a guest built with `{how}`"));
    // Short: the control socket path must fit in 103 bytes.
    let state = tempfile::Builder::new()
        .prefix("dvn-")
        .tempdir_in("/tmp")
        .unwrap();
    Mac {
        state,
        guest: guest.into(),
        exe: signed_binary().to_path_buf(),
    }
}

fn mac() -> Mac {
    mac_with(
        "DARWIN_VZ_NIX_TEST_GUEST",
        "nix build --print-out-paths .#packages.aarch64-linux.guest",
    )
}

impl Mac {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.exe);
        command
            .arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .env("DARWIN_VZ_NIX_GUEST", &self.guest)
            .env("DARWIN_VZ_NIX_IDLE_TIMEOUT", "0");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
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

    fn status(&self) -> serde_json::Value {
        let out = self.run(&["status", "--json"]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn wait_for(&self, what: &str, limit: Duration, mut done: impl FnMut(&Mac) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Mac {
    fn drop(&mut self) {
        let _ = self.run(&["stop", "--daemon", "--timeout", "20"]);
    }
}

#[test]
#[ignore = "needs Apple Silicon: boots a real guest (DARWIN_VZ_NIX_TEST_GUEST)"]
fn boots_answers_ssh_runs_x86_64_reads_the_host_store_and_stops_gracefully() {
    let mac = mac();
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
#[ignore = "needs Apple Silicon: cold boots of a real guest (DARWIN_VZ_NIX_TEST_GUEST)"]
fn cold_boot_figures() {
    let mac = mac();
    assert!(mac.run(&["start"]).status.success());
    let out = mac.run(&["bench", "boot", "--runs", "3"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("guest sshd ready"));
}

/// Issue 14, item 6: a binary without the entitlement gets VZ's invalid-configuration
/// error as the unsigned-binary error, with the codesign command.
#[test]
#[ignore = "needs Apple Silicon: Virtualization.framework judges the signature (DARWIN_VZ_NIX_TEST_GUEST)"]
fn a_binary_without_the_entitlement_is_refused_with_the_codesign_command() {
    let mut mac = mac();
    let bare = mac.state.path().join("bin/darwin-vz-nix");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    std::fs::copy(signed_binary(), &bare).unwrap();
    // arm64 macOS runs nothing unsigned: sign it ad hoc, without the entitlement.
    sign(&bare, false);
    mac.exe = bare.clone();

    let out = mac.run(&["start", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!(
            "{} is not signed with the com.apple.security.virtualization entitlement",
            bare.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("codesign --force --sign - --entitlements resources/entitlements.plist"),
        "{text}"
    );
}

/// The supervisor's open Unix sockets (the control socket, clients, guest streams).
fn unix_sockets(pid: u64) -> usize {
    let out = Command::new("lsof")
        .args(["-a", "-U", "-p", &pid.to_string(), "-F", "f"])
        .output()
        .expect("lsof runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.starts_with('f'))
        .count()
}

/// Issue 14, item 3: VZ's descriptor for a vsock connection is closed right after the
/// duplicate is made, so an open session costs the supervisor exactly one
/// descriptor (its watch copy; the stream itself went to ssh), and none after it.
#[test]
#[ignore = "needs Apple Silicon: real vsock connections (DARWIN_VZ_NIX_TEST_GUEST)"]
fn an_open_session_costs_the_supervisor_one_descriptor_and_none_after_it() {
    let mac = mac();
    assert!(mac.run(&["start"]).status.success());
    let pid = mac.status()["supervisorPid"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let idle = unix_sockets(pid);

    let mut session: Child = mac
        .command(&["ssh", "--", "sleep 60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    mac.wait_for("the session", Duration::from_secs(30), |mac| {
        mac.status()["connections"] == 1
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(unix_sockets(pid), idle + 1, "one descriptor per session");

    let _ = session.kill();
    let _ = session.wait();
    mac.wait_for("the session's end", Duration::from_secs(90), |mac| {
        mac.status()["connections"] == 0
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(unix_sockets(pid), idle, "nothing left behind");
}

/// Part 2: on an M3 or later with macOS 15, the guest with a 6.12+ kernel boots with
/// nested virtualization, says it has /dev/kvm, and runs a build that requires kvm
/// and nixos-test (as a NixOS VM test does); root's line for Nix offers both.
#[test]
#[ignore = "needs an Apple M3 or later with macOS 15+: nested virtualization (DARWIN_VZ_NIX_TEST_KVM_GUEST)"]
fn nested_virtualization_runs_a_build_that_requires_kvm() {
    let mac = mac_with(
        "DARWIN_VZ_NIX_TEST_KVM_GUEST",
        "nix build --print-out-paths .#packages.aarch64-linux.guest-kvm",
    );
    let plan = mac.run(&[
        "start",
        "--dry-run",
        "--json",
        "--nested-virtualization",
        "on",
    ]);
    if plan.status.code() == Some(2) {
        eprintln!(
            "skipped: this Mac has no nested virtualization: {}",
            String::from_utf8_lossy(&plan.stderr)
        );
        return;
    }
    let plan = mac.run(&["start", "--dry-run", "--json"]);
    assert!(plan.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(
        plan["nestedVirtualization"]["enabled"], true,
        "auto turns it on for this guest: {plan}"
    );

    assert!(mac.run(&["start"]).status.success());
    mac.wait_for("the guest's kvm report", Duration::from_secs(90), |mac| {
        mac.status()["guestReport"]["kvm"].is_string()
    });
    assert_eq!(
        mac.status()["guestReport"]["kvm"],
        "present",
        "{}",
        mac.status()
    );

    let out = mac.ssh(
        r#"nix build --no-link --print-out-paths --impure --expr 'derivation { name = "kvm-check"; system = "aarch64-linux"; builder = "/bin/sh"; args = [ "-c" "test -c /dev/kvm && echo ok > $out" ]; requiredSystemFeatures = [ "kvm" "nixos-test" ]; }'"#,
    );
    assert_eq!(mac.ssh(&format!("cat {out}")), "ok");

    let line = mac.run(&["machines"]);
    assert!(
        String::from_utf8_lossy(&line.stdout).contains(",kvm,nixos-test "),
        "{}",
        String::from_utf8_lossy(&line.stdout)
    );
}

/// Issue 16: while an ssh session is open the daemon holds its power assertion, which
/// `pmset -g assertions` lists and `status` names; it goes with the session.
#[test]
#[ignore = "needs Apple Silicon: a real VM, IOKit's power assertions and pmset (DARWIN_VZ_NIX_TEST_GUEST)"]
fn pmset_shows_the_assertion_while_an_ssh_session_is_open() {
    let mac = mac();
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

    let mut session: Child = mac.command(&["ssh", "--", "sleep", "15"]).spawn().unwrap();
    mac.wait_for(
        "pmset to list the assertion",
        Duration::from_secs(12),
        |_| listed(),
    );
    assert_eq!(
        mac.status()["sleep"]["assertion"]["reason"],
        serde_json::Value::from(name)
    );
    assert!(session.wait().unwrap().success());
    mac.wait_for(
        "the assertion to go with the session",
        Duration::from_secs(20),
        |_| !listed(),
    );
}

/// Issue 16: when a boot is ready the guest's clock is set from the host's, and the
/// two agree within a few seconds.
#[test]
#[ignore = "needs Apple Silicon: a real VM whose guest runs the clock setter (DARWIN_VZ_NIX_TEST_GUEST)"]
fn the_guest_clock_is_set_from_the_host_at_boot() {
    use std::time::SystemTime;
    let mac = mac();
    assert!(mac.run(&["start"]).status.success());
    mac.wait_for("the boot's clock sync", Duration::from_secs(20), |mac| {
        !mac.status()["clockSync"].is_null()
    });
    let sync = mac.status()["clockSync"].clone();
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

/// Issue 15: a host store path the guest's database does not know comes from the
/// host store cache over vsock, signed with the host's cache key, and `status` counts it.
#[test]
#[ignore = "needs Apple Silicon: the guest substitutes from the host store cache over vsock (DARWIN_VZ_NIX_TEST_GUEST)"]
fn the_guest_substitutes_a_host_path_from_the_host_store_cache_over_vsock() {
    let mac = mac();
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
    let status = mac.status();
    assert!(
        status["hostCache"]["narsServed"].as_u64().unwrap() >= 1,
        "{status}"
    );
}
