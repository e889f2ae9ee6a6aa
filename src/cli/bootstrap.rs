//! `darwin-vz-nix bootstrap`: from nothing to a booted builder, every step printed
//! with the exact command that runs it.
//!
//! The steps are the supervisor's own (`crate::guest`): the commands printed here
//! are built by the same functions (`guest::nix`) the supervisor runs. Only the
//! read-only dry run (`nix-store --realise --dry-run`) runs in this process; the
//! build runs in the supervisor, as its account, and this command follows it.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use super::CliError;
use super::args::{BootstrapArgs, GlobalArgs};
use super::commands::{
    GuestProgress, Outcome, act_as_owner, describe_boot, ensure_supervisor, resolve_config,
};
use crate::bootstrap::BootstrapSpec;
use crate::config::Config;
use crate::control::ControlClient;
use crate::control::protocol::{self, Reply, Request};
use crate::guest::nix::{self, DryRun, NixStore, shell_line, shell_quote};
use crate::guest::{GuestSpec, describe_plan};
use crate::host::HostInfo;
use crate::machines::NIX_MACHINES_FILE;
use crate::state::StateDir;

pub fn run(global: &GlobalArgs, args: &BootstrapArgs) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config(global, args.vm.layer(), &host)?;
    act_as_owner(&config)?;
    let state = StateDir::new(&config.state_dir);
    println!("Bootstrap of the builder in {}", state.root().display());
    match config.lazy_guest() {
        Some(spec) => print_plan(&config, &state, &spec),
        None => println!(
            "\nThe guest is a directory that is already built ({}): nothing to build; the supervisor boots it.",
            config
                .guest
                .dir
                .as_deref()
                .map_or_else(|| "single files".to_string(), |d| d.display().to_string())
        ),
    }
    if args.dry_run {
        println!("\n(dry run: nothing was built, started or changed)");
        return Ok(0);
    }

    println!();
    ensure_supervisor(global, &args.vm, &config, &host)?;
    let mut client = ControlClient::connect(&config.state_dir)?;
    let timeout = Duration::from_secs(args.timeout);
    eprintln!(
        "building the guest if needed, then booting it (waiting up to {} s)…",
        args.timeout
    );
    let progress = GuestProgress::follow(&config.state_dir);
    let reply = client.call(
        Request::Start {
            wait: true,
            timeout_ms: Some(protocol::millis(timeout)),
        },
        timeout.saturating_add(Duration::from_secs(5)),
    );
    drop(progress);
    match reply? {
        Reply::Started {
            already_running: true,
            ..
        } => println!("the builder runs"),
        Reply::Started {
            boot: Some(boot), ..
        } => println!("{}", describe_boot(&boot)),
        Reply::Started { .. } => println!("ready"),
        other => return Err(CliError::Failure(format!("unexpected reply {other:?}"))),
    }
    Ok(0)
}

/// Prints the steps for a lazy guest, with the commands, running the dry run.
fn print_plan(config: &Config, state: &StateDir, spec: &GuestSpec) {
    let built = spec.out.is_dir();
    println!(
        "\nthe guest   {} (in the store: {})",
        spec.out.display(),
        if built { "yes" } else { "no" }
    );
    println!("built from  {}", spec.drv.display());
    let account = account_of(state.root());
    let nix_store = NixStore::find(std::env::var_os("PATH").as_deref());

    println!(
        "\n1. Nix knows this builder (root, once; the nix-darwin module does it at every switch):"
    );
    if Path::new(NIX_MACHINES_FILE).exists() {
        println!("     yes: {NIX_MACHINES_FILE} exists");
    } else {
        let state_dir = shell_quote(&state.root().display().to_string());
        println!("     no: {NIX_MACHINES_FILE} is missing. As an administrator:");
        println!(
            "     $ sudo darwin-vz-nix machines --state-dir {state_dir} --write {NIX_MACHINES_FILE}"
        );
        println!("     $ echo @{NIX_MACHINES_FILE} | sudo tee -a /etc/nix/machines");
        println!(
            "     $ darwin-vz-nix ssh-config --state-dir {state_dir} --proxy-bin \"$(command -v darwin-vz-nix)\" | sudo tee /etc/ssh/ssh_config.d/100-darwin-vz-nix.conf"
        );
    }

    println!("\n2. What is missing (read-only, as you):");
    let dry_args = nix::dry_run_args(&spec.drv);
    println!("     $ {}", shell_line("nix-store", &dry_args));
    // aarch64-linux builds to do; unknown when the dry run could not tell.
    let mut linux_builds = None;
    if built {
        println!("     → nothing: the guest is in the store");
        linux_builds = Some(0);
    } else {
        let home = std::env::var_os("HOME").map_or_else(|| state.root().to_path_buf(), Into::into);
        let dry = crate::guest::run_dry(&nix_store, &spec.drv, &home);
        match dry {
            Ok(dry) => {
                let linux = dry.aarch64_linux_builds().len();
                println!("     → {}", describe_dry_run(&dry, linux));
                linux_builds = Some(linux);
            }
            Err(message) => println!("     → could not tell: {message}"),
        }
    }

    let mut step = 3;
    let guest_before = crate::machines::guest_has_booted(state);
    if let Some(bootstrap) = config.bootstrap()
        && !guest_before
        && linux_builds != Some(0)
    {
        print_bootstrap_steps(step, &bootstrap, state);
        step += 1;
    } else if guest_before && linux_builds != Some(0) {
        println!(
            "\n{step}. The guest booted before builds those aarch64-linux derivations (Nix reaches it as ssh-ng://…@darwin-vz-nix; it boots on demand)."
        );
        step += 1;
    }

    println!(
        "\n{step}. The supervisor builds the guest through the nix-daemon, as {account}; progress in `darwin-vz-nix status`, Nix's output in {}:",
        state.guest_build_log().display()
    );
    step += 1;
    let realise = nix::realise_args(&spec.drv, &state.pending_guest_root());
    println!(
        "     $ NIX_REMOTE=daemon {}",
        shell_line("nix-store", &realise)
    );
    println!(
        "   Nix builds what no binary cache has; its build hook sends aarch64-linux builds to the machines in /etc/nix/machines."
    );

    println!(
        "\n{step}. It boots the guest, and keeps it with a GC root while it is the guest being booted:"
    );
    let root = nix::root_args(&spec.out, &state.guest_root());
    println!(
        "     $ NIX_REMOTE=daemon {}",
        shell_line("nix-store", &root)
    );
    println!(
        "   Until then a guest booted before (if any) keeps serving; the new one boots at the next boot (`darwin-vz-nix stop`, or after {} idle minutes).",
        config.idle_timeout_minutes
    );
}

/// The bootstrap builder's steps, with the commands the supervisor runs.
fn print_bootstrap_steps(step: u32, bootstrap: &BootstrapSpec, state: &StateDir) {
    println!(
        "\n{step}. No guest exists to run aarch64-linux builds: the supervisor brings up the bootstrap builder, nixpkgs' darwin.linux-builder (QEMU), for them:"
    );
    let daemon =
        |args: &[OsString]| println!("     $ NIX_REMOTE=daemon {}", shell_line("nix-store", args));
    daemon(&nix::dry_run_args(&bootstrap.drv));
    println!(
        "       (it must need no aarch64-linux build itself: then it all comes from cache.nixos.org)"
    );
    daemon(&nix::realise_args(&bootstrap.drv, &state.bootstrap_root()));
    let keys = state.bootstrap_dir().join("keys");
    println!(
        "     $ KEYS=$(NIX_REMOTE=daemon nix-store --add {})      # holds {}_ed25519.pub: this builder's client key, the only one it accepts",
        shell_quote(&keys.display().to_string()),
        crate::bootstrap::BUILDER_USER
    );
    let env: Vec<String> = crate::bootstrap::runner_env(Path::new("$KEYS"), 0, bootstrap, state)
        .into_iter()
        .map(|(name, value)| {
            let value = value.to_string_lossy().replace(":0-:22", ":$PORT-:22");
            // `$KEYS` and `$PORT` are the shell's to expand.
            let value = if value.starts_with('$') {
                value
            } else if value.contains("$PORT") {
                format!("\"{value}\"")
            } else {
                shell_quote(&value)
            };
            format!("{name}={value}")
        })
        .collect();
    println!(
        "     $ cd {} && {} \"$(readlink {})\"/bin/run-*-vm",
        shell_quote(&state.bootstrap_dir().display().to_string()),
        env.join(" "),
        shell_quote(&state.bootstrap_root().display().to_string())
    );
    println!(
        "       (PORT: a free loopback port; SSH is forwarded from 127.0.0.1 only; its disk and temporary files stay in {}; NIX_SSL_CERT_FILE is the CA bundle Nix uses here, when there is one)",
        state.bootstrap_dir().display()
    );
    println!(
        "   Nix's aarch64-linux builds (ssh-ng://builder@darwin-vz-nix) reach it through the supervisor; x86_64-linux ones (…@{}) wait for the guest. ssh pins its host key in {} while it runs. When the guest's build is over and its last connection closed, it is stopped and all of it deleted.",
        crate::ssh::X86_ALIAS,
        state.bootstrap_known_hosts().display()
    );
}

/// `5 derivations to build, 812 paths to fetch; 3 of the builds for aarch64-linux, …`;
/// `linux`: how many of its builds are for aarch64-linux.
fn describe_dry_run(dry: &DryRun, linux: usize) -> String {
    let mut text = describe_plan(dry);
    if linux > 0 {
        text.push_str(&format!(
            "; {linux} of the builds for aarch64-linux, which need a Linux builder"
        ));
    }
    if !dry.unknown.is_empty() {
        text.push_str(&format!(
            "; Nix does not know how to make {} paths",
            dry.unknown.len()
        ));
    }
    text
}

/// The name of the account that owns the state directory: the supervisor runs as
/// it (root acts as the owner).
fn account_of(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(dir).map_or_else(|_| ::nix::unistd::getuid().as_raw(), |m| m.uid());
    match ::nix::unistd::User::from_uid(::nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}
