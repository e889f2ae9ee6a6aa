//! The configuration model: what the user can set, where it comes from, and whether it
//! can work on this host.
//!
//! Settings come in layers, lowest precedence first: built-in defaults, the JSON config
//! file (`--config`), environment variables (`DARWIN_VZ_NIX_*`), command-line flags.
//! Each resolved value remembers its origin so that an error can say which input to fix.
//! Validation collects every problem before reporting, so one run shows them all.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};
use crate::host::HostInfo;
use crate::size::ByteSize;

/// Defaults a user gets without configuring anything.
pub mod defaults {
    use crate::size::ByteSize;

    pub const CORES: u32 = 4;
    pub const MEMORY_MIB: u64 = 6144;
    pub const DISK_SIZE: ByteSize = ByteSize::from_gib(100);
    pub const ROSETTA: bool = true;
    pub const IDLE_TIMEOUT_MINUTES: u64 = 180;
    pub const STOP_TIMEOUT_SECONDS: u64 = 15;
    pub const PREVENT_SLEEP: bool = true;
    pub const HOST_STORE_CACHE: bool = true;
}

/// Below this the NixOS guest does not reliably boot and build.
pub const MIN_MEMORY_MIB: u64 = 1024;
/// Room for the guest's Nix database, `/var` and a few builds.
pub const MIN_DISK_SIZE: ByteSize = ByteSize::from_mib(512);

/// The range of every number a user can set (the README's configuration table).
/// Values are refused outside them, never clamped; the host's own limits (its CPUs,
/// its memory) are checked on top before a boot.
pub mod ranges {
    use std::ops::RangeInclusive;

    use crate::size::ByteSize;

    /// Virtual CPUs; far above any Mac, so that the host check names the real limit.
    pub const CORES: RangeInclusive<u64> = 1..=1024;
    /// MiB of guest memory: the guest's minimum to 16 TiB.
    pub const MEMORY_MIB: RangeInclusive<u64> = super::MIN_MEMORY_MIB..=16 * 1024 * 1024;
    /// The disk image: room for the guest's store to 64 TiB.
    pub const DISK_SIZE: RangeInclusive<ByteSize> =
        super::MIN_DISK_SIZE..=ByteSize::from_gib(64 * 1024);
    /// Minutes without a connection before poweroff: 0 (never) to a year.
    pub const IDLE_TIMEOUT_MINUTES: RangeInclusive<u64> = 0..=525_600;
    /// Seconds a graceful poweroff may take: 1 s to an hour.
    pub const STOP_TIMEOUT_SECONDS: RangeInclusive<u64> = 1..=3600;
    /// Largest config file read; a real one is a few hundred bytes.
    pub const CONFIG_FILE_BYTES: u64 = 1 << 20;
    /// Longest user name for the guest (what `useradd` accepts on Linux).
    pub const SSH_USER_BYTES: usize = 32;
    /// Longest group name for `controlGroup`.
    pub const GROUP_NAME_BYTES: usize = 64;
}

/// Prefix of every environment variable the tool reads.
pub const ENV_PREFIX: &str = "DARWIN_VZ_NIX_";

/// How much the daemon logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        <LogLevel as clap::ValueEnum>::from_str(text, true).map_err(|_| {
            format!("`{text}` is not a log level; use error, warn, info, debug or trace")
        })
    }
}

/// One source of settings. Every field is optional so that sources can be layered; the
/// JSON config file has exactly this shape (camelCase keys, unknown keys rejected).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigLayer {
    /// Virtual CPUs. Every number is read as u64 in every layer, so that one range
    /// check with one message judges it, whichever layer it came from.
    pub cores: Option<u64>,
    /// Guest memory in MiB.
    pub memory: Option<u64>,
    /// Size of the guest's disk image.
    pub disk_size: Option<ByteSize>,
    /// Run x86_64-linux binaries through Rosetta 2.
    pub rosetta: Option<bool>,
    /// Minutes without an open connection before the VM powers off; 0 = never.
    pub idle_timeout: Option<u64>,
    /// Seconds to wait for a graceful poweroff before forcing it.
    pub stop_timeout: Option<u64>,
    /// A guest directory holding `kernel`, `initrd`, `system` and `registration`.
    pub guest: Option<PathBuf>,
    /// Override of the guest directory's kernel.
    pub kernel: Option<PathBuf>,
    /// Override of the guest directory's initrd.
    pub initrd: Option<PathBuf>,
    /// Override of the guest directory's NixOS system (toplevel).
    pub system: Option<PathBuf>,
    /// Override of the guest directory's store registration.
    pub registration: Option<PathBuf>,
    /// Extra kernel command-line parameters, appended last.
    pub kernel_params: Option<Vec<String>>,
    /// Where the disk image, keys, control socket and logs live.
    pub state_dir: Option<PathBuf>,
    /// How much the daemon logs.
    pub log_level: Option<LogLevel>,
    /// Group allowed to use the control socket (besides the owner).
    pub control_group: Option<String>,
    /// User that `ssh` and Nix log in as on the guest.
    pub ssh_user: Option<String>,
    /// How Nix uses the builder: the line `darwin-vz-nix machines` prints for Nix.
    /// Config file only (the nix-darwin module sets it).
    pub builder: Option<crate::machines::BuilderSettings>,
    /// Boot the guest with nested virtualization (its `/dev/kvm`): auto, on, off.
    pub nested_virtualization: Option<crate::nested::NestedVirtualization>,
    /// Keep the Mac from idle sleep while a build connection is open.
    pub prevent_sleep: Option<bool>,
    /// The guest's derivation (`/nix/store/…-darwin-vz-nix-guest.drv`), which the
    /// daemon realises when it is first needed (see `guest`). A `guest` directory,
    /// when set, wins.
    pub guest_drv: Option<PathBuf>,
    /// The output path `guestDrv` builds; set together with it.
    pub guest_out: Option<PathBuf>,
    /// nixpkgs' `darwin.linux-builder` VM runner (`…-nixos-vm.drv`): brought up
    /// from cache.nixos.org while the guest needs an aarch64-linux build and no
    /// guest exists yet (see `crate::bootstrap`). Unset: no automatic bootstrap.
    pub bootstrap_drv: Option<PathBuf>,
    /// The bootstrap builder's public SSH host key (`ssh-ed25519 AAAA…`), from
    /// the same nixpkgs; set together with `bootstrapDrv`.
    pub bootstrap_host_key: Option<String>,
    /// Serve the host's store to the guest as its first binary cache.
    pub host_store_cache: Option<bool>,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "source", content = "name")]
pub enum Origin {
    Default,
    File(PathBuf),
    Env,
    Flag,
}

/// A layer together with where it came from.
#[derive(Debug, Clone)]
pub struct Source {
    pub origin: Origin,
    pub layer: ConfigLayer,
}

/// Names of a setting in each place it can be written.
struct FieldNames {
    key: &'static str,
    env: &'static str,
    flag: &'static str,
}

const FIELDS: &[FieldNames] = &[
    field("cores", "CORES", "--cores"),
    field("memory", "MEMORY", "--memory"),
    field("diskSize", "DISK_SIZE", "--disk-size"),
    field("rosetta", "ROSETTA", "--rosetta/--no-rosetta"),
    field("idleTimeout", "IDLE_TIMEOUT", "--idle-timeout"),
    field("stopTimeout", "STOP_TIMEOUT", "--stop-timeout"),
    field("guest", "GUEST", "--guest"),
    field("kernel", "KERNEL", "--kernel"),
    field("initrd", "INITRD", "--initrd"),
    field("system", "SYSTEM", "--system"),
    field("registration", "REGISTRATION", "--registration"),
    field("kernelParams", "KERNEL_PARAMS", "--kernel-param"),
    field("stateDir", "STATE_DIR", "--state-dir"),
    field("logLevel", "LOG_LEVEL", "--log-level"),
    field("controlGroup", "CONTROL_GROUP", "--control-group"),
    field("sshUser", "SSH_USER", "--ssh-user"),
    // Config file only: no variable or flag sets it, so these names are never shown.
    field("builder", "BUILDER", "--config"),
    field(
        "nestedVirtualization",
        "NESTED_VIRTUALIZATION",
        "--nested-virtualization",
    ),
    field(
        "preventSleep",
        "PREVENT_SLEEP",
        "--prevent-sleep/--no-prevent-sleep",
    ),
    field("guestDrv", "GUEST_DRV", "--guest-drv"),
    field("guestOut", "GUEST_OUT", "--guest-out"),
    field("bootstrapDrv", "BOOTSTRAP_DRV", "--bootstrap-drv"),
    field(
        "bootstrapHostKey",
        "BOOTSTRAP_HOST_KEY",
        "--bootstrap-host-key",
    ),
    field(
        "hostStoreCache",
        "HOST_STORE_CACHE",
        "--host-store-cache/--no-host-store-cache",
    ),
];

const fn field(key: &'static str, env: &'static str, flag: &'static str) -> FieldNames {
    FieldNames { key, env, flag }
}

fn names(key: &str) -> &'static FieldNames {
    FIELDS
        .iter()
        .find(|f| f.key == key)
        .expect("every setting is listed in FIELDS")
}

/// The environment variable that sets `key` (a camelCase config key).
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}{}", names(key).env)
}

impl Origin {
    /// How to point a user at the input that set `key`.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Origin::Default => format!("`{key}` (built-in default)"),
            Origin::File(path) => format!("`{key}` in {}", path.display()),
            Origin::Env => env_var(key),
            Origin::Flag => names(key).flag.to_string(),
        }
    }
}

/// One thing wrong with the configuration: which input, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub input: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.input, self.message)
    }
}

/// Every problem found, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for problem in many {
                    write!(f, "\n  - {problem}")?;
                }
                Ok(())
            }
        }
    }
}

/// Where the guest's boot artifacts come from, before they are checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GuestSource {
    pub dir: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub system: Option<PathBuf>,
    pub registration: Option<PathBuf>,
}

/// The resolved configuration: every value present, each with its origin.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub cores: u32,
    pub memory_mib: u64,
    pub disk_size: ByteSize,
    pub rosetta: bool,
    pub idle_timeout_minutes: u64,
    pub stop_timeout_seconds: u64,
    pub guest: GuestSource,
    pub kernel_params: Vec<String>,
    pub state_dir: PathBuf,
    pub log_level: LogLevel,
    pub control_group: Option<String>,
    pub ssh_user: String,
    pub builder: crate::machines::BuilderSettings,
    pub nested_virtualization: crate::nested::NestedVirtualization,
    pub prevent_sleep: bool,
    /// The guest's derivation and the output it builds (`guestDrv`, `guestOut`).
    pub guest_drv: Option<PathBuf>,
    pub guest_out: Option<PathBuf>,
    /// The bootstrap builder (`bootstrapDrv`, `bootstrapHostKey`).
    pub bootstrap_drv: Option<PathBuf>,
    pub bootstrap_host_key: Option<String>,
    pub host_store_cache: bool,
    #[serde(skip)]
    origins: BTreeMap<&'static str, Origin>,
}

impl Config {
    /// Layers `sources` (lowest precedence first) over the defaults.
    ///
    /// `default_state_dir` is passed in because it depends on the user's home directory.
    pub fn resolve(
        sources: &[Source],
        default_state_dir: Option<PathBuf>,
    ) -> Result<Config, ConfigErrors> {
        let mut origins = BTreeMap::new();
        macro_rules! pick {
            ($field:ident, $key:literal) => {{
                let found = sources
                    .iter()
                    .rev()
                    .find_map(|s| s.layer.$field.clone().map(|v| (v, s.origin.clone())));
                match found {
                    Some((value, origin)) => {
                        origins.insert($key, origin);
                        Some(value)
                    }
                    None => {
                        origins.insert($key, Origin::Default);
                        None
                    }
                }
            }};
        }

        let cores = pick!(cores, "cores").unwrap_or(u64::from(defaults::CORES));
        let memory_mib = pick!(memory, "memory").unwrap_or(defaults::MEMORY_MIB);
        let disk_size = pick!(disk_size, "diskSize").unwrap_or(defaults::DISK_SIZE);
        let rosetta = pick!(rosetta, "rosetta").unwrap_or(defaults::ROSETTA);
        let idle_timeout_minutes =
            pick!(idle_timeout, "idleTimeout").unwrap_or(defaults::IDLE_TIMEOUT_MINUTES);
        let stop_timeout_seconds =
            pick!(stop_timeout, "stopTimeout").unwrap_or(defaults::STOP_TIMEOUT_SECONDS);
        let guest = GuestSource {
            dir: pick!(guest, "guest"),
            kernel: pick!(kernel, "kernel"),
            initrd: pick!(initrd, "initrd"),
            system: pick!(system, "system"),
            registration: pick!(registration, "registration"),
        };
        let kernel_params = pick!(kernel_params, "kernelParams").unwrap_or_default();
        let state_dir = pick!(state_dir, "stateDir").or(default_state_dir);
        let log_level = pick!(log_level, "logLevel").unwrap_or_default();
        let control_group = pick!(control_group, "controlGroup");
        let ssh_user =
            pick!(ssh_user, "sshUser").unwrap_or_else(|| crate::contract::GUEST_USER.to_string());
        let builder = pick!(builder, "builder").unwrap_or_default();
        let nested_virtualization =
            pick!(nested_virtualization, "nestedVirtualization").unwrap_or_default();
        let prevent_sleep = pick!(prevent_sleep, "preventSleep").unwrap_or(defaults::PREVENT_SLEEP);
        let guest_drv = pick!(guest_drv, "guestDrv");
        let guest_out = pick!(guest_out, "guestOut");
        let bootstrap_drv = pick!(bootstrap_drv, "bootstrapDrv");
        let bootstrap_host_key = pick!(bootstrap_host_key, "bootstrapHostKey");
        let host_store_cache =
            pick!(host_store_cache, "hostStoreCache").unwrap_or(defaults::HOST_STORE_CACHE);

        let Some(state_dir) = state_dir else {
            return Err(ConfigErrors(vec![Problem {
                input: "stateDir".into(),
                message: "no default: HOME is not set; pass --state-dir DIR or set DARWIN_VZ_NIX_STATE_DIR".into(),
            }]));
        };

        let config = Config {
            // In range means it fits; the placeholder is never used (the range
            // check below reports the number as given).
            cores: u32::try_from(cores).unwrap_or(defaults::CORES),
            memory_mib,
            disk_size,
            rosetta,
            idle_timeout_minutes,
            stop_timeout_seconds,
            guest,
            kernel_params,
            state_dir,
            log_level,
            control_group,
            ssh_user,
            builder,
            nested_virtualization,
            prevent_sleep,
            guest_drv,
            guest_out,
            bootstrap_drv,
            bootstrap_host_key,
            host_store_cache,
            origins,
        };

        // Range checks on the numbers as given, before any is narrowed.
        let mut problems = Vec::new();
        let mut out_of_range = |key: &str, message: Option<String>| {
            if let Some(message) = message {
                problems.push(config.problem(key, message));
            }
        };
        out_of_range("cores", check_range(cores, &ranges::CORES, "virtual CPUs"));
        out_of_range("memory", check_memory(memory_mib));
        out_of_range("diskSize", check_disk_size(disk_size));
        out_of_range(
            "idleTimeout",
            check_range(
                idle_timeout_minutes,
                &ranges::IDLE_TIMEOUT_MINUTES,
                IDLE_UNIT,
            ),
        );
        out_of_range(
            "stopTimeout",
            check_range(
                stop_timeout_seconds,
                &ranges::STOP_TIMEOUT_SECONDS,
                "seconds",
            ),
        );
        problems.extend(config.check_values());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// Shrinks built-in defaults that this host cannot give (4 CPUs on a 2-CPU machine,
    /// 6 GiB on an 8 GiB one); values the user chose are left for validation to judge.
    pub fn fit_defaults_to(&mut self, host: &HostInfo) {
        if self.origin("cores") == Origin::Default {
            self.cores = self.cores.min(host.cpus.max(1));
        }
        let half_host_mib = host.memory_bytes / (2 * 1024 * 1024);
        if self.origin("memory") == Origin::Default && half_host_mib > 0 {
            self.memory_mib = self.memory_mib.min(half_host_mib.max(MIN_MEMORY_MIB));
        }
    }

    /// Where `key` came from, phrased for an error message.
    pub fn input(&self, key: &str) -> String {
        self.origins
            .get(key)
            .unwrap_or(&Origin::Default)
            .describe(key)
    }

    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        let secs = self.idle_timeout_minutes.checked_mul(60)?;
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_seconds)
    }

    fn problem(&self, key: &str, message: impl Into<String>) -> Problem {
        Problem {
            input: self.input(key),
            message: message.into(),
        }
    }

    /// Checks that need nothing but the values themselves.
    fn check_values(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for param in &self.kernel_params {
            if param.is_empty() || param.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(self.problem(
                    "kernelParams",
                    format!("{param:?} is not one kernel parameter; give each parameter separately, without spaces"),
                ));
            }
        }
        for (key, path) in [
            ("guest", &self.guest.dir),
            ("kernel", &self.guest.kernel),
            ("initrd", &self.guest.initrd),
            ("system", &self.guest.system),
            ("registration", &self.guest.registration),
        ] {
            if let Some(message) = path.as_deref().and_then(path_problem) {
                problems.push(self.problem(key, message));
            }
        }
        if let Some(message) = path_problem(&self.state_dir) {
            problems.push(self.problem("stateDir", message));
        } else if !self.state_dir.is_absolute() {
            problems.push(self.problem(
                "stateDir",
                format!(
                    "{} is relative; give an absolute path",
                    self.state_dir.display()
                ),
            ));
        }
        if let Err(message) = crate::ssh::check_user(&self.ssh_user) {
            problems.push(self.problem("sshUser", message));
        }
        if let Some(group) = &self.control_group
            && let Err(message) = check_group_name(group)
        {
            problems.push(self.problem("controlGroup", message));
        }
        problems.extend(self.check_guest_derivation());
        problems.extend(self.check_bootstrap());
        problems
    }

    /// `bootstrapDrv` (an absolute `.drv`) and `bootstrapHostKey` (one public key),
    /// always given together.
    fn check_bootstrap(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Some(drv) = &self.bootstrap_drv {
            let shape = path_problem(drv).or_else(|| {
                (!drv.is_absolute() || drv.extension().is_none_or(|ext| ext != "drv")).then(|| {
                    format!(
                        "{} is not an absolute path to a derivation (`.drv`); give darwin.linux-builder's VM runner, e.g. `nix eval --raw nixpkgs#darwin.linux-builder.nixosConfig.system.build.vm.drvPath`",
                        drv.display()
                    )
                })
            });
            if let Some(message) = shape {
                problems.push(self.problem("bootstrapDrv", message));
            }
        }
        if let Some(key) = &self.bootstrap_host_key
            && let Err(message) = check_public_key(key)
        {
            problems.push(self.problem("bootstrapHostKey", message));
        }
        problems.extend(self.set_together(
            ("bootstrapDrv", self.bootstrap_drv.is_some()),
            ("bootstrapHostKey", self.bootstrap_host_key.is_some()),
            "the nix-darwin module does",
        ));
        problems
    }

    /// Two settings that mean something only together: a problem for the one that
    /// is set without the other. `who` sets both, e.g. "the nix-darwin module does".
    fn set_together(
        &self,
        (a, a_set): (&str, bool),
        (b, b_set): (&str, bool),
        who: &str,
    ) -> Option<Problem> {
        match (a_set, b_set) {
            (true, false) => {
                Some(self.problem(a, format!("is set without {b}; give both ({who})")))
            }
            (false, true) => {
                Some(self.problem(b, format!("is set without {a}; give both ({who})")))
            }
            _ => None,
        }
    }

    /// The bootstrap builder, when configured: its VM runner's derivation and host key.
    pub fn bootstrap(&self) -> Option<crate::bootstrap::BootstrapSpec> {
        match (&self.bootstrap_drv, &self.bootstrap_host_key) {
            (Some(drv), Some(host_key)) => Some(crate::bootstrap::BootstrapSpec {
                drv: drv.clone(),
                host_key: host_key.trim().to_string(),
                cores: self.cores,
                memory_mib: self.memory_mib,
                ssh_user: self.ssh_user.clone(),
            }),
            _ => None,
        }
    }

    /// `guestDrv` and `guestOut`: absolute UTF-8 paths, a `.drv` and its output,
    /// always given together.
    fn check_guest_derivation(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (key, path) in [("guestDrv", &self.guest_drv), ("guestOut", &self.guest_out)] {
            let Some(path) = path else { continue };
            if let Some(message) = path_problem(path) {
                problems.push(self.problem(key, message));
            } else if !path.is_absolute() {
                problems.push(self.problem(
                    key,
                    format!(
                        "{} is relative; give an absolute store path",
                        path.display()
                    ),
                ));
            }
        }
        if let Some(drv) = &self.guest_drv
            && drv.extension().is_none_or(|ext| ext != "drv")
        {
            problems.push(self.problem(
                "guestDrv",
                format!(
                    "{} is not a derivation (no `.drv`); give the guest's derivation, e.g. `nix eval --raw .#packages.aarch64-linux.guest.drvPath`",
                    drv.display()
                ),
            ));
        }
        problems.extend(self.set_together(
            ("guestDrv", self.guest_drv.is_some()),
            ("guestOut", self.guest_out.is_some()),
            "the nix-darwin module and `nix run` do",
        ));
        problems
    }

    /// The guest the daemon realises itself, when no `guest` directory is set: its
    /// derivation and the output path it builds.
    pub fn lazy_guest(&self) -> Option<crate::guest::GuestSpec> {
        if self.guest.dir.is_some() {
            return None;
        }
        match (&self.guest_drv, &self.guest_out) {
            (Some(drv), Some(out)) => Some(crate::guest::GuestSpec {
                drv: drv.clone(),
                out: out.clone(),
            }),
            _ => None,
        }
    }

    /// Checks against this host and the filesystem, done before anything boots.
    /// `existing_disk` is the size of the disk image already in the state directory.
    pub fn validate_for_boot(
        &self,
        host: &HostInfo,
        existing_disk: Option<ByteSize>,
    ) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.cores > host.cpus {
            problems.push(self.problem(
                "cores",
                format!(
                    "{} is more than this machine's {} CPUs; use at most {}",
                    self.cores, host.cpus, host.cpus
                ),
            ));
        }
        let host_mib = host.memory_bytes / (1024 * 1024);
        if host_mib > 0 && self.memory_mib > host_mib {
            problems.push(self.problem(
                "memory",
                format!(
                    "{} MiB is more than this machine's {host_mib} MiB; use less (memory is in MiB: 6144 = 6 GiB)",
                    self.memory_mib
                ),
            ));
        }
        if let Some(existing) = existing_disk
            && self.disk_size < existing
        {
            problems.push(self.problem(
                "diskSize",
                format!(
                    "{} is smaller than the existing disk image ({existing}); disks are never shrunk — set diskSize to at least {existing}, or run `darwin-vz-nix destroy` to start over with an empty disk",
                    self.disk_size
                ),
            ));
        }
        problems
    }
}

/// Reads and parses the JSON config file: a regular file (a FIFO would block, a
/// device never end) of at most `ranges::CONFIG_FILE_BYTES`.
pub fn load_file(path: &Path) -> Result<ConfigLayer, ConfigErrors> {
    let fail = |message: String| {
        ConfigErrors(vec![Problem {
            input: format!("config file {}", path.display()),
            message,
        }])
    };
    const WHERE: &str = "check the path given to --config or DARWIN_VZ_NIX_CONFIG";
    let bytes = files::open_input(path)
        .and_then(|file| files::read_capped(file, path, ranges::CONFIG_FILE_BYTES))
        .map_err(|e| {
            fail(match e {
                FileError::Io { source, .. } => format!("cannot read it ({source}); {WHERE}"),
                FileError::NotRegular { kind, .. } => {
                    format!("is {kind}, not a regular file; {WHERE}")
                }
                FileError::TooLarge { limit, .. } => format!(
                    "is larger than {limit} bytes (a configuration file is a few hundred); {WHERE}"
                ),
            })
        })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| fail(format!("is not UTF-8 text, so not JSON; {WHERE}")))?;
    parse_layer(&text).map_err(fail)
}

/// Parses the JSON config format; the error names line and column.
pub fn parse_layer(text: &str) -> Result<ConfigLayer, String> {
    serde_json::from_str(text).map_err(|e| {
        let what = e.to_string();
        // serde_json appends " at line L column C"; keep it, it is the useful part.
        format!("{what}; see the configuration reference in the README")
    })
}

/// What the environment sets: settings, and the config file to read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvSettings {
    pub layer: ConfigLayer,
    /// `DARWIN_VZ_NIX_CONFIG`.
    pub config_file: Option<PathBuf>,
}

/// The variable naming the config file (not a setting itself).
pub const CONFIG_FILE_VAR: &str = "DARWIN_VZ_NIX_CONFIG";

/// Variables of the test suite (`tests/macos.rs`), which the program does not read.
const TEST_SUITE_VARS: [&str; 2] = ["DARWIN_VZ_NIX_TEST_GUEST", "DARWIN_VZ_NIX_TEST_KVM_GUEST"];

/// Reads every `DARWIN_VZ_NIX_*` variable of `vars` (the process environment in
/// production). None is ever ignored: a variable that is set but empty, not UTF-8,
/// not a value of its setting, or not a setting at all (a typo) is an error naming
/// it — a silently ignored `DARWIN_VZ_NIX_STATE_DIR` would make `destroy` act on the
/// default state directory.
pub fn read_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<EnvSettings, ConfigErrors> {
    let (settings, problems) = read_env_all(vars);
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigErrors(problems))
    }
}

/// `read_env` that goes on past problems: the settings of every usable variable,
/// and a problem for each other one, so that a caller can report them together
/// with the problems of the other layers.
pub fn read_env_all(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> (EnvSettings, Vec<Problem>) {
    use std::os::unix::ffi::OsStrExt;

    let mut settings = EnvSettings::default();
    let mut problems = Vec::new();
    let mut vars: Vec<(OsString, OsString)> = vars
        .into_iter()
        .filter(|(name, _)| name.as_bytes().starts_with(ENV_PREFIX.as_bytes()))
        .collect();
    vars.sort();
    for (name, value) in vars {
        let problem = |message: String| Problem {
            input: name.to_string_lossy().into_owned(),
            message,
        };
        let Some(name_text) = name.to_str() else {
            problems.push(problem(
                "is not a setting darwin-vz-nix knows (its name is not UTF-8); unset it".into(),
            ));
            continue;
        };
        if TEST_SUITE_VARS.contains(&name_text) {
            continue;
        }
        let key = FIELDS.iter().find(|f| env_var(f.key) == name_text);
        if key.is_none() && name_text != CONFIG_FILE_VAR {
            problems.push(problem(format!(
                "is not a setting darwin-vz-nix knows{}; unset it",
                suggestion(name_text)
            )));
            continue;
        }
        let Some(value) = value.to_str() else {
            problems.push(problem(
                "is not valid UTF-8; give a UTF-8 value, or unset it".into(),
            ));
            continue;
        };
        if value.trim().is_empty() {
            problems.push(problem(
                "is set but empty; give it a value, or unset it to use the default".into(),
            ));
            continue;
        }
        let Some(key) = key else {
            settings.config_file = Some(PathBuf::from(value));
            continue;
        };
        if let Err(message) = set_from_text(&mut settings.layer, key.key, value) {
            problems.push(problem(message));
        }
    }
    (settings, problems)
}

/// `, did you mean X?` for a misspelt variable name (same letters but the
/// underscores, or two letters off).
fn suggestion(name: &str) -> String {
    let squeeze = |s: &str| s.replace('_', "").to_ascii_uppercase();
    FIELDS
        .iter()
        .map(|f| env_var(f.key))
        .chain([CONFIG_FILE_VAR.to_string()])
        .find(|known| squeeze(known) == squeeze(name) || edit_distance(known, name) <= 2)
        .map(|known| format!(" (did you mean {known}?)"))
        .unwrap_or_default()
}

/// Levenshtein distance, for short names only.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// Sets `key` of `layer` from its text form (an environment variable's value).
/// Numbers are only parsed here; `Config::resolve` judges their range, with the
/// same message for every layer.
fn set_from_text(layer: &mut ConfigLayer, key: &str, text: &str) -> Result<(), String> {
    let number = |range: &RangeInclusive<u64>, unit: &str| parse_whole(text, range, unit);
    match key {
        "cores" => layer.cores = Some(number(&ranges::CORES, "virtual CPUs")?),
        "memory" => layer.memory = Some(number(&ranges::MEMORY_MIB, MIB_UNIT)?),
        "diskSize" => layer.disk_size = Some(text.parse().map_err(|e| format!("{e}"))?),
        "rosetta" => layer.rosetta = Some(parse_bool_setting(text)?),
        "idleTimeout" => {
            layer.idle_timeout = Some(number(&ranges::IDLE_TIMEOUT_MINUTES, IDLE_UNIT)?)
        }
        "stopTimeout" => {
            layer.stop_timeout = Some(number(&ranges::STOP_TIMEOUT_SECONDS, "seconds")?)
        }
        "guest" => layer.guest = Some(text.into()),
        "kernel" => layer.kernel = Some(text.into()),
        "initrd" => layer.initrd = Some(text.into()),
        "system" => layer.system = Some(text.into()),
        "registration" => layer.registration = Some(text.into()),
        "kernelParams" => {
            layer.kernel_params = Some(text.split_whitespace().map(String::from).collect())
        }
        "stateDir" => layer.state_dir = Some(text.into()),
        "logLevel" => layer.log_level = Some(text.parse()?),
        "controlGroup" => layer.control_group = Some(text.into()),
        "sshUser" => layer.ssh_user = Some(text.into()),
        "nestedVirtualization" => layer.nested_virtualization = Some(text.parse()?),
        "preventSleep" => layer.prevent_sleep = Some(parse_bool_setting(text)?),
        "guestDrv" => layer.guest_drv = Some(text.into()),
        "guestOut" => layer.guest_out = Some(text.into()),
        "bootstrapDrv" => layer.bootstrap_drv = Some(text.into()),
        "bootstrapHostKey" => layer.bootstrap_host_key = Some(text.into()),
        "hostStoreCache" => layer.host_store_cache = Some(parse_bool_setting(text)?),
        // It has a name in FIELDS only so that messages can name it.
        "builder" => {
            return Err(
                "the builder section is set in the config file only (--config); unset it".into(),
            );
        }
        _ => unreachable!("every key in FIELDS is handled: {key}"),
    }
    Ok(())
}

/// Units as the range messages say them.
const MIB_UNIT: &str = "MiB (memory is in MiB: 6144 = 6 GiB)";
const IDLE_UNIT: &str = "minutes (0 = never power off)";

/// A whole number in `range`, for flags that only a command takes.
pub fn parse_number(text: &str, range: &RangeInclusive<u64>, unit: &str) -> Result<u64, String> {
    let value = parse_whole(text, range, unit)?;
    check_range(value, range, unit).map_or(Ok(value), Err)
}

/// A whole number; one too large for any integer gets the message of `range`,
/// like any other number outside it.
fn parse_whole(text: &str, range: &RangeInclusive<u64>, unit: &str) -> Result<u64, String> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    match text.parse::<u64>() {
        Ok(value) => Ok(value),
        Err(_) if digits => Err(format!(
            "{text} is out of range; give {} to {} {unit}",
            range.start(),
            range.end()
        )),
        Err(_) => Err(format!(
            "`{text}` is not a whole number of {}",
            unit.split(" (").next().unwrap_or(unit)
        )),
    }
}

/// The message for a number outside its range, or `None`.
fn check_range(value: u64, range: &RangeInclusive<u64>, unit: &str) -> Option<String> {
    (!range.contains(&value)).then(|| {
        format!(
            "{value} is out of range; give {} to {} {unit}",
            range.start(),
            range.end()
        )
    })
}

fn check_memory(mib: u64) -> Option<String> {
    let range = ranges::MEMORY_MIB;
    if mib < *range.start() {
        Some(format!(
            "{mib} MiB is below the {MIN_MEMORY_MIB} MiB the guest needs to boot and build; give it at least {MIN_MEMORY_MIB} (memory is in MiB: 6144 = 6 GiB)"
        ))
    } else {
        check_range(mib, &range, MIB_UNIT)
    }
}

fn check_disk_size(size: ByteSize) -> Option<String> {
    let range = ranges::DISK_SIZE;
    if size < *range.start() {
        Some(format!(
            "{size} is too small; use at least {}",
            range.start()
        ))
    } else if size > *range.end() {
        Some(format!(
            "{size} is out of range; give {} to {}",
            range.start(),
            range.end()
        ))
    } else {
        None
    }
}

/// Why a path setting cannot be used as given, or `None`. Paths end up in the
/// kernel command line, the boot plan and ssh_config, which are text: a path that
/// is not UTF-8 would be shown (and booted) as a different path.
fn path_problem(path: &Path) -> Option<String> {
    if path.as_os_str().is_empty() {
        return Some("is empty; give a path".into());
    }
    path.to_str().is_none().then(|| {
        format!(
            "{} is not valid UTF-8; rename it or choose a path whose name is UTF-8",
            path.display()
        )
    })
}

/// An SSH public key as known_hosts takes it: `TYPE BASE64`, one line.
fn check_public_key(key: &str) -> Result<(), String> {
    let key = key.trim();
    let mut words = key.split_whitespace();
    let (kind, data) = (words.next(), words.next());
    let shape_ok = key.len() <= 4096
        && kind.is_some_and(|k| k.starts_with("ssh-") || k.starts_with("ecdsa-"))
        && data.is_some_and(|d| {
            d.len() >= 16
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        })
        && !key.contains(['\n', '\r']);
    if shape_ok {
        Ok(())
    } else {
        Err("is not an SSH public key (`ssh-ed25519 AAAA…`, one line); give the bootstrap builder's host key from nixpkgs (nixos/modules/profiles/keys/ssh_host_ed25519_key.pub)".into())
    }
}

/// An account name (user or group) of 1 to `max` letters, digits, `_`, `-` and `.`:
/// the portable shape, which needs no quoting anywhere it is written.
pub(crate) fn is_account_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A group name as `controlGroup` takes it.
fn check_group_name(name: &str) -> Result<(), String> {
    if is_account_name(name, ranges::GROUP_NAME_BYTES) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a group name; use letters, digits, `_`, `-` or `.` (at most {} characters)",
            ranges::GROUP_NAME_BYTES
        ))
    }
}

/// A boolean setting's text, or the message that says how to write one.
fn parse_bool_setting(text: &str) -> Result<bool, String> {
    parse_bool(text)
        .ok_or_else(|| format!("`{text}` is not a boolean; use 1/0, true/false or yes/no"))
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// The per-user state directory: `~/Library/Application Support/darwin-vz-nix` on
/// macOS, `$XDG_STATE_HOME/darwin-vz-nix` (or `~/.local/state/darwin-vz-nix`) elsewhere.
pub fn default_state_dir(lookup: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let home = lookup("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    if cfg!(target_os = "macos") {
        return home.map(|h| h.join("Library/Application Support/darwin-vz-nix"));
    }
    let xdg = lookup("XDG_STATE_HOME")
        .filter(|x| x.starts_with('/'))
        .map(PathBuf::from);
    xdg.or_else(|| home.map(|h| h.join(".local/state")))
        .map(|base| base.join("darwin-vz-nix"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn host() -> HostInfo {
        HostInfo {
            cpus: 8,
            memory_bytes: 16 * 1024 * 1024 * 1024,
            macos_version: Some((14, 4)),
            arch: "aarch64".into(),
            nested_virtualization: None,
        }
    }

    fn resolve(sources: Vec<Source>) -> Result<Config, ConfigErrors> {
        Config::resolve(&sources, Some(PathBuf::from("/state")))
    }

    fn flags(layer: ConfigLayer) -> Source {
        Source {
            origin: Origin::Flag,
            layer,
        }
    }

    fn file(layer: ConfigLayer) -> Source {
        Source {
            origin: Origin::File(PathBuf::from("/etc/dvn.json")),
            layer,
        }
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config = resolve(vec![]).unwrap();
        assert_eq!(config.cores, 4);
        assert_eq!(config.memory_mib, 6144);
        assert_eq!(config.disk_size, ByteSize::from_gib(100));
        assert!(config.rosetta);
        assert_eq!(config.idle_timeout(), Some(Duration::from_secs(180 * 60)));
        assert_eq!(config.ssh_user, "builder");
        assert!(config.prevent_sleep);
        assert!(config.host_store_cache);
        assert_eq!(config.state_dir, PathBuf::from("/state"));
        assert_eq!(config.origin("cores"), Origin::Default);
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        let from_file = ConfigLayer {
            cores: Some(2),
            memory: Some(2048),
            disk_size: Some(ByteSize::from_gib(20)),
            rosetta: Some(false),
            ..Default::default()
        };
        let from_env = read_env(vars(&[
            ("DARWIN_VZ_NIX_MEMORY", "3072"),
            ("DARWIN_VZ_NIX_DISK_SIZE", "30G"),
        ]))
        .unwrap()
        .layer;
        let from_flags = ConfigLayer {
            disk_size: Some(ByteSize::from_gib(40)),
            ..Default::default()
        };
        let config = resolve(vec![
            file(from_file),
            Source {
                origin: Origin::Env,
                layer: from_env,
            },
            flags(from_flags),
        ])
        .unwrap();
        assert_eq!(config.cores, 2, "file beats default");
        assert_eq!(config.memory_mib, 3072, "env beats file");
        assert_eq!(config.disk_size, ByteSize::from_gib(40), "flag beats env");
        assert!(!config.rosetta, "file beats default");
        assert_eq!(config.idle_timeout_minutes, 180, "default when unset");
        assert_eq!(config.input("cores"), "`cores` in /etc/dvn.json");
        assert_eq!(config.input("memory"), "DARWIN_VZ_NIX_MEMORY");
        assert_eq!(config.input("diskSize"), "--disk-size");
        assert_eq!(
            config.input("idleTimeout"),
            "`idleTimeout` (built-in default)"
        );
    }

    #[test]
    fn idle_timeout_zero_means_never() {
        let config = resolve(vec![file(ConfigLayer {
            idle_timeout: Some(0),
            ..Default::default()
        })])
        .unwrap();
        assert_eq!(config.idle_timeout(), None);
    }

    #[test]
    fn file_format_rejects_unknown_keys_and_bad_sizes() {
        let err = parse_layer(r#"{"coress": 4}"#).unwrap_err();
        assert!(
            err.starts_with("unknown field `coress`, expected one of `cores`"),
            "{err}"
        );
        let err = parse_layer(r#"{"diskSize": "lots"}"#).unwrap_err();
        assert!(err.contains("`lots` is not a size"), "{err}");
        let layer =
            parse_layer(r#"{"cores": 2, "diskSize": "64G", "kernelParams": ["quiet"]}"#).unwrap();
        assert_eq!(layer.cores, Some(2));
        assert_eq!(layer.disk_size, Some(ByteSize::from_gib(64)));
    }

    #[test]
    fn log_levels_read_back_what_they_print_and_others_are_refused() {
        use std::str::FromStr;
        for level in [
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ] {
            // `start` hands the level to the daemon it spawns as text.
            assert_eq!(LogLevel::from_str(level.as_str()), Ok(level));
            assert_eq!(format!("{level:?}").to_lowercase(), level.as_str());
        }
        assert_eq!(LogLevel::from_str("DEBUG"), Ok(LogLevel::Debug));
        assert_eq!(
            LogLevel::from_str("loud"),
            Err("`loud` is not a log level; use error, warn, info, debug or trace".to_string())
        );
        let layer = read_env(vars(&[("DARWIN_VZ_NIX_LOG_LEVEL", "trace")])).unwrap();
        assert_eq!(layer.layer.log_level, Some(LogLevel::Trace));
    }

    #[test]
    fn every_variable_sets_its_own_setting() {
        let value = |key: &str| match key {
            "cores" => "3",
            "memory" => "2048",
            "diskSize" => "20G",
            "idleTimeout" => "5",
            "stopTimeout" => "9",
            "logLevel" => "debug",
            "nestedVirtualization" => "off",
            "rosetta" | "preventSleep" | "hostStoreCache" => "false",
            "kernelParams" => "quiet loglevel=3",
            "bootstrapHostKey" => "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKey",
            "controlGroup" | "sshUser" => "someone",
            _ => "/some/path.drv",
        };
        for field in FIELDS.iter().filter(|f| f.key != "builder") {
            let name = env_var(field.key);
            let layer = read_env(vars(&[(name.as_str(), value(field.key))]))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let json = serde_json::to_value(&layer.layer).unwrap();
            let set: Vec<&String> = json
                .as_object()
                .unwrap()
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k)
                .collect();
            assert_eq!(set, [field.key], "{name} sets exactly its own setting");
        }
    }

    #[test]
    fn env_errors_name_the_variable() {
        let err = read_env(vars(&[
            ("DARWIN_VZ_NIX_CORES", "many"),
            ("DARWIN_VZ_NIX_ROSETTA", "maybe"),
            ("DARWIN_VZ_NIX_DISK_SIZE", "10Q"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("invalid configuration (3 problems):"),
            "{text}"
        );
        assert!(
            text.contains("DARWIN_VZ_NIX_CORES: `many` is not a whole number of virtual CPUs"),
            "{text}"
        );
        assert!(
            text.contains("DARWIN_VZ_NIX_ROSETTA: `maybe` is not a boolean"),
            "{text}"
        );
        assert!(
            text.contains("DARWIN_VZ_NIX_DISK_SIZE: `10Q` is not a size"),
            "{text}"
        );
    }

    #[test]
    fn all_value_problems_are_reported_at_once() {
        let err = resolve(vec![flags(ConfigLayer {
            cores: Some(0),
            memory: Some(512),
            disk_size: Some(ByteSize::from_mib(100)),
            kernel_params: Some(vec!["a b".into()]),
            state_dir: Some(PathBuf::from("relative")),
            ..Default::default()
        })])
        .unwrap_err();
        let inputs: Vec<_> = err.0.iter().map(|p| p.input.as_str()).collect();
        assert_eq!(
            inputs,
            [
                "--cores",
                "--memory",
                "--disk-size",
                "--kernel-param",
                "--state-dir"
            ]
        );
    }

    #[test]
    fn every_variable_is_used_or_refused_by_name() {
        use std::os::unix::ffi::OsStringExt;
        let mut pairs = vars(&[
            ("DARWIN_VZ_NIX_STATE_DIR", ""),
            ("DARWIN_VZ_NIX_GUEST", "  "),
            ("DARWIN_VZ_NIX_STATEDIR", "/x"),
            ("DARWIN_VZ_NIX_CORSE", "2"),
            ("DARWIN_VZ_NIX_FROB", "1"),
            ("DARWIN_VZ_NIX_TEST_GUEST", "/ignored/by/the/program"),
            ("OTHER", ""),
        ]);
        pairs.push((
            "DARWIN_VZ_NIX_KERNEL".into(),
            OsString::from_vec(b"/k\xff".to_vec()),
        ));
        let err = read_env(pairs).unwrap_err();
        let text: Vec<String> = err.0.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "DARWIN_VZ_NIX_CORSE: is not a setting darwin-vz-nix knows (did you mean DARWIN_VZ_NIX_CORES?); unset it",
                "DARWIN_VZ_NIX_FROB: is not a setting darwin-vz-nix knows; unset it",
                "DARWIN_VZ_NIX_GUEST: is set but empty; give it a value, or unset it to use the default",
                "DARWIN_VZ_NIX_KERNEL: is not valid UTF-8; give a UTF-8 value, or unset it",
                "DARWIN_VZ_NIX_STATEDIR: is not a setting darwin-vz-nix knows (did you mean DARWIN_VZ_NIX_STATE_DIR?); unset it",
                "DARWIN_VZ_NIX_STATE_DIR: is set but empty; give it a value, or unset it to use the default",
            ]
        );
        let settings = read_env(vars(&[("DARWIN_VZ_NIX_CONFIG", "/etc/dvn.json")])).unwrap();
        assert_eq!(settings.config_file, Some(PathBuf::from("/etc/dvn.json")));
    }

    #[test]
    fn numbers_outside_their_range_are_refused_in_every_layer_alike() {
        let flag = resolve(vec![flags(ConfigLayer {
            cores: Some(u64::MAX),
            memory: Some(u64::MAX),
            disk_size: Some(ByteSize::from_bytes(u64::MAX)),
            idle_timeout: Some(u64::MAX),
            stop_timeout: Some(u64::MAX),
            ..Default::default()
        })])
        .unwrap_err();
        let text: Vec<String> = flag.0.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "--cores: 18446744073709551615 is out of range; give 1 to 1024 virtual CPUs",
                "--memory: 18446744073709551615 is out of range; give 1024 to 16777216 MiB (memory is in MiB: 6144 = 6 GiB)",
                "--disk-size: 18446744073709551615B is out of range; give 512M to 64T",
                "--idle-timeout: 18446744073709551615 is out of range; give 0 to 525600 minutes (0 = never power off)",
                "--stop-timeout: 18446744073709551615 is out of range; give 1 to 3600 seconds",
            ]
        );
        // Too large for any integer: refused while reading, with the range's message.
        let env = read_env(vars(&[(
            "DARWIN_VZ_NIX_IDLE_TIMEOUT",
            "99999999999999999999999",
        )]))
        .unwrap_err();
        assert_eq!(
            env.to_string(),
            "invalid configuration: DARWIN_VZ_NIX_IDLE_TIMEOUT: 99999999999999999999999 is out of range; give 0 to 525600 minutes (0 = never power off)"
        );
        // An integer out of range: judged with the others, named by its variable.
        let layer = read_env(vars(&[(
            "DARWIN_VZ_NIX_STOP_TIMEOUT",
            "18446744073709551615",
        )]))
        .unwrap()
        .layer;
        let env = resolve(vec![Source {
            origin: Origin::Env,
            layer,
        }])
        .unwrap_err();
        assert_eq!(
            env.to_string(),
            "invalid configuration: DARWIN_VZ_NIX_STOP_TIMEOUT: 18446744073709551615 is out of range; give 1 to 3600 seconds"
        );
        let most = resolve(vec![file(ConfigLayer {
            idle_timeout: Some(525_600),
            stop_timeout: Some(3600),
            ..Default::default()
        })])
        .unwrap();
        assert_eq!(most.idle_timeout(), Some(Duration::from_secs(525_600 * 60)));
    }

    #[test]
    fn paths_must_be_utf8_and_user_and_group_names_plain() {
        use std::os::unix::ffi::OsStrExt;
        let bad = PathBuf::from(std::ffi::OsStr::from_bytes(b"/st\xffate"));
        let err = resolve(vec![flags(ConfigLayer {
            state_dir: Some(bad),
            ssh_user: Some("a\nProxyCommand x".into()),
            control_group: Some("staff wheel".into()),
            ..Default::default()
        })])
        .unwrap_err();
        let text: Vec<String> = err.0.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "--state-dir: /st\u{fffd}ate is not valid UTF-8; rename it or choose a path whose name is UTF-8",
                "--ssh-user: \"a\\nProxyCommand x\" is not a user name; use letters, digits, `_`, `-` or `.` (at most 32 characters, not starting with `-`)",
                "--control-group: \"staff wheel\" is not a group name; use letters, digits, `_`, `-` or `.` (at most 64 characters)",
            ]
        );
    }

    #[test]
    fn nested_virtualization_is_auto_unless_a_layer_says_on_or_off() {
        assert_eq!(
            resolve(vec![]).unwrap().nested_virtualization,
            crate::nested::NestedVirtualization::Auto
        );
        let from_env = read_env(vars(&[("DARWIN_VZ_NIX_NESTED_VIRTUALIZATION", "off")]))
            .unwrap()
            .layer;
        let from_file = parse_layer(r#"{"nestedVirtualization": "on"}"#).unwrap();
        let config = resolve(vec![
            file(from_file),
            Source {
                origin: Origin::Env,
                layer: from_env,
            },
        ])
        .unwrap();
        assert_eq!(
            config.nested_virtualization,
            crate::nested::NestedVirtualization::Off,
            "env beats file"
        );
        assert_eq!(
            config.input("nestedVirtualization"),
            "DARWIN_VZ_NIX_NESTED_VIRTUALIZATION"
        );
        let err = read_env(vars(&[("DARWIN_VZ_NIX_NESTED_VIRTUALIZATION", "yes")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: DARWIN_VZ_NIX_NESTED_VIRTUALIZATION: `yes` is not a nestedVirtualization value; use auto, on or off"
        );
        let err = parse_layer(r#"{"nestedVirtualization": "yes"}"#).unwrap_err();
        assert!(err.contains("expected one of `auto`, `on`, `off`"), "{err}");
    }

    #[test]
    fn the_builder_section_cannot_come_from_the_environment() {
        let err = read_env(vars(&[("DARWIN_VZ_NIX_BUILDER", "{}")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: DARWIN_VZ_NIX_BUILDER: the builder section is set in the config file only (--config); unset it"
        );
    }

    #[test]
    fn a_guest_derivation_comes_with_its_output_and_a_guest_directory_wins() {
        let lazy = |drv: Option<&str>, out: Option<&str>, dir: Option<&str>| {
            resolve(vec![flags(ConfigLayer {
                guest_drv: drv.map(PathBuf::from),
                guest_out: out.map(PathBuf::from),
                guest: dir.map(PathBuf::from),
                ..Default::default()
            })])
        };
        let config = lazy(
            Some("/nix/store/a-guest.drv"),
            Some("/nix/store/b-guest"),
            None,
        )
        .unwrap();
        let spec = config.lazy_guest().unwrap();
        assert_eq!(spec.drv, PathBuf::from("/nix/store/a-guest.drv"));
        assert_eq!(spec.out, PathBuf::from("/nix/store/b-guest"));
        let dir = lazy(
            Some("/nix/store/a-guest.drv"),
            Some("/nix/store/b-guest"),
            Some("/guest"),
        )
        .unwrap();
        assert_eq!(dir.lazy_guest(), None, "a built guest directory wins");

        let text = |result: Result<Config, ConfigErrors>| -> Vec<String> {
            result
                .unwrap_err()
                .0
                .iter()
                .map(|p| p.to_string())
                .collect()
        };
        assert_eq!(
            text(lazy(Some("/nix/store/a-guest.drv"), None, None)),
            [
                "--guest-drv: is set without guestOut; give both (the nix-darwin module and `nix run` do)"
            ]
        );
        assert_eq!(
            text(lazy(None, Some("/nix/store/b-guest"), None)),
            [
                "--guest-out: is set without guestDrv; give both (the nix-darwin module and `nix run` do)"
            ]
        );
        assert_eq!(
            text(lazy(Some("/nix/store/a-guest"), Some("b-guest"), None)),
            [
                "--guest-out: b-guest is relative; give an absolute store path",
                "--guest-drv: /nix/store/a-guest is not a derivation (no `.drv`); give the guest's derivation, e.g. `nix eval --raw .#packages.aarch64-linux.guest.drvPath`",
            ]
        );
        let from_env = read_env(vars(&[
            ("DARWIN_VZ_NIX_GUEST_DRV", "/nix/store/a-guest.drv"),
            ("DARWIN_VZ_NIX_GUEST_OUT", "/nix/store/b-guest"),
        ]))
        .unwrap()
        .layer;
        assert_eq!(
            from_env.guest_drv,
            Some(PathBuf::from("/nix/store/a-guest.drv"))
        );
        assert_eq!(
            from_env.guest_out,
            Some(PathBuf::from("/nix/store/b-guest"))
        );
    }

    #[test]
    fn the_bootstrap_builder_needs_its_derivation_and_a_host_key() {
        let bootstrap = |drv: Option<&str>, key: Option<&str>| {
            resolve(vec![flags(ConfigLayer {
                bootstrap_drv: drv.map(PathBuf::from),
                bootstrap_host_key: key.map(String::from),
                ..Default::default()
            })])
        };
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheTests root@nixos\n";
        let config = bootstrap(Some("/nix/store/a-nixos-vm.drv"), Some(key)).unwrap();
        let spec = config.bootstrap().unwrap();
        assert_eq!(spec.drv, PathBuf::from("/nix/store/a-nixos-vm.drv"));
        assert_eq!(
            spec.host_key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheTests root@nixos"
        );
        assert_eq!(
            (spec.cores, spec.memory_mib),
            (config.cores, config.memory_mib)
        );
        assert!(resolve(vec![]).unwrap().bootstrap().is_none());

        let text = |result: Result<Config, ConfigErrors>| -> Vec<String> {
            result
                .unwrap_err()
                .0
                .iter()
                .map(|p| p.to_string())
                .collect()
        };
        assert_eq!(
            text(bootstrap(Some("/nix/store/a-nixos-vm.drv"), None)),
            [
                "--bootstrap-drv: is set without bootstrapHostKey; give both (the nix-darwin module does)"
            ]
        );
        let bad = text(bootstrap(
            Some("nixos-vm"),
            Some("ssh-ed25519 AAAA\nProxyCommand x"),
        ));
        assert_eq!(bad.len(), 2, "{bad:?}");
        // Each half of "an absolute path to a `.drv`" on its own is not enough.
        for drv in ["a-nixos-vm.drv", "/nix/store/a-nixos-vm"] {
            let problems = text(bootstrap(Some(drv), Some(key)));
            assert_eq!(problems.len(), 1, "{drv}: {problems:?}");
            assert!(
                problems[0].contains("is not an absolute path to a derivation"),
                "{problems:?}"
            );
        }
        assert!(
            bad[0].starts_with("--bootstrap-drv: nixos-vm is not an absolute path to a derivation"),
            "{bad:?}"
        );
        assert!(
            bad[1].starts_with("--bootstrap-host-key: is not an SSH public key"),
            "{bad:?}"
        );
    }

    #[test]
    fn duplicate_keys_in_the_file_are_refused() {
        let err = parse_layer(r#"{"stopTimeout": 5, "stopTimeout": 10}"#).unwrap_err();
        assert!(err.starts_with("duplicate field `stopTimeout`"), "{err}");
    }

    #[test]
    fn boot_validation_checks_the_host_and_the_existing_disk() {
        let config = resolve(vec![flags(ConfigLayer {
            cores: Some(16),
            memory: Some(32768),
            disk_size: Some(ByteSize::from_gib(10)),
            ..Default::default()
        })])
        .unwrap();
        let problems = config.validate_for_boot(&host(), Some(ByteSize::from_gib(50)));
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "--cores: 16 is more than this machine's 8 CPUs; use at most 8",
                "--memory: 32768 MiB is more than this machine's 16384 MiB; use less (memory is in MiB: 6144 = 6 GiB)",
                "--disk-size: 10G is smaller than the existing disk image (50G); disks are never shrunk — set diskSize to at least 50G, or run `darwin-vz-nix destroy` to start over with an empty disk",
            ]
        );
    }

    #[test]
    fn defaults_shrink_to_a_small_host_but_chosen_values_do_not() {
        let small = HostInfo {
            cpus: 2,
            memory_bytes: 8 << 30,
            ..host()
        };
        let mut config = resolve(vec![]).unwrap();
        config.fit_defaults_to(&small);
        assert_eq!((config.cores, config.memory_mib), (2, 4096));
        let mut config = resolve(vec![flags(ConfigLayer {
            cores: Some(4),
            ..Default::default()
        })])
        .unwrap();
        config.fit_defaults_to(&small);
        assert_eq!(
            config.cores, 4,
            "validation, not silent clamping, judges a chosen value"
        );
        assert_eq!(config.validate_for_boot(&small, None).len(), 1);
    }

    #[test]
    fn defaults_stay_when_the_hosts_memory_is_unknown_and_never_go_under_the_minimum() {
        let default = resolve(vec![]).unwrap();
        let unknown = HostInfo {
            memory_bytes: 0,
            ..host()
        };
        let mut config = resolve(vec![]).unwrap();
        config.fit_defaults_to(&unknown);
        assert_eq!(
            config.memory_mib, default.memory_mib,
            "unknown is not small"
        );
        let tiny = HostInfo {
            cpus: 0,
            memory_bytes: 1 << 30,
            ..host()
        };
        let mut config = resolve(vec![]).unwrap();
        config.fit_defaults_to(&tiny);
        assert_eq!((config.cores, config.memory_mib), (1, MIN_MEMORY_MIB));
    }

    #[test]
    fn the_timeouts_are_in_their_documented_units() {
        let config = resolve(vec![flags(ConfigLayer {
            stop_timeout: Some(7),
            idle_timeout: Some(3),
            ..Default::default()
        })])
        .unwrap();
        assert_eq!(config.stop_timeout(), Duration::from_secs(7));
        assert_eq!(config.idle_timeout(), Some(Duration::from_secs(180)));
        let never = resolve(vec![flags(ConfigLayer {
            idle_timeout: Some(0),
            ..Default::default()
        })])
        .unwrap();
        assert_eq!(never.idle_timeout(), None, "0 minutes: never");
    }

    #[test]
    fn the_whole_of_the_hosts_memory_and_cpus_may_be_chosen_but_not_more() {
        let host = HostInfo {
            cpus: 4,
            memory_bytes: 8 << 30,
            ..host()
        };
        let chosen = |cores: u64, memory: u64| {
            resolve(vec![flags(ConfigLayer {
                cores: Some(cores),
                memory: Some(memory),
                ..Default::default()
            })])
            .unwrap()
            .validate_for_boot(&host, None)
            .len()
        };
        assert_eq!(chosen(4, 8192), 0);
        assert_eq!(chosen(5, 8192), 1);
        assert_eq!(chosen(4, 8193), 1);
        // A host whose memory could not be read judges no memory at all.
        let unknown = HostInfo {
            memory_bytes: 0,
            ..host.clone()
        };
        let config = resolve(vec![flags(ConfigLayer {
            memory: Some(8192),
            ..Default::default()
        })])
        .unwrap();
        assert_eq!(config.validate_for_boot(&unknown, None), Vec::new());
    }

    #[test]
    fn disk_sizes_at_either_end_of_the_range_are_accepted() {
        assert_eq!(check_disk_size(MIN_DISK_SIZE), None);
        assert_eq!(check_disk_size(ByteSize::from_gib(64 * 1024)), None);
        assert!(check_disk_size(ByteSize::from_mib(511)).is_some());
        assert!(check_disk_size(ByteSize::from_gib(64 * 1024 + 1)).is_some());
    }

    #[test]
    fn a_bootstrap_host_key_must_look_like_one_ssh_public_key() {
        let good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKey root@nixos";
        assert_eq!(check_public_key(good), Ok(()));
        assert_eq!(
            check_public_key("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTI"),
            Ok(())
        );
        for bad in [
            "hello world",
            "ssh-ed25519",
            "ssh-ed25519 AAAA",
            "rsa AAAAC3NzaC1lZDI1NTE5AAAAIFakeKey",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA!FakeKey",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKey\nProxyCommand x",
        ] {
            assert!(check_public_key(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(check_public_key(&format!("ssh-ed25519 {}", "A".repeat(5000))).is_err());
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        for (a, b, distance) in [
            ("same", "same", 0),
            ("kitten", "sitting", 3),
            ("flaw", "lawn", 2),
            ("ab", "ba", 2),
            ("", "abc", 3),
            ("abc", "", 3),
            ("CORES", "CORSE", 2),
            ("STATE_DIR", "STATEDIR", 1),
        ] {
            assert_eq!(edit_distance(a, b), distance, "{a} → {b}");
            assert_eq!(edit_distance(b, a), distance, "{b} → {a}");
        }
    }

    #[test]
    fn default_state_dir_follows_the_platform() {
        let dir = default_state_dir(env(&[("HOME", "/home/u")])).unwrap();
        if cfg!(target_os = "macos") {
            assert_eq!(
                dir,
                PathBuf::from("/home/u/Library/Application Support/darwin-vz-nix")
            );
        } else {
            assert_eq!(dir, PathBuf::from("/home/u/.local/state/darwin-vz-nix"));
            let dir =
                default_state_dir(env(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "/xdg")])).unwrap();
            assert_eq!(dir, PathBuf::from("/xdg/darwin-vz-nix"));
        }
        assert_eq!(default_state_dir(env(&[])), None);
    }
}
