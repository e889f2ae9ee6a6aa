//! The bootstrap builder end to end: the real supervisor with a fake VM, a fake
//! `nix-store`, a stand-in for nixpkgs' `run-nixos-vm` (a process that listens where
//! QEMU would and greets like sshd), and the real binary as ProxyCommand. What only
//! a Mac can show (QEMU itself, the nix-daemon's build hook) is in tests/macos.rs.

mod support;

use std::process::Child;
use std::time::Duration;

use darwin_vz_nix::config::ConfigLayer;
use support::*;

fn proxy(fixture: &Fixture, alias: &str) -> Child {
    spawn_proxy_with(fixture, &["--alias", alias])
}

fn close(mut child: Child) {
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

fn harness(fixture: &Fixture, guest: &FakeGuest, bootstrap: &FakeBootstrap) -> Harness {
    Harness::start_with(
        fixture,
        fixture.lazy_config(guest, bootstrap.layer()),
        FakeVmBehaviour::default(),
        fixture.options(None),
    )
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[test]
fn while_no_guest_exists_the_bootstrap_builder_answers_aarch64_builds_and_goes_away_after() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.hold();
    let bootstrap = nix.bootstrap_vm();
    let harness = harness(&fixture, &guest, &bootstrap);
    let state = &fixture.state_dir;

    // The guest needs an aarch64-linux build and no guest exists: up it comes.
    wait_for(Duration::from_secs(20), "the bootstrap builder", || {
        bootstrap_phase(&fixture) == "running"
    });
    let report = status(&fixture).guest.unwrap().bootstrap.unwrap();
    let endpoint = report.endpoint.unwrap();
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains(&format!(
            "\nbootstrap     running on {endpoint} (nixpkgs' darwin.linux-builder), 0 sessions; console {}\n",
            state.join("logs/bootstrap-console.log").display()
        )),
        "{text}"
    );

    // As nixpkgs' runner wants it: unprivileged, in the state directory, SSH
    // forwarded from 127.0.0.1 only, the guest's size, our key in the store.
    let record = bootstrap.record().unwrap();
    let port = endpoint.strip_prefix("127.0.0.1:").unwrap();
    assert_eq!(
        record["QEMU_NET_OPTS"],
        format!("hostfwd=tcp:127.0.0.1:{port}-:22")
    );
    assert_eq!(record["QEMU_OPTS"], "-m 1024 -smp 1");
    assert_eq!(
        record["NIX_DISK_IMAGE"],
        state.join("bootstrap/disk.qcow2").to_str().unwrap()
    );
    assert_eq!(
        record["TMPDIR"],
        state.join("bootstrap/tmp").to_str().unwrap()
    );
    assert_eq!(record["USE_TMPDIR"], "1");
    assert_eq!(record["cwd"], state.join("bootstrap").to_str().unwrap());
    assert_eq!(record["own_process_group"], true);
    let keys = record["KEYS"].as_str().unwrap();
    assert!(keys.starts_with(nix.store().to_str().unwrap()), "{keys}");
    let client_pub = std::fs::read_to_string(state.join("keys/client_ed25519.pub")).unwrap();
    let mut client_fields = client_pub.split_whitespace();
    assert_eq!(
        record["authorized"].as_str().unwrap(),
        format!(
            "{} {}\n",
            client_fields.next().unwrap(),
            client_fields.next().unwrap()
        ),
        "the builder accepts our client key, and only it"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("keys/bootstrap_known_hosts")).unwrap(),
        format!("darwin-vz-nix {FAKE_BOOTSTRAP_HOST_KEY}\n"),
        "ssh pins its host key under the builder's alias"
    );
    let realise_bootstrap = format!(
        "--realise {} --add-root {} --indirect --log-format internal-json",
        bootstrap.drv.display(),
        state.join("gcroots/bootstrap").display()
    );
    let realise_guest = format!(
        "--realise {} --add-root {} --indirect --log-format internal-json",
        guest.drv.display(),
        state.join("gcroots/guest-pending").display()
    );
    wait_for(Duration::from_secs(10), "the guest's build", || {
        nix.calls().contains(&realise_guest)
    });
    let calls = nix.calls();
    let position = |call: &str| calls.iter().position(|c| c == call);
    assert!(
        position(&format!("--realise --dry-run {}", bootstrap.drv.display())).is_some(),
        "{calls:?}"
    );
    assert!(
        position(&format!("--add {}", state.join("bootstrap/keys").display())).is_some(),
        "{calls:?}"
    );
    assert!(
        position(&realise_bootstrap) < position(&realise_guest)
            && position(&realise_guest).is_some(),
        "the builder is up before the guest's build starts: {calls:?}"
    );

    // The aarch64-linux alias reaches it; the x86_64 alias waits for the guest.
    let aarch64 = {
        let mut child = proxy(&fixture, "darwin-vz-nix");
        assert_eq!(first_line(&mut child), "SSH-2.0-fake-bootstrap\r\n");
        child
    };
    wait_for(Duration::from_secs(5), "the session to count", || {
        status(&fixture).guest.unwrap().bootstrap.unwrap().sessions == 1
    });
    let mut x86 = proxy(&fixture, "darwin-vz-nix-x86");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(x86.try_wait().unwrap(), None, "x86_64 waits for the guest");
    assert_eq!(harness.vm.boots(), 0);

    // The guest is built: the waiting connection boots it. The builder stays while
    // its session lasts.
    guest.release();
    let banner = first_line(&mut x86);
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner:?}");
    close(x86);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        bootstrap_phase(&fixture),
        "running",
        "a build is still on it"
    );
    assert_eq!(bootstrap.record().unwrap()["stopped"], false);

    // Its last session ends: stopped, and nothing of it is left.
    close(aarch64);
    wait_for(
        Duration::from_secs(20),
        "the bootstrap builder to go",
        || bootstrap_phase(&fixture) == "off",
    );
    let record = bootstrap.record().unwrap();
    assert_eq!(record["stopped"], true, "asked to stop with SIGTERM");
    let pid = i32::try_from(record["pid"].as_i64().unwrap()).unwrap();
    wait_for(Duration::from_secs(5), "its process to end", || {
        !pid_alive(pid)
    });
    for gone in [
        "bootstrap",
        "keys/bootstrap_known_hosts",
        "gcroots/bootstrap",
    ] {
        assert!(
            std::fs::symlink_metadata(state.join(gone)).is_err(),
            "{gone} is left"
        );
    }
    assert!(
        !stdout(&fixture.cli(&["status"])).contains("bootstrap"),
        "status no longer shows it"
    );

    // From now on the aarch64-linux alias reaches the guest.
    let mut again = proxy(&fixture, "darwin-vz-nix");
    assert!(first_line(&mut again).starts_with("SSH-2.0-OpenSSH"));
    close(again);
}

#[test]
fn with_a_guest_booted_before_no_bootstrap_builder_is_fetched_or_started() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let old = nix.guest("darwin-vz-nix-guest", "");
    let bootstrap = nix.bootstrap_vm();
    // The first guest exists already (built some other way, booted once).
    {
        let harness = Harness::start_with(
            &fixture,
            fixture.lazy_config(&old, ConfigLayer::default()),
            FakeVmBehaviour::default(),
            fixture.options(None),
        );
        assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
        drop(harness);
    }
    let new = nix.guest("darwin-vz-nix-guest-custom", "");
    new.hold();
    let harness = harness(&fixture, &new, &bootstrap);
    wait_for(Duration::from_secs(10), "the new build", || {
        status(&fixture)
            .guest
            .unwrap()
            .progress
            .is_some_and(|p| !p.starts_with("planning"))
    });

    // The aarch64-linux alias is the old guest's, which builds the new one.
    let mut aarch64 = proxy(&fixture, "darwin-vz-nix");
    assert!(first_line(&mut aarch64).starts_with("SSH-2.0-OpenSSH"));
    close(aarch64);
    assert_eq!(bootstrap_phase(&fixture), "off");
    assert!(bootstrap.record().is_none(), "never started");
    assert!(
        !nix.calls().iter().any(|c| c.contains("nixos-vm")),
        "never fetched: {:?}",
        nix.calls()
    );
    assert_eq!(harness.vm.boots(), 1);
    new.release();
}

#[test]
fn a_bootstrap_builder_missing_from_the_cache_fails_the_build_with_one_line_and_starts_nothing() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    let bootstrap = nix.bootstrap_vm();
    let linux = nix
        .store()
        .join("55555555555555555555555555555555-nixos-system-nixos.drv");
    bootstrap.not_cached(&linux);
    let harness = harness(&fixture, &guest, &bootstrap);

    let out = run_proxy(&fixture, &["--alias", "darwin-vz-nix"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: the guest {} could not be built: it needs 1 aarch64-linux build(s), and the bootstrap builder {} is not on cache.nixos.org: it would need 1 aarch64-linux build(s) (nixos-system-nixos …), which need the Linux builder it is meant to be; keep the flake's own nixpkgs for the guest (services.darwin-vz.guestNixpkgs), or build the first guest on another aarch64-linux builder\n",
            guest.out.display(),
            bootstrap.drv.display()
        )
    );
    assert!(bootstrap.record().is_none(), "nothing was started");
    assert!(
        !nix.calls()
            .iter()
            .any(|c| c.starts_with(&format!("--realise {}", bootstrap.drv.display()))),
        "nothing was fetched: {:?}",
        nix.calls()
    );
    assert!(
        !nix.calls()
            .iter()
            .any(|c| c.contains("gcroots/guest-pending"))
    );
    assert_eq!(harness.vm.boots(), 0);
    assert!(!fixture.state_dir.join("bootstrap").exists());
}

#[test]
fn a_bootstrap_builder_that_exits_while_booting_fails_naming_its_console_log() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    let bootstrap = nix.bootstrap_vm();
    bootstrap.crash_on_start();
    let _harness = harness(&fixture, &guest, &bootstrap);
    wait_for(Duration::from_secs(20), "the build to fail", || {
        status(&fixture).guest.unwrap().phase == "failed"
    });
    let error = status(&fixture).guest.unwrap().error.unwrap();
    let console = fixture.state_dir.join("logs/bootstrap-console.log");
    assert!(
        error.ends_with(&format!(
            "the bootstrap builder exited while booting (exit status: 1); see {}",
            console.display()
        )),
        "{error}"
    );
    assert!(
        std::fs::read_to_string(&console)
            .unwrap()
            .contains("could not set up host forwarding rule")
    );
    assert!(!fixture.state_dir.join("bootstrap").exists(), "cleaned up");
    assert!(
        !fixture
            .state_dir
            .join("keys/bootstrap_known_hosts")
            .exists()
    );
}

#[test]
fn machines_writes_an_x86_64_entry_of_its_own_until_a_guest_has_booted() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let bootstrap = nix.bootstrap_vm();
    let machines = || {
        fixture
            .cli_command(&["machines"])
            .env("DARWIN_VZ_NIX_BOOTSTRAP_DRV", &bootstrap.drv)
            .env("DARWIN_VZ_NIX_BOOTSTRAP_HOST_KEY", FAKE_BOOTSTRAP_HOST_KEY)
            .env("DARWIN_VZ_NIX_CORES", "2")
            .output()
            .unwrap()
    };
    let user = current_user();
    // The fixture's state directory has a space: the key is left to ssh_config (`-`).
    let entry = |alias: &str, systems: &str| {
        format!("ssh-ng://{user}@{alias} {systems} - 2 1 benchmark,big-parallel - -")
    };
    let out = machines();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().skip(1).map(String::from).collect();
    assert_eq!(
        lines,
        [
            entry("darwin-vz-nix", "aarch64-linux"),
            entry("darwin-vz-nix-x86", "x86_64-linux")
        ]
    );

    // Once a guest has booted (its GC root exists), one entry again.
    std::fs::create_dir_all(fixture.state_dir.join("gcroots")).unwrap();
    std::os::unix::fs::symlink(&fixture.guest_dir, fixture.state_dir.join("gcroots/guest"))
        .unwrap();
    let out = machines();
    let lines: Vec<String> = stdout(&out).lines().skip(1).map(String::from).collect();
    assert_eq!(
        lines,
        [entry("darwin-vz-nix", "aarch64-linux,x86_64-linux")]
    );
}

#[test]
fn bootstrap_dry_run_shows_the_bootstrap_builders_steps_and_commands_when_no_guest_exists() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    let bootstrap = nix.bootstrap_vm();
    let out = fixture
        .cli_command(&["bootstrap", "--dry-run"])
        .env_remove("DARWIN_VZ_NIX_GUEST")
        .env("DARWIN_VZ_NIX_GUEST_DRV", &guest.drv)
        .env("DARWIN_VZ_NIX_GUEST_OUT", &guest.out)
        .env("DARWIN_VZ_NIX_BOOTSTRAP_DRV", &bootstrap.drv)
        .env("DARWIN_VZ_NIX_BOOTSTRAP_HOST_KEY", FAKE_BOOTSTRAP_HOST_KEY)
        .env("DARWIN_VZ_NIX_SSH_USER", "builder")
        .env("DARWIN_VZ_NIX_CORES", "2")
        .env("DARWIN_VZ_NIX_MEMORY", "2048")
        .env("PATH", nix.path_env())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    // Every path has a space in the fixture: quoted as a shell needs.
    let q = |path: &std::path::Path| format!("'{}'", path.display());
    let state = &fixture.state_dir;
    for line in [
        "3. No guest exists to run aarch64-linux builds: the supervisor brings up the bootstrap builder, nixpkgs' darwin.linux-builder (QEMU), for them:".to_string(),
        format!(
            "     $ NIX_REMOTE=daemon nix-store --realise --dry-run {}",
            q(&bootstrap.drv)
        ),
        format!(
            "     $ NIX_REMOTE=daemon nix-store --realise {} --add-root {} --indirect --log-format internal-json",
            q(&bootstrap.drv),
            q(&state.join("gcroots/bootstrap"))
        ),
        format!(
            "     $ cd {} && NIX_DISK_IMAGE={} TMPDIR={} USE_TMPDIR=1 KEYS=$KEYS QEMU_NET_OPTS=\"hostfwd=tcp:127.0.0.1:$PORT-:22\" QEMU_OPTS='-m 2048 -smp 2' \"$(readlink {})\"/bin/run-*-vm",
            q(&state.join("bootstrap")),
            q(&state.join("bootstrap/disk.qcow2")),
            q(&state.join("bootstrap/tmp")),
            q(&state.join("gcroots/bootstrap"))
        ),
        "4. The supervisor builds the guest through the nix-daemon, as root; progress in `darwin-vz-nix status`, Nix's output in ".to_string(),
        "5. It boots the guest, and keeps it with a GC root while it is the guest being booted:".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&line)),
            "missing {line:?} in:\n{text}"
        );
    }
    assert_eq!(
        nix.calls(),
        [format!("--realise --dry-run {}", guest.drv.display())],
        "only the guest's dry run ran"
    );
    assert!(!state.exists());
}

#[test]
fn a_retry_while_the_bootstrap_builder_still_serves_reuses_it_instead_of_starting_another() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.hold();
    guest.fail_with(
        r#"@nix {"action":"msg","level":0,"msg":"error: builder for '/nix/store/5y5s1mmz6m3hyq9x4k3i0fg0395ymljf-etc.drv' failed with exit code 1"}
"#,
    );
    let bootstrap = nix.bootstrap_vm();
    let _harness = harness(&fixture, &guest, &bootstrap);
    wait_for(Duration::from_secs(20), "the bootstrap builder", || {
        bootstrap_phase(&fixture) == "running"
    });
    // A build on it is open when the guest's build fails.
    let session = {
        let mut child = proxy(&fixture, "darwin-vz-nix");
        assert_eq!(first_line(&mut child), "SSH-2.0-fake-bootstrap\r\n");
        child
    };
    guest.release();
    wait_for(Duration::from_secs(10), "the build to fail", || {
        status(&fixture).guest.unwrap().phase == "failed"
    });
    let pid = bootstrap.record().unwrap()["pid"].as_i64().unwrap();

    // `start` retries at once, on the builder that still runs.
    guest.succeed();
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        bootstrap.record().unwrap()["pid"].as_i64().unwrap(),
        pid,
        "the same builder"
    );
    let fetches = nix
        .calls()
        .iter()
        .filter(|c| c.starts_with(&format!("--realise {}", bootstrap.drv.display())))
        .count();
    assert_eq!(fetches, 1, "fetched once: {:?}", nix.calls());
    // The first build's retire left it to the second; the last session ends it.
    assert_eq!(bootstrap_phase(&fixture), "running");
    close(session);
    wait_for(
        Duration::from_secs(20),
        "the bootstrap builder to go",
        || bootstrap_phase(&fixture) == "off",
    );
    assert!(!fixture.state_dir.join("bootstrap").exists());
}

#[test]
fn an_aarch64_connect_that_times_out_while_the_bootstrap_builder_comes_up_says_so() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    let bootstrap = nix.bootstrap_vm();
    bootstrap.hold();
    let _harness = harness(&fixture, &guest, &bootstrap);
    wait_for(
        Duration::from_secs(10),
        "the bootstrap builder's fetch",
        || bootstrap_phase(&fixture) == "fetching",
    );

    let t0 = std::time::Instant::now();
    let out = run_proxy(&fixture, &["--alias", "darwin-vz-nix", "--timeout", "1"]);
    assert!(t0.elapsed() < Duration::from_secs(10), "one bound, not two");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: timed out after 1 s waiting for the guest to be built (building: 1 aarch64-linux build(s) and no guest to run them; bringing up the bootstrap builder for them first; log {}); `darwin-vz-nix status` shows how far it got\n",
            fixture.state_dir.join("logs/guest-build.log").display()
        )
    );
    let text = stdout(&fixture.cli(&["status"]));
    assert!(
        text.contains(
            "\nbootstrap     fetching nixpkgs' darwin.linux-builder from cache.nixos.org: "
        ),
        "{text}"
    );
    bootstrap.release();
}

#[test]
fn an_aarch64_connection_made_while_the_guest_is_still_planned_reaches_the_bootstrap_builder() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.hold();
    guest.hold_dry_run();
    let bootstrap = nix.bootstrap_vm();
    let _harness = harness(&fixture, &guest, &bootstrap);
    wait_for(Duration::from_secs(10), "the guest's dry run", || {
        nix.calls().iter().any(|call| call.contains("--dry-run"))
    });
    assert_eq!(bootstrap_phase(&fixture), "off");

    // Nobody knows yet whether the bootstrap builder is needed: the connection
    // waits for the answer instead of waiting for a guest to boot.
    let mut connection =
        spawn_proxy_with(&fixture, &["--alias", "darwin-vz-nix", "--timeout", "30"]);
    std::thread::sleep(Duration::from_millis(500));
    guest.release_dry_run();
    assert_eq!(first_line(&mut connection), "SSH-2.0-fake-bootstrap\r\n");
    close(connection);
    guest.release();
}
