//! The command line, declared with clap. Help texts teach: units, defaults, examples.

use std::ffi::OsString;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigLayer, LogLevel, parse_number, ranges};
use crate::nested::NestedVirtualization;
use crate::size::ByteSize;

/// Ranges of the numbers that only a command's own flags set (the README's CLI
/// reference); settings' ranges are in `config::ranges`.
pub mod flag_ranges {
    use std::ops::RangeInclusive;

    /// `start --timeout`, `proxy --timeout`: up to a day of waiting for a boot.
    pub const BOOT_WAIT_SECONDS: RangeInclusive<u64> = 1..=86_400;
    /// `bench boot --runs`: each run is a cold boot.
    pub const BOOT_RUNS: RangeInclusive<u64> = 1..=100;
    /// `bench control --runs`.
    pub const CONTROL_RUNS: RangeInclusive<u64> = 1..=100_000;
    /// `logs -n`.
    pub const LOG_LINES: RangeInclusive<u64> = 0..=100_000;
}

fn in_range(text: &str, range: &RangeInclusive<u64>, unit: &str) -> Result<u64, String> {
    parse_number(text, range, unit)
}
fn boot_wait_seconds(text: &str) -> Result<u64, String> {
    in_range(text, &flag_ranges::BOOT_WAIT_SECONDS, "seconds")
}
fn stop_seconds(text: &str) -> Result<u64, String> {
    in_range(text, &ranges::STOP_TIMEOUT_SECONDS, "seconds")
}
/// A count in `range`, in the width the program counts in (the ranges are small).
fn count_in(text: &str, range: &RangeInclusive<u64>, unit: &str) -> Result<usize, String> {
    let count = in_range(text, range, unit)?;
    usize::try_from(count).map_err(|_| format!("{count} is too large for this machine"))
}
fn boot_runs(text: &str) -> Result<usize, String> {
    count_in(text, &flag_ranges::BOOT_RUNS, "runs")
}
fn control_runs(text: &str) -> Result<usize, String> {
    count_in(text, &flag_ranges::CONTROL_RUNS, "runs")
}
fn log_lines(text: &str) -> Result<usize, String> {
    count_in(text, &flag_ranges::LOG_LINES, "lines")
}

const ABOUT: &str = "Run a NixOS VM on Apple Silicon through Virtualization.framework and use it as this Mac's Linux builder (aarch64-linux natively, x86_64-linux through Rosetta 2).";

const AFTER_HELP: &str = "\
Examples:
  darwin-vz-nix start                      boot the builder and wait until SSH answers
  darwin-vz-nix start --dry-run            print what would boot, change nothing
  darwin-vz-nix ssh -- uname -m            run a command on the builder
  darwin-vz-nix status                     state, uptime, connections, idle time left
  darwin-vz-nix stop                       power off (graceful, forced after a timeout)
  nix build --builders 'ssh-ng://darwin-vz-nix aarch64-linux' .#packages.aarch64-linux.hello

Configuration, lowest precedence first: built-in defaults, the JSON file given by
--config (or DARWIN_VZ_NIX_CONFIG), DARWIN_VZ_NIX_* environment variables, flags.

Exit status: 0 success; 1 runtime failure (boot, stop, connection); 2 usage or
configuration error; 3 not running (status, when no supervisor answers).";

#[derive(Debug, Parser)]
#[command(name = "darwin-vz-nix", version, about = ABOUT, after_help = AFTER_HELP, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// JSON config file (camelCase keys as in the README's configuration reference)
    /// [env: DARWIN_VZ_NIX_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory: disk image, keys, control socket, logs
    /// [default: ~/Library/Application Support/darwin-vz-nix on macOS,
    /// $XDG_STATE_HOME/darwin-vz-nix elsewhere (~/.local/state/darwin-vz-nix when
    /// XDG_STATE_HOME is unset or relative); env: DARWIN_VZ_NIX_STATE_DIR].
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the VM and wait until the guest's SSH answers.
    ///
    /// Spawns a background supervisor if none runs for the state directory (its log is
    /// <state>/logs/daemon.log), or asks the running one. Prints how long the boot took.
    #[command(
        after_help = "Examples:\n  darwin-vz-nix start --cores 8 --memory 8192\n  darwin-vz-nix start --dry-run --json\n  darwin-vz-nix start --guest ./result --no-wait"
    )]
    Start(StartArgs),
    /// From nothing to a booted builder: print every step with its exact command,
    /// then run them.
    ///
    /// With a guest given as a derivation (`guestDrv`, what `nix run` and the
    /// nix-darwin module set), the supervisor builds it through the nix-daemon as its
    /// own account, reporting progress, then boots it. --dry-run prints the steps
    /// (running only the read-only `nix-store --realise --dry-run`) and changes
    /// nothing. Also the way to retry a failed build at once.
    #[command(
        after_help = "Examples:\n  darwin-vz-nix bootstrap --dry-run\n  sudo darwin-vz-nix bootstrap --state-dir /var/lib/darwin-vz"
    )]
    Bootstrap(BootstrapArgs),
    /// Power the VM off: ACPI power button first, forced after --timeout.
    ///
    /// The supervisor keeps running (and boots again on the next connection) unless
    /// --daemon is given.
    Stop(StopArgs),
    /// Show the VM's state, the guest's build, connections, idle time left and the last boot.
    ///
    /// Also the configuration, nested virtualization, whether builds keep the Mac awake
    /// (`sleep`), the guest's clock, the host store cache and notices. Exit status 3 when
    /// no supervisor runs. --json prints the supervisor's status reply (`guest`: the
    /// guest's build; `guestReport`: what the booted guest said about /dev/kvm).
    #[command(
        after_help = "Examples:\n  darwin-vz-nix status\n  darwin-vz-nix status --json | jq .guest"
    )]
    Status(JsonArg),
    /// Open a shell on the builder, or run a command: `darwin-vz-nix ssh -- CMD…`.
    ///
    /// Runs OpenSSH with the generated configuration (pinned host key, the state
    /// directory's identity, `proxy` as ProxyCommand) and returns the remote exit code.
    #[command(
        after_help = "Examples:\n  darwin-vz-nix ssh\n  darwin-vz-nix ssh -- nix-store --verify --check-contents\n  darwin-vz-nix ssh -- sudo journalctl -b\n  sudo darwin-vz-nix ssh --state-dir /var/lib/darwin-vz   (nix-darwin: the key is the service account's)"
    )]
    Ssh(SshArgs),
    /// Print the ssh_config `Host darwin-vz-nix darwin-vz-nix-x86` block that reaches the builder.
    ///
    /// Put it in /etc/ssh/ssh_config.d/ so that root's nix-daemon can use the builder
    /// (the nix-darwin module does this for you).
    SshConfig(SshConfigArgs),
    /// ssh ProxyCommand: a byte stream to the guest's sshd over vsock.
    ///
    /// Boots the VM on demand and waits until sshd answers, so the first build after
    /// an idle poweroff does not fail. Writes nothing but the stream to stdout.
    Proxy(ProxyArgs),
    /// Print the line that registers the builder with Nix, or write it (as root).
    ///
    /// The line, in Nix's machines-file format, describes the VM the daemon runs with
    /// the same configuration (--config, the environment, --state-dir and the flags
    /// below, resolved as `daemon` resolves them): maxJobs is the cores it gives the
    /// VM, fitted to this Mac unless configured; the systems follow Rosetta; the key is
    /// the state directory's client key; kvm and nixos-test where nested
    /// virtualization gives the guest /dev/kvm. While the first guest is still to be
    /// built by the bootstrap builder (bootstrapDrv set, no `gcroots/guest` in the
    /// state directory), x86_64-linux gets an entry of its own (darwin-vz-nix-x86),
    /// which only the guest answers. Of the state directory it reads only the guest's
    /// report and `gcroots/guest`, and it writes nothing there.
    #[command(after_help = machines_after_help())]
    Machines(MachinesArgs),
    /// Run the supervisor in the foreground (what launchd runs).
    ///
    /// Owns the VM and serves the control socket; boots on demand and powers off when
    /// idle. SIGTERM, SIGINT, SIGHUP and every other catchable ending signal power the VM
    /// off gracefully (forced after stopTimeout) before exit.
    Daemon(DaemonArgs),
    /// Check this machine, the configuration and the state directory; one line per check.
    Doctor(DoctorArgs),
    /// Show the supervisor's log (<state>/logs/daemon.log) or the guest's console
    /// (logs/console.log).
    #[command(
        after_help = "Examples:\n  darwin-vz-nix logs -n 200\n  darwin-vz-nix logs --console -f\n  darwin-vz-nix logs --console --previous"
    )]
    Logs(LogsArgs),
    /// Measure cold boots or control round-trips against the running supervisor.
    Bench(BenchArgs),
    /// Delete the disk image, MAC address, console logs and keys, to start over.
    ///
    /// The guest's disk (its Nix store upper layer and database) is lost; new SSH keys
    /// are made first (nothing is deleted if that fails), the host cache's signing key at
    /// the next boot. Stops the VM first.
    Destroy(DestroyArgs),
    /// Replace the SSH keys (client and guest host key) and the host cache's signing key;
    /// the VM stops first.
    RotateKeys,
    /// Print shell completions, e.g. `darwin-vz-nix completions zsh > _darwin-vz-nix`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Settings of the VM, shared by `start` and `daemon`.
#[derive(Debug, Clone, Default, Args)]
pub struct VmArgs {
    /// Virtual CPUs [default: 4, or the host's CPU count if lower; 1 to 1024, at most
    /// the host's].
    #[arg(long, value_name = "N")]
    pub cores: Option<u64>,
    /// Guest memory in MiB [default: 6144; at least 1024], e.g. 8192 for 8 GiB. The
    /// default is half the host's memory where that is less; more than the host has is
    /// refused.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Disk image size, e.g. 100G, 512M, 1T [default: 100G; 512M to 64T]. Grows an
    /// existing image; never shrinks it.
    #[arg(long, value_name = "SIZE")]
    pub disk_size: Option<ByteSize>,
    /// Run x86_64-linux builds through Rosetta 2 [default: on].
    #[arg(long, overrides_with = "no_rosetta")]
    pub rosetta: bool,
    /// Do not attach Rosetta; the builder offers aarch64-linux only.
    #[arg(long, overrides_with = "rosetta")]
    pub no_rosetta: bool,
    /// Minutes without an SSH connection before the VM powers off; 0 = never
    /// [default: 180; at most 525600, a year].
    #[arg(long, value_name = "MINUTES")]
    pub idle_timeout: Option<u64>,
    /// Seconds a graceful poweroff may take before it is forced [default: 15; 1 to 3600].
    #[arg(long, value_name = "SECONDS")]
    pub stop_timeout: Option<u64>,
    /// Guest directory (kernel, initrd, system, registration), e.g. ./result of
    /// `nix build .#guest` [env: DARWIN_VZ_NIX_GUEST].
    #[arg(long, value_name = "DIR")]
    pub guest: Option<PathBuf>,
    /// Kernel (uncompressed arm64 Image), instead of the guest directory's.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initrd, instead of the guest directory's.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// NixOS system (toplevel), instead of the guest directory's.
    #[arg(long, value_name = "DIR")]
    pub system: Option<PathBuf>,
    /// Store registration (closure info), instead of the guest directory's.
    #[arg(long, value_name = "FILE")]
    pub registration: Option<PathBuf>,
    /// Extra kernel parameter, appended last; repeat for more, e.g.
    /// --kernel-param systemd.log_level=debug.
    #[arg(long = "kernel-param", value_name = "PARAM")]
    pub kernel_params: Vec<String>,
    /// Daemon log level [default: info].
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,
    /// Group whose members may use the control socket (0660 then): status, start and
    /// builds, not stop [default: none].
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// User to log in as on the guest [default: builder].
    #[arg(long, value_name = "USER")]
    pub ssh_user: Option<String>,
    /// Boot the guest with nested virtualization, so it has /dev/kvm and Nix may send
    /// it NixOS VM tests: auto = wherever it works (an M3 or later, macOS 15+, a guest
    /// kernel of 6.12+), on (refused where the Mac cannot), off [default: auto].
    #[arg(long, value_enum, value_name = "WHEN")]
    pub nested_virtualization: Option<NestedVirtualization>,
    /// Keep the Mac from idle sleep while a build connection is open [default: on].
    /// The display may still sleep; closing the lid still sleeps the Mac.
    #[arg(long, overrides_with = "no_prevent_sleep")]
    pub prevent_sleep: bool,
    /// Let the Mac idle-sleep even in the middle of a build.
    #[arg(long, overrides_with = "prevent_sleep")]
    pub no_prevent_sleep: bool,
    /// The guest's derivation (a `.drv` in the store): the daemon builds it when it
    /// is first needed and boots its output; a --guest directory wins
    /// [env: DARWIN_VZ_NIX_GUEST_DRV]. `nix run` and the nix-darwin module set it.
    #[arg(long, value_name = "DRV")]
    pub guest_drv: Option<PathBuf>,
    /// The output path --guest-drv builds [env: DARWIN_VZ_NIX_GUEST_OUT].
    #[arg(long, value_name = "PATH")]
    pub guest_out: Option<PathBuf>,
    /// nixpkgs' darwin.linux-builder VM runner (a `.drv`), brought up from
    /// cache.nixos.org while the guest needs an aarch64-linux build and no guest
    /// exists yet [env: DARWIN_VZ_NIX_BOOTSTRAP_DRV]. The nix-darwin module sets it.
    #[arg(long, value_name = "DRV")]
    pub bootstrap_drv: Option<PathBuf>,
    /// That builder's public host key, `ssh-ed25519 AAAA…`
    /// [env: DARWIN_VZ_NIX_BOOTSTRAP_HOST_KEY].
    #[arg(long, value_name = "KEY")]
    pub bootstrap_host_key: Option<String>,
    /// Serve this Mac's /nix/store to the guest as its first binary cache, over vsock
    /// [default: on].
    #[arg(long, overrides_with = "no_host_store_cache")]
    pub host_store_cache: bool,
    /// Do not: build inputs reach the guest through Nix's SSH push or other caches.
    #[arg(long, overrides_with = "host_store_cache")]
    pub no_host_store_cache: bool,
}

impl VmArgs {
    /// The flags as a configuration layer (only what was given).
    pub fn layer(&self) -> ConfigLayer {
        ConfigLayer {
            cores: self.cores,
            memory: self.memory,
            disk_size: self.disk_size,
            rosetta: if self.no_rosetta {
                Some(false)
            } else {
                self.rosetta.then_some(true)
            },
            idle_timeout: self.idle_timeout,
            stop_timeout: self.stop_timeout,
            guest: self.guest.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            system: self.system.clone(),
            registration: self.registration.clone(),
            kernel_params: (!self.kernel_params.is_empty()).then(|| self.kernel_params.clone()),
            state_dir: None,
            log_level: self.log_level,
            control_group: self.control_group.clone(),
            ssh_user: self.ssh_user.clone(),
            // Config file only.
            builder: None,
            nested_virtualization: self.nested_virtualization,
            prevent_sleep: if self.no_prevent_sleep {
                Some(false)
            } else {
                self.prevent_sleep.then_some(true)
            },
            guest_drv: self.guest_drv.clone(),
            guest_out: self.guest_out.clone(),
            bootstrap_drv: self.bootstrap_drv.clone(),
            bootstrap_host_key: self.bootstrap_host_key.clone(),
            host_store_cache: if self.no_host_store_cache {
                Some(false)
            } else {
                self.host_store_cache.then_some(true)
            },
        }
    }

    /// The flags as arguments again, to hand to a spawned `daemon`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: Option<String>| {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value.into());
            }
        };
        push("--cores", self.cores.map(|v| v.to_string()));
        push("--memory", self.memory.map(|v| v.to_string()));
        push("--disk-size", self.disk_size.map(|v| v.to_string()));
        push("--idle-timeout", self.idle_timeout.map(|v| v.to_string()));
        push("--stop-timeout", self.stop_timeout.map(|v| v.to_string()));
        push(
            "--log-level",
            self.log_level.map(|v| v.as_str().to_string()),
        );
        push("--control-group", self.control_group.clone());
        push("--ssh-user", self.ssh_user.clone());
        push(
            "--nested-virtualization",
            self.nested_virtualization.map(|v| v.as_str().to_string()),
        );
        push("--bootstrap-host-key", self.bootstrap_host_key.clone());
        for param in &self.kernel_params {
            push("--kernel-param", Some(param.clone()));
        }
        let mut paths: Vec<OsString> = Vec::new();
        for (flag, path) in [
            ("--guest", &self.guest),
            ("--kernel", &self.kernel),
            ("--initrd", &self.initrd),
            ("--system", &self.system),
            ("--registration", &self.registration),
            ("--guest-drv", &self.guest_drv),
            ("--guest-out", &self.guest_out),
            ("--bootstrap-drv", &self.bootstrap_drv),
        ] {
            if let Some(path) = path {
                paths.push(flag.into());
                paths.push(absolute(path).into_os_string());
            }
        }
        if self.no_rosetta {
            args.push("--no-rosetta".into());
        } else if self.rosetta {
            args.push("--rosetta".into());
        }
        args.extend(paths);
        if self.no_prevent_sleep {
            args.push("--no-prevent-sleep".into());
        } else if self.prevent_sleep {
            args.push("--prevent-sleep".into());
        }
        if self.no_host_store_cache {
            args.push("--no-host-store-cache".into());
        } else if self.host_store_cache {
            args.push("--host-store-cache".into());
        }
        args
    }
}

/// The daemon runs with `/` as its directory, so relative paths are made absolute.
pub fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Print the boot plan (devices, command line, paths) and exit; changes nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print as JSON (with --dry-run: the plan; otherwise the boot timing).
    #[arg(long)]
    pub json: bool,
    /// Return once the boot has begun instead of waiting for SSH.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for the guest's SSH, including building a guest that is not
    /// in the store yet (minutes, the first time) [default: 3600, an hour; 1 to 86400].
    #[arg(long, value_name = "SECONDS", default_value = "3600", hide_default_value = true, value_parser = boot_wait_seconds)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Print the steps and their commands; build, start and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds to wait for the guest to be built and to answer SSH
    /// [default: 3600, an hour; 1 to 86400].
    #[arg(long, value_name = "SECONDS", default_value = "3600", hide_default_value = true, value_parser = boot_wait_seconds)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Pull the plug at once instead of asking the guest to power off.
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the graceful poweroff before forcing it
    /// [default: the configured stopTimeout, 15; 1 to 3600].
    #[arg(long, value_name = "SECONDS", value_parser = stop_seconds)]
    pub timeout: Option<u64>,
    /// Also end the supervisor process (under launchd it is started again).
    #[arg(long)]
    pub daemon: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Debug, Clone, Copy, Args)]
pub struct JsonArg {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// User to log in as [default: the configured sshUser, builder].
    #[arg(long, short = 'l', value_name = "USER")]
    pub user: Option<String>,
    /// The command to run on the builder, after `--`; a login shell when empty.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// The darwin-vz-nix binary ssh should run as ProxyCommand [default: this one].
    #[arg(long, value_name = "PATH")]
    pub proxy_bin: Option<PathBuf>,
    /// User to log in as [default: the configured sshUser, builder].
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Guest vsock port [default: 22, the guest's sshd].
    #[arg(long, value_name = "PORT", default_value_t = crate::contract::SSH_VSOCK_PORT, hide_default_value = true)]
    pub port: u32,
    /// Seconds to wait for an on-demand boot, including building a guest that is not
    /// in the store yet [default: 3600, an hour; 1 to 86400].
    #[arg(long, value_name = "SECONDS", default_value = "3600", hide_default_value = true, value_parser = boot_wait_seconds)]
    pub timeout: u64,
    /// Hand the stream's descriptor to ssh (needs `ProxyUseFdpass yes`) instead of
    /// copying bytes; falls back to copying when stdout is not a socket.
    #[arg(long)]
    pub fdpass: bool,
    /// The host name ssh was asked for (ssh_config passes `%n`): `darwin-vz-nix`,
    /// Nix's aarch64-linux alias, may be answered by the bootstrap builder while the
    /// first guest is built; any other name waits for the guest.
    #[arg(long, value_name = "NAME")]
    pub alias: Option<String>,
}

fn machines_after_help() -> String {
    let file = crate::machines::NIX_MACHINES_FILE;
    format!(
        "\
Only root should write what Nix reads: whoever writes a machines line chooses where root's
nix-daemon connects, with which key, for which systems. So the daemon (an unprivileged
account) writes no such file; root runs this command instead.

With nix-darwin, the module runs it at every switch (`machines --config <the daemon's
config> --write {file}`) and adds `@{file}` to /etc/nix/machines.

Without nix-darwin, once, and again whenever cores, rosetta, sshUser, stateDir or the
builder settings change (sudo drops DARWIN_VZ_NIX_*: give the daemon's state directory,
config file and flags):
  sudo darwin-vz-nix machines --state-dir DIR --write {file}
  echo @{file} | sudo tee -a /etc/nix/machines

--write PATH replaces PATH atomically with a 0644 file. It refuses a symbolic link at PATH,
and a directory that is not owned by root (or by you) or that its group or everyone may
write to.

kvm and nixos-test join the default features where the daemon boots the guest with nested
virtualization (nestedVirtualization, this Mac, the guest's kernel), unless the guest's
last report in the state directory (guest-report.json, which the daemon writes after each
boot) says that a boot with it had no /dev/kvm: the report can take them away, never add
them. nix-darwin runs this command again whenever that report changes."
    )
}

/// `machines` takes the settings that shape the line; the rest of the daemon's
/// configuration does not change it.
#[derive(Debug, Args)]
pub struct MachinesArgs {
    /// The daemon's virtual CPUs; maxJobs follows them [default: 4, or the host's CPU
    /// count if lower].
    #[arg(long, value_name = "N")]
    pub cores: Option<u64>,
    /// The daemon runs with Rosetta: the line lists x86_64-linux [default: on].
    #[arg(long, overrides_with = "no_rosetta")]
    pub rosetta: bool,
    /// The daemon runs without Rosetta: aarch64-linux only.
    #[arg(long, overrides_with = "rosetta")]
    pub no_rosetta: bool,
    /// User Nix logs in as on the guest [default: builder].
    #[arg(long, value_name = "USER")]
    pub ssh_user: Option<String>,
    /// The daemon's nested virtualization: the line offers kvm and nixos-test where it
    /// is on [default: auto].
    #[arg(long, value_enum, value_name = "WHEN")]
    pub nested_virtualization: Option<NestedVirtualization>,
    /// Write the line to PATH (atomically, mode 0644) instead of printing it; root runs
    /// this for the nix-daemon.
    #[arg(long, value_name = "PATH")]
    pub write: Option<PathBuf>,
}

impl MachinesArgs {
    /// The flags as a configuration layer, the top one as for `daemon`.
    pub fn layer(&self) -> ConfigLayer {
        VmArgs {
            cores: self.cores,
            rosetta: self.rosetta,
            no_rosetta: self.no_rosetta,
            ssh_user: self.ssh_user.clone(),
            nested_virtualization: self.nested_virtualization,
            ..VmArgs::default()
        }
        .layer()
    }
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The guest's console instead of the supervisor's log.
    #[arg(long)]
    pub console: bool,
    /// The console of the boot before this one (with --console).
    #[arg(long, requires = "console")]
    pub previous: bool,
    /// Lines to show from the end [default: 50; 0 to 100000].
    #[arg(long, short = 'n', value_name = "N", default_value = "50", hide_default_value = true, value_parser = log_lines)]
    pub lines: usize,
    /// Keep printing what is appended.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchKind,
    /// Run even while sessions are open: the bench forces the VM off between runs,
    /// under whatever build is running.
    #[arg(long, global = true)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchKind {
    /// Cold boots: force-stop, then boot and wait for SSH; prints min/median/max.
    Boot {
        /// Number of cold boots [default: 5; 1 to 100].
        #[arg(long, default_value = "5", hide_default_value = true, value_parser = boot_runs)]
        runs: usize,
    },
    /// Control round-trip latency (`status`) and connect-to-first-byte from a stopped VM.
    Control {
        /// Number of round-trips; connect-to-first-byte runs a fortieth as many cold
        /// boots (1 to 10) [default: 200; 1 to 100000].
        #[arg(long, default_value = "200", hide_default_value = true, value_parser = control_runs)]
        runs: usize,
    },
}

#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// Confirm that the disk image and keys may be deleted.
    #[arg(long)]
    pub yes: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn vm_args(args: &[&str]) -> VmArgs {
        let mut argv = vec!["darwin-vz-nix", "daemon"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Daemon(daemon) => daemon.vm,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn prevent_sleep_flags_set_the_setting_and_reach_a_spawned_daemon() {
        assert_eq!(vm_args(&[]).layer().prevent_sleep, None);
        for (given, expected) in [
            (&["--no-prevent-sleep"][..], Some(false)),
            (&["--prevent-sleep"], Some(true)),
            (&["--prevent-sleep", "--no-prevent-sleep"], Some(false)),
            (&["--no-prevent-sleep", "--prevent-sleep"], Some(true)),
        ] {
            let args = vm_args(given);
            assert_eq!(args.layer().prevent_sleep, expected, "{given:?}");
            // What `start` hands to the daemon it spawns means the same.
            let again: Vec<String> = args
                .to_args()
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect();
            let again: Vec<&str> = again.iter().map(String::as_str).collect();
            assert_eq!(vm_args(&again).layer().prevent_sleep, expected, "{again:?}");
        }
    }
}
