//! The host store cache end to end, with the real Nix (Debian's 2.8) on both sides:
//! the host's `nix build` sends a derivation to the builder over `ssh-ng` through
//! the supervisor, and the builder's Nix — a chroot store behind the fake VM's
//! `sshd -i` — takes the inputs it lacks from its substituters, the first being the
//! supervisor's cache, reached through the test's stand-in for the guest's
//! forwarder (a loopback listener whose connections become guest→host streams).
//!
//! Where the inputs came from is read from Nix itself (the builder's store keeps
//! each substituted path's signature; the host cache signs with the supervisor's
//! key, a pushed path carries none) and from the bytes that crossed the SSH
//! session (the fake VM counts them), never from timing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use darwin_vz_nix::config::ConfigLayer;
use darwin_vz_nix::contract;
use darwin_vz_nix::control::ControlClient;
use darwin_vz_nix::control::protocol::{HostCacheReport, Reply, Request};
use support::hoststore::*;
use support::*;

/// A builder ("guest") and a client ("host"), each with its own store and nix.conf,
/// the supervisor in between, and the guest's forwarder to the host cache.
struct Setup {
    // Dropped first: the supervisor stops while its state directory still exists.
    harness: Harness,
    forwarder: Forwarder,
    fixture: Fixture,
    /// Stores and Nix configurations: a directory without spaces (sshd's SetEnv and
    /// NIX_SSHOPTS split on them; the fixture's state directory has one on purpose).
    scratch: tempfile::TempDir,
    /// The client's store: where `nix build` runs, and what the host cache serves
    /// unless the test gave another one.
    client_store: PathBuf,
    client_conf: PathBuf,
    guest_store: PathBuf,
    guest_conf: PathBuf,
    ssh_config: PathBuf,
    closure: Closure,
}

const MIB: u64 = 1024 * 1024;

/// Makes the store the cache serves from (given the scratch directory and the
/// closure already in the client's store).
type ServedStore = dyn Fn(&Path, &Closure) -> PathBuf;

impl Setup {
    /// `count` input paths of `size` bytes in the client store; the cache serves the
    /// store at `served` (the client's own when `None`), through a forwarder that
    /// tampers as told.
    fn new(
        count: usize,
        size: u64,
        served: Option<&ServedStore>,
        tamper: impl FnOnce(&Path, &Closure) -> Tamper,
    ) -> Setup {
        let fixture = Fixture::new();
        let scratch = tempfile::Builder::new()
            .prefix("dvn-e2e-")
            .tempdir()
            .unwrap();
        let home = scratch.path().to_path_buf();
        let client_store = home.join("host-store");
        let client_conf = nix_conf(
            &home.join("client-conf"),
            "builders-use-substitutes = true\n",
        );
        let closure = build_closure(&client_store, &client_conf, &home, "input", count, size);
        let served_store = served.map_or_else(|| client_store.clone(), |f| f(&home, &closure));

        let guest_store = home.join("guest-store");
        let fragment = home.join("guest-run/nix-host-cache.conf");
        let guest_conf = nix_conf(
            &home.join("guest-conf"),
            &format!("!include {}\n", fragment.display()),
        );
        let behaviour = FakeVmBehaviour {
            sshd_extra: vec![format!(
                "SetEnv NIX_REMOTE={} NIX_CONF_DIR={} NIX_USER_CONF_FILES={} XDG_CACHE_HOME={}",
                guest_store.display(),
                guest_conf.display(),
                guest_conf.join("nix.conf").display(),
                home.join("guest-cache").display(),
            )],
            count_ssh_bytes: true,
            ..Default::default()
        };
        let mut options = fixture.options(None);
        options.host_store = served_store.join("nix/store");
        options.host_store_db = served_store.join("nix/var/nix/db/db.sqlite");
        let harness = Harness::start_with(
            &fixture,
            fixture.config(ConfigLayer::default()),
            behaviour,
            options,
        );
        let vm = harness.vm.clone();
        let forwarder = Forwarder::start(
            move || vm.connect_to_host(contract::HOST_CACHE_VSOCK_PORT),
            tamper(&served_store, &closure),
        );

        // Boot, so that the supervisor makes the cache's key and puts its public
        // half in the guest's share; then the guest's own script configures Nix.
        let out = fixture.cli(&["start"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let key_file = fixture
            .state_dir
            .join("keys/guest")
            .join(contract::KEY_FILE_HOST_CACHE_KEY);
        let script = std::process::Command::new("bash")
            .arg("nix/nixos/scripts/host-cache.sh")
            .arg(&key_file)
            .arg(forwarder.url())
            .arg(&fragment)
            .output()
            .unwrap();
        check(script, "the guest's host-cache.sh");

        let out = fixture.cli(&["ssh-config"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let ssh_config = home.join("ssh_config");
        std::fs::write(&ssh_config, &out.stdout).unwrap();

        Setup {
            fixture,
            scratch,
            harness,
            forwarder,
            client_store,
            client_conf,
            guest_store,
            guest_conf,
            ssh_config,
            closure,
        }
    }

    fn home(&self) -> &Path {
        self.scratch.path()
    }

    /// Builds, on the builder only, a derivation whose inputs are the closure.
    fn build_remotely(&self) -> Output {
        let expression = self.home().join("remote.nix");
        std::fs::write(
            &expression,
            format!(
                r#"let inputs = import {}; in
derivation {{
  name = "uses-the-inputs";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "PATH=/usr/bin:/bin; wc -c < ${{inputs}}/data > $out" ];
}}
"#,
                self.closure.expression.display()
            ),
        )
        .unwrap();
        let mut command = nix_tool("nix", &self.client_conf, self.home());
        command
            .env("NIX_SSHOPTS", format!("-F {}", self.ssh_config.display()))
            .args([
                "build",
                "--print-build-logs",
                "--no-link",
                "--json",
                "--max-jobs",
                "0",
            ])
            .arg("--store")
            .arg(&self.client_store)
            .args([
                "--builders",
                "ssh-ng://darwin-vz-nix x86_64-linux - 1 1",
                "-f",
            ])
            .arg(&expression);
        command.output().unwrap()
    }

    /// Whether the builder's copy of `path` was signed by the host cache's key.
    fn came_from_the_host_cache(&self, path: &str) -> bool {
        let key = std::fs::read_to_string(
            self.fixture
                .state_dir
                .join("keys/guest")
                .join(contract::KEY_FILE_HOST_CACHE_KEY),
        )
        .unwrap();
        let name = key.split(':').next().unwrap();
        signatures(&self.guest_store, &self.guest_conf, self.home(), path)
            .iter()
            .any(|sig| sig.starts_with(&format!("{name}:")))
    }

    fn cache_report(&self) -> HostCacheReport {
        match ControlClient::connect(&self.fixture.state_dir)
            .unwrap()
            .call(Request::Status, Duration::from_secs(5))
            .unwrap()
        {
            Reply::Status(report) => report.host_cache.expect("the cache is served"),
            other => panic!("{other:?}"),
        }
    }
}

fn assert_built(out: &Output) -> String {
    let log = format!("stdout: {}\nstderr: {}", stdout(out), stderr(out));
    assert!(out.status.success(), "{log}");
    log
}

/// Nix's line for a path the host's Nix pushed to the builder over SSH.
fn pushed(path: &str) -> String {
    format!("copying path '{path}' to 'ssh-ng://darwin-vz-nix'")
}

/// Nix's line for a path the builder substituted from `url`.
fn substituted(path: &str, url: &str) -> String {
    format!("copying path '{path}' from '{url}'")
}

#[test]
fn inputs_the_host_has_reach_the_builder_from_the_host_cache_not_over_ssh() {
    let setup = Setup::new(4, 8 * MIB, None, |_, _| Tamper::None);
    let out = setup.build_remotely();
    let log = assert_built(&out);
    let url = setup.forwarder.url();

    // Nix says so: the builder copied every input from the host cache, and the
    // host's push had nothing left to copy.
    for path in &setup.closure.paths {
        assert!(log.contains(&substituted(path, &url)), "{path}\n{log}");
        assert!(!log.contains(&pushed(path)), "{log}");
        assert!(
            setup.came_from_the_host_cache(path),
            "{path} carries no host cache signature"
        );
    }
    assert!(log.contains("copying 0 paths..."), "{log}");
    // And the SSH session carried a few KiB of protocol, not the 32 MiB of inputs.
    let (to_guest, _) = setup.harness.vm.ssh_bytes();
    assert!(
        to_guest < setup.closure.nar_bytes / 100,
        "{to_guest} bytes went to the builder over SSH for {} bytes of inputs",
        setup.closure.nar_bytes
    );
    let report = setup.cache_report();
    assert_eq!(report.nars_served, 4);
    assert_eq!(report.nar_bytes, setup.closure.nar_bytes);
    assert_eq!(report.nars_aborted, 0);
    assert_eq!(report.narinfo_hits, 4);
}

/// A second store holding a copy of the closure, for the cache to serve from.
fn copy_of_the_closure(home: &Path, closure: &Closure) -> PathBuf {
    let copy = home.join("served-store");
    check(
        nix_tool("nix", &home.join("client-conf"), home)
            .args(["copy", "--no-check-sigs", "--from"])
            .arg(home.join("host-store"))
            .arg("--to")
            .arg(&copy)
            .arg(&closure.top)
            .output()
            .unwrap(),
        "copying the closure into the served store",
    );
    copy
}

#[test]
fn a_path_collected_between_its_narinfo_and_its_nar_comes_over_ssh_and_the_build_succeeds() {
    let setup = Setup::new(3, 4 * MIB, Some(&copy_of_the_closure), |served, closure| {
        let (served, top) = (served.to_path_buf(), closure.top.clone());
        let hash_part = top["/nix/store/".len().."/nix/store/".len() + 32].to_string();
        let home = served.parent().unwrap().to_path_buf();
        // The host's garbage collector, between the builder's query and its download.
        Tamper::BeforeNar(Box::new(move |url| {
            if url.starts_with(&format!("/nar/{hash_part}-")) {
                check(
                    nix_tool("nix-store", &home.join("client-conf"), &home)
                        .arg("--store")
                        .arg(&served)
                        .arg("--delete")
                        .arg(&top)
                        .output()
                        .unwrap(),
                    "deleting the path from the served store",
                );
            }
        }))
    });
    let out = setup.build_remotely();
    let log = assert_built(&out);
    let url = setup.forwarder.url();
    let top = &setup.closure.top;
    assert!(
        setup
            .forwarder
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /nar/")
                && r.contains(&top["/nix/store/".len().."/nix/store/".len() + 32])),
        "the builder asked for the collected path's NAR"
    );
    for path in setup.closure.paths.iter().filter(|p| *p != top) {
        assert!(log.contains(&substituted(path, &url)), "{path}\n{log}");
        assert!(setup.came_from_the_host_cache(path), "{path}");
    }
    // The collected one was gone when the builder came for it, and came over SSH,
    // pushed by the host's Nix.
    assert!(
        log.contains(&format!("does not exist in binary cache '{url}'")),
        "{log}"
    );
    assert!(log.contains(&pushed(top)), "{log}");
    assert!(!setup.came_from_the_host_cache(top));
    assert!(log.contains("copying 1 paths..."), "{log}");
    let (to_guest, _) = setup.harness.vm.ssh_bytes();
    assert!(to_guest > 4 * MIB, "only {to_guest} bytes went over SSH");
    let report = setup.cache_report();
    assert_eq!((report.narinfo_hits, report.nars_served), (3, 2));
}

#[test]
fn a_tampered_nar_is_refused_by_the_builder_and_the_inputs_come_over_ssh() {
    let setup = Setup::new(3, 4 * MIB, None, |_, _| Tamper::FlipNarByte);
    let out = setup.build_remotely();
    let log = assert_built(&out);
    assert!(log.contains("hash mismatch"), "{log}");
    for path in &setup.closure.paths {
        assert!(!setup.came_from_the_host_cache(path), "{path} was accepted");
        assert!(log.contains(&pushed(path)), "{log}");
    }
    assert!(log.contains("copying 3 paths..."), "{log}");
    let (to_guest, _) = setup.harness.vm.ssh_bytes();
    assert!(
        to_guest > setup.closure.nar_bytes,
        "{to_guest} bytes over SSH for {} bytes of inputs",
        setup.closure.nar_bytes
    );
    // The host sent each NAR whole and right; the forwarder spoilt it on the way.
    assert_eq!(setup.cache_report().nars_aborted, 0);
}

#[test]
fn an_unsigned_narinfo_is_refused_by_the_builder_and_the_inputs_come_over_ssh() {
    let setup = Setup::new(3, 4 * MIB, None, |_, _| Tamper::StripSignatures);
    let out = setup.build_remotely();
    let log = assert_built(&out);
    assert!(
        log.contains("is not signed by any of the keys in 'trusted-public-keys'"),
        "{log}"
    );
    for path in &setup.closure.paths {
        assert!(!setup.came_from_the_host_cache(path), "{path} was accepted");
        assert!(
            !log.contains(&substituted(path, &setup.forwarder.url())),
            "{log}"
        );
        assert!(log.contains(&pushed(path)), "{log}");
    }
    assert!(log.contains("copying 3 paths..."), "{log}");
    let (to_guest, _) = setup.harness.vm.ssh_bytes();
    assert!(to_guest > setup.closure.nar_bytes);
    assert_eq!(
        setup.cache_report().nars_served,
        0,
        "nothing was even downloaded"
    );
}

#[test]
fn with_the_cache_off_nothing_listens_for_the_guest_and_status_shows_no_cache() {
    let fixture = Fixture::new();
    let config = fixture.config(ConfigLayer {
        host_store_cache: Some(false),
        ..Default::default()
    });
    let harness = Harness::start_with(
        &fixture,
        config,
        FakeVmBehaviour::default(),
        fixture.options(None),
    );
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let refused = harness
        .vm
        .connect_to_host(contract::HOST_CACHE_VSOCK_PORT)
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let out = fixture.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status.get("hostCache").is_none(), "{status}");
    assert!(
        !fixture
            .state_dir
            .join("keys/guest")
            .join(contract::KEY_FILE_HOST_CACHE_KEY)
            .exists()
    );
    assert!(!stdout(&fixture.cli(&["status"])).contains("host cache"));

    // On, the key is made at the boot and the status has the cache's line.
    let fixture = Fixture::new();
    let harness_on = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    assert!(
        harness_on
            .vm
            .connect_to_host(contract::HOST_CACHE_VSOCK_PORT)
            .is_ok()
    );
    let key = fixture
        .state_dir
        .join("keys")
        .join(darwin_vz_nix::hostcache::key::SECRET_KEY_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains(
            "\nhost cache    0 NARs sent (0 MiB), 0 narinfo hits, 0 misses, 0 NARs cut short\n"
        ),
        "{text}"
    );
    drop(harness);
}
