//! `darwin-vz-nix bootstrap`: from nothing to a booted builder, every step printed
//! with the exact command that runs it.
//!
//! The steps are the supervisor's own (`crate::guest`): the commands printed here
//! are built by the same functions (`guest::nix`) the supervisor runs. Only the
//! read-only dry run (`nix-store --realise --dry-run`) runs in this process; the
//! build runs in the supervisor, as its account, and this command follows it.

use std::path::Path;
use std::time::Duration;

use super::CliError;
use super::args::{BootstrapArgs, GlobalArgs};
use super::commands::{
    GuestProgress, Outcome, act_as_owner, describe_boot, ensure_supervisor, resolve_config,
};
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
    if built {
        println!("     → nothing: the guest is in the store");
    } else {
        let home = std::env::var_os("HOME").map_or_else(|| state.root().to_path_buf(), Into::into);
        let dry = crate::guest::run_dry(&nix_store, &spec.drv, &home);
        match dry {
            Ok(dry) => println!("     → {}", describe_dry_run(&dry)),
            Err(message) => println!("     → could not tell: {message}"),
        }
    }

    println!(
        "\n3. The supervisor builds the guest through the nix-daemon, as {account}; progress in `darwin-vz-nix status`, Nix's output in {}:",
        state.guest_build_log().display()
    );
    let realise = nix::realise_args(&spec.drv, &state.pending_guest_root());
    println!(
        "     $ NIX_REMOTE=daemon {}",
        shell_line("nix-store", &realise)
    );
    println!(
        "   Nix builds what no binary cache has; its build hook sends aarch64-linux builds to the machines in /etc/nix/machines."
    );

    println!(
        "\n4. It boots the guest, and keeps it with a GC root while it is the guest being booted:"
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

/// `5 derivations to build (3 for aarch64-linux), 812 paths to fetch`.
fn describe_dry_run(dry: &DryRun) -> String {
    let mut text = describe_plan(dry);
    let linux = dry
        .to_build
        .iter()
        .filter(|drv| nix::derivation_system(drv).is_ok_and(|s| s == "aarch64-linux"))
        .count();
    if linux > 0 {
        text.push_str(&format!(
            "; {linux} of the builds are aarch64-linux, for a Linux builder"
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
