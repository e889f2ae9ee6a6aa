//! Host and guest, Rust and Nix, must agree: these tests fail when one side changes
//! alone.

mod support;

use std::path::Path;

use darwin_vz_nix::config::{self, Config, Origin, Source, defaults};
use darwin_vz_nix::contract;
use darwin_vz_nix::host::HostInfo;
use darwin_vz_nix::machines::{self, MachineLine, VmFacts};
use darwin_vz_nix::nested::NestedVirtualization;
use darwin_vz_nix::state::StateDir;
use serde_json::Value;

#[test]
fn contract_json_matches_the_rust_constants() {
    let json: Value = serde_json::from_str(contract::CONTRACT_JSON).unwrap();
    let at = |pointer: &str| {
        json.pointer(pointer)
            .unwrap_or_else(|| panic!("contract.json lacks {pointer}"))
            .clone()
    };
    let expected: &[(&str, Value)] = &[
        ("/hostKeyAlias", contract::HOST_KEY_ALIAS.into()),
        ("/vsock/sshPort", contract::SSH_VSOCK_PORT.into()),
        ("/vsock/clockPort", contract::CLOCK_VSOCK_PORT.into()),
        (
            "/vsock/hostCachePort",
            contract::HOST_CACHE_VSOCK_PORT.into(),
        ),
        ("/tags/hostStore", contract::TAG_HOST_STORE.into()),
        ("/tags/keys", contract::TAG_KEYS.into()),
        ("/tags/rosetta", contract::TAG_ROSETTA.into()),
        ("/guest/user", contract::GUEST_USER.into()),
        ("/guest/console", contract::GUEST_CONSOLE.into()),
        ("/guest/rootDevice", contract::GUEST_ROOT_DEVICE.into()),
        ("/guest/mounts/hostStore", contract::MOUNT_HOST_STORE.into()),
        ("/guest/mounts/keys", contract::MOUNT_KEYS.into()),
        ("/guest/mounts/rosetta", contract::MOUNT_ROSETTA.into()),
        (
            "/guest/keyFiles/hostKey",
            contract::KEY_FILE_HOST_KEY.into(),
        ),
        (
            "/guest/keyFiles/hostKeyPub",
            contract::KEY_FILE_HOST_KEY_PUB.into(),
        ),
        (
            "/guest/keyFiles/authorizedKeys",
            contract::KEY_FILE_AUTHORIZED_KEYS.into(),
        ),
        (
            "/guest/keyFiles/caBundle",
            contract::KEY_FILE_CA_BUNDLE.into(),
        ),
        (
            "/guest/keyFiles/hostCacheKey",
            contract::KEY_FILE_HOST_CACHE_KEY.into(),
        ),
        ("/artifacts/kernel", contract::ARTIFACT_KERNEL.into()),
        ("/artifacts/initrd", contract::ARTIFACT_INITRD.into()),
        ("/artifacts/system", contract::ARTIFACT_SYSTEM.into()),
        (
            "/artifacts/registration",
            contract::ARTIFACT_REGISTRATION.into(),
        ),
        (
            "/kernelParams/registration",
            contract::PARAM_REGISTRATION.into(),
        ),
        ("/kernelParams/rosetta", contract::PARAM_ROSETTA.into()),
        (
            "/kernelParams/rosettaPreserveArgv0",
            contract::PARAM_ROSETTA_PRESERVE_ARGV0.into(),
        ),
        ("/kernelParams/hostCache", contract::PARAM_HOST_CACHE.into()),
        (
            "/consoleMarkers/bootTiming",
            contract::CONSOLE_MARKER_BOOT_TIMING.into(),
        ),
        ("/consoleMarkers/kvm", contract::CONSOLE_MARKER_KVM.into()),
    ];
    for (pointer, value) in expected {
        assert_eq!(&at(pointer), value, "contract.json {pointer}");
    }
    // Nothing in the JSON that Rust does not know about.
    let count = |v: &Value| -> usize {
        fn leaves(v: &Value) -> usize {
            match v {
                Value::Object(map) => map
                    .iter()
                    .filter(|(k, _)| !k.starts_with('_'))
                    .map(|(_, v)| leaves(v))
                    .sum(),
                _ => 1,
            }
        }
        leaves(v)
    };
    assert_eq!(
        count(&json),
        expected.len(),
        "every contract value is checked"
    );
}

#[test]
fn the_tags_the_plan_uses_are_valid_virtiofs_tags() {
    for tag in [
        contract::TAG_HOST_STORE,
        contract::TAG_KEYS,
        contract::TAG_ROSETTA,
    ] {
        assert!(
            !tag.is_empty() && tag.len() <= darwin_vz_nix::plan::MAX_TAG_LEN,
            "{tag}"
        );
    }
}

/// The nix-darwin module's daemon config (nix/lib.nix `daemonConfig`) loads with the
/// daemon's own loader, and its defaults are the daemon's defaults.
#[test]
fn the_module_daemon_config_loads_with_the_rust_loader() {
    let cases = support::nix_eval_json(Path::new("tests/nix/daemon-config.nix"));
    let cases = cases.as_object().unwrap();
    for name in [
        "defaults",
        "chosen",
        "no-rosetta-never-idle",
        "minimal",
        "no-prevent-sleep",
        "lazy",
    ] {
        assert!(
            cases.contains_key(name),
            "tests/nix/daemon-config.nix lacks {name}"
        );
    }
    let load = |name: &str| -> Config {
        let text = serde_json::to_string(&cases[name]).unwrap();
        let layer = config::parse_layer(&text).unwrap_or_else(|e| panic!("case {name}: {e}"));
        Config::resolve(
            &[Source {
                origin: Origin::File(name.into()),
                layer,
            }],
            None,
        )
        .unwrap_or_else(|e| panic!("case {name}: {e}"))
    };
    for name in cases.keys() {
        load(name);
    }

    let module = load("defaults");
    assert_eq!(module.cores, defaults::CORES);
    assert_eq!(module.memory_mib, defaults::MEMORY_MIB);
    assert_eq!(module.disk_size, defaults::DISK_SIZE);
    assert_eq!(module.rosetta, defaults::ROSETTA);
    assert_eq!(module.idle_timeout_minutes, defaults::IDLE_TIMEOUT_MINUTES);
    assert_eq!(module.stop_timeout_seconds, defaults::STOP_TIMEOUT_SECONDS);
    assert_eq!(module.log_level, config::LogLevel::default());
    assert_eq!(module.state_dir, Path::new("/var/lib/darwin-vz"));
    assert_eq!(module.control_group.as_deref(), Some("_darwin-vz"));
    assert_eq!(module.prevent_sleep, defaults::PREVENT_SLEEP);
    assert_eq!(cases["defaults"]["preventSleep"], true);
    assert_eq!(module.host_store_cache, defaults::HOST_STORE_CACHE);
    assert!(
        !load("chosen").host_store_cache,
        "the module's hostStoreCache = false reaches the daemon"
    );
    assert!(module.guest.dir.as_ref().unwrap().starts_with("/nix/store"));

    assert_eq!(module.nested_virtualization, NestedVirtualization::Auto);
    assert_eq!(
        load("chosen").nested_virtualization,
        NestedVirtualization::Off
    );
    assert!(
        load("chosen").builder.supported_features.is_some(),
        "a list the user sets reaches the daemon"
    );
    assert!(
        module.builder.supported_features.is_none(),
        "by default `machines` decides the features"
    );

    let custom = load("no-rosetta-never-idle");
    assert!(!custom.rosetta);
    assert_eq!(custom.idle_timeout(), None);

    // Unset options reach the daemon as absent keys, so its defaults apply.
    let minimal = load("minimal");
    assert_eq!(minimal.cores, defaults::CORES);
    assert!(minimal.prevent_sleep);
    assert!(!load("no-prevent-sleep").prevent_sleep);
    assert_eq!(minimal.control_group, None);
    assert!(minimal.host_store_cache);

    // A guest given as a derivation reaches the daemon as the guest it realises.
    let lazy = load("lazy").lazy_guest().expect("a lazy guest");
    assert!(
        lazy.drv
            .to_str()
            .unwrap()
            .ends_with("-darwin-vz-nix-guest.drv")
    );
    assert!(lazy.out.to_str().unwrap().ends_with("-darwin-vz-nix-guest"));
    assert!(module.lazy_guest().is_none(), "a guest directory stays one");
}

/// The switch builds nothing for aarch64-linux: the daemon config's strings depend
/// on the guest's `.drv` file only (context `path`), never on an output
/// (`outputs`, `allOutputs`), and they name the derivation and its output path.
#[test]
fn the_daemon_config_names_the_guest_derivation_without_depending_on_its_outputs() {
    let eval = support::nix_eval_json(Path::new("tests/nix/lazy-guest.nix"));
    let config = &eval["config"];
    assert_eq!(config["guestDrv"], eval["guestDrv"]);
    assert_eq!(config["guestOut"], eval["guestOut"]);
    assert!(config.get("guest").is_none(), "{config}");
    assert_eq!(config["bootstrapDrv"], eval["bootstrapDrv"]);
    assert_eq!(eval["outputDependencies"], serde_json::json!([]));
    let context = eval["context"].as_object().unwrap();
    let mut drvs = vec![
        eval["guestDrv"].as_str().unwrap(),
        eval["bootstrapDrv"].as_str().unwrap(),
    ];
    drvs.sort();
    assert_eq!(
        context.keys().map(String::as_str).collect::<Vec<_>>(),
        drvs,
        "only the two .drv files are in the context"
    );
    for drv in drvs {
        assert_eq!(
            context[drv],
            serde_json::json!({ "path": true }),
            "{drv} as a plain path: nothing is built"
        );
    }
    // The check itself catches a guest named by its output.
    assert_eq!(eval["withOutputs"], serde_json::json!([eval["guestDrv"]]));
    // A guest directory (a store path) stays `guest`.
    assert!(eval["directory"]["guest"].is_string());
    assert!(eval["directory"].get("guestDrv").is_none());

    // The Rust side reads it as a lazy guest.
    let layer = config::parse_layer(&config.to_string()).unwrap();
    let resolved = Config::resolve(
        &[Source {
            origin: Origin::File("lazy".into()),
            layer,
        }],
        None,
    )
    .unwrap();
    let spec = resolved.lazy_guest().unwrap();
    assert_eq!(spec.drv.to_str(), eval["guestDrv"].as_str());
    assert_eq!(spec.out.to_str(), eval["guestOut"].as_str());
    let bootstrap = resolved.bootstrap().unwrap();
    assert_eq!(bootstrap.drv.to_str(), eval["bootstrapDrv"].as_str());
    assert!(bootstrap.host_key.starts_with("ssh-ed25519 AAAA"));
}

/// The module leaves cores and memory unset (null), so the daemon fits them to the
/// Mac, and the machines line (`darwin-vz-nix machines`, fitting the same way)
/// carries the cores it really uses.
#[test]
fn module_defaults_are_fitted_to_a_small_mac_and_max_jobs_follows_the_cores() {
    let cases = support::nix_eval_json(Path::new("tests/nix/daemon-config.nix"));
    let load = |name: &str| -> Config {
        let layer = config::parse_layer(&cases[name].to_string()).unwrap();
        Config::resolve(
            &[Source {
                origin: Origin::File(name.into()),
                layer,
            }],
            None,
        )
        .unwrap()
    };
    assert!(
        cases["defaults"].get("cores").is_none(),
        "{}",
        cases["defaults"]
    );
    assert!(cases["defaults"].get("memory").is_none());
    let eight_gib_two_cores = HostInfo {
        cpus: 2,
        memory_bytes: 8 << 30,
        macos_version: Some((15, 0)),
        arch: "aarch64".into(),
        nested_virtualization: None,
    };
    let state = StateDir::new("/var/lib/darwin-vz");

    let mut module = load("defaults");
    module.fit_defaults_to(&eight_gib_two_cores);
    assert_eq!((module.cores, module.memory_mib), (2, 4096));
    assert_eq!(
        MachineLine::new(&module, &state, &VmFacts::default()).to_string(),
        "ssh-ng://builder@darwin-vz-nix aarch64-linux,x86_64-linux /var/lib/darwin-vz/keys/client_ed25519 2 1 benchmark,big-parallel - -"
    );

    // What the user sets is the user's: neither fitted nor overridden.
    let mut chosen = load("chosen");
    chosen.fit_defaults_to(&eight_gib_two_cores);
    assert_eq!((chosen.cores, chosen.memory_mib), (6, 8192));
    assert_eq!(
        MachineLine::new(&chosen, &state, &VmFacts::default()).to_string(),
        "ssh-ng://builder@darwin-vz-nix aarch64-linux /var/lib/darwin-vz/keys/client_ed25519 3 2 big-parallel,dvn dvn -"
    );
}

/// The module's builtins-only checks (nix/lib.nix): account assertions, the
/// linux-builder directory overlap, the machines file root writes and the
/// /etc/nix/machines line, and the builder defaults, which must be the CLI's.
#[test]
fn the_module_checks_give_the_expected_answers() {
    let checks = support::nix_eval_json(Path::new("tests/nix/module-checks.nix"));

    let problems: Vec<(String, usize, String)> = checks["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let found = a["problems"].as_array().unwrap();
            let text = found
                .iter()
                .map(|p| p.as_str().unwrap())
                .collect::<Vec<_>>()
                .join("\n");
            (a["group"].as_str().unwrap().to_string(), found.len(), text)
        })
        .collect();
    let expected = [
        ("_darwin-vz", 0, ""),
        (
            "admin",
            1,
            "services.darwin-vz.group = \"admin\" is one of macOS's own",
        ),
        (
            "staff",
            1,
            "services.darwin-vz.group = \"staff\" is one of macOS's own",
        ),
        ("everyone", 1, "\"everyone\" is one of macOS's own"),
        (
            "_darwin-vz",
            1,
            "services.darwin-vz.user = \"alice\" does not start with `_`",
        ),
        (
            "_darwin-vz",
            1,
            "services.darwin-vz.user = \"_darwin-vz\" has uid 70, in the range macOS keeps",
        ),
        (
            "com.apple.access_ssh",
            2,
            "\"com.apple.access_ssh\" is one of macOS's own",
        ),
    ];
    assert_eq!(problems.len(), expected.len());
    for ((group, count, text), (want_group, want_count, want_text)) in problems.iter().zip(expected)
    {
        assert_eq!((group.as_str(), *count), (want_group, want_count), "{text}");
        assert!(text.contains(want_text), "{text}");
        if *count > 0 {
            assert!(
                text.contains("services.darwin-vz.groupMembers"),
                "points at the way for existing users: {text}"
            );
        }
    }

    let overlaps: Vec<bool> = checks["overlaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["overlap"].as_bool().unwrap())
        .collect();
    assert_eq!(
        overlaps,
        [false, true, true, true, true, true, false, true],
        "{}",
        checks["overlaps"]
    );

    assert_eq!(
        checks["machinesFile"],
        machines::NIX_MACHINES_FILE,
        "the module writes the file the CLI's help and the README name"
    );
    assert_eq!(
        checks["machinesInclude"],
        format!("@{}\n", machines::NIX_MACHINES_FILE),
        "/etc/nix/machines points Nix at that file, from the start of a line"
    );

    let systems = |v: &Value| -> Vec<String> { serde_json::from_value(v.clone()).unwrap() };
    assert_eq!(
        systems(&checks["defaultSystems"]["rosetta"]),
        machines::default_systems(true)
    );
    assert_eq!(
        systems(&checks["defaultSystems"]["noRosetta"]),
        machines::default_systems(false)
    );
    let builder = &checks["builderDefaults"];
    assert!(
        builder["supportedFeatures"].is_null(),
        "the features follow the VM unless the user lists them"
    );
    assert_eq!(
        systems(&checks["defaultSupportedFeatures"]),
        machines::DEFAULT_SUPPORTED_FEATURES
    );
    assert_eq!(builder["mandatoryFeatures"], serde_json::json!([]));
    assert_eq!(builder["speedFactor"], 1);
    assert!(
        builder["maxJobs"].is_null(),
        "maxJobs follows the cores the daemon uses"
    );
    assert_eq!(
        checks["x86Alias"],
        darwin_vz_nix::ssh::X86_ALIAS,
        "the Host block's second name is the machines entry's"
    );
}

/// Nested virtualization on both sides: the option's values are the daemon's, the
/// guest's kernel follows rosetta and nestedVirtualization as nix/nixos/kvm.nix
/// says, and root's launchd job watches the very file the daemon writes its guest
/// report to and runs a `machines` command the CLI accepts.
#[test]
fn nested_virtualization_agrees_between_the_module_the_guest_and_the_daemon() {
    let checks = support::nix_eval_json(Path::new("tests/nix/module-checks.nix"));

    for value in checks["nestedVirtualizationValues"].as_array().unwrap() {
        let text = value.as_str().unwrap();
        let parsed: NestedVirtualization = text.parse().unwrap();
        assert_eq!(parsed.as_str(), text);
    }
    assert_eq!(
        checks["nestedVirtualizationValues"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let kernels: Vec<(bool, String, bool)> = checks["guestKernel"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["rosetta"].as_bool().unwrap(),
                c["nestedVirtualization"].as_str().unwrap().to_string(),
                c["kvmKernel"].as_bool().unwrap(),
            )
        })
        .collect();
    let expected = [
        (true, "auto", false),
        (true, "on", true),
        (true, "off", false),
        (false, "auto", true),
        (false, "on", true),
        (false, "off", false),
    ];
    assert_eq!(kernels.len(), expected.len());
    for ((rosetta, nested, kvm), (want_rosetta, want_nested, want_kvm)) in
        kernels.iter().zip(expected)
    {
        assert_eq!(
            (*rosetta, nested.as_str(), *kvm),
            (want_rosetta, want_nested, want_kvm)
        );
    }
    assert_eq!(
        checks["guestKernelModule"],
        serde_json::json!({ "darwin-vz-nix": { "kernel": { "forNestedVirtualization": true } } })
    );

    let state = StateDir::new("/var/lib/darwin-vz");
    let report = state.guest_report().display().to_string();
    for path in checks["guestReportFiles"].as_array().unwrap() {
        assert_eq!(path.as_str().unwrap(), report);
    }

    let job = &checks["machinesRefresh"]["serviceConfig"];
    assert_eq!(job["WatchPaths"], serde_json::json!([report]));
    assert!(
        job.get("UserName").is_none(),
        "root runs it: only root writes what Nix reads"
    );
    for key in ["StandardOutPath", "StandardErrorPath"] {
        let log = job[key].as_str().unwrap();
        assert!(
            !log.starts_with("/var/lib/darwin-vz"),
            "root's log is not in the service account's directory: {log}"
        );
        assert_eq!(log, "/var/log/darwin-vz-nix-machines.log");
    }
    let args: Vec<String> = serde_json::from_value(job["ProgramArguments"].clone()).unwrap();
    assert_eq!(
        args.get(1..).unwrap(),
        [
            "machines",
            "--config",
            "/nix/store/00000000000000000000000000000000-darwin-vz-nix.json",
            "--write",
            machines::NIX_MACHINES_FILE,
        ]
    );

    // The real CLI takes those arguments (with a config and a target of this test).
    let fixture = support::Fixture::new();
    let config = fixture.dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({ "stateDir": fixture.state_dir }).to_string(),
    )
    .unwrap();
    let target = fixture.dir.path().join("machines");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"))
        .args(args.get(1..3).unwrap())
        .arg(&config)
        .arg(args.get(4).unwrap())
        .arg(&target)
        .env_remove("DARWIN_VZ_NIX_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", support::stderr(&out));
    assert!(
        std::fs::read_to_string(&target)
            .unwrap()
            .contains("ssh-ng://builder@darwin-vz-nix aarch64-linux,x86_64-linux")
    );
}
