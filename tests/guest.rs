//! The lazy guest end to end: the real supervisor (`daemon::serve`) with a fake VM,
//! a fake `nix-store` that records its calls and "builds" fake guests, and the real
//! `darwin-vz-nix` binary as client and ProxyCommand.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use darwin_vz_nix::config::ConfigLayer;
use darwin_vz_nix::control::protocol::VmState;
use support::*;

/// Nix's progress while it builds 3 of 41 derivations and fetches 120 of 800
/// paths, one build running on the builder.
const PROGRESS: &str = r#"@nix {"action":"msg","level":3,"msg":"these 41 derivations will be built:"}
@nix {"action":"start","id":1,"level":0,"text":"","type":104}
@nix {"action":"start","id":2,"level":0,"text":"","type":103}
@nix {"action":"result","fields":[3,41,1,0],"id":1,"type":105}
@nix {"action":"result","fields":[120,800,2,0],"id":2,"type":105}
@nix {"action":"start","fields":["/nix/store/5y5s1mmz6m3hyq9x4k3i0fg0395ymljf-etc.drv","ssh-ng://builder@darwin-vz-nix",1,1],"id":3,"level":3,"text":"building '/nix/store/5y5s1mmz6m3hyq9x4k3i0fg0395ymljf-etc.drv' on 'ssh-ng://builder@darwin-vz-nix'","type":105}
@nix {"action":"result","fields":["installing etc"],"id":3,"type":101}
"#;

/// A build of the guest failing, as Nix reports it.
const FAILED_BUILD: &str = r#"@nix {"action":"start","fields":["/nix/store/5y5s1mmz6m3hyq9x4k3i0fg0395ymljf-etc.drv","",1,1],"id":3,"level":3,"text":"building '/nix/store/5y5s1mmz6m3hyq9x4k3i0fg0395ymljf-etc.drv'","type":105}
@nix {"action":"result","fields":["etc: no such user: builder2"],"id":3,"type":101}
@nix {"action":"stop","id":3}
@nix {"action":"msg","column":null,"file":null,"level":0,"line":null,"msg":"\u001b[31;1merror:\u001b[0m builder for '\u001b[35;1m/nix/store/5y5s1mmz6m3hyq9x4k3i0fg0395ymljf-etc.drv\u001b[0m' failed with exit code 1","raw_msg":"builder for '\u001b[35;1m/nix/store/5y5s1mmz6m3hyq9x4k3i0fg0395ymljf-etc.drv\u001b[0m' failed with exit code 1"}
"#;

/// `darwin-vz-nix status`, as text.
fn status_text(fixture: &Fixture) -> String {
    stdout(&fixture.cli(&["status"]))
}

fn spawn_start(fixture: &Fixture) -> Child {
    fixture
        .cli_command(&["start"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn lazy_harness(fixture: &Fixture, guest: &FakeGuest) -> Harness {
    Harness::start_with(
        fixture,
        fixture.lazy_config(guest, ConfigLayer::default()),
        FakeVmBehaviour::default(),
        fixture.options(None),
    )
}

fn canonical(path: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(path).unwrap()
}

/// How the supervisor realises a guest: the read-only dry run, then the build with
/// its pending root; what the boot root adds is checked where it happens.
fn realise_calls(guest: &FakeGuest, fixture: &Fixture) -> [String; 2] {
    [
        format!("--realise --dry-run {}", guest.drv.display()),
        format!(
            "--realise {} --add-root {} --indirect --log-format internal-json",
            guest.drv.display(),
            fixture.state_dir.join("gcroots/guest-pending").display()
        ),
    ]
}

fn boot_root_call(dir: &std::path::Path, fixture: &Fixture) -> String {
    format!(
        "--realise {} --add-root {} --indirect",
        dir.display(),
        fixture.state_dir.join("gcroots/guest").display()
    )
}

#[test]
fn a_missing_guest_is_built_through_the_nix_daemon_then_booted_and_kept_with_a_gc_root() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "loglevel=4\n");
    guest.progress(PROGRESS);
    guest.hold();
    let harness = lazy_harness(&fixture, &guest);

    // The daemon starts the realisation by itself, and says how far it got.
    wait_for(
        Duration::from_secs(10),
        "the build to report progress",
        || status_text(&fixture).contains("120 of 800 paths fetched"),
    );
    let text = status_text(&fixture);
    let log = fixture.state_dir.join("logs/guest-build.log");
    assert!(
        text.contains(&format!(
            ": 3 of 41 derivations built, 120 of 800 paths fetched (building etc on ssh-ng://builder@darwin-vz-nix); log {}\n",
            log.display()
        )),
        "{text}"
    );
    assert!(text.contains("\nguest         building for "), "{text}");
    assert!(
        text.contains("\nnext boot     waits for the guest to be built\n"),
        "{text}"
    );
    assert_eq!(status(&fixture).guest.unwrap().phase, "building");

    // `start` waits for it (saying how it goes), then boots it.
    let start = spawn_start(&fixture);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        harness.vm.boots(),
        0,
        "nothing boots before the guest exists"
    );
    assert_eq!(status(&fixture).state, VmState::Starting);
    guest.release();
    let out = start.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ready in "), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("guest: building for "),
        "start shows the build's progress: {}",
        stderr(&out)
    );

    assert_eq!(harness.vm.booted_kernels(), [canonical(&guest.kernel())]);
    assert_eq!(
        link_target(&fixture.state_dir.join("gcroots/guest")),
        Some(guest.out.clone()),
        "the booted guest is kept with a GC root"
    );
    assert!(
        !fixture.state_dir.join("gcroots/guest-pending").exists(),
        "the pending root is dropped once the boot root holds the guest"
    );
    let [dry, realise] = realise_calls(&guest, &fixture);
    assert_eq!(
        nix.calls(),
        [dry, realise, boot_root_call(&guest.out, &fixture)]
    );
    let text = status_text(&fixture);
    assert!(
        text.contains(&format!("\nguest         ready: {}\n", guest.out.display())),
        "{text}"
    );
    assert!(!text.contains("next boot"), "{text}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("installing etc\n"), "{log}");
    assert!(log.contains("$ "), "the log starts with the command: {log}");
}

#[test]
fn a_proxy_connect_during_the_build_waits_for_it_then_boots_the_new_guest() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.hold();
    let harness = lazy_harness(&fixture, &guest);

    let mut proxy = spawn_proxy(&fixture);
    wait_for(
        Duration::from_secs(10),
        "the connection to be counted",
        || status(&fixture).connections == 1,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(proxy.try_wait().unwrap(), None, "the proxy waits");
    assert_eq!(harness.vm.boots(), 0);

    guest.release();
    let banner = first_line(&mut proxy);
    assert!(banner.starts_with("SSH-2.0-"), "{banner:?}");
    assert_eq!(harness.vm.booted_kernels(), [canonical(&guest.kernel())]);
    drop(proxy.stdin.take());
    assert!(proxy.wait().unwrap().success());
}

#[test]
fn a_connect_that_times_out_while_the_guest_builds_says_how_far_it_got() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.progress(PROGRESS);
    guest.hold();
    let _harness = lazy_harness(&fixture, &guest);
    wait_for(Duration::from_secs(10), "progress", || {
        status_text(&fixture).contains("120 of 800")
    });

    let out = run_proxy(&fixture, &["--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: timed out after 1 s waiting for the guest to be built (building: 3 of 41 derivations built, 120 of 800 paths fetched (building etc on ssh-ng://builder@darwin-vz-nix); log {}); `darwin-vz-nix status` shows how far it got\n",
            fixture.state_dir.join("logs/guest-build.log").display()
        )
    );
    guest.release();
}

#[test]
fn a_failed_build_is_one_line_naming_what_failed_the_log_and_the_fix_and_start_retries_it() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.fail_with(FAILED_BUILD);
    let harness = lazy_harness(&fixture, &guest);
    wait_for(Duration::from_secs(10), "the build to fail", || {
        status(&fixture).guest.unwrap().phase == "failed"
    });

    let log = fixture.state_dir.join("logs/guest-build.log");
    let drv = "/nix/store/5y5s1mmz6m3hyq9x4k3i0fg0395ymljf-etc.drv";
    let line = format!(
        "the guest {} could not be built: builder for '{drv}' failed with exit code 1; log {}; to fix: `nix log {drv}` shows why; change the guest's configuration (extraNixOSConfig), then run `darwin-vz-nix bootstrap`",
        guest.out.display(),
        log.display()
    );
    // A connection gets it at once (no new build within a minute of the last).
    let calls = nix.calls().len();
    let out = run_proxy(&fixture, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), format!("darwin-vz-nix: {line}\n"));
    assert_eq!(nix.calls().len(), calls, "not rebuilt for each connection");
    assert_eq!(harness.vm.boots(), 0);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("etc: no such user: builder2\n"),
        "the build's own words are in the log"
    );
    let text = status_text(&fixture);
    assert!(text.contains(&format!(" ago: {line}\n")), "{text}");
    assert!(text.contains("state         failed\n"), "{text}");
    assert!(!fixture.state_dir.join("gcroots/guest").exists());

    // `start` asks again at once; this time it builds.
    guest.succeed();
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(harness.vm.booted_kernels(), [canonical(&guest.kernel())]);
    let [_, realise] = realise_calls(&guest, &fixture);
    assert_eq!(
        nix.calls().iter().filter(|c| **c == realise).count(),
        2,
        "{:?}",
        nix.calls()
    );
}

/// Boots `guest` once with its own supervisor, which then exits: the state
/// directory keeps it as the guest booted before.
fn boot_once(fixture: &Fixture, guest: &FakeGuest) {
    let harness = lazy_harness(fixture, guest);
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(harness.vm.booted_kernels(), [canonical(&guest.kernel())]);
    drop(harness);
    assert_eq!(
        link_target(&fixture.state_dir.join("gcroots/guest")),
        Some(guest.out.clone())
    );
}

#[test]
fn a_newer_guest_is_built_while_the_older_one_serves_and_boots_at_the_next_boot() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let old = nix.guest("darwin-vz-nix-guest", "");
    boot_once(&fixture, &old);

    // A switch changed the guest: the new supervisor builds the new one...
    let new = nix.guest("darwin-vz-nix-guest-custom", "loglevel=7\n");
    new.hold();
    let harness = lazy_harness(&fixture, &new);
    wait_for(Duration::from_secs(10), "the new build", || {
        status(&fixture).guest.unwrap().phase == "building"
    });
    // ...while the old one serves, at once.
    let t0 = Instant::now();
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(harness.vm.booted_kernels(), [canonical(&old.kernel())]);
    let text = status_text(&fixture);
    assert!(
        text.contains(&format!(
            "\nnext boot     {}, the guest booted before, until the new one is ready\n",
            old.out.display()
        )),
        "{text}"
    );
    assert_eq!(
        link_target(&fixture.state_dir.join("gcroots/guest")),
        Some(old.out.clone()),
        "the root keeps the guest that runs"
    );

    // Ready: it is not swapped under the running VM...
    new.release();
    wait_for(Duration::from_secs(10), "the new guest", || {
        status(&fixture).guest.unwrap().phase == "ready"
    });
    assert_eq!(harness.vm.boots(), 1);
    assert_eq!(
        link_target(&fixture.state_dir.join("gcroots/guest-pending")),
        Some(new.out.clone()),
        "the pending root keeps the new guest until it boots"
    );
    // ...and boots at the next boot, which moves the root.
    assert_eq!(fixture.cli(&["stop"]).status.code(), Some(0));
    assert_eq!(fixture.cli(&["start"]).status.code(), Some(0));
    assert_eq!(
        harness.vm.booted_kernels(),
        [canonical(&old.kernel()), canonical(&new.kernel())]
    );
    assert_eq!(
        link_target(&fixture.state_dir.join("gcroots/guest")),
        Some(new.out.clone())
    );
    assert!(!fixture.state_dir.join("gcroots/guest-pending").exists());
    assert!(
        nix.calls().contains(&boot_root_call(&new.out, &fixture)),
        "{:?}",
        nix.calls()
    );
}

#[test]
fn a_failed_newer_guest_leaves_the_previous_guest_booting() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let old = nix.guest("darwin-vz-nix-guest", "");
    boot_once(&fixture, &old);

    let new = nix.guest("darwin-vz-nix-guest-custom", "");
    new.fail_with(FAILED_BUILD);
    let harness = lazy_harness(&fixture, &new);
    wait_for(Duration::from_secs(10), "the new build to fail", || {
        status(&fixture).guest.unwrap().phase == "failed"
    });

    // A build connection boots the old guest, as if nothing had happened.
    let mut proxy = spawn_proxy(&fixture);
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
    drop(proxy.stdin.take());
    assert!(proxy.wait().unwrap().success());
    assert_eq!(harness.vm.booted_kernels(), [canonical(&old.kernel())]);
    assert_eq!(
        link_target(&fixture.state_dir.join("gcroots/guest")),
        Some(old.out.clone())
    );
    let text = status_text(&fixture);
    assert!(text.contains("\nguest         failed "), "{text}");
    assert!(
        text.contains(&format!("\nnext boot     {},", old.out.display())),
        "{text}"
    );
}

#[test]
fn bootstrap_dry_run_prints_every_step_with_its_command_and_changes_nothing() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    // One build for aarch64-linux (the guest), one for the Mac, two paths to fetch.
    let darwin = nix
        .store()
        .join("ffffffffffffffffffffffffffffffff-darwin-vz-nix.json.drv");
    std::fs::write(
        &darwin,
        r#"Derive([("out","/nix/store/x","","")],[],[],"aarch64-darwin","/bin/sh",[],[])"#,
    )
    .unwrap();
    guest.dry_run_says(&format!(
        "these 2 derivations will be built:\n  {}\n  {}\nthese 2 paths will be fetched (10.00 MiB download, 50.00 MiB unpacked):\n  /nix/store/11111111111111111111111111111111-linux\n  /nix/store/22222222222222222222222222222222-systemd\n",
        guest.drv.display(),
        darwin.display()
    ));

    let out = fixture
        .cli_command(&["bootstrap", "--dry-run"])
        .env_remove("DARWIN_VZ_NIX_GUEST")
        .env("DARWIN_VZ_NIX_GUEST_DRV", &guest.drv)
        .env("DARWIN_VZ_NIX_GUEST_OUT", &guest.out)
        .env("PATH", nix.path_env())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    // The fixture's paths have spaces: every path is quoted as a shell needs it.
    let state = fixture.state_dir.display().to_string();
    let quoted = |path: &str| format!("'{path}'");
    let drv = quoted(&guest.drv.display().to_string());
    let out_path = quoted(&guest.out.display().to_string());
    for line in [
        format!("the guest   {} (in the store: no)", guest.out.display()),
        format!("built from  {}", guest.drv.display()),
        format!("     $ nix-store --realise --dry-run {drv}"),
        "     → 2 derivations to build, 2 paths to fetch; 1 of the builds for aarch64-linux, which need a Linux builder".to_string(),
        format!(
            "     $ NIX_REMOTE=daemon nix-store --realise {drv} --add-root {} --indirect --log-format internal-json",
            quoted(&format!("{state}/gcroots/guest-pending"))
        ),
        format!(
            "     $ NIX_REMOTE=daemon nix-store --realise {out_path} --add-root {} --indirect",
            quoted(&format!("{state}/gcroots/guest"))
        ),
        "(dry run: nothing was built, started or changed)".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }
    assert_eq!(
        nix.calls(),
        [format!("--realise --dry-run {}", guest.drv.display())],
        "only the read-only dry run ran"
    );
    assert!(!fixture.state_dir.exists(), "nothing was created");

    // `start --dry-run` cannot show a plan for a guest not built yet, and says
    // where to look instead.
    let out = fixture
        .cli_command(&["start", "--dry-run"])
        .env_remove("DARWIN_VZ_NIX_GUEST")
        .env("DARWIN_VZ_NIX_GUEST_DRV", &guest.drv)
        .env("DARWIN_VZ_NIX_GUEST_OUT", &guest.out)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: the guest {} is not built yet (the daemon builds it from {} when first needed); `darwin-vz-nix bootstrap --dry-run` shows every step\n",
            guest.out.display(),
            guest.drv.display()
        )
    );
    assert!(!fixture.state_dir.exists(), "nothing was created");
}

#[test]
fn bootstrap_prints_its_steps_then_follows_the_build_to_a_booted_guest() {
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    guest.progress(PROGRESS);
    guest.hold();
    let harness = lazy_harness(&fixture, &guest);
    wait_for(Duration::from_secs(10), "progress", || {
        status_text(&fixture).contains("120 of 800")
    });

    let child = fixture
        .cli_command(&["bootstrap"])
        .env_remove("DARWIN_VZ_NIX_GUEST")
        .env("DARWIN_VZ_NIX_GUEST_DRV", &guest.drv)
        .env("DARWIN_VZ_NIX_GUEST_OUT", &guest.out)
        .env("PATH", nix.path_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    guest.release();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("Bootstrap of the builder in "), "{text}");
    assert!(
        text.contains("The supervisor builds the guest through the nix-daemon"),
        "{text}"
    );
    assert!(
        text.lines().last().unwrap().starts_with("ready in "),
        "{text}"
    );
    assert!(
        stderr(&out).contains("guest: building for "),
        "it follows the build: {}",
        stderr(&out)
    );
    assert_eq!(harness.vm.booted_kernels(), [canonical(&guest.kernel())]);
}

/// `status` carries both kinds of news about the guest under names of their own:
/// `guest` is the lazy guest's build, `guestReport` what the booted guest said about
/// `/dev/kvm`; neither hides the other, in JSON or as text.
#[test]
fn status_json_has_the_guests_build_under_guest_and_what_the_booted_guest_said_under_guest_report()
{
    let fixture = Fixture::new();
    let nix = FakeNix::install(&fixture);
    let guest = nix.guest("darwin-vz-nix-guest", "");
    let _harness = Harness::start_with(
        &fixture,
        fixture.lazy_config(&guest, ConfigLayer::default()),
        FakeVmBehaviour {
            guest_kvm: Some(false),
            ..Default::default()
        },
        fixture.options(None),
    );
    let out = fixture.cli(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    wait_for(Duration::from_secs(15), "the guest's kvm report", || {
        status(&fixture)
            .guest_report
            .is_some_and(|report| report.kvm.is_some())
    });

    let json: serde_json::Value =
        serde_json::from_slice(&fixture.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["guest"]["phase"], "ready", "{json}");
    assert_eq!(json["guest"]["out"], guest.out.to_str().unwrap(), "{json}");
    assert_eq!(json["guestReport"]["boot"], 1, "{json}");
    assert_eq!(json["guestReport"]["kvm"], "absent", "{json}");
    assert_eq!(json["guestReport"]["nestedVirtualization"], false, "{json}");
    assert!(json["guest"].get("kvm").is_none(), "{json}");
    assert!(json["guestReport"].get("phase").is_none(), "{json}");

    let text = status_text(&fixture);
    assert!(
        text.contains(&format!("\nguest         ready: {}\n", guest.out.display())),
        "{text}"
    );
    assert!(
        text.contains("\nnested virt   auto: off for boot 1; kvm and nixos-test are not offered\n"),
        "{text}"
    );
}
