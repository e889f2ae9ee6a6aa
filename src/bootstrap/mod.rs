//! The bootstrap builder: the first guest's aarch64-linux builds, when no guest
//! exists yet to build them.
//!
//! nixpkgs' `darwin.linux-builder` is a QEMU-run aarch64-linux NixOS builder that
//! Hydra builds for aarch64-darwin, so every nixpkgs-unstable revision has it on
//! cache.nixos.org. When the guest's realisation needs an aarch64-linux build and no
//! guest can boot, the supervisor brings it up, lets the nix-daemon's build hook
//! reach it, and removes it afterwards:
//!
//! ```text
//!   off ──> fetching ──> booting ──> running ──> stopping ──> off
//!              │            │           │ (the guest's build ended and the last
//!              └────────────┴───────────┴─> failed     session closed)
//! ```
//!
//! * **fetching**: `nix-store --realise` its VM runner (the `.drv` from the daemon
//!   config, `bootstrapDrv`), after a dry run that refuses when it would need an
//!   aarch64-linux build itself (then this nixpkgs' builder is not cached);
//!   `nix-store --add` a directory holding only our client's public key, so the
//!   VM's sshd accepts it (a root-owned store path passes sshd's StrictModes over
//!   9p, where a file of the service account would not).
//! * **booting**: the runner, unprivileged, from `<state>/bootstrap` (its disk
//!   image and temporary files live there), its SSH port forwarded to
//!   `127.0.0.1:PORT` only, PORT free when picked (a socket bound, never
//!   listening); until its sshd's banner answers.
//! * **running**: build connections (`proxy --alias darwin-vz-nix`) get a stream to
//!   it through the supervisor (a Unix socket pair relayed to the TCP connection,
//!   so that the supervisor sees each session end); ssh pins its host key, written
//!   to `<state>/keys/bootstrap_known_hosts` under the builder's alias.
//! * **stopping**: once the guest's realisation ended and no session is open (or
//!   after a bound): SIGTERM to its process group, SIGKILL after a bound; its
//!   directory, the known_hosts file and its GC root are deleted.
//!
//! Its host key is public (nixpkgs commits the private half), so pinning it proves
//! nothing about who answers. What protects the path is how it is reached: QEMU
//! binds 127.0.0.1:PORT itself (a second process cannot bind it while QEMU holds
//! it); the supervisor connects only while the QEMU it started runs; root's ssh
//! never dials TCP: it gets the stream from the supervisor through the control
//! socket; and the VM accepts only our client key. It lives only while the first
//! guest is built. See docs/bootstrap.md.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};

use crate::guest::nix::{self, NixStore};
use crate::guest::progress::Progress;
use crate::guest::run;
use crate::state::StateDir;

/// The user nixpkgs' builder lets in (`authorizedKeysFiles` = `/var/keys/%u_ed25519.pub`).
pub const BUILDER_USER: &str = "builder";

/// What the configuration says about the bootstrap builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapSpec {
    /// Its VM runner's derivation (`…-nixos-vm.drv`).
    pub drv: PathBuf,
    /// Its public host key, `ssh-ed25519 AAAA…`.
    pub host_key: String,
    /// The VM's size: the guest's own.
    pub cores: u32,
    pub memory_mib: u64,
    /// Who ssh logs in as (must be [`BUILDER_USER`]).
    pub ssh_user: String,
}

/// Bounds. Tests shrink them.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// Fetching the builder (about 3 GiB, once).
    pub fetch_timeout: Duration,
    /// From start to its sshd's banner (QEMU needs about 25 s).
    pub boot_timeout: Duration,
    /// How long a stop waits after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// How long open sessions keep it after the guest's build ended.
    pub drain_timeout: Duration,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions {
            fetch_timeout: Duration::from_secs(3 * 3600),
            boot_timeout: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(3600),
        }
    }
}

/// Where the bootstrap builder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Off,
    Fetching,
    Booting,
    Running,
    Stopping,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Off => "off",
            Phase::Fetching => "fetching",
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Failed => "failed",
        }
    }
}

/// The bootstrap builder at one instant, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapStatus {
    pub phase: Phase,
    /// While fetching: `120 of 800 paths fetched`.
    pub progress: Option<String>,
    /// While running: `127.0.0.1:PORT`.
    pub endpoint: Option<String>,
    /// Open build connections to it.
    pub sessions: usize,
    pub console_log: PathBuf,
    pub error: Option<String>,
}

#[derive(Debug)]
enum LifePhase {
    Off,
    Fetching {
        progress: Progress,
    },
    Booting,
    Running {
        port: u16,
        stop: Option<oneshot::Sender<()>>,
    },
    Stopping,
    Failed {
        message: String,
    },
}

impl LifePhase {
    /// The phase as `status` names it.
    fn public(&self) -> Phase {
        match self {
            LifePhase::Off => Phase::Off,
            LifePhase::Fetching { .. } => Phase::Fetching,
            LifePhase::Booting => Phase::Booting,
            LifePhase::Running { .. } => Phase::Running,
            LifePhase::Stopping => Phase::Stopping,
            LifePhase::Failed { .. } => Phase::Failed,
        }
    }
}

#[derive(Debug)]
struct Life {
    phase: LifePhase,
    sessions: usize,
    /// Bumped by every `up`: a `retire` for an older one leaves the builder to the
    /// realisation that brought it up (or reused it) since.
    claims: u64,
}

/// Which `up` a `retire` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim(u64);

struct Inner {
    spec: BootstrapSpec,
    state: StateDir,
    nix: NixStore,
    options: BootstrapOptions,
    life: Mutex<Life>,
    changed: watch::Sender<u64>,
}

impl Inner {
    fn life(&self) -> MutexGuard<'_, Life> {
        self.life
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn set(&self, phase: LifePhase) {
        self.life().phase = phase;
        self.notify();
    }

    /// Waits until `done` holds for the phase, at most as long as a stop may take
    /// (its SIGKILL included) and 10 s more.
    async fn wait_for_phase(&self, done: impl Fn(&LifePhase) -> bool) {
        let mut changes = self.changed.subscribe();
        let bound = self
            .options
            .stop_timeout
            .saturating_add(Duration::from_secs(10));
        let _ = tokio::time::timeout(bound, async {
            loop {
                changes.borrow_and_update();
                if done(&self.life().phase) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
}

/// The bootstrap builder; cheap to clone.
#[derive(Clone)]
pub struct Bootstrap {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("spec", &self.inner.spec)
            .finish_non_exhaustive()
    }
}

impl Bootstrap {
    /// Off, with whatever an earlier supervisor left (a crash mid-bootstrap)
    /// deleted: the builder never outlives the bootstrap.
    pub fn new(
        spec: BootstrapSpec,
        state: StateDir,
        nix: NixStore,
        options: BootstrapOptions,
    ) -> Bootstrap {
        clean_up(&state);
        let (changed, _) = watch::channel(0);
        Bootstrap {
            inner: Arc::new(Inner {
                spec,
                state,
                nix,
                options,
                life: Mutex::new(Life {
                    phase: LifePhase::Off,
                    sessions: 0,
                    claims: 0,
                }),
                changed,
            }),
        }
    }

    /// Bumped on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    pub fn phase(&self) -> Phase {
        self.inner.life().phase.public()
    }

    /// Phase, progress and sessions, read together under one lock.
    pub fn status(&self) -> BootstrapStatus {
        let life = self.inner.life();
        let (progress, endpoint, error) = match &life.phase {
            LifePhase::Fetching { progress } => (Some(progress.describe()), None, None),
            LifePhase::Running { port, .. } => (None, Some(format!("127.0.0.1:{port}")), None),
            LifePhase::Failed { message } => (None, None, Some(message.clone())),
            _ => (None, None, None),
        };
        BootstrapStatus {
            phase: life.phase.public(),
            progress,
            endpoint,
            sessions: life.sessions,
            console_log: self.inner.state.bootstrap_console_log(),
            error,
        }
    }

    /// Build connections open to it while it runs or stops; none once it is off or
    /// failed (its sessions ended with it). The supervisor keeps the Mac awake
    /// for these as for the guest's own.
    pub fn open_sessions(&self) -> usize {
        let life = self.inner.life();
        match life.phase {
            LifePhase::Running { .. } | LifePhase::Stopping => life.sessions,
            _ => 0,
        }
    }

    /// Brings the builder up: fetched, booted, its sshd answering (a builder still
    /// running for an earlier realisation is reused). Fails with one line saying
    /// why. Called by the guest's realisation only, one at a time; hand the claim to
    /// `retire` when done.
    pub async fn up(&self) -> Result<Claim, String> {
        self.wait_while_stopping().await;
        let (claim, running) = {
            let mut life = self.inner.life();
            life.claims = life.claims.wrapping_add(1);
            (
                Claim(life.claims),
                matches!(life.phase, LifePhase::Running { .. }),
            )
        };
        if running {
            tracing::info!("reusing the bootstrap builder that still runs");
            return Ok(claim);
        }
        match self.up_steps().await {
            Ok(()) => Ok(claim),
            Err(message) => {
                tracing::error!("{message}");
                clean_up(&self.inner.state);
                self.inner.set(LifePhase::Failed {
                    message: message.clone(),
                });
                Err(message)
            }
        }
    }

    /// A stop under way ends (bounded) before anything new starts.
    async fn wait_while_stopping(&self) {
        self.inner
            .wait_for_phase(|phase| !matches!(phase, LifePhase::Stopping))
            .await;
    }

    async fn up_steps(&self) -> Result<(), String> {
        let inner = &self.inner;
        let spec = &inner.spec;
        let state = &inner.state;
        if spec.ssh_user != BUILDER_USER {
            return Err(format!(
                "the bootstrap builder (nixpkgs' darwin.linux-builder) lets in only the user `{BUILDER_USER}`, but sshUser is `{}`; build the first guest with sshUser = \"{BUILDER_USER}\", or on another aarch64-linux builder",
                spec.ssh_user
            ));
        }
        inner.set(LifePhase::Fetching {
            progress: Progress::default(),
        });
        tracing::info!("bringing up the bootstrap builder ({})", spec.drv.display());

        // 1. It must come from the cache: building it would need the Linux builder
        //    it is meant to be.
        let dry = {
            let (nix, drv, home) = (
                inner.nix.clone(),
                spec.drv.clone(),
                state.root().to_path_buf(),
            );
            tokio::task::spawn_blocking(move || crate::guest::run_dry(&nix, &drv, &home))
                .await
                .map_err(|e| format!("planning the bootstrap builder failed: {e}"))??
        };
        let linux = dry.aarch64_linux_builds();
        if let Some(first) = linux.first() {
            return Err(format!(
                "the bootstrap builder {} is not on cache.nixos.org: it would need {} aarch64-linux build(s) ({} …), which need the Linux builder it is meant to be; keep the flake's own nixpkgs for the guest (services.darwin-vz.guestNixpkgs), or build the first guest on another aarch64-linux builder",
                spec.drv.display(),
                linux.len(),
                nix::short_name(first)
            ));
        }

        // 2. Fetch it (and build its few darwin-side parts), kept by a GC root.
        state
            .create_gcroots_dir()
            .map_err(|e| format!("cannot make {}: {e}", state.gcroots_dir().display()))?;
        let args = nix::realise_args(&spec.drv, &state.bootstrap_root());
        let log = state.bootstrap_build_log();
        let updates = inner.clone();
        let finished = run::logged(
            &inner.nix,
            &args,
            state.root(),
            (&log, ""),
            inner.options.fetch_timeout,
            move |progress| {
                let mut life = updates.life();
                if let LifePhase::Fetching { progress: now } = &mut life.phase {
                    *now = progress.clone();
                }
                drop(life);
                updates.notify();
            },
        )
        .await?;
        if !finished.success {
            let said = finished
                .progress
                .last_error
                .unwrap_or_else(|| format!("nix-store ended with {}", finished.status));
            return Err(format!(
                "the bootstrap builder could not be fetched: {said}; log {}; to fix: check the network (cache.nixos.org), then run `darwin-vz-nix bootstrap`",
                log.display()
            ));
        }
        let out = std::fs::read_link(state.bootstrap_root()).map_err(|e| {
            format!(
                "nix-store did not leave {} ({e})",
                state.bootstrap_root().display()
            )
        })?;
        let runner = find_runner(&out)?;

        // 3. Its working directory, and the one key it accepts, in the store.
        let keys = prepare_dir(state)?;
        let keys_in_store = {
            let (nix, args, home) = (
                inner.nix.clone(),
                vec![OsString::from("--add"), keys.into_os_string()],
                state.root().to_path_buf(),
            );
            tokio::task::spawn_blocking(move || {
                run::blocking(&nix, &args, &home, Duration::from_secs(120))
            })
            .await
            .map_err(|e| format!("adding the bootstrap builder's key failed: {e}"))??
        };
        let keys_in_store = PathBuf::from(keys_in_store.stdout.trim());
        write_known_hosts(state, &spec.host_key)?;

        // 4. Boot it on a free loopback port; a port taken meanwhile is retried.
        inner.set(LifePhase::Booting);
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_loopback_port()?;
            let mut child = spawn_runner(&runner, &keys_in_store, port, spec, state)?;
            match wait_ready(&mut child, port, inner.options.boot_timeout, state).await {
                Ok(()) => {
                    let (stop, stopped) = oneshot::channel();
                    inner.set(LifePhase::Running {
                        port,
                        stop: Some(stop),
                    });
                    tokio::spawn(watch_vm(inner.clone(), child, stopped));
                    tracing::info!("the bootstrap builder answers on 127.0.0.1:{port}");
                    return Ok(());
                }
                Err(Ready::Exited(message)) => {
                    last = message;
                    continue;
                }
                Err(Ready::TimedOut(message)) => {
                    stop_child(&mut child, inner.options.stop_timeout).await;
                    return Err(message);
                }
            }
        }
        Err(last)
    }

    /// A stream to the running builder's sshd, relayed through the supervisor. The
    /// session counts until either side ends.
    pub async fn connect(&self) -> Result<OwnedFd, String> {
        let port = {
            let mut life = self.inner.life();
            let LifePhase::Running { port, .. } = life.phase else {
                return Err("the bootstrap builder is not running".into());
            };
            life.sessions = life.sessions.saturating_add(1);
            port
        };
        let session = Session {
            inner: self.inner.clone(),
        };
        self.inner.notify();
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .map_err(|_| "the bootstrap builder did not accept the connection within 10 s".to_string())?
        .map_err(|e| format!("cannot reach the bootstrap builder on 127.0.0.1:{port}: {e}"))?;
        let (ours, theirs) = tokio::net::UnixStream::pair()
            .map_err(|e| format!("cannot make a stream for the bootstrap builder: {e}"))?;
        let theirs = theirs
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
            .map_err(|e| format!("cannot hand out the bootstrap stream: {e}"))?;
        tokio::spawn(relay(ours, tcp, session));
        Ok(OwnedFd::from(theirs))
    }

    /// Stops and deletes the builder once no session is open (or after the drain
    /// bound), unless a newer `up` claimed it meanwhile; what comes up later (a
    /// retry) starts afresh.
    pub async fn retire(&self, claim: Claim) {
        let inner = &self.inner;
        let mut changes = inner.changed.subscribe();
        let deadline = tokio::time::Instant::now()
            .checked_add(inner.options.drain_timeout)
            .unwrap_or_else(tokio::time::Instant::now);
        let stop = loop {
            changes.borrow_and_update();
            {
                let mut life = inner.life();
                if Claim(life.claims) != claim {
                    tracing::info!("the bootstrap builder serves a newer build; left running");
                    return;
                }
                let running = matches!(life.phase, LifePhase::Running { .. });
                if !running || life.sessions == 0 || tokio::time::Instant::now() >= deadline {
                    let stop = match &mut life.phase {
                        LifePhase::Running { stop, .. } => stop.take(),
                        _ => None,
                    };
                    if running {
                        life.phase = LifePhase::Stopping;
                    }
                    break stop;
                }
            }
            let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
        };
        inner.notify();
        match stop {
            Some(stop) => {
                tracing::info!("the guest's build is over: stopping the bootstrap builder");
                let _ = stop.send(());
                // The watcher stops it, cleans up and reports Off.
                inner
                    .wait_for_phase(|phase| {
                        matches!(phase, LifePhase::Off | LifePhase::Failed { .. })
                    })
                    .await;
            }
            None => clean_up(&inner.state),
        }
    }
}

/// Counts one session until dropped.
struct Session {
    inner: Arc<Inner>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut life = self.inner.life();
        life.sessions = life.sessions.saturating_sub(1);
        drop(life);
        self.inner.notify();
    }
}

/// Copies both ways until either side ends; then both close (ours is the only copy
/// of our end in this process, so the client sees the end).
async fn relay(mut ours: tokio::net::UnixStream, mut tcp: tokio::net::TcpStream, session: Session) {
    let _ = tokio::io::copy_bidirectional(&mut ours, &mut tcp).await;
    drop(ours);
    drop(tcp);
    drop(session);
}

/// Waits for the VM process: a stop request stops it; an exit on its own marks the
/// builder failed. Either way its files go.
async fn watch_vm(
    inner: Arc<Inner>,
    mut child: tokio::process::Child,
    stopped: oneshot::Receiver<()>,
) {
    let phase = tokio::select! {
        status = child.wait() => {
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            LifePhase::Failed {
                message: format!(
                    "the bootstrap builder stopped on its own ({status}); see {}",
                    inner.state.bootstrap_console_log().display()
                ),
            }
        }
        _ = stopped => {
            stop_child(&mut child, inner.options.stop_timeout).await;
            LifePhase::Off
        }
    };
    clean_up(&inner.state);
    tracing::info!("the bootstrap builder is gone");
    inner.set(phase);
}

/// SIGTERM to the VM's process group, SIGKILL after `timeout`.
async fn stop_child(child: &mut tokio::process::Child, timeout: Duration) {
    use ::nix::sys::signal::{Signal, killpg};
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return;
    };
    let group = ::nix::unistd::Pid::from_raw(pid);
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.kill().await;
    }
}

/// Deletes the builder's directory, its known_hosts file and its GC root.
fn clean_up(state: &StateDir) {
    // remove_dir_all never follows a symbolic link out of the directory.
    let _ = std::fs::remove_dir_all(state.bootstrap_dir());
    let _ = std::fs::remove_file(state.bootstrap_known_hosts());
    let _ = std::fs::remove_file(state.bootstrap_root());
}

/// `<out>/bin/run-<name>-vm`, the one script nixpkgs' `system.build.vm` holds.
fn find_runner(out: &Path) -> Result<PathBuf, String> {
    let bin = out.join("bin");
    let entries = std::fs::read_dir(&bin).map_err(|e| {
        format!(
            "{} has no bin/ ({e}): bootstrapDrv is not a NixOS VM runner",
            out.display()
        )
    })?;
    entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("run-") && n.ends_with("-vm"))
        })
        .ok_or_else(|| {
            format!(
                "{} holds no run-*-vm script: bootstrapDrv is not a NixOS VM runner (system.build.vm)",
                bin.display()
            )
        })
}

/// A fresh `<state>/bootstrap` with `keys/builder_ed25519.pub` (our client's public
/// key) and `tmp/`; returns the keys directory.
fn prepare_dir(state: &StateDir) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = state.bootstrap_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let keys = dir.join("keys");
    for path in [&dir, &keys, &dir.join("tmp")] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(|e| format!("cannot make {}: {e}", path.display()))?;
    }
    let public =
        crate::keys::read_public_key(&state.client_key_pub()).map_err(|e| e.to_string())?;
    let file = keys.join(format!("{BUILDER_USER}_ed25519.pub"));
    crate::files::write_atomic(&file, &keys, format!("{public}\n").as_bytes(), 0o644)
        .map_err(|e| e.to_string())?;
    Ok(keys)
}

/// `<state>/keys/bootstrap_known_hosts`: the builder's host key under the alias.
fn write_known_hosts(state: &StateDir, host_key: &str) -> Result<(), String> {
    crate::files::write_atomic(
        &state.bootstrap_known_hosts(),
        &state.keys_dir(),
        crate::keys::known_hosts_line(host_key).as_bytes(),
        0o644,
    )
    .map_err(|e| e.to_string())
}

/// A loopback port that is free now: a socket is bound to port 0 and closed,
/// never listening (so nothing could connect to it meanwhile).
fn free_loopback_port() -> Result<u16, String> {
    use ::nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, getsockname, socket,
    };
    let fail = |e: ::nix::errno::Errno| format!("cannot find a free loopback port: {e}");
    // No SOCK_CLOEXEC (macOS has none): the socket lives for two calls.
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .map_err(fail)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, 0),
    )
    .map_err(fail)?;
    let address: SockaddrIn = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(fail)?;
    Ok(address.port())
}

/// The runner, unprivileged, in its own process group, with its disk and
/// temporary files in `<state>/bootstrap` and SSH on 127.0.0.1:`port` only.
fn spawn_runner(
    runner: &Path,
    keys: &Path,
    port: u16,
    spec: &BootstrapSpec,
    state: &StateDir,
) -> Result<tokio::process::Child, String> {
    use std::os::unix::process::CommandExt;
    let dir = state.bootstrap_dir();
    let console = crate::files::open_state_log(&state.bootstrap_console_log(), 0o640)
        .map_err(|e| e.to_string())?;
    let _ = console.set_len(0);
    let console_err = console.try_clone().map_err(|e| e.to_string())?;
    let mut command = std::process::Command::new(runner);
    // nixpkgs' builder copies this bundle into the VM (useHostCerts): it fetches
    // through the same TLS proxy the Mac's Nix trusts, if any.
    if let Some(bundle) = crate::cacerts::find(&crate::cacerts::Sources::from_host()) {
        command.env("NIX_SSL_CERT_FILE", bundle);
    }
    command
        .current_dir(&dir)
        .envs(runner_env(keys, port, spec, state))
        .stdin(std::process::Stdio::null())
        .stdout(console)
        .stderr(console_err)
        .process_group(0);
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    command.spawn().map_err(|e| {
        format!(
            "cannot start the bootstrap builder {}: {e}",
            runner.display()
        )
    })
}

/// What nixpkgs' `run-nixos-vm` reads: where the disk image and temporary files
/// go, the keys to share, the port forward (added to `-netdev user`) and the size.
pub fn runner_env(
    keys: &Path,
    port: u16,
    spec: &BootstrapSpec,
    state: &StateDir,
) -> Vec<(String, OsString)> {
    let dir = state.bootstrap_dir();
    vec![
        ("NIX_DISK_IMAGE".into(), dir.join("disk.qcow2").into()),
        ("TMPDIR".into(), dir.join("tmp").into()),
        ("USE_TMPDIR".into(), "1".into()),
        ("KEYS".into(), keys.into()),
        (
            "QEMU_NET_OPTS".into(),
            format!("hostfwd=tcp:127.0.0.1:{port}-:22").into(),
        ),
        (
            "QEMU_OPTS".into(),
            format!("-m {} -smp {}", spec.memory_mib, spec.cores).into(),
        ),
    ]
}

enum Ready {
    /// The runner exited (e.g. the port was taken): worth another try.
    Exited(String),
    TimedOut(String),
}

/// Waits until an SSH banner comes from 127.0.0.1:`port`, while the runner lives.
async fn wait_ready(
    child: &mut tokio::process::Child,
    port: u16,
    timeout: Duration,
    state: &StateDir,
) -> Result<(), Ready> {
    let t0 = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Ready::Exited(format!(
                "the bootstrap builder exited while booting ({status}); see {}",
                state.bootstrap_console_log().display()
            )));
        }
        if banner(port).await {
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            return Err(Ready::TimedOut(format!(
                "the bootstrap builder's sshd did not answer on 127.0.0.1:{port} within {}; see {}",
                crate::supervisor::seconds(timeout),
                state.bootstrap_console_log().display()
            )));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff.saturating_mul(2)).min(Duration::from_secs(1));
    }
}

/// True when an SSH server greets on 127.0.0.1:`port` (QEMU accepts before the
/// guest's sshd runs, then closes: that is not ready).
async fn banner(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut greeting = [0u8; 4];
        stream.read_exact(&mut greeting).await.ok()?;
        (&greeting == b"SSH-").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(()))
    )
}
