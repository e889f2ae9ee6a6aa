//! The configuration model: what the user can set, where it comes from, and whether it
//! can work on this host.
//!
//! Settings come in layers, lowest precedence first: built-in defaults, the JSON config
//! file (`--config`), environment variables (`DARWIN_VZ_NIX_*`), command-line flags.
//! Each resolved value remembers its origin so that an error can say which input to fix.
//! Validation collects every problem before reporting, so one run shows them all.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
}

/// Below this the NixOS guest does not reliably boot and build.
pub const MIN_MEMORY_MIB: u64 = 1024;
/// Room for the guest's Nix database, `/var` and a few builds.
pub const MIN_DISK_SIZE: ByteSize = ByteSize::from_mib(512);

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
    /// Virtual CPUs.
    pub cores: Option<u32>,
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
    /// How Nix uses the builder: the line the daemon writes to `<state>/machines`.
    /// Config file only (the nix-darwin module sets it).
    pub builder: Option<crate::machines::BuilderSettings>,
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

        let cores = pick!(cores, "cores").unwrap_or(defaults::CORES);
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

        let Some(state_dir) = state_dir else {
            return Err(ConfigErrors(vec![Problem {
                input: "stateDir".into(),
                message: "no default: HOME is not set; pass --state-dir DIR or set DARWIN_VZ_NIX_STATE_DIR".into(),
            }]));
        };

        let config = Config {
            cores,
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
            origins,
        };
        let problems = config.check_values();
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
        (self.idle_timeout_minutes > 0).then(|| Duration::from_secs(self.idle_timeout_minutes * 60))
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
        if self.cores == 0 {
            problems.push(self.problem("cores", "must be at least 1"));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            problems.push(self.problem(
                "memory",
                format!(
                    "{} MiB is below the {MIN_MEMORY_MIB} MiB the guest needs to boot and build; give it at least {MIN_MEMORY_MIB} (memory is in MiB: 6144 = 6 GiB)",
                    self.memory_mib
                ),
            ));
        }
        if self.disk_size < MIN_DISK_SIZE {
            problems.push(self.problem(
                "diskSize",
                format!(
                    "{} is too small; use at least {MIN_DISK_SIZE}",
                    self.disk_size
                ),
            ));
        }
        if self.stop_timeout_seconds == 0 {
            problems.push(self.problem("stopTimeout", "must be at least 1 second"));
        }
        for param in &self.kernel_params {
            if param.is_empty() || param.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(self.problem(
                    "kernelParams",
                    format!("{param:?} is not one kernel parameter; give each parameter separately, without spaces"),
                ));
            }
        }
        if !self.state_dir.is_absolute() {
            problems.push(self.problem(
                "stateDir",
                format!(
                    "{} is relative; give an absolute path",
                    self.state_dir.display()
                ),
            ));
        }
        if self.ssh_user.is_empty()
            || !self
                .ssh_user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            problems.push(self.problem(
                "sshUser",
                format!(
                    "{:?} is not a user name; use letters, digits, `_`, `-` or `.`",
                    self.ssh_user
                ),
            ));
        }
        problems
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

/// Reads and parses the JSON config file.
pub fn load_file(path: &Path) -> Result<ConfigLayer, ConfigErrors> {
    let fail = |message: String| {
        ConfigErrors(vec![Problem {
            input: format!("config file {}", path.display()),
            message,
        }])
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(format!(
            "cannot read it ({e}); check the path given to --config or DARWIN_VZ_NIX_CONFIG"
        ))
    })?;
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

/// Reads `DARWIN_VZ_NIX_*` variables through `lookup` (the process environment in
/// production, a map in tests).
pub fn env_layer(lookup: impl Fn(&str) -> Option<String>) -> Result<ConfigLayer, ConfigErrors> {
    let mut layer = ConfigLayer::default();
    let mut problems = Vec::new();
    let get = |key: &str| lookup(&env_var(key)).filter(|v| !v.is_empty());

    fn parsed<T: std::str::FromStr>(
        key: &str,
        value: Option<String>,
        expected: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<T>
    where
        T::Err: fmt::Display,
    {
        let value = value?;
        match value.parse::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                let detail = e.to_string();
                problems.push(Problem {
                    input: env_var(key),
                    message: if detail.contains(&value) {
                        detail
                    } else {
                        format!("`{value}` is not {expected}")
                    },
                });
                None
            }
        }
    }

    layer.cores = parsed(
        "cores",
        get("cores"),
        "a whole number of CPUs",
        &mut problems,
    );
    layer.memory = parsed(
        "memory",
        get("memory"),
        "a whole number of MiB",
        &mut problems,
    );
    layer.disk_size = parsed("diskSize", get("diskSize"), "a size", &mut problems);
    layer.rosetta = get("rosetta").and_then(|v| match parse_bool(&v) {
        Some(b) => Some(b),
        None => {
            problems.push(Problem {
                input: env_var("rosetta"),
                message: format!("`{v}` is not a boolean; use 1/0, true/false or yes/no"),
            });
            None
        }
    });
    layer.idle_timeout = parsed(
        "idleTimeout",
        get("idleTimeout"),
        "a whole number of minutes",
        &mut problems,
    );
    layer.stop_timeout = parsed(
        "stopTimeout",
        get("stopTimeout"),
        "a whole number of seconds",
        &mut problems,
    );
    layer.guest = get("guest").map(PathBuf::from);
    layer.kernel = get("kernel").map(PathBuf::from);
    layer.initrd = get("initrd").map(PathBuf::from);
    layer.system = get("system").map(PathBuf::from);
    layer.registration = get("registration").map(PathBuf::from);
    layer.kernel_params =
        get("kernelParams").map(|v| v.split_whitespace().map(String::from).collect());
    layer.state_dir = get("stateDir").map(PathBuf::from);
    layer.log_level = parsed("logLevel", get("logLevel"), "a log level", &mut problems);
    layer.control_group = get("controlGroup");
    layer.ssh_user = get("sshUser");

    if problems.is_empty() {
        Ok(layer)
    } else {
        Err(ConfigErrors(problems))
    }
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

    fn host() -> HostInfo {
        HostInfo {
            cpus: 8,
            memory_bytes: 16 * 1024 * 1024 * 1024,
            macos_version: Some((14, 4)),
            arch: "aarch64".into(),
        }
    }

    fn resolve(sources: Vec<Source>) -> Result<Config, ConfigErrors> {
        Config::resolve(&sources, Some(PathBuf::from("/state")))
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
        let from_env = env_layer(env(&[
            ("DARWIN_VZ_NIX_MEMORY", "3072"),
            ("DARWIN_VZ_NIX_DISK_SIZE", "30G"),
        ]))
        .unwrap();
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
            Source {
                origin: Origin::Flag,
                layer: from_flags,
            },
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
    fn env_errors_name_the_variable() {
        let err = env_layer(env(&[
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
            text.contains("DARWIN_VZ_NIX_CORES: `many` is not a whole number of CPUs"),
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
        let err = resolve(vec![Source {
            origin: Origin::Flag,
            layer: ConfigLayer {
                cores: Some(0),
                memory: Some(512),
                disk_size: Some(ByteSize::from_mib(100)),
                kernel_params: Some(vec!["a b".into()]),
                state_dir: Some(PathBuf::from("relative")),
                ..Default::default()
            },
        }])
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
    fn boot_validation_checks_the_host_and_the_existing_disk() {
        let config = resolve(vec![Source {
            origin: Origin::Flag,
            layer: ConfigLayer {
                cores: Some(16),
                memory: Some(32768),
                disk_size: Some(ByteSize::from_gib(10)),
                ..Default::default()
            },
        }])
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
        let mut config = resolve(vec![Source {
            origin: Origin::Flag,
            layer: ConfigLayer {
                cores: Some(4),
                ..Default::default()
            },
        }])
        .unwrap();
        config.fit_defaults_to(&small);
        assert_eq!(
            config.cores, 4,
            "validation, not silent clamping, judges a chosen value"
        );
        assert_eq!(config.validate_for_boot(&small, None).len(), 1);
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
