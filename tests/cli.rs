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
fn version_is_one_line_and_completions_offer_every_subcommand() {
    let fixture = Fixture::new();
    let out = run(&fixture, &["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let version = stdout(&out);
    let number = version
        .strip_prefix("darwin-vz-nix ")
        .and_then(|v| v.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("{version:?}"));
    let parts: Vec<&str> = number.split('.').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
        "a semantic version: {version:?}"
    );
    for (shell, header) in [
        ("zsh", "#compdef darwin-vz-nix"),
        ("bash", "complete -F _darwin__vz__nix"),
        ("fish", "complete -c darwin-vz-nix"),
    ] {
        let out = run(&fixture, &["completions", shell], &[]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = stdout(&out);
        assert!(script.contains(header), "{shell}: {header}");
        for sub in [
            "start",
            "stop",
            "status",
            "ssh-config",
            "proxy",
            "machines",
            "daemon",
            "doctor",
            "logs",
            "bench",
            "destroy",
            "rotate-keys",
        ] {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
    assert!(!fixture.state_dir.exists(), "neither creates state");
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
        &dry_run(&fixture, &[], &[("DARWIN_VZ_NIX_PREVENT_SLEEP", "later")]),
        "invalid configuration: DARWIN_VZ_NIX_PREVENT_SLEEP: `later` is not a boolean; use 1/0, true/false or yes/no",
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
        "invalid configuration: `guest` (built-in default): no guest configured; pass --guest DIR (a guest built by `nix build .#guest`) or --guest-drv DRV --guest-out PATH (its derivation, which the daemon builds), set DARWIN_VZ_NIX_GUEST, or set `guest` in the config file — `nix run` and the nix-darwin module set one for you",
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
        skipped(
            "start_and_daemon_say_where_vms_can_run_and_lose_nothing",
            "on a Mac, start really boots (tests/macos.rs)",
        );
        return;
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

/// Waits for a child with a bound: a command that should fail at once must not hang.
fn output_within(mut command: Command, limit: std::time::Duration) -> Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn every_number_has_a_range_in_every_layer_and_one_message() {
    let fixture = Fixture::new();
    let file = fixture.dir.path().join("config.json");
    let path = file.display().to_string();
    // (config key, variable, flag, value in JSON, value as text, message)
    let settings = [
        (
            "cores",
            "DARWIN_VZ_NIX_CORES",
            "--cores",
            "18446744073709551615",
            "18446744073709551615",
            "18446744073709551615 is out of range; give 1 to 1024 virtual CPUs",
        ),
        (
            "memory",
            "DARWIN_VZ_NIX_MEMORY",
            "--memory",
            "16777217",
            "16777217",
            "16777217 is out of range; give 1024 to 16777216 MiB (memory is in MiB: 6144 = 6 GiB)",
        ),
        (
            "diskSize",
            "DARWIN_VZ_NIX_DISK_SIZE",
            "--disk-size",
            "\"65T\"",
            "65T",
            "65T is out of range; give 512M to 64T",
        ),
        (
            "idleTimeout",
            "DARWIN_VZ_NIX_IDLE_TIMEOUT",
            "--idle-timeout",
            "18446744073709551615",
            "18446744073709551615",
            "18446744073709551615 is out of range; give 0 to 525600 minutes (0 = never power off)",
        ),
        (
            "stopTimeout",
            "DARWIN_VZ_NIX_STOP_TIMEOUT",
            "--stop-timeout",
            "18446744073709551615",
            "18446744073709551615",
            "18446744073709551615 is out of range; give 1 to 3600 seconds",
        ),
        (
            "stopTimeout",
            "DARWIN_VZ_NIX_STOP_TIMEOUT",
            "--stop-timeout",
            "0",
            "0",
            "0 is out of range; give 1 to 3600 seconds",
        ),
    ];
    for (key, var, flag, json, text, message) in settings {
        std::fs::write(&file, format!("{{\"{key}\": {json}}}")).unwrap();
        let layers = [
            (
                flag.to_string(),
                run(&fixture, &["start", "--dry-run", flag, text], &[]),
            ),
            (
                var.to_string(),
                run(&fixture, &["start", "--dry-run"], &[(var, text)]),
            ),
            (
                format!("`{key}` in {path}"),
                run(&fixture, &["start", "--dry-run", "--config", &path], &[]),
            ),
        ];
        for (input, out) in layers {
            assert_usage_error(&out, &format!("invalid configuration: {input}: {message}"));
        }
    }
    // The same value through a subcommand that only reads the configuration.
    assert_usage_error(
        &run(
            &fixture,
            &["stop"],
            &[("DARWIN_VZ_NIX_STOP_TIMEOUT", "18446744073709551615")],
        ),
        "invalid configuration: DARWIN_VZ_NIX_STOP_TIMEOUT: 18446744073709551615 is out of range; give 1 to 3600 seconds",
    );

    // Numbers that only a command's own flags take; `18446744073709552` s used to
    // wrap to 0.38 s, `18446744073709551615` to end in an overflow panic (exit 101).
    let flags: [(&[&str], &str, &str); 8] = [
        (
            &["start", "--timeout", "18446744073709551615"],
            "--timeout <SECONDS>",
            "18446744073709551615 is out of range; give 1 to 86400 seconds",
        ),
        (
            &["start", "--timeout", "18446744073709552"],
            "--timeout <SECONDS>",
            "18446744073709552 is out of range; give 1 to 86400 seconds",
        ),
        (
            &["stop", "--timeout", "18446744073709551615"],
            "--timeout <SECONDS>",
            "18446744073709551615 is out of range; give 1 to 3600 seconds",
        ),
        (
            &["stop", "--timeout", "0"],
            "--timeout <SECONDS>",
            "0 is out of range; give 1 to 3600 seconds",
        ),
        (
            &["proxy", "--timeout", "99999999999999999999999"],
            "--timeout <SECONDS>",
            "99999999999999999999999 is out of range; give 1 to 86400 seconds",
        ),
        (
            &["bench", "boot", "--runs", "0"],
            "--runs <RUNS>",
            "0 is out of range; give 1 to 100 runs",
        ),
        (
            &["bench", "control", "--runs", "100001"],
            "--runs <RUNS>",
            "100001 is out of range; give 1 to 100000 runs",
        ),
        (
            &["logs", "-n", "18446744073709551616"],
            "--lines <N>",
            "18446744073709551616 is out of range; give 0 to 100000 lines",
        ),
    ];
    for (args, arg, message) in flags {
        let out = run(&fixture, args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!(
                "error: invalid value '{}' for '{arg}': {message}\n\nFor more information, try '--help'.\n",
                args.last().unwrap()
            ),
            "{args:?}"
        );
        assert!(out.stdout.is_empty());
    }
    assert!(!fixture.state_dir.exists(), "nothing was created");
}

#[test]
fn a_config_file_that_is_a_fifo_a_device_or_huge_is_refused_at_once() {
    let fixture = Fixture::new();
    let fifo = fixture.dir.path().join("config.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let huge = fixture.dir.path().join("huge.json");
    std::fs::write(&huge, vec![b' '; (1 << 20) + 1]).unwrap();
    let hint = "check the path given to --config or DARWIN_VZ_NIX_CONFIG";
    let cases = [
        (
            fifo.display().to_string(),
            "is a FIFO, not a regular file".to_string(),
        ),
        (
            "/dev/zero".to_string(),
            "is a character device, not a regular file".to_string(),
        ),
        (
            huge.display().to_string(),
            "is larger than 1048576 bytes (a configuration file is a few hundred)".to_string(),
        ),
    ];
    let limit = std::time::Duration::from_secs(20);
    for (path, what) in cases {
        let expected = format!("invalid configuration: config file {path}: {what}; {hint}");
        let by_flag = output_within(
            command(&fixture, &["status", "--config", &path], &[]),
            limit,
        );
        assert_usage_error(&by_flag, &expected);
        let by_env = output_within(
            command(&fixture, &["status"], &[("DARWIN_VZ_NIX_CONFIG", &path)]),
            limit,
        );
        assert_usage_error(&by_env, &expected);
    }
}

#[test]
fn duplicate_keys_in_the_config_file_are_refused() {
    let fixture = Fixture::new();
    let file = fixture.dir.path().join("config.json");
    std::fs::write(&file, r#"{"memory": 2048, "memory": 1024}"#).unwrap();
    let path = file.display().to_string();
    assert_usage_error(
        &dry_run(&fixture, &["--config", &path], &[]),
        &format!(
            "invalid configuration: config file {path}: duplicate field `memory` at line 1 column 25; see the configuration reference in the README"
        ),
    );
}

#[test]
fn a_variable_that_is_set_but_unusable_is_an_error_and_destroy_deletes_nothing() {
    use std::os::unix::ffi::OsStrExt;
    let fixture = Fixture::new();
    // The default state directory (HOME based on Linux), with a disk image in it.
    let home = fixture.dir.path().join("home");
    let default_dir = home.join(".local/state/darwin-vz-nix");
    std::fs::create_dir_all(&default_dir).unwrap();
    let disk = default_dir.join("disk.img");
    std::fs::write(&disk, b"the guest's store").unwrap();
    let destroy = |env: &[(&str, &std::ffi::OsStr)]| {
        let mut command = bare_command(&fixture, &["destroy", "--yes"], &[]);
        command
            .env("HOME", &home)
            .env_remove("XDG_STATE_HOME")
            .envs(env.iter().map(|(k, v)| (k, v)));
        command.output().unwrap()
    };
    let cases: [(&str, &std::ffi::OsStr, &str); 4] = [
        (
            "DARWIN_VZ_NIX_STATE_DIR",
            std::ffi::OsStr::new(""),
            "DARWIN_VZ_NIX_STATE_DIR: is set but empty; give it a value, or unset it to use the default",
        ),
        (
            "DARWIN_VZ_NIX_STATE_DIR",
            std::ffi::OsStr::new("  "),
            "DARWIN_VZ_NIX_STATE_DIR: is set but empty; give it a value, or unset it to use the default",
        ),
        (
            "DARWIN_VZ_NIX_STATE_DIR",
            std::ffi::OsStr::from_bytes(b"/tmp/st\xffate"),
            "DARWIN_VZ_NIX_STATE_DIR: is not valid UTF-8; give a UTF-8 value, or unset it",
        ),
        (
            "DARWIN_VZ_NIX_STATEDIR",
            std::ffi::OsStr::new("/tmp/elsewhere"),
            "DARWIN_VZ_NIX_STATEDIR: is not a setting darwin-vz-nix knows (did you mean DARWIN_VZ_NIX_STATE_DIR?); unset it",
        ),
    ];
    for (name, value, message) in cases {
        let out = destroy(&[(name, value)]);
        assert_usage_error(&out, &format!("invalid configuration: {message}"));
        assert!(disk.exists(), "{name}={value:?} deleted the default disk");
    }

    // Every variable, set but empty, is named.
    for name in [
        "CORES",
        "MEMORY",
        "DISK_SIZE",
        "ROSETTA",
        "IDLE_TIMEOUT",
        "STOP_TIMEOUT",
        "GUEST",
        "KERNEL",
        "INITRD",
        "SYSTEM",
        "REGISTRATION",
        "KERNEL_PARAMS",
        "STATE_DIR",
        "LOG_LEVEL",
        "CONTROL_GROUP",
        "SSH_USER",
        "NESTED_VIRTUALIZATION",
        "PREVENT_SLEEP",
        "GUEST_DRV",
        "GUEST_OUT",
        "BOOTSTRAP_DRV",
        "BOOTSTRAP_HOST_KEY",
        "HOST_STORE_CACHE",
        "CONFIG",
    ] {
        let name = format!("DARWIN_VZ_NIX_{name}");
        assert_usage_error(
            &run(&fixture, &["status"], &[(&name, "")]),
            &format!(
                "invalid configuration: {name}: is set but empty; give it a value, or unset it to use the default"
            ),
        );
    }

    // A usable value is used, and said.
    let named = fixture.dir.path().join("named");
    let out = destroy(&[("DARWIN_VZ_NIX_STATE_DIR", named.as_os_str())]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "state directory {0}\nnothing to delete: {0} does not exist\n",
            named.display()
        )
    );
    assert!(disk.exists());
}

/// A stand-in for ssh-keygen in `dir`: `-t` (generation) writes the private key but
/// leaves its `.pub` empty, as on a full disk; everything else is the real one.
fn half_writing_keygen(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let real = which("ssh-keygen");
    let script = dir.join("ssh-keygen");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" -t \"*) ;; *) exec {real} \"$@\";; esac\n{real} \"$@\" || exit $?\nfor last; do :; done\n: > \"$last.pub\"\nexit 0\n",
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn which(program: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{program} is on PATH"))
}

fn path_with(dir: &std::path::Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap()));
    std::env::join_paths(paths).unwrap()
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn destroy_and_rotate_keys_check_everything_before_they_act() {
    let fixture = Fixture::new();
    let dir = fixture.state_dir.display().to_string();

    // No state directory: nothing to rotate is an error, and nothing is created.
    let out = run(&fixture, &["rotate-keys"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("state directory {dir}\n"));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: {dir} does not exist, so there are no keys to rotate; check --state-dir (or DARWIN_VZ_NIX_STATE_DIR) — the daemon makes the directory and its keys on first start\n"
        )
    );
    assert!(!fixture.state_dir.exists());

    // An existing directory without keys/: it is made, with keys.
    std::fs::create_dir(&fixture.state_dir).unwrap();
    let disk = fixture.state_dir.join("disk.img");
    std::fs::write(&disk, b"the guest's store").unwrap();
    let out = run(&fixture, &["rotate-keys"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("state directory {dir}\nkeys replaced; new SSH keys are in {dir}/keys\n")
    );
    let key = fixture.state_dir.join("keys/client_ed25519");
    let before = std::fs::read(&key).unwrap();

    // ssh-keygen that leaves half a pair, then no ssh-keygen at all: nothing goes.
    let bin = fixture.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    half_writing_keygen(&bin);
    let empty = fixture.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let failures = [
        (path_with(&bin), "ssh-keygen failed for"),
        (
            empty.clone().into_os_string(),
            "ssh-keygen was not found on PATH",
        ),
    ];
    for (path, why) in failures {
        for args in [&["destroy", "--yes"][..], &["rotate-keys"]] {
            let out = command(&fixture, args, &[])
                .env("PATH", &path)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(err.starts_with(&format!("darwin-vz-nix: {why}")), "{err}");
            assert!(
                err.ends_with("; nothing was deleted or replaced\n"),
                "{err}"
            );
            assert_eq!(std::fs::read(&disk).unwrap(), b"the guest's store");
            assert_eq!(std::fs::read(&key).unwrap(), before, "{args:?}");
            assert_eq!(
                names_in(&fixture.state_dir.join("keys")),
                [
                    "client_ed25519",
                    "client_ed25519.pub",
                    "guest",
                    "known_hosts"
                ],
                "no half pair, no leftovers"
            );
            assert_eq!(
                names_in(&fixture.state_dir.join("keys/guest")),
                [
                    "authorized_keys",
                    "ssh_host_ed25519_key",
                    "ssh_host_ed25519_key.pub"
                ]
            );
        }
    }

    // keys/ that cannot be made (a file stands there): refused before anything goes.
    let keys = fixture.state_dir.join("keys");
    std::fs::rename(&keys, fixture.dir.path().join("keys.saved")).unwrap();
    std::fs::write(&keys, "").unwrap();
    let out = run(&fixture, &["destroy", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: {dir}/keys exists but is a regular file, not a directory; remove it or choose another --state-dir\n"
        )
    );
    assert!(disk.exists());
    std::fs::remove_file(&keys).unwrap();
    std::fs::rename(fixture.dir.path().join("keys.saved"), &keys).unwrap();

    // With ssh-keygen, destroy says what it deleted and what it replaced.
    let out = run(&fixture, &["destroy", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("state directory {dir}\ndeleted {dir}/disk.img\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("replaced {dir}/keys/client_ed25519\n")),
        "{text}"
    );
    assert!(!disk.exists());
    assert_ne!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn ssh_never_sees_a_user_that_would_inject_an_option() {
    use std::os::unix::fs::PermissionsExt;
    let fixture = Fixture::new();
    let marker = fixture.dir.path().join("pwned");
    let bad = format!("builder\n  ProxyCommand touch {}", marker.display());
    let message = format!(
        "{bad:?} is not a user name; use letters, digits, `_`, `-` or `.` (at most 32 characters, not starting with `-`)"
    );
    let file = fixture.dir.path().join("config.json");
    std::fs::write(&file, serde_json::json!({ "sshUser": bad }).to_string()).unwrap();
    let path = file.display().to_string();

    // A fake ssh that records its arguments: it must never run with the bad user.
    let bin = fixture.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let args_file = fixture.dir.path().join("ssh-args");
    std::fs::write(
        bin.join("ssh"),
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"{}\"\n",
            args_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("ssh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path_env = path_with(&bin);

    let cases: [(Command, String); 6] = [
        (
            command(&fixture, &["ssh-config", "--user", &bad], &[]),
            "--user".into(),
        ),
        (
            command(
                &fixture,
                &["ssh-config"],
                &[("DARWIN_VZ_NIX_SSH_USER", &bad)],
            ),
            "DARWIN_VZ_NIX_SSH_USER".into(),
        ),
        (
            command(&fixture, &["ssh-config", "--config", &path], &[]),
            format!("`sshUser` in {path}"),
        ),
        (
            command(&fixture, &["ssh", "-l", &bad, "--", "true"], &[]),
            "-l/--user".into(),
        ),
        (
            command(
                &fixture,
                &["ssh", "--", "true"],
                &[("DARWIN_VZ_NIX_SSH_USER", &bad)],
            ),
            "DARWIN_VZ_NIX_SSH_USER".into(),
        ),
        (
            command(&fixture, &["start", "--dry-run", "--ssh-user", &bad], &[]),
            "--ssh-user".into(),
        ),
    ];
    for (mut command, input) in cases {
        let out = command.env("PATH", &path_env).output().unwrap();
        assert_usage_error(&out, &format!("invalid configuration: {input}: {message}"));
        assert!(!args_file.exists(), "ssh ran for {input}");
        assert!(!marker.exists());
    }

    // A good user passes the same gate and reaches ssh, and ssh -G reads the block
    // exactly as printed.
    let out = command(&fixture, &["ssh", "-l", "alice", "--", "true"], &[])
        .env("PATH", &path_env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let args = std::fs::read_to_string(&args_file).unwrap();
    assert!(args.lines().any(|l| l == "User=alice"), "{args}");
    let out = run(&fixture, &["ssh-config", "--user", "alice"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let block = fixture.dir.path().join("ssh_config");
    std::fs::write(&block, &out.stdout).unwrap();
    let resolved = Command::new("ssh")
        .arg("-G")
        .arg("-F")
        .arg(&block)
        .arg("darwin-vz-nix")
        .output()
        .unwrap();
    assert_eq!(resolved.status.code(), Some(0), "{}", stderr(&resolved));
    let resolved = stdout(&resolved);
    assert!(resolved.lines().any(|l| l == "user alice"), "{resolved}");
    let proxy: Vec<&str> = resolved
        .lines()
        .filter(|l| l.starts_with("proxycommand "))
        .collect();
    assert_eq!(proxy.len(), 1, "{resolved}");
    assert!(
        proxy[0].ends_with(&format!(
            "proxy --fdpass --state-dir \"{}\" --alias %n",
            fixture.state_dir.display()
        )),
        "{}",
        proxy[0]
    );
}

#[test]
fn a_state_dir_that_is_not_utf8_is_refused_and_a_link_to_a_directory_is_used() {
    use std::os::unix::ffi::OsStrExt;
    let fixture = Fixture::new();
    let bad = fixture
        .dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"st\xffate"));
    for args in [&["ssh-config"][..], &["status"], &["destroy", "--yes"]] {
        let out = bare_command(&fixture, args, &[])
            .arg("--state-dir")
            .arg(&bad)
            .output()
            .unwrap();
        assert_usage_error(
            &out,
            &format!(
                "invalid configuration: --state-dir: {} is not valid UTF-8; rename it or choose a path whose name is UTF-8",
                bad.display()
            ),
        );
    }

    // A link to a directory is the directory.
    let real = fixture.dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = fixture.dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let out = bare_command(
        &fixture,
        &["--state-dir", link.to_str().unwrap(), "rotate-keys"],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(real.join("keys/client_ed25519").is_file());

    // A link to anything else is explained.
    let file = fixture.dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let to_file = fixture.dir.path().join("to-file");
    std::os::unix::fs::symlink(&file, &to_file).unwrap();
    let out = bare_command(
        &fixture,
        &["--state-dir", to_file.to_str().unwrap(), "rotate-keys"],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: {} is a symbolic link to {}, which is a regular file, not a directory; point --state-dir at an existing directory\n",
            to_file.display(),
            file.display()
        )
    );
}

#[test]
fn a_kernel_command_line_the_guest_would_cut_is_refused_naming_kernel_params() {
    let fixture = Fixture::new();
    let out = dry_run(&fixture, &["--json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let base: Vec<&str> = plan["commandLine"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let base_len = base.join(" ").len();
    // Exactly the 2047 bytes the kernel keeps: accepted.
    let fits = "x".repeat(2047 - base_len - 1);
    assert_eq!(
        dry_run(&fixture, &["--kernel-param", &fits], &[])
            .status
            .code(),
        Some(0)
    );
    let long = "x".repeat(2047 - base_len);
    assert_usage_error(
        &dry_run(&fixture, &["--kernel-param", &long], &[]),
        &format!(
            "invalid configuration: --kernel-param: the kernel command line would be 2048 bytes, more than the 2047 arm64 Linux keeps (it silently cuts the rest); kernelParams add {} bytes of it — shorten them",
            long.len() + 1
        ),
    );
}

#[test]
fn logs_never_follow_a_linked_log() {
    let fixture = Fixture::new();
    let logs = fixture.state_dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let secret = fixture.dir.path().join("secret");
    std::fs::write(&secret, "SECRET\n").unwrap();
    std::os::unix::fs::symlink(&secret, logs.join("daemon.log")).unwrap();
    let out = run(&fixture, &["logs"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: {} is a symbolic link, not a regular file; remove it (darwin-vz-nix makes its state files itself)\n",
            logs.join("daemon.log").display()
        )
    );
}

/// `nestedVirtualization` through the binary, on a machine without it (this one is
/// not a Mac): every layer names its input, `on` is refused before anything boots,
/// `auto` says why it is off, `doctor` shows it, and root's `machines` warns and
/// writes a line without kvm instead of failing the switch.
#[test]
fn nested_virtualization_is_a_setting_that_says_where_it_cannot_be_on() {
    if darwin_vz_nix::vm_backend_available() {
        eprintln!("skipped: this test describes a machine without Virtualization.framework");
        return;
    }
    let fixture = Fixture::new();
    let requirement = "on needs an Apple M3 or later with macOS 15 or later, but there is no Virtualization.framework on this system (linux); set it to auto (on wherever it works) or off";
    assert_usage_error(
        &dry_run(&fixture, &["--nested-virtualization", "on"], &[]),
        &format!("invalid configuration: --nested-virtualization: {requirement}"),
    );
    assert_usage_error(
        &dry_run(
            &fixture,
            &[],
            &[("DARWIN_VZ_NIX_NESTED_VIRTUALIZATION", "on")],
        ),
        &format!("invalid configuration: DARWIN_VZ_NIX_NESTED_VIRTUALIZATION: {requirement}"),
    );
    assert_usage_error(
        &dry_run(
            &fixture,
            &[],
            &[("DARWIN_VZ_NIX_NESTED_VIRTUALIZATION", "maybe")],
        ),
        "invalid configuration: DARWIN_VZ_NIX_NESTED_VIRTUALIZATION: `maybe` is not a nestedVirtualization value; use auto, on or off",
    );
    let file = fixture.dir.path().join("config.json");
    std::fs::write(&file, r#"{"nestedVirtualization": "on"}"#).unwrap();
    let path = file.display().to_string();
    assert_usage_error(
        &dry_run(&fixture, &["--config", &path], &[]),
        &format!("invalid configuration: `nestedVirtualization` in {path}: {requirement}"),
    );
    let out = run(&fixture, &["start", "--nested-virtualization", "yes"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid value 'yes' for '--nested-virtualization <WHEN>'"),
        "{}",
        stderr(&out)
    );

    let out = dry_run(&fixture, &[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(
            "\nnested virt   off: auto, and there is no Virtualization.framework on this system (linux)"
        ),
        "{}",
        stdout(&out)
    );
    let out = dry_run(&fixture, &["--json", "--nested-virtualization", "off"], &[]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        plan["nestedVirtualization"],
        serde_json::json!({ "enabled": false, "reason": "nestedVirtualization = off" })
    );

    let out = run(
        &fixture,
        &["doctor", "--cores", "1", "--memory", "1024"],
        &[],
    );
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("skip  nested virt    off: auto, and there is no")),
        "{}",
        stdout(&out)
    );
    let out = run(
        &fixture,
        &[
            "doctor",
            "--cores",
            "1",
            "--memory",
            "1024",
            "--nested-virtualization",
            "on",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with(
                "FAIL  nested virt    --nested-virtualization: on needs an Apple M3 or later"
            ) && l.ends_with("— fix: set nestedVirtualization to auto or off")),
        "{}",
        stdout(&out)
    );

    let target = fixture.dir.path().join("machines");
    let out = run(
        &fixture,
        &[
            "machines",
            "--nested-virtualization",
            "on",
            "--write",
            target.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "warning: --nested-virtualization: {requirement}; the line offers no kvm, and the daemon boots nothing until this is changed\n"
        )
    );
    let written = std::fs::read_to_string(&target).unwrap();
    assert!(written.contains(" benchmark,big-parallel - -"), "{written}");
}
