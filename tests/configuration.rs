//! Configuration as the README promises it, through the real binary: which layer
//! wins for each setting, where the state directory is by default, every problem of
//! every layer reported at once, and a dry run that changes nothing in an existing
//! state directory.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

/// The binary with none of our variables but `env`, and `args` as given (no
/// `--state-dir` unless the test passes one).
fn bare(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"));
    command.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DARWIN_VZ_NIX_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    bare(args, env).output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn write_config(fixture: &Fixture, name: &str, value: serde_json::Value) -> String {
    let path = fixture.dir.path().join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// The directory a dry run names in its first line.
fn planned_state_dir(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    let text = stdout(out);
    let first = text.lines().next().unwrap_or_default();
    first
        .strip_prefix("Boot plan for ")
        .and_then(|rest| rest.strip_suffix(" (dry run: nothing was created or started)"))
        .unwrap_or_else(|| panic!("{text}"))
        .to_string()
}

/// `darwin_vz_nix.rosetta=…` of a JSON plan.
fn rosetta_param(plan: &serde_json::Value) -> String {
    plan["commandLine"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .find_map(|p| p.strip_prefix("darwin_vz_nix.rosetta="))
        .unwrap()
        .to_string()
}

#[test]
fn state_dir_precedence_is_file_then_environment_then_flag() {
    let fixture = Fixture::new();
    let dirs: Vec<String> = ["from-file", "from-env", "from-flag"]
        .iter()
        .map(|name| fixture.dir.path().join(name).display().to_string())
        .collect();
    let config = write_config(
        &fixture,
        "config.json",
        serde_json::json!({ "stateDir": dirs[0], "cores": 1, "memory": 1024 }),
    );
    let guest = fixture.guest_dir.to_str().unwrap();
    let dry_run = |flag: Option<&str>, env: Option<&str>| {
        let mut args = vec!["start", "--dry-run", "--config", &config];
        if let Some(dir) = flag {
            args.extend(["--state-dir", dir]);
        }
        let mut vars = vec![("DARWIN_VZ_NIX_GUEST", guest)];
        if let Some(dir) = env {
            vars.push(("DARWIN_VZ_NIX_STATE_DIR", dir));
        }
        planned_state_dir(&run(&args, &vars))
    };
    assert_eq!(dry_run(None, None), dirs[0], "the file over the default");
    assert_eq!(
        dry_run(None, Some(&dirs[1])),
        dirs[1],
        "the environment over the file"
    );
    assert_eq!(
        dry_run(Some(&dirs[2]), Some(&dirs[1])),
        dirs[2],
        "the flag over the environment"
    );
    // The same order for a command that only reads the configuration.
    let out = run(
        &["status", "--json", "--state-dir", &dirs[2]],
        &[("DARWIN_VZ_NIX_STATE_DIR", &dirs[1])],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stateDir"], dirs[2].as_str());
    for dir in &dirs {
        assert!(!Path::new(dir).exists(), "a dry run created {dir}");
    }
}

#[test]
fn rosetta_precedence_is_file_then_environment_then_flag() {
    let fixture = Fixture::new();
    let state = fixture.state_dir.to_str().unwrap();
    let guest = fixture.guest_dir.to_str().unwrap();
    let off = write_config(
        &fixture,
        "off.json",
        serde_json::json!({ "rosetta": false, "cores": 1, "memory": 1024 }),
    );
    let plan = |flags: &[&str], env: Option<&str>| {
        let mut args = vec!["--state-dir", state, "start", "--dry-run", "--json"];
        args.extend_from_slice(flags);
        let mut vars = vec![("DARWIN_VZ_NIX_GUEST", guest)];
        if let Some(value) = env {
            vars.push(("DARWIN_VZ_NIX_ROSETTA", value));
        }
        rosetta_param(&json(&run(&args, &vars)))
    };
    assert_eq!(
        plan(&["--config", &off], None),
        "0",
        "the file over the default"
    );
    assert_eq!(
        plan(&["--config", &off], Some("yes")),
        "1",
        "the environment over the file"
    );
    assert_eq!(
        plan(&["--config", &off, "--no-rosetta"], Some("yes")),
        "0",
        "--no-rosetta over the environment"
    );
    assert_eq!(
        plan(&["--config", &off, "--rosetta"], Some("off")),
        "1",
        "--rosetta over the environment"
    );
    assert_eq!(
        plan(&["--cores", "1", "--memory", "1024"], Some("0")),
        "0",
        "the environment over the default"
    );
}

#[test]
fn other_settings_follow_the_same_precedence() {
    let fixture = Fixture::new();
    let state = fixture.state_dir.to_str().unwrap();
    // A second guest, to tell the layers' guests apart.
    let other_guest = fixture.dir.path().join("other guest");
    darwin_vz_nix::artifacts::write_fake_guest(&other_guest, "").unwrap();
    let config = write_config(
        &fixture,
        "config.json",
        serde_json::json!({
            "cores": 1,
            "memory": 1024,
            "kernelParams": ["from-file"],
            "guest": fixture.guest_dir,
            "sshUser": "fileuser",
        }),
    );
    let base = ["--state-dir", state, "--config", &config];
    let plan = |extra: &[&str], env: &[(&str, &str)]| {
        let args = [&base[..], &["start", "--dry-run", "--json"], extra].concat();
        json(&run(&args, env))
    };
    let params = |plan: &serde_json::Value| -> Vec<String> {
        plan["commandLine"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    };
    let from_file = plan(&[], &[]);
    assert!(params(&from_file).contains(&"from-file".to_string()));
    assert_eq!(
        from_file["kernel"],
        fixture.guest_dir.join("kernel").to_str().unwrap()
    );

    let other = other_guest.to_str().unwrap();
    let from_env = plan(
        &[],
        &[
            ("DARWIN_VZ_NIX_KERNEL_PARAMS", "from-env"),
            ("DARWIN_VZ_NIX_GUEST", other),
        ],
    );
    assert!(params(&from_env).contains(&"from-env".to_string()));
    assert!(!params(&from_env).contains(&"from-file".to_string()));
    assert_eq!(
        from_env["kernel"],
        other_guest.join("kernel").to_str().unwrap()
    );

    let from_flags = plan(
        &[
            "--kernel-param",
            "from-flag",
            "--guest",
            fixture.guest_dir.to_str().unwrap(),
        ],
        &[
            ("DARWIN_VZ_NIX_KERNEL_PARAMS", "from-env"),
            ("DARWIN_VZ_NIX_GUEST", other),
        ],
    );
    assert!(params(&from_flags).contains(&"from-flag".to_string()));
    assert!(!params(&from_flags).contains(&"from-env".to_string()));
    assert_eq!(
        from_flags["kernel"],
        fixture.guest_dir.join("kernel").to_str().unwrap()
    );

    // sshUser: the file, then the environment, then `ssh-config --user`.
    let user = |extra: &[&str], env: &[(&str, &str)]| {
        let args = [&base[..], &["ssh-config"], extra].concat();
        let out = run(&args, env);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .find_map(|l| l.trim().strip_prefix("User ").map(String::from))
            .unwrap()
    };
    assert_eq!(user(&[], &[]), "fileuser");
    assert_eq!(
        user(&[], &[("DARWIN_VZ_NIX_SSH_USER", "envuser")]),
        "envuser"
    );
    assert_eq!(
        user(
            &["--user", "flaguser"],
            &[("DARWIN_VZ_NIX_SSH_USER", "envuser")]
        ),
        "flaguser"
    );
}

#[test]
fn the_default_state_dir_follows_xdg_state_home_or_falls_back_to_local_state() {
    let fixture = Fixture::new();
    let home = fixture.dir.path().join("home");
    let xdg = fixture.dir.path().join("xdg");
    let state_dir = |xdg_value: Option<&str>| -> String {
        let mut command = bare(&["status", "--json"], &[]);
        command.env("HOME", &home).env_remove("XDG_STATE_HOME");
        if let Some(value) = xdg_value {
            command.env("XDG_STATE_HOME", value);
        }
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["stateDir"].as_str().unwrap().to_string()
    };
    if cfg!(target_os = "macos") {
        let expected = home.join("Library/Application Support/darwin-vz-nix");
        assert_eq!(state_dir(None), expected.display().to_string());
        return;
    }
    let fallback = home
        .join(".local/state/darwin-vz-nix")
        .display()
        .to_string();
    assert_eq!(state_dir(None), fallback, "XDG_STATE_HOME unset");
    assert_eq!(
        state_dir(Some(xdg.to_str().unwrap())),
        xdg.join("darwin-vz-nix").display().to_string(),
        "XDG_STATE_HOME set"
    );
    assert_eq!(
        state_dir(Some("relative/state")),
        fallback,
        "a relative XDG_STATE_HOME is ignored, as the XDG spec says"
    );
}

#[test]
fn problems_in_every_layer_are_reported_at_once() {
    let fixture = Fixture::new();
    let state = fixture.state_dir.to_str().unwrap();
    let missing = fixture.dir.path().join("no guest here");
    let file = write_config(&fixture, "config.json", serde_json::json!({ "memory": 10 }));

    // The environment, a flag, the config file and the guest: four problems, one run.
    let out = run(
        &[
            "--state-dir",
            state,
            "--config",
            &file,
            "start",
            "--dry-run",
            "--cores",
            "0",
        ],
        &[
            ("DARWIN_VZ_NIX_ROSETTA", "maybe"),
            ("DARWIN_VZ_NIX_GUEST", missing.to_str().unwrap()),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: invalid configuration (4 problems):\n  \
             - DARWIN_VZ_NIX_ROSETTA: `maybe` is not a boolean; use 1/0, true/false or yes/no\n  \
             - --cores: 0 is out of range; give 1 to 1024 virtual CPUs\n  \
             - `memory` in {file}: 10 MiB is below the 1024 MiB the guest needs to boot and build; give it at least 1024 (memory is in MiB: 6144 = 6 GiB)\n  \
             - DARWIN_VZ_NIX_GUEST: {} is not a directory; point it at a guest built by `nix build .#guest` (it holds kernel, initrd, system and registration)\n",
            missing.display()
        )
    );
    assert!(out.stdout.is_empty());

    // A config file that cannot be read does not hide the environment's problems,
    // nor the flags'; the guest, which that file may name, is not judged without it.
    let unreadable = fixture.dir.path().join("absent.json");
    let out = run(
        &[
            "--state-dir",
            state,
            "--config",
            unreadable.to_str().unwrap(),
            "start",
            "--dry-run",
            "--memory",
            "10",
        ],
        &[("DARWIN_VZ_NIX_CORES", "many")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: invalid configuration (3 problems):\n  \
             - DARWIN_VZ_NIX_CORES: `many` is not a whole number of virtual CPUs\n  \
             - config file {}: cannot read it (No such file or directory (os error 2)); check the path given to --config or DARWIN_VZ_NIX_CONFIG\n  \
             - --memory: 10 MiB is below the 1024 MiB the guest needs to boot and build; give it at least 1024 (memory is in MiB: 6144 = 6 GiB)\n",
            unreadable.display()
        )
    );

    // Commands that do not boot report the layers' problems together too.
    let out = run(
        &["--state-dir", state, "--config", &file, "status"],
        &[("DARWIN_VZ_NIX_STOP_TIMEOUT", "0")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: invalid configuration (2 problems):\n  \
             - `memory` in {file}: 10 MiB is below the 1024 MiB the guest needs to boot and build; give it at least 1024 (memory is in MiB: 6144 = 6 GiB)\n  \
             - DARWIN_VZ_NIX_STOP_TIMEOUT: 0 is out of range; give 1 to 3600 seconds\n"
        )
    );
    assert!(!fixture.state_dir.exists(), "nothing was created");
}

/// Name, size, mode and modification time of everything under `dir`.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, u32, i64, i64)> {
    let mut entries = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        }
        entries.push((
            path,
            meta.len(),
            meta.mode(),
            meta.mtime(),
            meta.mtime_nsec(),
        ));
    }
    entries.sort();
    entries
}

#[test]
fn a_dry_run_on_an_existing_state_dir_changes_nothing_in_it() {
    let fixture = Fixture::new();
    let state = fixture.state_dir.to_str().unwrap();
    let guest = fixture.guest_dir.to_str().unwrap();
    std::fs::create_dir(&fixture.state_dir).unwrap();
    std::fs::set_permissions(
        &fixture.state_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    // A disk image smaller than the configured size, and no MAC address yet.
    let disk = fixture.state_dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let dry_run = || {
        run(
            &[
                "--state-dir",
                state,
                "start",
                "--dry-run",
                "--json",
                "--cores",
                "1",
                "--memory",
                "1024",
                "--disk-size",
                "2G",
            ],
            &[("DARWIN_VZ_NIX_GUEST", guest)],
        )
    };
    let before = snapshot(&fixture.state_dir);
    let plan = json(&dry_run());
    assert_eq!(plan["devices"][0]["path"], disk.to_str().unwrap());
    assert_eq!(
        snapshot(&fixture.state_dir),
        before,
        "no mac-address, no keys, no logs written; disk.img neither grown nor touched"
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 30);
    assert!(!fixture.state_dir.join("mac-address").exists());

    // An existing MAC address is the one planned, and stays as it was.
    let mac = fixture.state_dir.join("mac-address");
    std::fs::write(&mac, "02:11:22:33:44:55\n").unwrap();
    let before = snapshot(&fixture.state_dir);
    let plan = json(&dry_run());
    let network = plan["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["type"] == "network")
        .unwrap();
    assert_eq!(network["mac"], "02:11:22:33:44:55");
    assert_eq!(snapshot(&fixture.state_dir), before);
}

#[test]
fn relative_paths_in_the_config_file_are_relative_to_the_file() {
    let fixture = Fixture::new();
    // The file sits next to the guest and names it relatively; the command runs
    // from `/`, so a path taken relative to the working directory would miss it.
    let config = write_config(
        &fixture,
        "config.json",
        serde_json::json!({ "guest": "guest", "stateDir": "state", "cores": 1, "memory": 1024 }),
    );
    let out = bare(&["start", "--dry-run", "--json", "--config", &config], &[])
        .current_dir("/")
        .output()
        .unwrap();
    let plan = json(&out);
    assert_eq!(
        plan["kernel"],
        fixture.guest_dir.join("kernel").to_str().unwrap()
    );
    assert_eq!(
        plan["devices"][0]["path"],
        fixture.dir.path().join("state/disk.img").to_str().unwrap()
    );
}
