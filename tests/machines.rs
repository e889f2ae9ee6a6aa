//! The build-machine line the daemon writes to `<state>/machines`, through the real
//! supervisor (`daemon::serve`), and read by real Nix the way the nix-darwin module
//! wires it: `/etc/nix/machines` holds `@<state>/machines` (from `nix/lib.nix`), and
//! Nix follows it to the daemon's line.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use darwin_vz_nix::config::{ConfigLayer, parse_layer};
use support::*;

/// A fixture whose paths have no spaces, so the key fits into its machines field.
fn fixture_without_spaces() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("dvn-machines-")
        .tempdir()
        .unwrap();
    let state_dir = dir.path().join("state");
    let guest_dir = dir.path().join("guest");
    darwin_vz_nix::artifacts::write_fake_guest(&guest_dir, "loglevel=4\n").unwrap();
    Fixture {
        dir,
        state_dir,
        guest_dir,
    }
}

fn builder_layer(json: &str) -> ConfigLayer {
    parse_layer(&format!(r#"{{"builder": {json}}}"#)).unwrap()
}

fn machines_file(fixture: &Fixture) -> PathBuf {
    fixture.state_dir.join("machines")
}

#[test]
fn the_daemon_writes_its_machine_line_at_start_with_max_jobs_from_the_cores_it_uses() {
    let fixture = fixture_without_spaces();
    let config = fixture.config(ConfigLayer {
        cores: Some(1),
        ..builder_layer(r#"{"speedFactor": 3, "mandatoryFeatures": ["dvn-only"]}"#)
    });
    let _harness = Harness::start_with(
        &fixture,
        config,
        FakeVmBehaviour::default(),
        fixture.options(None),
    );
    let path = machines_file(&fixture);
    let text = std::fs::read_to_string(&path).unwrap();
    let entry = text.lines().nth(1).unwrap_or_default();
    assert_eq!(
        entry,
        format!(
            "ssh-ng://{}@darwin-vz-nix aarch64-linux,x86_64-linux {} 1 3 benchmark,big-parallel,dvn-only dvn-only -",
            current_user(),
            fixture.state_dir.join("keys/client_ed25519").display()
        ),
        "{text}"
    );
    assert!(fixture.state_dir.join("keys/client_ed25519").is_file());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "root's nix-daemon and users' nix read it");
}

#[test]
fn a_state_dir_with_a_space_leaves_the_key_field_to_ssh_config() {
    let fixture = Fixture::new();
    assert!(fixture.state_dir.to_str().unwrap().contains(' '));
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let text = std::fs::read_to_string(machines_file(&fixture)).unwrap();
    let entry = text.lines().nth(1).unwrap_or_default();
    let fields: Vec<&str> = entry.split(' ').collect();
    assert_eq!(fields.len(), 8, "{entry}");
    assert_eq!(fields[2], "-", "{entry}");
}

/// `@<state>/machines` exactly as nix/lib.nix writes it into /etc/nix/machines.
fn module_include_line(state_dir: &Path) -> String {
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "--expr"])
        .arg(format!(
            "(import {}).machinesInclude {}",
            serde_json::to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nix/lib.nix")).unwrap(),
            serde_json::to_string(state_dir.to_str().unwrap()).unwrap()
        ))
        .output()
        .expect("nix-instantiate is installed (apt install nix-bin)");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A Nix configuration of the test's own (no machine's nix.conf, users or groups
/// change the test), with no binary cache: CI has no network.
fn own_nix_conf(dir: &Path, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("nix.conf"),
        format!("build-users-group =\nsubstituters =\n{extra}"),
    )
    .unwrap();
    dir.to_path_buf()
}

fn ssh_config_file(fixture: &Fixture) -> PathBuf {
    let out = fixture.cli(&["ssh-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let path = fixture.dir.path().join("ssh_config");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

fn nix(fixture: &Fixture, conf_dir: &Path, ssh_config: &Path, args: &[&str]) -> Output {
    Command::new("nix")
        .args(["--extra-experimental-features", "nix-command"])
        .args(args)
        .env("NIX_SSHOPTS", format!("-F {}", ssh_config.display()))
        .env("HOME", fixture.dir.path())
        .env("NIX_CONF_DIR", conf_dir)
        .env("NIX_USER_CONF_FILES", conf_dir.join("nix.conf"))
        .env_remove("NIX_CONFIG")
        .env_remove("NIX_REMOTE")
        .output()
        .expect("nix is installed (apt install nix-bin)")
}

#[test]
fn nix_follows_the_module_include_line_to_the_daemon_line_and_builds_there() {
    let fixture = fixture_without_spaces();
    let root = fixture.dir.path();
    // The "guest" builds into a chroot store of its own.
    let guest_store = root.join("guest-store");
    let guest_conf = own_nix_conf(
        &root.join("guest-nix-conf"),
        "sandbox = true\nextra-sandbox-paths = /usr /bin /lib /lib64\n",
    );
    let behaviour = FakeVmBehaviour {
        sshd_extra: vec![format!(
            "SetEnv NIX_REMOTE={} NIX_CONF_DIR={} NIX_USER_CONF_FILES={}",
            guest_store.display(),
            guest_conf.display(),
            guest_conf.join("nix.conf").display()
        )],
        ..Default::default()
    };
    let _harness = Harness::start(&fixture, behaviour, None);

    // The client's /etc/nix/machines: a user's own machine (another system, never
    // contacted) and the module's include line.
    let etc_machines = root.join("etc-nix-machines");
    let include = module_include_line(&fixture.state_dir);
    assert_eq!(include, format!("@{}\n", machines_file(&fixture).display()));
    std::fs::write(
        &etc_machines,
        format!("ssh-ng://someone@elsewhere riscv64-linux - 2 1 - - -\n{include}"),
    )
    .unwrap();
    let client_conf = own_nix_conf(
        &root.join("client-nix-conf"),
        &format!("builders = @{}\n", etc_machines.display()),
    );

    let expression = root.join("remote.nix");
    std::fs::write(
        &expression,
        r#"derivation {
  name = "built-through-the-machines-file";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo built on the builder > $out" ];
}
"#,
    )
    .unwrap();
    let client_store = root.join("client-store");
    let out = nix(
        &fixture,
        &client_conf,
        &ssh_config_file(&fixture),
        &[
            "build",
            "--store",
            client_store.to_str().unwrap(),
            "--max-jobs",
            "0",
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
    let path = built[0]["outputs"]["out"].as_str().unwrap();
    let on_builder = guest_store.join(path.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(&on_builder).unwrap(),
        "built on the builder\n",
        "built in the builder's store"
    );
}
