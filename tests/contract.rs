//! Host and guest, Rust and Nix, must agree: these tests fail when one side changes
//! alone.

mod support;

use std::path::Path;

use darwin_vz_nix::config::{self, Config, Origin, Source, defaults};
use darwin_vz_nix::contract;
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
        (
            "/consoleMarkers/bootTiming",
            contract::CONSOLE_MARKER_BOOT_TIMING.into(),
        ),
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
    assert!(cases.contains_key("defaults") && cases.contains_key("no-rosetta-never-idle"));
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
    assert!(module.guest.dir.as_ref().unwrap().starts_with("/nix/store"));

    let custom = load("no-rosetta-never-idle");
    assert!(!custom.rosetta);
    assert_eq!(custom.idle_timeout(), None);

    // Unset options reach the daemon as absent keys, so its defaults apply.
    let minimal = load("minimal");
    assert_eq!(minimal.cores, defaults::CORES);
    assert_eq!(minimal.control_group, None);
}
