//! The command line as a user meets it: help, version, dry runs, and the exact
//! message and exit status for each kind of bad input.

mod support;

use std::process::{Command, Output};

use support::*;

fn host_cpus() -> usize {
    std::thread::available_parallelism().unwrap().get()
}

/// The binary with a clean environment for our variables, the fixture's guest, and
/// `args` (no `--state-dir`: tests of the default directory need that).
fn bare_command(fixture: &Fixture, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"));
    command.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DARWIN_VZ_NIX_") {
            command.env_remove(key);
        }
    }
    command.env("DARWIN_VZ_NIX_GUEST", &fixture.guest_dir);
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// The binary on the fixture's state directory.
fn command(fixture: &Fixture, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut full = vec!["--state-dir", fixture.state_dir.to_str().unwrap()];
    full.extend_from_slice(args);
    bare_command(fixture, &full, env)
}

/// Runs the binary with a clean environment for our variables.
fn run(fixture: &Fixture, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(fixture, args, env).output().unwrap()
}

/// A dry run of the small test configuration (set through the environment, so that
/// flags in `extra` override it).
fn dry_run(fixture: &Fixture, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec!["start", "--dry-run"];
    args.extend_from_slice(extra);
    let mut env = env.to_vec();
    env.insert(0, ("DARWIN_VZ_NIX_CORES", "1"));
    env.insert(1, ("DARWIN_VZ_NIX_MEMORY", "1024"));
    run(fixture, &args, &env)
}

fn assert_usage_error(out: &Output, message: &str) {
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(out));
    assert_eq!(stderr(out), format!("darwin-vz-nix: {message}\n"));
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", stdout(out));
}

#[test]
fn help_teaches_and_every_subcommand_has_help() {
    let fixture = Fixture::new();
    let out = run(&fixture, &["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    for needle in [
        "Examples:",
        "Exit status: 0 success; 1 runtime failure",
        "DARWIN_VZ_NIX_*",
        "start",
        "proxy",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}");
    }
    for sub in [
        "start",
        "stop",
        "status",
        "ssh",
        "ssh-config",
        "proxy",
        "daemon",
        "doctor",
        "logs",
        "bench",
        "destroy",
        "rotate-keys",
        "completions",
    ] {
        let out = run(&fixture, &[sub, "--help"], &[]);
        assert_eq!(out.status.code(), Some(0), "{sub} --help");
        assert!(
            stdout(&out).contains("Usage: darwin-vz-nix"),
            "{sub} --help"
        );
    }
    let start = stdout(&run(&fixture, &["start", "--help"], &[]));
    assert!(
        start.contains("Guest memory in MiB [default: 6144; at least 1024]"),
        "{start}"
    );
    assert!(start.contains("e.g. 100G, 512M, 1T"), "{start}");
    assert!(!fixture.state_dir.exists(), "help creates no state");
}

#[test]
fn version_and_completions() {
    let fixture = Fixture::new();
    let out = run(&fixture, &["--version"], &[]);
    assert_eq!(
        stdout(&out),
        format!("darwin-vz-nix {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&fixture, &["completions", "zsh"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("#compdef darwin-vz-nix"));
}

#[test]
fn dry_run_prints_the_plan_and_creates_nothing() {
    let fixture = Fixture::new();
    let out = dry_run(&fixture, &["--json", "--kernel-param", "quiet"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["cpus"], 1);
    assert_eq!(plan["memoryMib"], 1024);
    assert_eq!(
        plan["kernel"],
        fixture.guest_dir.join("kernel").to_str().unwrap()
    );
    let line: Vec<&str> = plan["commandLine"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(line[0], "console=hvc0");
    assert_eq!(
        line[2],
        format!("init={}/system/init", fixture.guest_dir.display())
    );
    assert_eq!(
        line[3], "loglevel=4",
        "the guest's own kernel-params follow"
    );
    assert_eq!(*line.last().unwrap(), "quiet", "user parameters come last");
    let types: Vec<&str> = plan["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "disk",
            "network",
            "share",
            "share",
            "rosetta",
            "vsock",
            "entropy",
            "console",
            "memory-balloon"
        ]
    );
    let disk = &plan["devices"][0];
    assert_eq!(
        (disk["caching"].as_str(), disk["sync"].as_str()),
        (Some("cached"), Some("fsync"))
    );
    assert!(!fixture.state_dir.exists(), "a dry run creates no state");

    let out = dry_run(&fixture, &["--no-rosetta"], &[]);
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "Boot plan for {} (dry run",
            fixture.state_dir.display()
        )),
        "{text}"
    );
    assert!(text.contains("darwin_vz_nix.rosetta=0"), "{text}");
    assert!(!text.contains("rosetta       virtiofs"), "{text}");
    assert!(
        text.contains("share         virtiofs tag nix-store <- /nix/store (read-only)"),
        "{text}"
    );
}

#[test]
fn configuration_precedence_through_the_binary() {
    let fixture = Fixture::new();
    let file = fixture.dir.path().join("config.json");
    std::fs::write(
        &file,
        r#"{"memory": 1100, "kernelParams": ["from-file"], "rosetta": false}"#,
    )
    .unwrap();
    let memory = |out: &Output| -> u64 {
        assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["memoryMib"]
            .as_u64()
            .unwrap()
    };
    let base = ["start", "--dry-run", "--json", "--cores", "1"];
    let config = file.to_str().unwrap();
    let out = run(&fixture, &[&base[..], &["--config", config]].concat(), &[]);
    assert_eq!(memory(&out), 1100, "file over default");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        plan["commandLine"]
            .as_array()
            .unwrap()
            .contains(&"from-file".into())
    );
    let out = run(
        &fixture,
        &[&base[..], &["--config", config]].concat(),
        &[("DARWIN_VZ_NIX_MEMORY", "1200")],
    );
    assert_eq!(memory(&out), 1200, "environment over file");
    let out = run(
        &fixture,
        &[&base[..], &["--config", config, "--memory", "1300"]].concat(),
        &[("DARWIN_VZ_NIX_MEMORY", "1200")],
    );
    assert_eq!(memory(&out), 1300, "flag over environment");
    let out = run(&fixture, &base, &[("DARWIN_VZ_NIX_CONFIG", config)]);
    assert_eq!(memory(&out), 1100, "DARWIN_VZ_NIX_CONFIG names the file");
}

#[test]
fn bad_sizes_and_numbers_are_usage_errors() {
    let fixture = Fixture::new();
    let out = dry_run(&fixture, &["--disk-size", "10X"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with(
            "error: invalid value '10X' for '--disk-size <SIZE>': `10X` is not a size: the unit is not one of K, M, G, T; write a whole number with a unit, e.g. 100G, 512M or 1T"
        ),
        "{}",
        stderr(&out)
    );
    let out = dry_run(&fixture, &["--cores", "lots"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: invalid value 'lots' for '--cores <N>'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn each_bad_value_names_its_input_and_the_fix() {
    let fixture = Fixture::new();
    assert_usage_error(
        &dry_run(&fixture, &["--cores", "0"], &[]),
        "invalid configuration: --cores: 0 is out of range; give 1 to 1024 virtual CPUs",
    );
    assert_usage_error(
        &dry_run(&fixture, &["--memory", "512"], &[]),
        "invalid configuration: --memory: 512 MiB is below the 1024 MiB the guest needs to boot and build; give it at least 1024 (memory is in MiB: 6144 = 6 GiB)",
    );
    let cpus = host_cpus();
    let too_many = (cpus + 1).to_string();
    assert_usage_error(
        &dry_run(&fixture, &["--cores", &too_many], &[]),
        &format!(
            "invalid configuration: --cores: {} is more than this machine's {cpus} CPUs; use at most {cpus}",
            cpus + 1
        ),
    );
    let out = dry_run(&fixture, &["--memory", "16777216"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("darwin-vz-nix: invalid configuration: --memory: 16777216 MiB is more than this machine's "),
        "{}",
        stderr(&out)
    );
    assert_usage_error(
        &dry_run(&fixture, &["--kernel-param", "a b"], &[]),
        "invalid configuration: --kernel-param: \"a b\" is not one kernel parameter; give each parameter separately, without spaces",
    );
    assert_usage_error(
        &dry_run(&fixture, &["--disk-size", "100M"], &[]),
        "invalid configuration: --disk-size: 100M is too small; use at least 512M",
    );
    assert_usage_error(
        &dry_run(&fixture, &[], &[("DARWIN_VZ_NIX_ROSETTA", "maybe")]),
        "invalid configuration: DARWIN_VZ_NIX_ROSETTA: `maybe` is not a boolean; use 1/0, true/false or yes/no",
    );
    assert_usage_error(
        &dry_run(&fixture, &[], &[("DARWIN_VZ_NIX_IDLE_TIMEOUT", "soon")]),
        "invalid configuration: DARWIN_VZ_NIX_IDLE_TIMEOUT: `soon` is not a whole number of minutes",
    );
}

#[test]
fn config_file_problems_name_the_file() {
    let fixture = Fixture::new();
    let file = fixture.dir.path().join("config.json");
    let path = file.display().to_string();

    let out = dry_run(&fixture, &["--config", &path], &[]);
    assert_usage_error(
        &out,
        &format!(
            "invalid configuration: config file {path}: cannot read it (No such file or directory (os error 2)); check the path given to --config or DARWIN_VZ_NIX_CONFIG"
        ),
    );
    std::fs::write(&file, "{\"coress\": 4}").unwrap();
    let out = dry_run(&fixture, &["--config", &path], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with(&format!(
            "darwin-vz-nix: invalid configuration: config file {path}: unknown field `coress`, expected one of `cores`"
        )),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out)
            .trim_end()
            .ends_with("at line 1 column 9; see the configuration reference in the README")
    );
    std::fs::write(&file, "{\"cores\": 4,}").unwrap();
    let out = dry_run(&fixture, &["--config", &path], &[]);
    assert_usage_error(
        &out,
        &format!(
            "invalid configuration: config file {path}: trailing comma at line 1 column 13; see the configuration reference in the README"
        ),
    );
}

#[test]
fn broken_guests_are_caught_before_boot() {
    let fixture = Fixture::new();
    let missing = fixture.dir.path().join("nope");
    assert_usage_error(
        &dry_run(&fixture, &["--guest", missing.to_str().unwrap()], &[]),
        &format!(
            "invalid configuration: --guest: {} is not a directory; point it at a guest built by `nix build .#guest` (it holds kernel, initrd, system and registration)",
            missing.display()
        ),
    );
    std::fs::write(fixture.guest_dir.join("kernel"), [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
    assert_usage_error(
        &dry_run(&fixture, &[], &[]),
        &format!(
            "invalid configuration: DARWIN_VZ_NIX_GUEST: kernel {}/kernel is gzip-compressed; Virtualization.framework boots only an uncompressed arm64 `Image` — use the kernel of a guest built by nix/guest.nix, or gunzip it",
            fixture.guest_dir.display()
        ),
    );
    let out = command(&fixture, &["start", "--dry-run"], &[])
        .env_remove("DARWIN_VZ_NIX_GUEST")
        .output()
        .unwrap();
    assert_usage_error(
        &out,
        "invalid configuration: `guest` (built-in default): no guest configured; pass --guest DIR (a guest built by `nix build .#guest`), set DARWIN_VZ_NIX_GUEST, or set `guest` in the config file — `nix run` and the nix-darwin module set it for you",
    );
}

#[test]
fn several_problems_are_reported_together() {
    let fixture = Fixture::new();
    let out = dry_run(
        &fixture,
        &["--cores", "0", "--memory", "10", "--disk-size", "1M"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "darwin-vz-nix: invalid configuration (3 problems):\n  \
         - --cores: 0 is out of range; give 1 to 1024 virtual CPUs\n  \
         - --memory: 10 MiB is below the 1024 MiB the guest needs to boot and build; give it at least 1024 (memory is in MiB: 6144 = 6 GiB)\n  \
         - --disk-size: 1M is too small; use at least 512M\n"
    );
}

#[test]
fn disks_are_never_shrunk_and_qcow2_is_refused() {
    let fixture = Fixture::new();
    std::fs::create_dir_all(&fixture.state_dir).unwrap();
    let disk = fixture.state_dir.join("disk.img");
    let file = std::fs::File::create(&disk).unwrap();
    file.set_len(2 << 30).unwrap();
    assert_usage_error(
        &dry_run(&fixture, &["--disk-size", "1G"], &[]),
        "invalid configuration: --disk-size: 1G is smaller than the existing disk image (2G); disks are never shrunk — set diskSize to at least 2G, or run `darwin-vz-nix destroy` to start over with an empty disk",
    );
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        2 << 30,
        "the image is untouched"
    );

    std::fs::write(&disk, b"QFI\xfb\0\0\0\x03").unwrap();
    assert_usage_error(
        &dry_run(&fixture, &[], &[]),
        &format!(
            "invalid configuration: --state-dir: {} is a QEMU qcow2 image (left over from nix.linux-builder?), not a raw disk; move it away or run `darwin-vz-nix destroy` — booting it as raw would corrupt it",
            disk.display()
        ),
    );
}

#[test]
fn a_state_dir_too_long_for_a_socket_is_refused() {
    let fixture = Fixture::new();
    let long = format!("/tmp/{}", "d".repeat(110));
    let out = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"))
        .args([
            "--state-dir",
            &long,
            "start",
            "--dry-run",
            "--cores",
            "1",
            "--memory",
            "1024",
        ])
        .env("DARWIN_VZ_NIX_GUEST", &fixture.guest_dir)
        .output()
        .unwrap();
    assert_usage_error(
        &out,
        &format!(
            "invalid configuration: --state-dir: the control socket path {long}/control.sock is {} bytes, longer than the {} a Unix socket allows; choose a shorter --state-dir",
            long.len() + 13,
            darwin_vz_nix::state::MAX_SOCKET_PATH
        ),
    );
}

#[test]
fn start_and_daemon_say_where_vms_can_run_and_lose_nothing() {
    if darwin_vz_nix::vm_backend_available() {
        return; // On a Mac, start really boots; see tests/macos.rs.
    }
    let fixture = Fixture::new();
    let out = run(
        &fixture,
        &["start", "--cores", "1", "--memory", "1024"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("darwin-vz-nix: darwin-vz-nix runs VMs only on macOS 13+ on Apple Silicon (this is linux); `darwin-vz-nix start --dry-run` shows what would boot"), "{}", stderr(&out));
    let out = run(
        &fixture,
        &["daemon", "--cores", "1", "--memory", "1024"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("runs VMs only on macOS"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_commands_and_destroy_without_yes_are_usage_errors() {
    let fixture = Fixture::new();
    let out = run(&fixture, &["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: unrecognized subcommand 'frobnicate'"),
        "{}",
        stderr(&out)
    );
    let out = run(&fixture, &["destroy"], &[]);
    assert_usage_error(
        &out,
        &format!(
            "destroy deletes the disk image {} (the guest's store and Nix database) and the SSH keys in {}; re-run with --yes",
            fixture.state_dir.join("disk.img").display(),
            fixture.state_dir.join("keys").display()
        ),
    );
    let out = run(&fixture, &["destroy", "--yes"], &[]);
    assert_eq!(
        stdout(&out),
        format!(
            "state directory {0}\nnothing to delete: {0} does not exist\n",
            fixture.state_dir.display()
        )
    );
}

#[test]
fn doctor_reports_one_line_per_check() {
    let fixture = Fixture::new();
    let out = run(
        &fixture,
        &["doctor", "--cores", "1", "--memory", "1024"],
        &[],
    );
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.starts_with("ok    guest")), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("ok    ssh-keygen")),
        "{text}"
    );
    if !darwin_vz_nix::vm_backend_available() {
        assert!(
            text.lines()
                .any(|l| l.starts_with("skip  macOS          not macOS (linux)")),
            "{text}"
        );
        assert_eq!(out.status.code(), Some(0), "skips are not failures: {text}");
    }
    std::fs::remove_file(fixture.guest_dir.join("initrd")).unwrap();
    let out = run(
        &fixture,
        &["doctor", "--cores", "1", "--memory", "1024", "--json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let guest = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "guest")
        .unwrap();
    assert_eq!(guest["verdict"], "fail");
}
