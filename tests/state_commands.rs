//! Commands that read or change the state directory, as the README promises them,
//! through the real binary: `logs` (`-n`, `-f`, `--console --previous`), `destroy`
//! (the MAC address goes, the host key and its pin are replaced), `rotate-keys`
//! (both keys and the pin replaced, disk and MAC kept), and `controlGroup` (the
//! socket and directories opened to that group, and to no one else).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use darwin_vz_nix::config::ConfigLayer;
use darwin_vz_nix::control::protocol::VmState;
use support::*;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `type base64` of a public key file.
fn key_fields(path: &Path) -> String {
    read(path)
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What identifies the state's keys and the guest's network identity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    client_key: String,
    host_key: String,
    known_hosts: String,
    mac: Option<String>,
}

fn identity(fixture: &Fixture) -> Identity {
    let keys = fixture.state_dir.join("keys");
    Identity {
        client_key: read(&keys.join("client_ed25519")),
        host_key: key_fields(&keys.join("guest/ssh_host_ed25519_key.pub")),
        known_hosts: read(&keys.join("known_hosts")),
        mac: std::fs::read_to_string(fixture.state_dir.join("mac-address")).ok(),
    }
}

/// The pin names the guest's current host key under the alias, and nothing else.
fn assert_pinned(id: &Identity) {
    assert_eq!(
        id.known_hosts.trim_end(),
        format!("darwin-vz-nix {}", id.host_key),
        "known_hosts pins the current host key"
    );
}

/// Runs `darwin-vz-nix ssh -- echo ok` and checks it gets in.
fn assert_ssh_works(fixture: &Fixture) {
    let out = fixture.cli(&["ssh", "--", "echo", "ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");
}

#[test]
fn destroy_deletes_the_mac_address_and_replaces_the_host_key_and_its_pin() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    let before = identity(&fixture);
    assert!(before.mac.is_some(), "the first boot made a MAC address");
    assert_pinned(&before);

    // With a supervisor: it stops the VM and resets.
    let out = fixture.cli(&["destroy", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mac_path = fixture.state_dir.join("mac-address");
    assert!(
        stdout(&out).contains(&format!("deleted {}\n", mac_path.display())),
        "{}",
        stdout(&out)
    );
    let after = identity(&fixture);
    assert_eq!(after.mac, None, "the MAC address is gone");
    assert_ne!(after.host_key, before.host_key, "a new guest host key");
    assert_ne!(after.client_key, before.client_key, "a new client key");
    assert_pinned(&after);
    assert_eq!(vm_state(&fixture), VmState::Stopped);

    // The next boot makes a new MAC address, and ssh trusts the new host key.
    assert_ssh_works(&fixture);
    let booted = identity(&fixture);
    assert!(booted.mac.is_some());
    assert_ne!(booted.mac, before.mac, "a new network identity");

    // Without a supervisor: the command does the same itself.
    drop(harness);
    let out = fixture.cli(&["destroy", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("deleted {}\n", mac_path.display())),
        "{}",
        stdout(&out)
    );
    let last = identity(&fixture);
    assert_eq!(last.mac, None);
    assert_ne!(last.host_key, booted.host_key);
    assert_pinned(&last);
    assert!(!fixture.state_dir.join("disk.img").exists());
}

/// Size, inode and content of the disk image.
fn disk_identity(fixture: &Fixture) -> (u64, u64, Vec<u8>) {
    let disk = fixture.state_dir.join("disk.img");
    let meta = std::fs::metadata(&disk).unwrap();
    let mut head = vec![0u8; 4096];
    std::io::Read::read_exact(&mut std::fs::File::open(&disk).unwrap(), &mut head).unwrap();
    (meta.len(), meta.ino(), head)
}

#[test]
fn rotate_keys_replaces_both_keys_and_the_pin_and_keeps_disk_and_mac() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_ssh_works(&fixture);
    // Something the guest wrote to its disk, which a key rotation must keep.
    let disk = fixture.state_dir.join("disk.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all(b"the guest's store")
        .unwrap();
    let before = identity(&fixture);
    let disk_before = disk_identity(&fixture);
    let old_key = fixture.dir.path().join("old_client_key");
    std::fs::copy(fixture.state_dir.join("keys/client_ed25519"), &old_key).unwrap();
    std::fs::set_permissions(&old_key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let out = fixture.cli(&["rotate-keys"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).ends_with(&format!(
            "keys replaced; new SSH keys are in {}\n",
            fixture.state_dir.join("keys").display()
        )),
        "{}",
        stdout(&out)
    );
    assert_eq!(vm_state(&fixture), VmState::Stopped, "the VM stopped first");
    let after = identity(&fixture);
    assert_ne!(after.client_key, before.client_key, "a new client key");
    assert_ne!(after.host_key, before.host_key, "a new guest host key");
    assert_pinned(&after);
    assert_eq!(after.mac, before.mac, "the MAC address is kept");
    assert_eq!(disk_identity(&fixture), disk_before, "the disk is kept");

    // The new keys work; the old client key no longer gets in.
    assert_ssh_works(&fixture);
    // The generated block with the old key as its only identity (ssh would try
    // every IdentityFile it is given).
    let block = fixture.dir.path().join("ssh_config");
    let generated = stdout(&fixture.cli(&["ssh-config"]));
    let without_identity: String = generated
        .lines()
        .filter(|l| !l.trim_start().starts_with("IdentityFile "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        without_identity.lines().count() + 1,
        generated.lines().count()
    );
    std::fs::write(&block, without_identity).unwrap();
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&block)
        .arg("-o")
        .arg(format!("IdentityFile=\"{}\"", old_key.display()))
        .args(["-o", "BatchMode=yes", "darwin-vz-nix", "--", "true"])
        .env("DARWIN_VZ_NIX_GUEST", &fixture.guest_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255), "the old key got in");
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );

    // Without a supervisor, the same.
    drop(harness);
    let out = fixture.cli(&["rotate-keys"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let last = identity(&fixture);
    assert_ne!(last.client_key, after.client_key);
    assert_ne!(last.host_key, after.host_key);
    assert_pinned(&last);
    assert_eq!(last.mac, before.mac);
    assert_eq!(disk_identity(&fixture), disk_before);
}

/// Writes `lines` numbered lines (`{prefix} 1` …) to `path`.
fn numbered(path: &Path, prefix: &str, lines: usize) {
    let text: String = (1..=lines).map(|i| format!("{prefix} {i}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn expected_tail(prefix: &str, from: usize, to: usize) -> String {
    (from..=to).map(|i| format!("{prefix} {i}\n")).collect()
}

#[test]
fn logs_show_the_last_n_lines_of_the_log_or_either_console() {
    let fixture = Fixture::new();
    let logs = fixture.state_dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::set_permissions(&fixture.state_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    numbered(&logs.join("daemon.log"), "daemon", 120);
    numbered(&logs.join("console.log"), "this boot", 20);
    numbered(&logs.join("console.previous.log"), "previous boot", 20);

    let logs_of = |args: &[&str]| {
        let out = fixture.cli(&[&["logs"], args].concat());
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(logs_of(&["-n", "3"]), expected_tail("daemon", 118, 120));
    assert_eq!(
        logs_of(&[]),
        expected_tail("daemon", 71, 120),
        "50 by default"
    );
    assert_eq!(logs_of(&["-n", "0"]), "");
    assert_eq!(logs_of(&["-n", "500"]), expected_tail("daemon", 1, 120));
    assert_eq!(
        logs_of(&["--console", "-n", "2"]),
        expected_tail("this boot", 19, 20)
    );
    assert_eq!(
        logs_of(&["--console", "--previous", "-n", "2"]),
        expected_tail("previous boot", 19, 20)
    );
    let out = fixture.cli(&["logs", "--previous"]);
    assert_eq!(out.status.code(), Some(2), "--previous needs --console");
}

#[test]
fn logs_follow_prints_what_is_appended_and_survives_a_rotation() {
    let fixture = Fixture::new();
    let logs = fixture.state_dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::set_permissions(&fixture.state_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = logs.join("daemon.log");
    numbered(&log, "daemon", 10);

    let mut follow = fixture
        .cli_command(&["logs", "-n", "1", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("logs -f did not print {what:?} within 10 s: {e}"))
    };
    assert_eq!(next("daemon 10"), "daemon 10");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(b"appended 1\nappended 2\n")
        .unwrap();
    assert_eq!(next("appended 1"), "appended 1");
    assert_eq!(next("appended 2"), "appended 2");
    // The daemon renames a full log to daemon.log.1 and starts a new one.
    std::fs::rename(&log, logs.join("daemon.log.1")).unwrap();
    std::fs::write(&log, "after rotation\n").unwrap();
    assert_eq!(next("after rotation"), "after rotation");
    let _ = follow.kill();
    let _ = follow.wait();
}

/// The current user's primary group: a group this user is in on any machine.
fn own_group() -> (String, u32) {
    let gid = nix::unistd::getegid();
    let group = nix::unistd::Group::from_gid(gid)
        .unwrap()
        .expect("the primary group has a name");
    (group.name, gid.as_raw())
}

#[test]
fn control_group_opens_the_socket_and_state_directory_to_that_group_only() {
    let fixture = Fixture::new();
    let (group, gid) = own_group();
    let config = fixture.config(ConfigLayer {
        control_group: Some(group.clone()),
        ..Default::default()
    });
    let _harness = Harness::start_with(
        &fixture,
        config,
        FakeVmBehaviour::default(),
        fixture.options(None),
    );
    let mode_and_group = |path: PathBuf| {
        let meta = std::fs::metadata(&path).unwrap();
        (meta.permissions().mode() & 0o7777, meta.gid())
    };
    let state = &fixture.state_dir;
    assert_eq!(
        mode_and_group(state.join("control.sock")),
        (0o660, gid),
        "the socket: owner and {group}, read-write"
    );
    assert_eq!(
        mode_and_group(state.clone()),
        (0o750, gid),
        "{group} may enter"
    );
    assert_eq!(
        mode_and_group(state.join("logs")),
        (0o750, gid),
        "and read logs"
    );
    assert_eq!(
        mode_and_group(state.join("keys")).0,
        0o700,
        "keys stay the owner's"
    );
    assert_eq!(mode_and_group(state.join("keys/client_ed25519")).0, 0o600);
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Without controlGroup, the same directory closes again.
    drop(_harness);
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(mode_and_group(state.join("control.sock")).0, 0o600);
    assert_eq!(mode_and_group(state.clone()).0, 0o700);
    assert_eq!(mode_and_group(state.join("logs")).0, 0o700);
}
