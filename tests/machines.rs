//! The build-machine line Nix reads, through the real binary: `darwin-vz-nix
//! machines` prints it (maxJobs = the cores the daemon fits to this host, or the
//! configured ones) and, with `--write`, writes it as only root should write what
//! root's nix-daemon reads. Real Nix then reads it the way the nix-darwin module
//! wires it: `/etc/nix/machines` holds the include line from `nix/lib.nix`, and Nix
//! follows it to our line and builds on the fake guest. The daemon itself writes no
//! machines file.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use darwin_vz_nix::config::defaults;
use support::*;

/// A fixture whose paths have no spaces, so the key fits into its machines field.
fn fixture_without_spaces() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("dvn-machines-")
        .tempdir()
        .unwrap();
    Fixture::in_dir(dir, "state")
}

/// `darwin-vz-nix --state-dir <fixture's> machines ARGS…`, with none of the
/// caller's DARWIN_VZ_NIX_* settings (they are a configuration layer).
fn machines_command(fixture: &Fixture, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DARWIN_VZ_NIX_") {
            command.env_remove(key);
        }
    }
    command
        .arg("--state-dir")
        .arg(&fixture.state_dir)
        .arg("machines")
        .args(args);
    command
}

fn run(mut command: Command) -> Output {
    command.output().unwrap()
}

/// The entry (the line after the comment) of the machines-file text.
fn entry(text: &str) -> &str {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "a comment and one entry: {text}");
    assert!(lines[0].starts_with('#'), "{text}");
    lines[1]
}

fn fields(entry: &str) -> Vec<&str> {
    let fields: Vec<&str> = entry.split(' ').collect();
    assert_eq!(fields.len(), 8, "eight fields: {entry}");
    fields
}

fn client_key(fixture: &Fixture) -> PathBuf {
    fixture.state_dir.join("keys/client_ed25519")
}

#[test]
fn machines_prints_max_jobs_as_the_cores_fitted_to_this_host_when_none_are_configured() {
    let fixture = fixture_without_spaces();
    let out = run(machines_command(&fixture, &[]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let host_cpus = std::thread::available_parallelism().unwrap().get();
    let fitted = usize::try_from(defaults::CORES).unwrap().min(host_cpus);
    assert_eq!(
        entry(&stdout(&out)),
        format!(
            "ssh-ng://builder@darwin-vz-nix aarch64-linux,x86_64-linux {} {fitted} 1 benchmark,big-parallel - -",
            client_key(&fixture).display()
        )
    );
    assert!(
        !fixture.state_dir.exists(),
        "machines reads and writes nothing in the state directory"
    );
}

/// On Linux a process's CPU affinity is its host's CPU count as far as fitting goes
/// (`available_parallelism`): pinned to one CPU, the binary must fit 4 cores to 1,
/// whatever machine the test runs on.
#[test]
fn machines_on_a_host_with_one_cpu_prints_max_jobs_1() {
    let Some(cpu) = first_allowed_cpu() else {
        skipped(
            "machines_on_a_host_with_one_cpu_prints_max_jobs_1",
            "needs Linux's /proc/self/status (Cpus_allowed_list) to pin a CPU",
        );
        return;
    };
    let mut command = Command::new("taskset");
    if Command::new("taskset").arg("-V").output().is_err() {
        skipped(
            "machines_on_a_host_with_one_cpu_prints_max_jobs_1",
            "needs taskset (util-linux) to run the binary on one CPU",
        );
        return;
    }
    let fixture = fixture_without_spaces();
    let inner = machines_command(&fixture, &[]);
    command
        .args(["-c", &cpu.to_string()])
        .arg(inner.get_program())
        .args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    let out = run(command);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(fields(entry(&stdout(&out)))[3], "1", "{}", stdout(&out));
}

fn first_allowed_cpu() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))?;
    let first = list.trim().split([',', '-']).next()?;
    first.parse().ok()
}

#[test]
fn machines_prints_the_configured_cores_and_builder_settings() {
    let fixture = fixture_without_spaces();
    let config = fixture.dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"cores": 3, "builder": {"speedFactor": 3, "mandatoryFeatures": ["dvn-only"]}}"#,
    )
    .unwrap();
    let out = run(machines_command(
        &fixture,
        &["--config", config.to_str().unwrap(), "--ssh-user", "alice"],
    ));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        entry(&stdout(&out)),
        format!(
            "ssh-ng://alice@darwin-vz-nix aarch64-linux,x86_64-linux {} 3 3 benchmark,big-parallel,dvn-only dvn-only -",
            client_key(&fixture).display()
        ),
        "configured cores are taken as given, even beyond this host's CPUs"
    );

    // A flag wins over the file, as for the daemon; builder.maxJobs wins over cores.
    let out = run(machines_command(
        &fixture,
        &[
            "--config",
            config.to_str().unwrap(),
            "--cores",
            "5",
            "--no-rosetta",
        ],
    ));
    let out_entry = stdout(&out);
    let got = fields(entry(&out_entry));
    assert_eq!((got[1], got[3]), ("aarch64-linux", "5"), "{out_entry}");
    std::fs::write(&config, r#"{"cores": 3, "builder": {"maxJobs": 2}}"#).unwrap();
    let out = run(machines_command(
        &fixture,
        &["--config", config.to_str().unwrap()],
    ));
    assert_eq!(fields(entry(&stdout(&out)))[3], "2", "{}", stdout(&out));
}

#[test]
fn machines_refuses_a_bad_setting_with_exit_2_naming_it() {
    let fixture = fixture_without_spaces();
    let out = run(machines_command(&fixture, &["--cores", "0"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--cores: 0 is out of range"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn a_state_dir_with_a_space_leaves_the_key_field_to_ssh_config() {
    let fixture = Fixture::new();
    assert!(fixture.state_dir.to_str().unwrap().contains(' '));
    let out = run(machines_command(&fixture, &[]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(fields(entry(&stdout(&out)))[2], "-", "{}", stdout(&out));
}

/// A directory only its owner may change, as /etc/nix is.
fn private_dir(fixture: &Fixture) -> PathBuf {
    let dir = fixture.dir.path().join("etc-nix");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn machines_write_replaces_the_file_by_rename_with_mode_0644_whatever_the_umask() {
    let fixture = fixture_without_spaces();
    let dir = private_dir(&fixture);
    let path = dir.join("darwin-vz-nix.machines");
    std::fs::write(&path, "old\n").unwrap();
    // A second name for the old file: written through, it would change too.
    let old = fixture.dir.path().join("old-machines");
    std::fs::hard_link(&path, &old).unwrap();
    let old_inode = std::fs::metadata(&path).unwrap().ino();

    let mut command = machines_command(&fixture, &["--write", path.to_str().unwrap()]);
    // SAFETY: umask is async-signal-safe; the child starts with a restrictive one,
    // as a root shell may have.
    unsafe {
        command.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            Ok(())
        });
    }
    let out = run(command);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let text = std::fs::read_to_string(&path).unwrap();
    let written = entry(&text);
    assert_eq!(
        stdout(&out),
        format!("wrote {}:\n{written}\n", path.display()),
        "says what it wrote"
    );
    assert_eq!(fields(written)[3], {
        let cpus = std::thread::available_parallelism().unwrap().get();
        usize::try_from(defaults::CORES)
            .unwrap()
            .min(cpus)
            .to_string()
    });
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.is_file());
    assert_eq!(
        meta.mode() & 0o7777,
        0o644,
        "root's nix-daemon and users' nix read it"
    );
    assert_ne!(meta.ino(), old_inode, "a new file, renamed into place");
    assert_eq!(std::fs::read_to_string(&old).unwrap(), "old\n");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["darwin-vz-nix.machines"], "no temporary file left");
}

#[test]
fn machines_write_refuses_a_symlink_at_the_path_and_leaves_its_target_alone() {
    let fixture = fixture_without_spaces();
    let dir = private_dir(&fixture);
    let target = fixture.dir.path().join("elsewhere");
    std::fs::write(&target, "untouched").unwrap();
    let path = dir.join("darwin-vz-nix.machines");
    std::os::unix::fs::symlink(&target, &path).unwrap();

    let out = run(machines_command(
        &fixture,
        &["--write", path.to_str().unwrap()],
    ));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim_end(),
        format!(
            "darwin-vz-nix: cannot write the machines file: {} is a symbolic link; something else manages that path (an environment.etc entry?): remove the link, then run again",
            path.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "nothing else made"
    );
}

#[test]
fn machines_write_refuses_a_directory_its_group_or_everyone_may_write() {
    let fixture = fixture_without_spaces();
    for (mode, who) in [(0o775, "its group"), (0o1777, "everyone")] {
        let dir = fixture.dir.path().join(format!("shared-{mode:o}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let path = dir.join("darwin-vz-nix.machines");
        let out = run(machines_command(
            &fixture,
            &["--write", path.to_str().unwrap()],
        ));
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "{} is writable by {who} (mode {mode:o}), who could replace the file; write into a directory only its owner can change",
                dir.display()
            )),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing written"
        );
    }
}

#[test]
fn machines_write_refuses_a_directory_another_user_owns() {
    if !nix::unistd::geteuid().is_root() {
        skipped(
            "machines_write_refuses_a_directory_another_user_owns",
            "needs root to give a directory to another user",
        );
        return;
    }
    let fixture = fixture_without_spaces();
    let dir = private_dir(&fixture);
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
    let path = dir.join("darwin-vz-nix.machines");
    let out = run(machines_command(
        &fixture,
        &["--write", path.to_str().unwrap()],
    ));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "{} belongs to uid 4242, which could replace the file",
            dir.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );
}

/// Every name under `dir`, recursively (links are not followed).
fn names_under(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        names.push(entry.file_name().to_string_lossy().into_owned());
        if entry.file_type().unwrap().is_dir() {
            names.extend(names_under(&entry.path()));
        }
    }
    names
}

#[test]
fn the_daemon_writes_nothing_named_machines_into_its_state_directory() {
    let fixture = fixture_without_spaces();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    // A boot too, through the real client: nothing is written later either.
    let out = fixture.cli(&["start", "--timeout", "30"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(harness.vm.boots(), 1);
    let names = names_under(&fixture.state_dir);
    assert!(names.iter().any(|n| n == "client_ed25519"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.contains("machines")),
        "the daemon's account must not write what Nix reads: {names:?}"
    );
}

/// The line the module puts into /etc/nix/machines, exactly as nix/lib.nix writes it,
/// for a machines file at `file` (the module's is `machinesFile`, compared with the
/// Rust constant in tests/contract.rs).
fn module_include_line(file: &Path) -> String {
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "--expr"])
        .arg(format!(
            "(import {}).machinesInclude {}",
            serde_json::to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nix/lib.nix")).unwrap(),
            serde_json::to_string(file.to_str().unwrap()).unwrap()
        ))
        .output()
        .expect("nix-instantiate is installed (apt install nix-bin)");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ssh_config_file(fixture: &Fixture) -> PathBuf {
    let out = fixture.cli(&["ssh-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let path = fixture.dir.path().join("ssh_config");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

#[test]
fn nix_follows_the_module_include_line_to_the_written_line_and_builds_there() {
    let fixture = fixture_without_spaces();
    let root = fixture.dir.path();
    // The "guest" builds into a chroot store of its own.
    let guest_store = root.join("guest-store");
    let guest_conf = own_nix_conf(
        &root.join("guest-nix-conf"),
        "sandbox = true\nextra-sandbox-paths = /usr /bin /lib /lib64\n",
    );
    let behaviour = builder_on_own_store(&guest_store, &guest_conf);
    let _harness = Harness::start(&fixture, behaviour, None);

    // What activation does as root: write our line into a root-owned directory.
    let etc_nix = private_dir(&fixture);
    let our_file = etc_nix.join("darwin-vz-nix.machines");
    let out = fixture.cli(&["machines", "--write", our_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The client's /etc/nix/machines: a user's own machine (another system, never
    // contacted) and the module's include line.
    let etc_machines = etc_nix.join("machines");
    let include = module_include_line(&our_file);
    assert_eq!(include, format!("@{}\n", our_file.display()));
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
    let out = nix_over_ssh(
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
