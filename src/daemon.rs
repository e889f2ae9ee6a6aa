//! `darwin-vz-nix daemon`: the supervisor process, wired together.
//!
//! It creates the state directory on first start (no activation script needed), takes
//! the directory's lock, makes the SSH keys, serves the control socket, and boots the
//! VM only when asked (`start`) or when a connection arrives (`proxy`). Configuration
//! problems that only matter for booting (a garbage-collected guest, too much memory)
//! do not stop the daemon: they are reported to whoever asks for a boot, so that Nix's
//! `ssh` shows the real error instead of "connection refused".
//!
//! It writes nothing that Nix reads: the daemon runs as an unprivileged account, and
//! the build-machine line root's nix-daemon follows is written by root
//! (`darwin-vz-nix machines`, see `machines`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::artifacts::GuestArtifacts;
use crate::backend::Backend;
use crate::config::{Config, ConfigErrors, Problem};
use crate::control::ControlServer;
use crate::control::protocol::ConfigSummary;
use crate::host::HostInfo;
use crate::mac::{MacAddress, MacOrigin};
use crate::plan::{BootPlan, HOST_STORE, PlanInputs};
use crate::state::{Access, StateDir, StateError, StateLock};
use crate::supervisor::{Supervisor, SupervisorOptions};
use crate::{artifacts, contract, disk, keys};

/// How long a boot may take until the guest's sshd answers.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error(transparent)]
    Server(#[from] crate::control::server::ServerError),
    #[error("cannot open the log file: {message}")]
    Log { message: String },
}

/// Knobs that are not user configuration: where the host store is and how the clock
/// runs. Tests shrink the durations; production derives them from `Config`.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub host_store: PathBuf,
    pub boot_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub stop_timeout: Duration,
    /// Power off and exit on SIGTERM/SIGINT (off when tests host the supervisor).
    pub handle_signals: bool,
}

impl DaemonOptions {
    pub fn from_config(config: &Config) -> DaemonOptions {
        DaemonOptions {
            host_store: PathBuf::from(HOST_STORE),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            idle_timeout: config.idle_timeout(),
            stop_timeout: config.stop_timeout(),
            handle_signals: true,
        }
    }
}

/// A state directory this process now owns.
pub struct Prepared {
    pub state: StateDir,
    pub access: Access,
    _lock: StateLock,
}

/// Creates the state directory and takes its lock; fails at once if another
/// supervisor owns it.
pub fn prepare(config: &Config) -> Result<Prepared, DaemonError> {
    let state = StateDir::new(&config.state_dir);
    let access = Access::from_group_name(config.control_group.as_deref())?;
    state.create(access)?;
    let lock = state.lock()?;
    Ok(Prepared {
        state,
        access,
        _lock: lock,
    })
}

/// Sends the daemon's log to `logs/daemon.log` (with timestamps), keeping one
/// previous file when it grows past 10 MiB. The log is opened without following a
/// symbolic link: whatever was planted at its path is refused, never appended to.
pub fn init_logging(state: &StateDir, level: crate::config::LogLevel) -> Result<(), DaemonError> {
    let path = state.daemon_log();
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() > 10 << 20) {
        let _ = std::fs::rename(&path, path.with_extension("log.1"));
    }
    let file = state
        // Readable by the control group where the logs directory lets it in.
        .open_daemon_log(0o640)
        .map_err(|e| DaemonError::Log {
            message: e.to_string(),
        })?;
    let filter = tracing_subscriber::EnvFilter::new(format!("darwin_vz_nix={}", level.as_str()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

/// Runs the supervisor until SIGTERM/SIGINT or `stop --daemon`, then powers the VM
/// off gracefully (forced after the stop timeout) and returns.
pub async fn serve(
    prepared: Prepared,
    config: Config,
    host: HostInfo,
    backend: Arc<dyn Backend>,
    options: DaemonOptions,
) -> Result<(), DaemonError> {
    let Prepared {
        state,
        access,
        _lock,
    } = prepared;
    let created = keys::ensure(&state)?;
    if created.client || created.host {
        tracing::info!(
            "made SSH keys in {} (client: {}, guest host key: {})",
            state.keys_dir().display(),
            created.client,
            created.host
        );
    }
    let server = ControlServer::bind(&state.socket(), access)?;
    tracing::info!(
        "supervisor {} ready on {} with the {} backend",
        std::process::id(),
        server.path().display(),
        backend.name()
    );

    let summary = ConfigSummary {
        cores: config.cores,
        memory_mib: config.memory_mib,
        disk_size: config.disk_size.to_string(),
        rosetta: config.rosetta,
        idle_timeout_minutes: config.idle_timeout_minutes,
        state_dir: state.root().to_path_buf(),
        console_log: state.console_log(),
        daemon_log: state.daemon_log(),
    };
    let supervisor_options = SupervisorOptions {
        idle_timeout: options.idle_timeout,
        stop_timeout: options.stop_timeout,
        boot_timeout: options.boot_timeout,
        ready_port: contract::SSH_VSOCK_PORT,
        console_log: state.console_log(),
    };
    let planner = {
        let (config, host, state, store) = (
            config.clone(),
            host.clone(),
            state.clone(),
            options.host_store.clone(),
        );
        // The supervisor shows each boot's plan; the notices are logged by plan_boot.
        Box::new(move || plan_boot(&config, &host, &state, &store).map(|planned| planned.plan))
    };
    let resetter = {
        let state = state.clone();
        Box::new(move |keys_only| reset_state(&state, keys_only).map_err(|e| e.to_string()))
    };
    let supervisor = Supervisor::new(backend, planner, resetter, supervisor_options, summary);

    let shutdown = Arc::new(Notify::new());
    if options.handle_signals {
        tokio::spawn(forward_signals(shutdown.clone()));
    }
    server.serve(supervisor.clone(), shutdown).await;

    tracing::info!("shutting down: powering the VM off");
    match supervisor.stop(false, options.stop_timeout).await {
        Ok(outcome) => tracing::info!("VM stop: {outcome:?}"),
        Err(e) => tracing::error!("VM stop failed: {e}"),
    }
    Ok(())
}

async fn forward_signals(shutdown: Arc<Notify>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    shutdown.notify_one();
}

/// Every reason this configuration cannot boot on this host with this state
/// directory, all at once; the checked guest artifacts when there is none. `start`
/// runs it before spawning anything, the supervisor before every boot.
pub fn check_boot(
    config: &Config,
    host: &HostInfo,
    state: &StateDir,
) -> Result<GuestArtifacts, ConfigErrors> {
    let mut problems = config.validate_for_boot(host, disk::existing_size(&state.disk_image()));
    let artifacts = artifacts::resolve(config)
        .map_err(|mut more| problems.append(&mut more))
        .ok();
    if let Some(artifacts) = &artifacts {
        let line = crate::plan::command_line(config, artifacts, host);
        if let Err(e) = crate::plan::check_command_line(&line, &config.kernel_params) {
            problems.push(Problem {
                input: config.input("kernelParams"),
                message: e.to_string(),
            });
        }
    }
    if disk::is_qcow2(&state.disk_image()).unwrap_or(false) {
        let message = disk::DiskError::Qcow2 {
            path: state.disk_image(),
        }
        .to_string();
        problems.push(Problem {
            input: config.input("stateDir"),
            message,
        });
    }
    if let Err(e) = state.check_socket_path() {
        problems.push(Problem {
            input: config.input("stateDir"),
            message: e.to_string(),
        });
    }
    match artifacts {
        Some(artifacts) if problems.is_empty() => Ok(artifacts),
        _ => Err(ConfigErrors(problems)),
    }
}

/// A boot plan, and what was repaired on the way to it that a user should hear about
/// (a key or MAC address made afresh because the old one was missing or corrupt).
#[derive(Debug, Clone)]
pub struct PlannedBoot {
    pub plan: BootPlan,
    pub notices: Vec<String>,
}

/// Everything a boot needs, checked and made ready: run before every boot so that a
/// guest garbage-collected since the last one is reported, not booted. Notices are
/// logged as warnings and returned.
pub fn plan_boot(
    config: &Config,
    host: &HostInfo,
    state: &StateDir,
    host_store: &std::path::Path,
) -> Result<PlannedBoot, String> {
    let artifacts = check_boot(config, host, state).map_err(|e| e.to_string())?;
    let disk_change =
        disk::ensure(&state.disk_image(), config.disk_size).map_err(|e| e.to_string())?;
    match disk_change {
        disk::DiskChange::Created => tracing::info!(
            "created disk image {} ({})",
            state.disk_image().display(),
            config.disk_size
        ),
        disk::DiskChange::Grown { from } => {
            tracing::info!("grew disk image from {from} to {}", config.disk_size)
        }
        disk::DiskChange::Unchanged => {}
    }
    let mut notices = keys::ensure(state).map_err(|e| e.to_string())?.notices;
    crate::cacerts::share_with_guest(&state.guest_keys_dir());
    let (mac, origin) =
        MacAddress::load_or_create(&state.mac_address()).map_err(|e| e.to_string())?;
    let mac_notice = match origin {
        MacOrigin::ReplacedUnusable => Some("did not hold a MAC address"),
        // Missing beside a disk that booted before: it was deleted.
        MacOrigin::Created if disk_change != disk::DiskChange::Created => Some("was missing"),
        MacOrigin::Created | MacOrigin::Kept => None,
    };
    if let Some(why) = mac_notice {
        let notice = format!(
            "{} {why}; made a new MAC address {mac} — the guest's network identity changed",
            state.mac_address().display()
        );
        tracing::warn!("{notice}");
        notices.push(notice);
    }
    rotate_console_log(state);
    let plan = BootPlan::build(&PlanInputs {
        config,
        artifacts: &artifacts,
        state,
        host,
        mac,
        host_store,
    })
    .map_err(|e| e.to_string())?;
    plan.check_shares_exist().map_err(|e| e.to_string())?;
    Ok(PlannedBoot { plan, notices })
}

/// Keeps the previous boot's console next to this one's.
fn rotate_console_log(state: &StateDir) {
    let _ = std::fs::rename(state.console_log(), state.previous_console_log());
}

/// Deletes state: the keys only (made afresh at once), or everything the guest had
/// (disk, MAC, keys, console logs). The caller owns the directory's lock or is the
/// supervisor with the VM stopped. Checks before it acts: the new keys are made
/// first (ssh-keygen present, `keys/` writable, room on the disk), so a failure
/// deletes nothing; once they exist, the old state goes and the new keys replace
/// the old ones by rename. Returns every path deleted or replaced.
pub fn reset_state(state: &StateDir, keys_only: bool) -> Result<Vec<PathBuf>, ResetError> {
    let staged = keys::stage_all(state).map_err(ResetError::NothingDone)?;
    let mut removed = Vec::new();
    if !keys_only {
        for path in [
            state.disk_image(),
            state.mac_address(),
            state.console_log(),
            state.previous_console_log(),
        ] {
            if std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed.extend(staged.install().map_err(ResetError::Unfinished)?);
    Ok(removed)
}

/// Why `reset_state` failed, and how far it got.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("{0}; nothing was deleted or replaced")]
    NothingDone(keys::KeyError),
    #[error(
        "{0}; the old state was deleted but the new keys are not all in place — run the command again (or start the daemon, which repairs them)"
    )]
    Unfinished(keys::KeyError),
}
