//! The state directory under a running supervisor: ownership that no deleted file
//! can undo, and keys and addresses that repair themselves — and say so.

mod support;

use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use darwin_vz_nix::control::ControlClient;
use darwin_vz_nix::daemon;
use darwin_vz_nix::host::HostInfo;
use darwin_vz_nix::state::{Access, StateDir};
use support::*;

#[test]
fn deleting_the_pid_file_does_not_let_a_second_daemon_in_nor_touch_the_socket() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let socket = fixture.state_dir.join("control.sock");
    let inode = std::fs::metadata(&socket).unwrap().ino();
    let refused = |pid: &str| {
        format!(
            "darwin-vz-nix: another supervisor (pid {pid}) already owns {}; use it (darwin-vz-nix status), or stop it with `darwin-vz-nix stop --daemon`\n",
            fixture.state_dir.display()
        )
    };

    let out = fixture.cli(&["daemon"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out), refused(&std::process::id().to_string()));

    // What let a second supervisor in before: the lock's file deleted underneath.
    for name in ["supervisor.pid", "lock"] {
        let _ = std::fs::remove_file(fixture.state_dir.join(name));
    }
    let out = fixture.cli(&["daemon"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out), refused("unknown"));

    assert_eq!(
        std::fs::metadata(&socket).unwrap().ino(),
        inode,
        "the first supervisor's socket is untouched"
    );
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(StateDir::new(&fixture.state_dir).is_locked());
}

/// `type base64` that ssh-keygen derives from a private key.
fn derived_public_key(private: &std::path::Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(private)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let fields: Vec<&str> = text.split_whitespace().take(2).collect();
    fields.join(" ")
}

#[test]
fn an_empty_public_key_beside_its_private_key_is_repaired_at_the_next_start() {
    let fixture = Fixture::new();
    drop(Harness::start(&fixture, FakeVmBehaviour::default(), None));
    let private = fixture.state_dir.join("keys/client_ed25519");
    let public = fixture.state_dir.join("keys/client_ed25519.pub");
    let key = std::fs::read(&private).unwrap();
    // What a first run on a full disk used to leave behind.
    std::fs::write(&public, "").unwrap();

    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    assert_eq!(std::fs::read(&private).unwrap(), key, "the key is kept");
    let repaired = std::fs::read_to_string(&public).unwrap();
    assert!(
        repaired.starts_with(&derived_public_key(&private)),
        "{repaired:?}"
    );
    // And the pair works end to end: the guest's sshd accepts the key.
    let out = fixture.cli(&["ssh", "--", "echo", "ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");
}

#[test]
fn plan_boot_returns_a_notice_for_each_repair() {
    let fixture = Fixture::new();
    let config = fixture.config(Default::default());
    let state = StateDir::new(&fixture.state_dir);
    state.create(Access::OwnerOnly).unwrap();
    let host = HostInfo::detect();
    let plan = || daemon::plan_boot(&config, &host, &state, fixture.dir.path()).unwrap();

    assert_eq!(
        plan().notices,
        Vec::<String>::new(),
        "a first boot is news to nobody"
    );
    assert_eq!(plan().notices, Vec::<String>::new());

    std::fs::remove_file(state.client_key()).unwrap();
    assert_eq!(
        plan().notices,
        [format!(
            "the client key {} was missing; made a new pair — the guest accepts the new one (authorized_keys is rewritten)",
            state.client_key().display()
        )]
    );

    std::fs::write(state.mac_address(), "not a mac\n").unwrap();
    let planned = plan();
    let mac = std::fs::read_to_string(state.mac_address()).unwrap();
    assert_eq!(
        planned.notices,
        [format!(
            "{} did not hold a MAC address; made a new MAC address {} — the guest's network identity changed",
            state.mac_address().display(),
            mac.trim()
        )]
    );

    std::fs::remove_file(state.mac_address()).unwrap();
    assert!(
        plan().notices[0].contains("mac-address was missing; made a new MAC address"),
        "a deleted address is news once the disk has booted"
    );

    std::fs::write(state.guest_host_key_pub(), "").unwrap();
    assert_eq!(
        plan().notices,
        [format!(
            "the public half of the guest host key ({}) was empty or not a public key; re-derived it from the private key",
            state.guest_host_key_pub().display()
        )]
    );
    assert_eq!(plan().notices, Vec::<String>::new(), "repaired for good");
}

// --- A supervisor in its own process, whose log the test reads. ---

/// Runs only when re-executed by `spawn_logging_supervisor`.
#[test]
#[ignore = "helper process for other tests"]
fn logging_supervisor() {
    let Ok(state_dir) = std::env::var("DVN_STATE_TEST_STATE_DIR") else {
        return;
    };
    let fixture_dir = std::path::PathBuf::from(std::env::var("DVN_STATE_TEST_FIXTURE").unwrap());
    let fixture = Fixture {
        dir: tempfile::tempdir().unwrap(),
        state_dir: state_dir.into(),
        guest_dir: fixture_dir.join("guest"),
    };
    let config = fixture.config(Default::default());
    let prepared = daemon::prepare(&config).expect("prepare");
    daemon::init_logging(&prepared.state, darwin_vz_nix::config::LogLevel::Info).unwrap();
    prepare_sshd_privsep_dir();
    let vm = FakeVm::new(&fixture.state_dir, FakeVmBehaviour::default());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(daemon::serve(
            prepared,
            config,
            HostInfo::detect(),
            vm,
            fixture.options(None),
        ))
        .unwrap();
    std::process::exit(0);
}

fn spawn_logging_supervisor(fixture: &Fixture) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "logging_supervisor",
            "--ignored",
            "--test-threads=1",
        ])
        .env("DVN_STATE_TEST_STATE_DIR", &fixture.state_dir)
        .env("DVN_STATE_TEST_FIXTURE", fixture.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_key_deleted_while_the_supervisor_runs_is_made_again_with_a_warning_in_its_log() {
    let fixture = Fixture::new();
    let mut child = spawn_logging_supervisor(&fixture);
    wait_for(Duration::from_secs(20), "the child supervisor", || {
        ControlClient::connect(&fixture.state_dir).is_ok()
    });
    let key = fixture.state_dir.join("keys/client_ed25519");
    std::fs::remove_file(&key).unwrap();

    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(key.is_file());
    let out = fixture.cli(&["logs", "-n", "100000"]);
    let log = stdout(&out);
    let warning = log
        .lines()
        .find(|l| l.contains("the client key") && l.contains("was missing; made a new pair"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");

    let out = fixture.cli(&["stop", "--daemon"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(child.wait().unwrap().success());
}
