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
use crate::control::access::Owner;
use crate::control::protocol::ConfigSummary;
use crate::control::server::{ServerContext, ServerOptions};
use crate::host::HostInfo;
use crate::hostcache::{self, HostCache, StoreSource};
use crate::logfile::LogFile;
use crate::mac::{MacAddress, MacOrigin};
use crate::nested::{self, GuestReport};
use crate::plan::{BootPlan, HOST_STORE, PlanInputs};
use crate::power::PowerManager;
use crate::state::{Access, StateDir, StateError, StateLock};
use crate::supervisor::{
    MAX_STOP_TIMEOUT, PlannedBoot, StateKeeper, StopRequest, Supervisor, SupervisorOptions,
};
use crate::{artifacts, contract, disk, keys};

/// How long a boot may take until the guest's sshd answers.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The most open descriptors the daemon asks for. macOS refuses a soft limit above
/// `OPEN_MAX` (10240) even when the hard limit is "unlimited", and a shell or launchd
/// starts processes with 256.
const WANTED_OPEN_FILES: u64 = 10240;

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
    /// The host store's directory: shared with the guest, and read by the host
    /// store cache.
    pub host_store: PathBuf,
    pub boot_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub stop_timeout: Duration,
    /// Power off and exit on the signals of [`stop_signals`] (off when tests host
    /// the supervisor in their own process).
    pub handle_signals: bool,
    /// A control client must send a complete request line within this long.
    pub request_timeout: Duration,
    /// Control clients served at once; `None` derives it from the descriptor limit.
    pub max_clients: Option<usize>,
    /// How often the control socket file is checked and, when deleted, made again.
    pub socket_check: Duration,
    /// How long after the guest is ready the supervisor waits for it to say whether
    /// it has `/dev/kvm` (see `nested`).
    pub guest_report_wait: Duration,
    /// How long the backend's start and forced stop may take before the supervisor
    /// reports them as failed.
    pub backend_timeout: Duration,
    /// The host's power management (IOKit on macOS); tests pass a fake.
    pub power: Arc<dyn PowerManager>,
    /// The `nix-store` that realises a lazy guest (`guestDrv`).
    pub nix_store: crate::guest::nix::NixStore,
    /// Bounds of the lazy guest's realisation.
    pub guest: crate::guest::GuestOptions,
    /// Bounds of the bootstrap builder.
    pub bootstrap: crate::bootstrap::BootstrapOptions,
    /// The host store's Nix database, which the host store cache reads (a chroot
    /// store's in tests).
    pub host_store_db: PathBuf,
    /// Whether the host store cache undoes Nix's macOS case hack (as the host's Nix
    /// does by default on macOS only).
    pub host_store_case_hack: bool,
}

impl DaemonOptions {
    pub fn from_config(config: &Config) -> DaemonOptions {
        DaemonOptions {
            host_store: PathBuf::from(HOST_STORE),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            idle_timeout: config.idle_timeout(),
            stop_timeout: config.stop_timeout(),
            handle_signals: true,
            request_timeout: ServerOptions::DEFAULT_REQUEST_TIMEOUT,
            max_clients: None,
            socket_check: ServerOptions::DEFAULT_SOCKET_CHECK,
            guest_report_wait: DEFAULT_GUEST_REPORT_WAIT,
            backend_timeout: crate::supervisor::DEFAULT_BACKEND_TIMEOUT,
            power: crate::power::platform_power(),
            nix_store: crate::guest::nix::NixStore::find(std::env::var_os("PATH").as_deref()),
            guest: crate::guest::GuestOptions::default(),
            bootstrap: crate::bootstrap::BootstrapOptions::default(),
            host_store_db: PathBuf::from(hostcache::HOST_DB),
            host_store_case_hack: StoreSource::host().case_hack,
        }
    }
}

/// The guest says whether it has `/dev/kvm` before its nix-daemon starts, seconds
/// after sshd answers at most; a guest that has not said so by then never will.
pub const DEFAULT_GUEST_REPORT_WAIT: Duration = Duration::from_secs(60);

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

/// Sends the daemon's log to `logs/daemon.log` (with timestamps), rotated to
/// `daemon.log.1` whenever it would grow past 10 MiB, repeats left out. The log is
/// opened without following a symbolic link: whatever was planted at its path is
/// refused, never appended to.
pub fn init_logging(state: &StateDir, level: crate::config::LogLevel) -> Result<(), DaemonError> {
    init_logging_with(state, level, crate::logfile::DEFAULT_MAX_BYTES)
}

/// `init_logging` with another size bound (tests use a small one).
pub fn init_logging_with(
    state: &StateDir,
    level: crate::config::LogLevel,
    max_bytes: u64,
) -> Result<(), DaemonError> {
    let path = state.daemon_log();
    let file = LogFile::open(&path, max_bytes).map_err(|e| DaemonError::Log {
        message: e.to_string(),
    })?;
    let filter = tracing_subscriber::EnvFilter::new(format!("darwin_vz_nix={}", level.as_str()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(file)
        .try_init();
    Ok(())
}

/// Raises the soft limit on open descriptors towards the hard one (at most
/// `WANTED_OPEN_FILES`), so that a few hundred clients cannot exhaust a shell's 256;
/// returns the limit in force.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 256;
    };
    let wanted = hard.min(WANTED_OPEN_FILES);
    if soft >= wanted {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
        Ok(()) => {
            tracing::info!("raised the open-file limit from {soft} to {wanted}");
            wanted
        }
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit from {soft} to {wanted}: {e}");
            soft
        }
    }
}

/// The state directory's side of each boot, for the supervisor.
struct DaemonKeeper {
    config: Config,
    host: HostInfo,
    state: StateDir,
    host_store: PathBuf,
    /// The lazy guest, whose realised (or earlier) directory each boot uses.
    guests: Option<crate::guest::Guests>,
    /// The host store cache, when it is served.
    host_cache: Option<Arc<HostCache>>,
}

impl DaemonKeeper {
    /// The boot plan of the guest to boot now: the configured one, or the lazy
    /// guest's realised (or earlier) directory.
    fn plan_guest_boot(&self) -> Result<PlannedBoot, String> {
        let Some(guests) = &self.guests else {
            return plan_boot(&self.config, &self.host, &self.state, &self.host_store);
        };
        // The supervisor waited until one can boot; it stays bootable (a root keeps it).
        let dir = guests
            .bootable()
            .ok_or_else(|| format!("no guest can boot yet: {}", guests.waiting_for()))?;
        // The guest booted before is found through the state directory's root.
        let key = if dir == guests.spec().out {
            "guestOut"
        } else {
            "stateDir"
        };
        let mut planned = plan_boot_from(
            &self.config,
            &self.host,
            &self.state,
            &self.host_store,
            Some((&dir, key)),
        )?;
        planned.notices.extend(guests.keep_booted(&dir));
        if dir != guests.spec().out {
            tracing::info!(
                "booting the guest booted before, {}, while {} is not ready",
                dir.display(),
                guests.spec().out.display()
            );
        }
        Ok(planned)
    }
}

impl StateKeeper for DaemonKeeper {
    fn plan_boot(&self) -> Result<PlannedBoot, String> {
        let mut planned = self.plan_guest_boot()?;
        if let Some(cache) = &self.host_cache {
            prepare_host_cache(cache, &self.state, &mut planned);
        }
        Ok(planned)
    }

    fn reset(&self, keys_only: bool) -> Result<Vec<PathBuf>, String> {
        reset_state(&self.state, keys_only).map_err(|e| e.to_string())
    }

    fn record_guest_report(&self, report: &GuestReport) -> Result<(), String> {
        // Root's `darwin-vz-nix machines` reads it (launchd runs it when the file
        // changes); it can only take kvm and nixos-test away (see `nested`).
        crate::state::write_file_atomic(&self.state.guest_report(), &report.to_json(), 0o644)
            .map_err(|e| format!("cannot record the guest's report: {e}"))
    }

    fn before_connect(&self) -> Vec<String> {
        match keys::restore_known_hosts(&self.state) {
            Ok(false) => Vec::new(),
            Ok(true) => vec![format!(
                "{} was missing; made it again from the guest's host key",
                self.state.known_hosts().display()
            )],
            Err(e) => vec![format!("cannot restore the pinned host key: {e}")],
        }
    }
}

/// Runs the supervisor until a stop signal or `stop --daemon`, then powers the VM
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
    let open_files = raise_open_file_limit();
    let created = keys::ensure(&state)?;
    if created.client || created.host {
        tracing::info!(
            "made SSH keys in {} (client: {}, guest host key: {})",
            state.keys_dir().display(),
            created.client,
            created.host
        );
    }
    let mut server_options = ServerOptions::for_limit(access, open_files);
    server_options.request_timeout = options.request_timeout;
    server_options.socket_check = options.socket_check;
    if let Some(max) = options.max_clients {
        server_options.max_clients = max;
    }
    let server = ControlServer::bind(&state.socket(), server_options.clone())?;
    tracing::info!(
        "supervisor {} ready on {} with the {} backend (up to {} control clients at once)",
        std::process::id(),
        server.path().display(),
        backend.name(),
        server_options.max_clients
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
        nested_virtualization: Some(config.nested_virtualization),
    };
    let supervisor_options = SupervisorOptions {
        idle_timeout: options.idle_timeout,
        stop_timeout: options.stop_timeout,
        boot_timeout: options.boot_timeout,
        ready_port: contract::SSH_VSOCK_PORT,
        console_log: state.console_log(),
        guest_report_wait: options.guest_report_wait,
        backend_timeout: options.backend_timeout,
        prevent_sleep: config.prevent_sleep,
        power: options.power.clone(),
        clock_port: contract::CLOCK_VSOCK_PORT,
    };
    // A lazy guest is realised from the start: by the time a build connects, it
    // may be ready.
    let guests = config.lazy_guest().map(|spec| {
        let bootstrap = config.bootstrap().map(|bootstrap| {
            crate::bootstrap::Bootstrap::new(
                bootstrap,
                state.clone(),
                options.nix_store.clone(),
                options.bootstrap.clone(),
            )
        });
        let guests = crate::guest::Guests::new(
            spec,
            state.clone(),
            options.nix_store.clone(),
            options.guest.clone(),
            bootstrap,
        );
        guests.kick(false);
        guests
    });
    let host_cache = start_host_cache(&config, &options, backend.as_ref());
    let mut config = config;
    // Without a listener the guest must not add the cache: it would be refused.
    config.host_store_cache = host_cache.is_some();
    let keeper = DaemonKeeper {
        config,
        host,
        state: state.clone(),
        host_store: options.host_store.clone(),
        guests: guests.clone(),
        host_cache: host_cache.clone(),
    };
    let supervisor = Supervisor::with_guests(backend, Box::new(keeper), supervisor_options, guests);

    let shutdown = Arc::new(Notify::new());
    if options.handle_signals {
        forward_stop_signals(shutdown.clone());
    }
    let context = Arc::new(ServerContext {
        supervisor: supervisor.clone(),
        summary,
        owner: Owner::current(),
        host_cache,
    });
    server.serve(context, shutdown).await;

    // A supervisor on its way out keeps nothing awake, even while the guest takes
    // its time to power off.
    supervisor.release_sleep_assertion();
    tracing::info!("shutting down: powering the VM off");
    // Bounded whatever the configuration says: the graceful part is capped, and so
    // is the backend's forced stop.
    let bound = options
        .stop_timeout
        .min(MAX_STOP_TIMEOUT)
        .saturating_add(options.backend_timeout)
        .saturating_add(Duration::from_secs(30));
    let stop = supervisor.stop(StopRequest {
        force: false,
        timeout: options.stop_timeout,
        unless_in_use: false,
    });
    match tokio::time::timeout(bound, stop).await {
        Ok(Ok(outcome)) => tracing::info!("VM stop: {outcome:?}"),
        Ok(Err(e)) => tracing::error!("VM stop failed: {e}"),
        Err(_) => tracing::error!(
            "VM stop did not finish within {} s; exiting",
            bound.as_secs()
        ),
    }
    Ok(())
}

/// Serves the host store as a binary cache on the guest's connections to host port
/// `hostCachePort`, when the configuration asks for it and the backend can listen.
fn start_host_cache(
    config: &Config,
    options: &DaemonOptions,
    backend: &dyn Backend,
) -> Option<Arc<HostCache>> {
    if !config.host_store_cache {
        tracing::info!("the host store cache is off (hostStoreCache = false)");
        return None;
    }
    let cache = HostCache::new(StoreSource {
        store_dir: options.host_store.clone(),
        db: options.host_store_db.clone(),
        case_hack: options.host_store_case_hack,
    });
    let (connections, streams) = tokio::sync::mpsc::unbounded_channel();
    if let Err(e) = backend.listen(contract::HOST_CACHE_VSOCK_PORT, connections) {
        tracing::warn!("the host store cache is off: {e}");
        return None;
    }
    tracing::info!(
        "serving {} (database {}) to the guest on host vsock port {}",
        options.host_store.display(),
        options.host_store_db.display(),
        contract::HOST_CACHE_VSOCK_PORT
    );
    tokio::spawn(cache.clone().serve(streams));
    Some(cache)
}

/// Gives the cache the signing key whose public half this boot's guest receives.
/// Without a key the guest is told that no cache is served: the build then takes
/// the inputs from its other sources, as without the cache.
fn prepare_host_cache(cache: &HostCache, state: &StateDir, planned: &mut PlannedBoot) {
    match hostcache::key::ensure(state) {
        Ok((key, notices)) => {
            cache.set_key(key);
            planned.notices.extend(notices);
        }
        Err(e) => {
            let off = format!("{}=0", contract::PARAM_HOST_CACHE);
            let on = format!("{}=1", contract::PARAM_HOST_CACHE);
            for param in &mut planned.plan.command_line {
                if *param == on {
                    param.clone_from(&off);
                }
            }
            let notice = format!("the host store cache is off for this boot: {e}");
            tracing::warn!("{notice}");
            planned.notices.push(notice);
        }
    }
}

/// The signals that would end the daemon and that it can catch. Each leads to the
/// same graceful stop. Not among them: SIGKILL and SIGSTOP (cannot be caught);
/// SIGPIPE (ignored: a client that goes away mid-reply must not stop the VM); the
/// synchronous faults SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS and SIGABRT
/// (the process cannot safely go on after them); and signals whose default is to be
/// ignored or to suspend the process (SIGCHLD, SIGURG, SIGWINCH, SIGCONT, SIGTSTP,
/// SIGTTIN, SIGTTOU, SIGINFO).
pub fn stop_signals() -> Vec<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal;
    #[allow(unused_mut)]
    let mut signals = vec![
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGVTALRM,
        Signal::SIGPROF,
        Signal::SIGXCPU,
        Signal::SIGXFSZ,
    ];
    #[cfg(target_os = "linux")]
    signals.extend([Signal::SIGIO, Signal::SIGPWR]);
    #[cfg(all(
        target_os = "linux",
        not(any(
            target_arch = "mips",
            target_arch = "mips32r6",
            target_arch = "mips64",
            target_arch = "mips64r6",
            target_arch = "sparc",
            target_arch = "sparc64"
        ))
    ))]
    signals.push(Signal::SIGSTKFLT);
    #[cfg(target_os = "macos")]
    signals.push(Signal::SIGEMT);
    signals
}

/// Notifies `shutdown` on the first stop signal.
fn forward_stop_signals(shutdown: Arc<Notify>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (first, mut received) = tokio::sync::mpsc::unbounded_channel();
    for which in stop_signals() {
        // A fieldless `repr(i32)` enum to its own value: nothing is narrowed.
        let kind = SignalKind::from_raw(which as nix::libc::c_int);
        match signal(kind) {
            Ok(mut stream) => {
                let first = first.clone();
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        if first.send(which).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("cannot handle {which}: {e}"),
        }
    }
    tokio::spawn(async move {
        if let Some(which) = received.recv().await {
            tracing::info!("{which}: powering the VM off gracefully, then exiting");
            shutdown.notify_one();
        }
        while let Some(which) = received.recv().await {
            tracing::info!("{which}: already shutting down");
        }
    });
}

/// Every reason this configuration cannot boot on this host with this state
/// directory, all at once; the checked guest artifacts when there is none. `start`
/// runs it before spawning anything, the supervisor before every boot.
pub fn check_boot(
    config: &Config,
    host: &HostInfo,
    state: &StateDir,
) -> Result<GuestArtifacts, ConfigErrors> {
    check_boot_from(config, host, state, None)
}

/// Everything `check_boot` checks but the guest: what `start` checks before it
/// spawns a daemon that will realise a lazy guest (`guestDrv`) itself.
pub fn check_settings(
    config: &Config,
    host: &HostInfo,
    state: &StateDir,
) -> Result<(), ConfigErrors> {
    let mut problems = config.validate_for_boot(host, disk::existing_size(&state.disk_image()));
    problems.extend(nested_problem(config, host));
    problems.extend(state_problems(config, state));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(problems))
    }
}

/// `check_boot` with the guest directory given (and the setting that named it),
/// instead of the configuration's `guest`.
pub fn check_boot_from(
    config: &Config,
    host: &HostInfo,
    state: &StateDir,
    guest_dir: Option<(&std::path::Path, &'static str)>,
) -> Result<GuestArtifacts, ConfigErrors> {
    let mut problems = config.validate_for_boot(host, disk::existing_size(&state.disk_image()));
    let resolved = match guest_dir {
        Some(dir) => artifacts::resolve_from(config, Some(dir)),
        None => artifacts::resolve(config),
    };
    let artifacts = resolved.map_err(|mut more| problems.append(&mut more)).ok();
    if let Some(artifacts) = &artifacts {
        let line = crate::plan::command_line(config, artifacts, host);
        if let Err(e) = crate::plan::check_command_line(&line, &config.kernel_params) {
            problems.push(Problem {
                input: config.input("kernelParams"),
                message: e.to_string(),
            });
        }
    }
    problems.extend(nested_problem(config, host));
    problems.extend(state_problems(config, state));
    match artifacts {
        Some(artifacts) if problems.is_empty() => Ok(artifacts),
        _ => Err(ConfigErrors(problems)),
    }
}

/// `nestedVirtualization = on` on a Mac without it; the guest kernel is judged when
/// the plan is made.
fn nested_problem(config: &Config, host: &HostInfo) -> Option<Problem> {
    nested::decide(config.nested_virtualization, host.nested_support(), || None)
        .err()
        .map(|message| Problem {
            input: config.input("nestedVirtualization"),
            message,
        })
}

/// What is wrong with the state directory itself: a QEMU image as the disk, a socket
/// path too long.
fn state_problems(config: &Config, state: &StateDir) -> Vec<Problem> {
    let mut problems = Vec::new();
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
    problems
}

/// Everything a boot needs, checked and made ready: run before every boot so that a
/// guest garbage-collected since the last one is reported, not booted. Its notices
/// (what had to be repaired on the way) are shown by `status`.
pub fn plan_boot(
    config: &Config,
    host: &HostInfo,
    state: &StateDir,
    host_store: &std::path::Path,
) -> Result<PlannedBoot, String> {
    plan_boot_from(config, host, state, host_store, None)
}

/// `plan_boot` with the guest directory given (see `check_boot_from`).
pub fn plan_boot_from(
    config: &Config,
    host: &HostInfo,
    state: &StateDir,
    host_store: &std::path::Path,
    guest_dir: Option<(&std::path::Path, &'static str)>,
) -> Result<PlannedBoot, String> {
    let artifacts = check_boot_from(config, host, state, guest_dir).map_err(|e| e.to_string())?;
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
    // The host cache's signing key goes with the SSH keys; the next boot makes a new
    // one and hands its public half to the guest.
    for path in [
        hostcache::key::secret_key_path(state),
        hostcache::key::public_key_path(state),
    ] {
        if std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
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
