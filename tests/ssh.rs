//! SSH over the supervisor end to end, with real clients: OpenSSH's `ssh` through
//! `darwin-vz-nix ssh` and `proxy`, and Nix (`nix store ping`, a remote build) over
//! `ssh-ng://darwin-vz-nix` with the generated ssh_config. The "guest" is the fake VM
//! of tests/support, whose port 22 is a real `sshd -i`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use darwin_vz_nix::control::protocol::VmState;
use support::*;

#[test]
fn ssh_runs_a_command_with_strict_host_key_checking() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(vm_state(&fixture), VmState::Stopped);

    // The first ssh boots the VM on demand.
    let out = fixture.cli(&["ssh", "--", "echo", "ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");
    assert_eq!(harness.vm.boots(), 1);

    // The remote command's exit status comes back.
    let out = fixture.cli(&["ssh", "--", "sh", "-c", "'exit 7'"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));

    // Strict: with the pin gone from known_hosts (the file still there, so nothing
    // restores it), the guest's host key is refused, not learned.
    let known_hosts = fixture.state_dir.join("keys/known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let out = fixture.cli(&["ssh", "--", "echo", "ok"]);
    assert_eq!(out.status.code(), Some(255), "{}", stdout(&out));
    assert!(stdout(&out).is_empty(), "the command did not run");
    let err = stderr(&out);
    assert!(
        err.contains(
            "No ED25519 host key is known for darwin-vz-nix and you have requested strict checking."
        ),
        "{err}"
    );
    assert!(err.contains("Host key verification failed."), "{err}");
    assert_eq!(
        std::fs::read_to_string(&known_hosts).unwrap(),
        "",
        "nothing was added on first use"
    );
}

#[test]
fn a_changed_guest_host_key_is_refused() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["ssh", "--", "true"]).status.code(), Some(0));

    // Someone swaps the guest's host key without the pin being updated.
    let key = fixture.state_dir.join("keys/guest/ssh_host_ed25519_key");
    std::fs::remove_file(&key).unwrap();
    std::fs::remove_file(key.with_extension("pub")).unwrap();
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());

    let out = fixture.cli(&["ssh", "--", "echo", "ok"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(stdout(&out).is_empty(), "the command did not run");
    let err = stderr(&out);
    assert!(
        err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{err}"
    );
    assert!(err.contains("Host key verification failed."), "{err}");
}

#[test]
fn ssh_config_matches_the_nix_darwin_module_byte_for_byte() {
    let cases = nix_eval_json(Path::new("tests/nix/ssh-config.nix"));
    let fixture = Fixture::new();
    for case in cases["cases"].as_array().unwrap() {
        let (bin, state_dir, text) = (
            case["bin"].as_str().unwrap(),
            case["stateDir"].as_str().unwrap(),
            case["text"].as_str().unwrap(),
        );
        let out = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"))
            .args(["ssh-config", "--state-dir", state_dir, "--proxy-bin", bin])
            .env("DARWIN_VZ_NIX_SSH_USER", "builder")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), text, "state dir {state_dir:?}");
    }
    for case in cases["rejected"].as_array().unwrap() {
        let state_dir = case["stateDir"].as_str().unwrap();
        assert_eq!(case["rejected"], true, "nix rejects {state_dir:?}");
        let out = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"))
            .args([
                "ssh-config",
                "--state-dir",
                state_dir,
                "--proxy-bin",
                "/bin/true",
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "the CLI rejects {state_dir:?} too"
        );
        assert!(
            stderr(&out).contains("which cannot be written into ssh_config"),
            "{}",
            stderr(&out)
        );
    }
    drop(fixture);
}

#[test]
fn ssh_boots_on_demand_and_the_vm_powers_off_after_the_last_session() {
    let fixture = Fixture::new();
    let idle = Duration::from_millis(400);
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), Some(idle));
    let session = fixture
        .cli_command(&["ssh", "--", "sleep", "1.5"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(10), "the VM to boot for ssh", || {
        vm_state(&fixture) == VmState::Running
    });
    // Longer than the idle timeout, but a session is open.
    std::thread::sleep(idle * 2);
    assert_eq!(vm_state(&fixture), VmState::Running);
    let out = session.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(Duration::from_secs(5), "the idle poweroff", || {
        vm_state(&fixture) == VmState::Stopped
    });
    assert_eq!(harness.vm.boots(), 1);
}

/// A user's ssh_config for Nix: the Host block from `ssh-config`, nothing else.
fn ssh_config_file(fixture: &Fixture) -> PathBuf {
    let out = fixture.cli(&["ssh-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Nix splits NIX_SSHOPTS on spaces, so this path has none (the state directory
    // inside the file does, and is quoted there).
    let dir = tempfile::Builder::new()
        .prefix("dvn-ssh-")
        .tempdir()
        .unwrap()
        .keep();
    let path = dir.join("ssh_config");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// Runs Debian's `nix` with the generated ssh configuration and its own nix.conf.
fn nix(fixture: &Fixture, config: &Path, args: &[&str]) -> Output {
    let conf_dir = own_nix_conf(&fixture.dir.path().join("client-nix-conf"), "");
    nix_over_ssh(fixture, &conf_dir, config, args)
}

#[test]
fn nix_store_ping_over_ssh_ng_through_the_proxy() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let config = ssh_config_file(&fixture);
    let out = nix(
        &fixture,
        &config,
        &["store", "ping", "--store", "ssh-ng://darwin-vz-nix"],
    );
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    // Nix 2.8 prints the report on stderr; newer versions on stdout.
    let report = stdout(&out) + &stderr(&out);
    assert!(
        report.contains("Store URL: ssh-ng://darwin-vz-nix"),
        "{report}"
    );
    assert_eq!(harness.vm.boots(), 1, "Nix's connection booted the VM");
}

#[test]
fn nix_builds_a_derivation_on_the_builder_and_copies_the_output_back() {
    let fixture = Fixture::new();
    // The "guest" side builds into its own chroot store, not the client's.
    // Nix's sandbox builds in a chroot store; give it the host's /bin/sh, and no
    // binary cache (CI has no network).
    let guest = tempfile::Builder::new()
        .prefix("dvn-guest-")
        .tempdir()
        .unwrap();
    let guest_store = guest.path().join("store");
    let guest_conf_dir = own_nix_conf(
        &guest.path().join("nix-conf"),
        "sandbox = true\nextra-sandbox-paths = /usr /bin /lib /lib64\n",
    );
    let behaviour = builder_on_own_store(&guest_store, &guest_conf_dir);
    let _harness = Harness::start(&fixture, behaviour, None);
    let config = ssh_config_file(&fixture);
    let client_store = fixture.dir.path().join("client-store");
    let expression = fixture.dir.path().join("remote.nix");
    std::fs::write(
        &expression,
        r#"derivation {
  name = "built-remotely";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo built on the builder > $out" ];
}
"#,
    )
    .unwrap();
    let out = nix(
        &fixture,
        &config,
        &[
            "build",
            "--store",
            client_store.to_str().unwrap(),
            "--max-jobs",
            "0",
            "--builders",
            "ssh-ng://darwin-vz-nix x86_64-linux - 1 1",
            "--no-link",
            "--json",
            "-f",
            expression.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = built[0]["outputs"]["out"].as_str().unwrap().to_string();
    assert!(
        path.starts_with("/nix/store/") && path.ends_with("-built-remotely"),
        "{path}"
    );
    let copied = client_store.join(path.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(&copied).unwrap(),
        "built on the builder\n"
    );
    // It was built in the builder's store, not the client's.
    let on_builder = guest_store.join(path.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(&on_builder).unwrap(),
        "built on the builder\n"
    );
}

// --- A session is its stream, whatever ssh does with its processes (issue 17.1). ---

/// Plain OpenSSH with the generated Host block, plus `options`.
fn plain_ssh(fixture: &Fixture, config: &Path, options: &[String]) -> Command {
    let mut command = Command::new("ssh");
    command
        .arg("-F")
        .arg(config)
        .env("HOME", fixture.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for option in options {
        command.arg("-o").arg(option);
    }
    command
}

/// `sh -c` text that creates `path` (which has spaces).
fn touch(path: &Path) -> String {
    format!("touch '{}'", path.display())
}

#[test]
fn ssh_f_keeps_the_vm_up_until_its_backgrounded_command_ends() {
    let fixture = Fixture::new();
    let idle = Duration::from_millis(500);
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), Some(idle));
    let config = ssh_config_file(&fixture);
    let done = fixture.dir.path().join("done");
    // -f: ssh forks into the background after authentication; the process that ran
    // the ProxyCommand exits at once.
    let exit = plain_ssh(&fixture, &config, &[])
        .args(["-f", "darwin-vz-nix"])
        .arg(format!("sleep 3; {}", touch(&done)))
        .status()
        .unwrap();
    assert!(exit.success());
    std::thread::sleep(idle * 3);
    let report = status(&fixture);
    assert_eq!(
        (report.state, report.connections),
        (VmState::Running, 1),
        "the backgrounded session still counts"
    );
    wait_for(
        Duration::from_secs(15),
        "the remote command to finish",
        || done.exists(),
    );
    wait_for(Duration::from_secs(10), "the idle poweroff", || {
        vm_state(&fixture) == VmState::Stopped
    });
    assert_eq!(harness.vm.boots(), 1);
}

#[test]
fn a_controlpersist_master_keeps_the_vm_up_for_its_sessions_then_it_idles_off() {
    let fixture = Fixture::new();
    let idle = Duration::from_millis(500);
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), Some(idle));
    let config = ssh_config_file(&fixture);
    // A short directory: ControlPath must fit in a Unix socket address.
    let control = tempfile::Builder::new()
        .prefix("dvn-cm-")
        .tempdir_in("/tmp")
        .unwrap();
    // What a user's `Host *` might say; command-line options win over the block.
    let options = [
        "ControlMaster=auto".to_string(),
        format!("ControlPath={}/%C", control.path().display()),
        "ControlPersist=2".to_string(),
    ];
    let (first_done, second_done) = (
        fixture.dir.path().join("first"),
        fixture.dir.path().join("second"),
    );
    let mut first = plain_ssh(&fixture, &config, &options)
        .arg("darwin-vz-nix")
        .arg(format!("sleep 1; {}", touch(&first_done)))
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(15), "the master's socket", || {
        std::fs::read_dir(control.path()).unwrap().next().is_some()
    });
    // The second session goes through the master: no new proxy, no new stream.
    let mut second = plain_ssh(&fixture, &config, &options)
        .arg("darwin-vz-nix")
        .arg(format!("sleep 3; {}", touch(&second_done)))
        .spawn()
        .unwrap();
    assert!(first.wait().unwrap().success());
    assert!(first_done.exists());
    // The process that started the master is gone; the second session runs on.
    std::thread::sleep(idle * 3);
    assert!(!second_done.exists());
    let report = status(&fixture);
    assert_eq!(
        (report.state, report.connections),
        (VmState::Running, 1),
        "one stream, the master's, keeps the VM up"
    );
    assert!(second.wait().unwrap().success());
    assert!(second_done.exists());
    // The master lingers for ControlPersist (2 s), then disconnects: idle, off.
    wait_for(Duration::from_secs(15), "the idle poweroff", || {
        vm_state(&fixture) == VmState::Stopped
    });
    assert_eq!(harness.vm.boots(), 1);
}

#[test]
fn an_ssh_killed_without_a_disconnect_ends_its_session_through_clientalive() {
    let fixture = Fixture::new();
    let idle = Duration::from_millis(300);
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), Some(idle));
    let config = ssh_config_file(&fixture);
    let started = fixture.dir.path().join("started");
    let mut ssh = plain_ssh(&fixture, &config, &[])
        .arg("darwin-vz-nix")
        .arg(format!("{}; sleep 60", touch(&started)))
        .spawn()
        .unwrap();
    // Logged in and running its command (before login, sshd's LoginGraceTime
    // would be what ends an abandoned connection).
    wait_for(Duration::from_secs(15), "the remote command", || {
        started.exists()
    });
    assert_eq!(status(&fixture).connections, 1);
    // SIGKILL: no disconnect reaches the guest. Its sshd's ClientAlive probes (1 s × 2
    // in the test guest, 15 s × 4 in the real one) end the session.
    ssh.kill().unwrap();
    ssh.wait().unwrap();
    wait_for(Duration::from_secs(20), "the idle poweroff", || {
        vm_state(&fixture) == VmState::Stopped
    });
}

#[test]
fn the_generated_block_opts_out_of_connection_sharing_even_under_a_host_star_master() {
    let fixture = Fixture::new();
    let block = std::fs::read_to_string(ssh_config_file(&fixture)).unwrap();
    let path = fixture.dir.path().join("with-host-star");
    std::fs::write(
        &path,
        format!(
            "{block}Host *\n  ControlMaster auto\n  ControlPath /tmp/%C\n  ControlPersist yes\n"
        ),
    )
    .unwrap();
    let out = Command::new("ssh")
        .arg("-G")
        .arg("-F")
        .arg(&path)
        .arg("darwin-vz-nix")
        .env("HOME", fixture.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let settings = stdout(&out);
    assert!(settings.contains("\ncontrolmaster false\n"), "{settings}");
    assert!(!settings.contains("\ncontrolpath "), "{settings}");
}

#[test]
fn a_deleted_known_hosts_is_made_again_on_the_next_connection() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(fixture.cli(&["ssh", "--", "true"]).status.code(), Some(0));
    let known_hosts = fixture.state_dir.join("keys/known_hosts");
    let pinned = std::fs::read_to_string(&known_hosts).unwrap();
    std::fs::remove_file(&known_hosts).unwrap();

    // The VM runs on; ssh must not fail with "Host key verification failed".
    let out = fixture.cli(&["ssh", "--", "echo", "ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), pinned);

    let out = fixture.cli(&["status"]);
    assert!(
        stdout(&out).contains(&format!(
            "ago: {} was missing; made it again from the guest's host key\n",
            known_hosts.display()
        )),
        "{}",
        stdout(&out)
    );
    let out = fixture.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["notices"][0]["message"]
            .as_str()
            .unwrap()
            .ends_with("was missing; made it again from the guest's host key")
    );
}
