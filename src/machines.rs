//! How Nix finds this builder: one entry of Nix's machines-file format, which
//! `darwin-vz-nix machines` prints or, run as root, writes to a root-owned file.
//!
//! Nix reads its build machines from the `builders` setting, `@/etc/nix/machines` by
//! default. An entry `@FILE` is replaced by the entries of FILE — also inside a
//! machines file, recursively — and a missing FILE is skipped without an error
//! (`expandBuilderLines` in Nix's `src/libstore/machines.cc`, the same from 2.18 to
//! today and in Determinate Nix). The nix-darwin module has root write the entry to
//! [`NIX_MACHINES_FILE`] at every activation and adds `@` + that path to
//! `/etc/nix/machines`, so the entry can follow what only this program knows, such as
//! the cores the daemon fits to this Mac, where a `nix.buildMachines` entry is fixed
//! by what the configuration says.
//!
//! Only root writes what Nix reads. Whoever writes an entry chooses the store URI,
//! the systems and the key: a file the service account could write would let it
//! claim `aarch64-darwin` (and receive root's Mac builds), send root's build hook to
//! another host with root's key, or name a store that is not SSH at all — which is
//! why Nix makes `builders` a setting only trusted users may change. The daemon,
//! which runs as that account, therefore writes no machines file.
//!
//! The format, as every Nix since 2.18 parses it: entries separated by newlines or
//! `;`, everything from `#` to the end of a line a comment, and in an entry the
//! fields separated by whitespace: store URI, systems, SSH key, max jobs, speed
//! factor, supported features, mandatory features, public host key (`-` = unset).
//! So no field may contain whitespace, `,` inside a list item, `;` or `#`.
//!
//! `kvm` and `nixos-test` are offered where nested virtualization gives the guest a
//! `/dev/kvm` ([`nested_facts`]); the only file of the state directory root reads
//! for that is the guest's report, which can take them away but never add them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::host::HostInfo;
use crate::state::StateDir;
use crate::{artifacts, contract, files, nested};

/// The root-owned file the nix-darwin module writes the entry to, and that
/// `/etc/nix/machines` includes; `nix/lib.nix` (`machinesFile`) names the same path.
/// Users without nix-darwin are told to use it too.
pub const NIX_MACHINES_FILE: &str = "/etc/nix/darwin-vz-nix.machines";

/// Features advertised unless the configuration lists its own. `kvm` and
/// `nixos-test` join them only where nested virtualization gives the guest a
/// `/dev/kvm` ([`nested_facts`]): advertised without it, such builds would be sent
/// to the VM and fail there instead of going to a machine that has it.
pub const DEFAULT_SUPPORTED_FEATURES: &[&str] = &["benchmark", "big-parallel"];

/// Accepted `maxJobs`: Nix runs that many builds on the VM at once.
pub const MAX_JOBS_RANGE: std::ops::RangeInclusive<u32> = 1..=1024;
/// Accepted `speedFactor`: Nix prefers faster machines, weighted by this.
pub const SPEED_FACTOR_RANGE: std::ops::RangeInclusive<u32> = 1..=1_000_000;

/// Longest system or feature name accepted (Nix's own are far shorter).
const MAX_NAME_LEN: usize = 100;

/// Written above the entry. Nix drops everything from `#` on; it must hold no `;`,
/// which Nix before 2.29 split on before it removed comments.
const HEADER: &str = "# The darwin-vz-nix builder, written by `darwin-vz-nix machines` as root (nix-darwin: at every switch): edits are lost.\n";

/// The `builder` section of the JSON config: how Nix should use this builder.
/// Every field is optional; unset ones follow the VM (see [`MachineLine::new`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuilderSettings {
    /// Builds Nix runs on the VM at once; unset = the VM's cores.
    pub max_jobs: Option<MaxJobs>,
    /// Preference among build machines.
    pub speed_factor: Option<SpeedFactor>,
    /// Systems Nix sends to the VM; unset = aarch64-linux, plus x86_64-linux with Rosetta.
    pub systems: Option<Systems>,
    /// Features the VM offers; unset = [`DEFAULT_SUPPORTED_FEATURES`].
    pub supported_features: Option<Vec<Name>>,
    /// Features a derivation must ask for to be sent to the VM.
    pub mandatory_features: Option<Vec<Name>>,
}

/// A `maxJobs` value inside [`MAX_JOBS_RANGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u32")]
pub struct MaxJobs(u32);

/// A `speedFactor` value inside [`SPEED_FACTOR_RANGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u32")]
pub struct SpeedFactor(u32);

fn in_range(what: &str, value: u64, range: std::ops::RangeInclusive<u32>) -> Result<u32, String> {
    u32::try_from(value)
        .ok()
        .filter(|v| range.contains(v))
        .ok_or_else(|| {
            format!(
                "{what} {value} is out of range; use {} to {}",
                range.start(),
                range.end()
            )
        })
}

impl TryFrom<u64> for MaxJobs {
    type Error = String;
    fn try_from(value: u64) -> Result<Self, String> {
        in_range("builder.maxJobs", value, MAX_JOBS_RANGE).map(MaxJobs)
    }
}

impl TryFrom<u64> for SpeedFactor {
    type Error = String;
    fn try_from(value: u64) -> Result<Self, String> {
        in_range("builder.speedFactor", value, SPEED_FACTOR_RANGE).map(SpeedFactor)
    }
}

impl From<MaxJobs> for u32 {
    fn from(value: MaxJobs) -> u32 {
        value.0
    }
}

impl From<SpeedFactor> for u32 {
    fn from(value: SpeedFactor) -> u32 {
        value.0
    }
}

/// A system or feature name that fits into one field of a machines-file entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let fits = !text.is_empty()
            && text.len() <= MAX_NAME_LEN
            && !text
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | ';' | '#'));
        if fits {
            Ok(Name(text))
        } else {
            Err(format!(
                "{text:?} cannot be a system or feature name in Nix's machines file; use 1 to {MAX_NAME_LEN} characters without spaces, `,`, `;` or `#`"
            ))
        }
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A non-empty list of systems: an empty field would mean "the Mac's own system".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Name>", into = "Vec<Name>")]
pub struct Systems(Vec<Name>);

impl TryFrom<Vec<Name>> for Systems {
    type Error = String;
    fn try_from(names: Vec<Name>) -> Result<Self, String> {
        if names.is_empty() {
            Err(
                "builder.systems is empty; list at least one system, e.g. [\"aarch64-linux\"]"
                    .into(),
            )
        } else {
            Ok(Systems(names))
        }
    }
}

impl From<Systems> for Vec<Name> {
    fn from(systems: Systems) -> Vec<Name> {
        systems.0
    }
}

/// What is known about the VM besides its configuration, as plain data: whoever
/// learns such a fact (the host's capabilities, the booted guest) hands it to
/// [`MachineLine::new`]. Empty by default: the configuration alone decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmFacts {
    /// Features the VM is known to offer beyond [`DEFAULT_SUPPORTED_FEATURES`] (for
    /// example `kvm` once the guest is known to have `/dev/kvm`). They join the
    /// default list only: a `supportedFeatures` list the user wrote is kept as written.
    pub extra_features: Vec<Name>,
    /// The first guest is still to be built, by the bootstrap builder (configured,
    /// and no guest has booted yet): aarch64-linux, which it builds, and the other
    /// systems, which only the guest builds, get entries of their own (see
    /// [`entries`]).
    pub bootstrap_pending: bool,
}

/// What root knows about nested virtualization on this Mac, as [`VmFacts`], and
/// what to say about it: `kvm` and `nixos-test` where the daemon will boot the
/// guest with nested virtualization (the setting, this Mac, the guest's kernel:
/// `nested::decide`), unless the guest's last report (written by the daemon into
/// its state directory) says that a boot with it had no `/dev/kvm` — the report can
/// only take features away (`nested::offer`).
pub fn nested_facts(config: &Config, host: &HostInfo, state: &StateDir) -> (VmFacts, Vec<String>) {
    let mut warnings = Vec::new();
    // A lazy guest's kernel once its output exists (built: the daemon boots it from
    // then on); the output path comes from the configuration, never the state
    // directory. Before that, the kernel is unknown and `auto` offers no kvm.
    let kernel = || {
        let lazy_out = config
            .lazy_guest()
            .map(|spec| spec.out)
            .filter(|out| out.is_dir());
        let guest = match &lazy_out {
            Some(out) => artifacts::resolve_from(config, Some((out, "guestOut"))),
            None => artifacts::resolve(config),
        };
        guest
            .ok()
            .and_then(|guest| nested::kernel_release(&guest.kernel))
    };
    let decision = match nested::decide(config.nested_virtualization, host.nested_support(), kernel)
    {
        Ok(decision) => decision,
        Err(message) => {
            warnings.push(format!(
                "{}: {message}; the line offers no kvm, and the daemon boots nothing until this is changed",
                config.input("nestedVirtualization")
            ));
            return (VmFacts::default(), warnings);
        }
    };
    let report = nested::read_report(&state.guest_report()).unwrap_or_else(|message| {
        warnings.push(message);
        None
    });
    let offer = nested::offer(&decision, report.as_ref());
    warnings.extend(offer.warning);
    let extra_features = offer
        .features
        .iter()
        .filter_map(|feature| Name::try_from(feature.to_string()).ok())
        .collect();
    let facts = VmFacts {
        extra_features,
        ..VmFacts::default()
    };
    (facts, warnings)
}

/// The builder as Nix should see it: every field of one machines-file entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineLine {
    /// `ssh-ng://USER@darwin-vz-nix`: the `Host` alias of the generated ssh_config.
    pub store_uri: String,
    pub systems: Vec<String>,
    /// The client key; `None` writes `-`, and ssh takes the key from the Host block.
    pub ssh_key: Option<PathBuf>,
    pub max_jobs: u32,
    pub speed_factor: u32,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
}

impl MachineLine {
    /// The entry for a daemon with this (resolved, host-fitted) configuration: unset
    /// builder settings follow the VM, so `maxJobs` is the cores the VM really gets.
    pub fn new(config: &Config, state: &StateDir, facts: &VmFacts) -> MachineLine {
        let builder = &config.builder;
        let names = |list: &[Name]| list.iter().map(|n| n.as_str().to_string()).collect();
        let systems = match &builder.systems {
            Some(Systems(list)) => names(list),
            None => default_systems(config.rosetta),
        };
        let supported_features = match &builder.supported_features {
            Some(list) => names(list),
            None => {
                let mut features: Vec<String> = DEFAULT_SUPPORTED_FEATURES
                    .iter()
                    .map(|f| f.to_string())
                    .collect();
                for extra in &facts.extra_features {
                    if !features.iter().any(|f| f == extra.as_str()) {
                        features.push(extra.as_str().to_string());
                    }
                }
                features
            }
        };
        let key = state.client_key();
        MachineLine {
            store_uri: format!("ssh-ng://{}@{}", config.ssh_user, contract::HOST_KEY_ALIAS),
            systems,
            ssh_key: fits_one_field(&key).then_some(key),
            max_jobs: builder.max_jobs.map_or(config.cores, u32::from),
            speed_factor: builder.speed_factor.map_or(1, u32::from),
            supported_features,
            mandatory_features: builder
                .mandatory_features
                .as_deref()
                .map_or_else(Vec::new, names),
        }
    }

    /// The file's text: a comment and the entry, newline-terminated.
    pub fn render(&self) -> String {
        format!("{HEADER}{self}\n")
    }
}

/// One entry, fields in Nix's order. Mandatory features are listed among the
/// supported ones too, as nix-darwin and NixOS write them.
impl fmt::Display for MachineLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |items: &[String]| {
            if items.is_empty() {
                "-".to_string()
            } else {
                items.join(",")
            }
        };
        let mut supported = self.supported_features.clone();
        for feature in &self.mandatory_features {
            if !supported.contains(feature) {
                supported.push(feature.clone());
            }
        }
        let key = self
            .ssh_key
            .as_deref()
            .and_then(Path::to_str)
            .unwrap_or("-");
        write!(
            f,
            "{} {} {} {} {} {} {} -",
            self.store_uri,
            list(&self.systems),
            key,
            self.max_jobs,
            self.speed_factor,
            list(&supported),
            list(&self.mandatory_features),
        )
    }
}

/// The machines file's entries. One, normally. While the first guest is still to be
/// built by the bootstrap builder, two: aarch64-linux on the builder's alias (which
/// the bootstrap builder may answer meanwhile) and the other systems on
/// [`crate::ssh::X86_ALIAS`] (which waits for the guest), so that the supervisor
/// knows from the name ssh was asked for which system a connection is for. Nix
/// counts jobs per entry, so until the next `machines --write` after the first
/// guest booted, the VM may get `maxJobs` builds of each.
pub fn entries(config: &Config, state: &StateDir, facts: &VmFacts) -> Vec<MachineLine> {
    let line = MachineLine::new(config, state, facts);
    let (native, other): (Vec<String>, Vec<String>) = line
        .systems
        .iter()
        .cloned()
        .partition(|system| system == "aarch64-linux");
    if !facts.bootstrap_pending || native.is_empty() || other.is_empty() {
        return vec![line];
    }
    let x86 = MachineLine {
        store_uri: format!("ssh-ng://{}@{}", config.ssh_user, crate::ssh::X86_ALIAS),
        systems: other,
        ..line.clone()
    };
    vec![
        MachineLine {
            systems: native,
            ..line
        },
        x86,
    ]
}

/// The file's text for several entries: the comment, then one entry per line.
pub fn render_entries(entries: &[MachineLine]) -> String {
    let mut text = HEADER.to_string();
    for entry in entries {
        text.push_str(&format!("{entry}\n"));
    }
    text
}

/// True when a guest has booted from this state directory: its GC root exists
/// (`gcroots/guest`, a symbolic link the supervisor makes). Read without following
/// it; whoever owns the directory can only choose between our own entries.
pub fn guest_has_booted(state: &StateDir) -> bool {
    std::fs::symlink_metadata(state.guest_root()).is_ok_and(|meta| meta.file_type().is_symlink())
}

/// Writes `entries` to `path` for root's nix-daemon, as [`write`] does.
pub fn write_entries(path: &Path, entries: &[MachineLine]) -> Result<(), files::TrustedFileError> {
    files::write_trusted(path, render_entries(entries).as_bytes(), 0o644)
}

/// Writes `line` to `path` for root's nix-daemon: 0644 (every user's `nix` reads
/// it too), atomically, never through a symbolic link, and only into a directory
/// no one but root (or the user writing) can change; see [`files::write_trusted`].
pub fn write(path: &Path, line: &MachineLine) -> Result<(), files::TrustedFileError> {
    files::write_trusted(path, line.render().as_bytes(), 0o644)
}

/// aarch64-linux natively; x86_64-linux only when Rosetta runs it. Listing
/// x86_64-linux is what makes Nix send those builds at all; listing it without
/// Rosetta makes them fail inside the VM.
pub fn default_systems(rosetta: bool) -> Vec<String> {
    let mut systems = vec!["aarch64-linux".to_string()];
    if rosetta {
        systems.push("x86_64-linux".to_string());
    }
    systems
}

/// Whether a path can be one whitespace-separated field of an entry. The default
/// state directory on macOS (`~/Library/Application Support/…`) cannot; the line then
/// leaves the key to the generated ssh_config's `IdentityFile`.
fn fits_one_field(path: &Path) -> bool {
    path.to_str().is_some_and(|text| {
        !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ';' | '#'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigLayer, Origin, Source};

    fn config(builder: &str, extra: ConfigLayer) -> Config {
        let layer = crate::config::parse_layer(&format!(r#"{{"builder": {builder}}}"#)).unwrap();
        Config::resolve(
            &[
                Source {
                    origin: Origin::File("/etc/dvn.json".into()),
                    layer,
                },
                Source {
                    origin: Origin::Flag,
                    layer: extra,
                },
            ],
            Some(PathBuf::from("/var/lib/darwin-vz")),
        )
        .unwrap()
    }

    fn state() -> StateDir {
        StateDir::new("/var/lib/darwin-vz")
    }

    #[test]
    fn unset_settings_follow_the_vm_cores_and_rosetta() {
        let config = config(
            "{}",
            ConfigLayer {
                cores: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(
            MachineLine::new(&config, &state(), &VmFacts::default()).to_string(),
            "ssh-ng://builder@darwin-vz-nix aarch64-linux,x86_64-linux /var/lib/darwin-vz/keys/client_ed25519 3 1 benchmark,big-parallel - -"
        );
        let mut no_rosetta = config;
        no_rosetta.rosetta = false;
        let line = MachineLine::new(&no_rosetta, &state(), &VmFacts::default());
        assert_eq!(line.systems, ["aarch64-linux"]);
    }

    #[test]
    fn set_settings_win_and_mandatory_features_are_also_supported() {
        let config = config(
            r#"{"maxJobs": 2, "speedFactor": 5, "systems": ["aarch64-linux"],
                "supportedFeatures": ["big-parallel"], "mandatoryFeatures": ["slow", "big-parallel"]}"#,
            ConfigLayer::default(),
        );
        assert_eq!(
            MachineLine::new(&config, &state(), &VmFacts::default()).to_string(),
            "ssh-ng://builder@darwin-vz-nix aarch64-linux /var/lib/darwin-vz/keys/client_ed25519 2 5 big-parallel,slow slow,big-parallel -"
        );
    }

    #[test]
    fn extra_facts_join_the_default_features_but_never_a_configured_list() {
        let facts = VmFacts {
            extra_features: vec![
                Name::try_from("kvm".to_string()).unwrap(),
                Name::try_from("big-parallel".to_string()).unwrap(),
            ],
            ..VmFacts::default()
        };
        let defaults = config("{}", ConfigLayer::default());
        assert_eq!(
            MachineLine::new(&defaults, &state(), &facts).supported_features,
            ["benchmark", "big-parallel", "kvm"],
            "added once, after the defaults"
        );
        let chosen = config(
            r#"{"supportedFeatures": ["benchmark"]}"#,
            ConfigLayer::default(),
        );
        assert_eq!(
            MachineLine::new(&chosen, &state(), &facts).supported_features,
            ["benchmark"],
            "the user's list is kept as written"
        );
    }

    #[test]
    fn while_the_bootstrap_is_pending_aarch64_and_the_rest_get_entries_of_their_own() {
        let config = config("{}", ConfigLayer::default());
        let pending = VmFacts {
            bootstrap_pending: true,
            ..VmFacts::default()
        };
        let text = render_entries(&entries(&config, &state(), &pending));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "ssh-ng://builder@darwin-vz-nix aarch64-linux /var/lib/darwin-vz/keys/client_ed25519 4 1 benchmark,big-parallel - -",
                "ssh-ng://builder@darwin-vz-nix-x86 x86_64-linux /var/lib/darwin-vz/keys/client_ed25519 4 1 benchmark,big-parallel - -",
            ]
        );
        assert!(!text.contains(';'));
        // Afterwards, or without Rosetta, one entry as before.
        assert_eq!(entries(&config, &state(), &VmFacts::default()).len(), 1);
        let mut no_rosetta = config;
        no_rosetta.rosetta = false;
        let one = entries(&no_rosetta, &state(), &pending);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].systems, ["aarch64-linux"]);
    }

    #[test]
    fn empty_feature_lists_are_written_as_a_dash() {
        let config = config(r#"{"supportedFeatures": []}"#, ConfigLayer::default());
        let line = MachineLine::new(&config, &state(), &VmFacts::default()).to_string();
        assert!(line.ends_with(" 4 1 - - -"), "{line}");
    }

    #[test]
    fn a_key_path_with_a_space_leaves_the_key_to_ssh_config() {
        let config = config("{}", ConfigLayer::default());
        for dir in [
            "/Users/me/Library/Application Support/darwin-vz-nix",
            "/tmp/a#b",
            "/tmp/a;b",
        ] {
            let line = MachineLine::new(&config, &StateDir::new(dir), &VmFacts::default());
            assert_eq!(line.ssh_key, None, "{dir}");
            assert_eq!(line.to_string().split(' ').nth(2), Some("-"), "{dir}");
        }
    }

    #[test]
    fn the_file_is_one_comment_and_one_entry_as_nix_splits_it() {
        let text = MachineLine::new(
            &config("{}", ConfigLayer::default()),
            &state(),
            &VmFacts::default(),
        )
        .render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with('#'));
        assert!(
            !text.contains(';'),
            "Nix < 2.29 splits entries on `;` before comments"
        );
        assert!(text.ends_with('\n'));
        assert_eq!(lines[1].split(' ').count(), 8, "all eight fields");
    }

    #[test]
    fn bad_builder_settings_are_refused_with_the_reason() {
        let cases = [
            (
                r#"{"maxJobs": 0}"#,
                "builder.maxJobs 0 is out of range; use 1 to 1024",
            ),
            (
                r#"{"maxJobs": 5000000000}"#,
                "builder.maxJobs 5000000000 is out of range",
            ),
            (
                r#"{"speedFactor": 0}"#,
                "builder.speedFactor 0 is out of range; use 1 to 1000000",
            ),
            (r#"{"systems": []}"#, "builder.systems is empty"),
            (
                r#"{"supportedFeatures": ["big parallel"]}"#,
                "\"big parallel\" cannot be a system or feature name in Nix's machines file",
            ),
            (r#"{"mandatoryFeatures": ["a,b"]}"#, "\"a,b\" cannot be"),
            (r#"{"systems": ["x#y"]}"#, "\"x#y\" cannot be"),
            (r#"{"systems": [""]}"#, "\"\" cannot be"),
            (r#"{"maxjobs": 2}"#, "unknown field `maxjobs`"),
        ];
        for (builder, expected) in cases {
            let err =
                crate::config::parse_layer(&format!(r#"{{"builder": {builder}}}"#)).unwrap_err();
            assert!(err.contains(expected), "{builder}: {err}");
        }
    }
}
