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

use std::process::Output;

use darwin_vz_nix::config::ConfigLayer;
use darwin_vz_nix::contract;
use support::hoststore::*;
use support::*;

const MIB: u64 = 1024 * 1024;

fn honest(cache: bool) -> RemoteOptions {
    RemoteOptions::honest(cache)
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

/// The host cache served something the builder refused: every input of `client`
/// reached the builder through the host's push over SSH instead — none carries the
/// host cache's signature, Nix copied each, and the SSH session carried more than
/// the inputs' NARs.
fn assert_all_pushed_over_ssh(client: &Client, remote: &Remote, log: &str) {
    for path in &client.closure.paths {
        assert!(
            !remote.came_from_the_host_cache(path),
            "{path} was accepted"
        );
        assert!(log.contains(&pushed(path)), "{log}");
    }
    let copying = format!("copying {} paths...", client.closure.paths.len());
    assert!(log.contains(&copying), "{log}");
    let (to_guest, _) = remote.harness.vm.ssh_bytes();
    assert!(
        to_guest > client.closure.nar_bytes,
        "{to_guest} bytes over SSH for {} bytes of inputs",
        client.closure.nar_bytes
    );
}

#[test]
fn inputs_the_host_has_reach_the_builder_from_the_host_cache_not_over_ssh() {
    let client = Client::new(4, 8 * MIB);
    let remote = Remote::new(&client, honest(true));
    let out = remote.build("a");
    let log = assert_built(&out);
    assert!(remote.output_text(&out).ends_with("\n8388608\n"));
    let url = remote.forwarder.url();

    // Nix says so: the builder copied every input from the host cache, and the
    // host's push had nothing left to copy.
    for path in &client.closure.paths {
        assert!(log.contains(&substituted(path, &url)), "{path}\n{log}");
        assert!(!log.contains(&pushed(path)), "{log}");
        assert!(
            remote.came_from_the_host_cache(path),
            "{path} carries no host cache signature"
        );
    }
    assert!(log.contains("copying 0 paths..."), "{log}");
    // And the SSH session carried a few KiB of protocol, not the 32 MiB of inputs.
    let (to_guest, _) = remote.harness.vm.ssh_bytes();
    assert!(
        to_guest < client.closure.nar_bytes / 100,
        "{to_guest} bytes went to the builder over SSH for {} bytes of inputs",
        client.closure.nar_bytes
    );
    let report = remote.cache_report().expect("the cache is served");
    assert_eq!(report.nars_served, 4);
    assert_eq!(report.nar_bytes, client.closure.nar_bytes);
    assert_eq!(report.nars_aborted, 0);
    assert_eq!(report.narinfo_hits, 4);
    let text = stdout(&remote.fixture.cli(&["status"]));
    assert!(
        text.lines()
            .any(|l| l.starts_with("host cache") && l.contains("4 NARs sent")),
        "{text}"
    );
}

#[test]
fn without_the_cache_the_same_inputs_are_pushed_over_ssh() {
    let client = Client::new(4, 8 * MIB);
    let remote = Remote::new(&client, honest(false));
    let log = assert_built(&remote.build("a"));
    for path in &client.closure.paths {
        assert!(log.contains(&pushed(path)), "{log}");
    }
    assert!(log.contains("copying 4 paths..."), "{log}");
    let (to_guest, _) = remote.harness.vm.ssh_bytes();
    assert!(to_guest > client.closure.nar_bytes, "{to_guest}");
    assert_eq!(remote.cache_report(), None);
}

#[test]
fn a_path_collected_between_its_narinfo_and_its_nar_comes_over_ssh_and_the_build_succeeds() {
    let client = Client::new(3, 4 * MIB);
    let served = client.copy_of_the_closure("served-store");
    let top = client.closure.top.clone();
    let hash_part = top["/nix/store/".len().."/nix/store/".len() + 32].to_string();
    let (conf, home, store, victim) = (
        client.conf.clone(),
        client.home().to_path_buf(),
        served.clone(),
        top.clone(),
    );
    // The host's garbage collector, between the builder's query and its download.
    let collect = Tamper::BeforeNar(Box::new(move |url| {
        if url.starts_with(&format!("/nar/{hash_part}-")) {
            check(
                nix_tool("nix-store", &conf, &home)
                    .arg("--store")
                    .arg(&store)
                    .arg("--delete")
                    .arg(&victim)
                    .output()
                    .unwrap(),
                "deleting the path from the served store",
            );
        }
    }));
    let remote = Remote::new(
        &client,
        RemoteOptions {
            served: Some(served),
            tamper: collect,
            ..RemoteOptions::honest(true)
        },
    );
    let log = assert_built(&remote.build("a"));
    let url = remote.forwarder.url();
    for path in client.closure.paths.iter().filter(|p| **p != top) {
        assert!(log.contains(&substituted(path, &url)), "{path}\n{log}");
        assert!(remote.came_from_the_host_cache(path), "{path}");
    }
    // The collected one was gone when the builder came for it, and came over SSH,
    // pushed by the host's Nix.
    assert!(
        log.contains(&format!("does not exist in binary cache '{url}'")),
        "{log}"
    );
    assert!(log.contains(&pushed(&top)), "{log}");
    assert!(!remote.came_from_the_host_cache(&top));
    assert!(log.contains("copying 1 paths..."), "{log}");
    let (to_guest, _) = remote.harness.vm.ssh_bytes();
    assert!(to_guest > 4 * MIB, "only {to_guest} bytes went over SSH");
    let report = remote.cache_report().unwrap();
    assert_eq!((report.narinfo_hits, report.nars_served), (3, 2));
}

#[test]
fn a_tampered_nar_is_refused_by_the_builder_and_the_inputs_come_over_ssh() {
    let client = Client::new(3, 4 * MIB);
    let remote = Remote::new(
        &client,
        RemoteOptions {
            tamper: Tamper::FlipNarByte,
            ..RemoteOptions::honest(true)
        },
    );
    let log = assert_built(&remote.build("a"));
    assert!(log.contains("hash mismatch"), "{log}");
    assert_all_pushed_over_ssh(&client, &remote, &log);
    // The host sent what was asked whole and right; the forwarder spoilt it on the
    // way. (After the first mismatch Nix asks no more: the paths that refer to it
    // cannot be substituted without it.)
    let report = remote.cache_report().unwrap();
    assert!(report.nars_served >= 1, "{report:?}");
    assert_eq!(report.nars_aborted, 0);
}

#[test]
fn an_unsigned_narinfo_is_refused_by_the_builder_and_the_inputs_come_over_ssh() {
    let client = Client::new(3, 4 * MIB);
    let remote = Remote::new(
        &client,
        RemoteOptions {
            tamper: Tamper::StripSignatures,
            ..RemoteOptions::honest(true)
        },
    );
    let log = assert_built(&remote.build("a"));
    assert!(
        log.contains("is not signed by any of the keys in 'trusted-public-keys'"),
        "{log}"
    );
    assert_all_pushed_over_ssh(&client, &remote, &log);
    let report = remote.cache_report().unwrap();
    assert_eq!(report.nars_served, 0, "nothing was even downloaded");
}

#[test]
fn rotate_keys_replaces_the_host_cache_key_and_the_next_boot_shares_the_new_one() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let public = fixture
        .state_dir
        .join("keys/guest")
        .join(contract::KEY_FILE_HOST_CACHE_KEY);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let before = std::fs::read_to_string(&public).unwrap();
    let out = fixture.cli(&["rotate-keys"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!public.exists(), "deleted with the SSH keys");
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let after = std::fs::read_to_string(&public).unwrap();
    assert_ne!(after, before);
    assert!(after.starts_with("darwin-vz-nix-"), "{after}");
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
