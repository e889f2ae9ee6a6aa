//! The supervisor: the one owner of the VM's lifecycle.
//!
//! ```text
//!            start / connect              guest sshd answered
//!   Stopped ─────────────────> Starting ───────────────────────> Running
//!     ^  ^                        │ plan, boot or readiness fails    │ stop, idle,
//!     │  └──── guest powered off ─┼──────────────────────────────────┤ SIGTERM
//!     │                           v                                  v
//!     │                        Failed  <─── VM crashed ───────── Stopping
//!     └────────────────── stopped (gracefully or forced) ────────────┘
//! ```
//!
//! Every request (`start`, `stop`, `connect`, idle poweroff, SIGTERM) goes through
//! the state machine, so concurrent requests share one boot and one stop. State lives
//! behind a plain mutex that is never held across an `.await`; waiters watch a
//! counter that is bumped on every change.
//!
//! Idle means "no open proxied connection": a connection is counted from the moment
//! its request arrives until the client closes its control connection. When the count
//! drops to zero on a running VM the idle clock starts; when it has run for the idle
//! timeout, the VM is powered off gracefully (forced after the stop timeout). The
//! supervisor itself stays, ready to boot again on the next connection.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::backend::{Backend, BackendError, BackendEvent, GuestStream};
use crate::control::protocol::{
    BootTiming, ConfigSummary, ErrorCode, StatusReport, StopOutcome, VmState,
};
use crate::plan::BootPlan;

/// Timing and policy knobs. Tests shrink them to milliseconds.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// Power off after this long without connections; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// How long a graceful poweroff may take before it is forced.
    pub stop_timeout: Duration,
    /// How long a boot may take until the guest's sshd answers.
    pub boot_timeout: Duration,
    /// The guest port whose SSH banner means "ready".
    pub ready_port: u32,
    /// Where the guest console goes, named in boot errors.
    pub console_log: std::path::PathBuf,
}

/// Builds a fresh, checked boot plan (config, artifacts, disk, keys) for each boot.
pub type Planner = Box<dyn Fn() -> Result<BootPlan, String> + Send + Sync>;
/// Deletes state (everything, or only the keys) while the VM is off.
pub type Resetter = Box<dyn Fn(bool) -> Result<Vec<std::path::PathBuf>, String> + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    BootFailed(String),
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: &'static str, secs: u64 },
    #[error("{0}")]
    ConnectFailed(String),
    #[error("{0}")]
    StopFailed(String),
    #[error("{0}")]
    WrongState(String),
    #[error("{0}")]
    Internal(String),
}

impl SupervisorError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SupervisorError::BootFailed(_) => ErrorCode::BootFailed,
            SupervisorError::Timeout { .. } => ErrorCode::Timeout,
            SupervisorError::ConnectFailed(_) => ErrorCode::ConnectFailed,
            SupervisorError::StopFailed(_) | SupervisorError::Internal(_) => ErrorCode::Internal,
            SupervisorError::WrongState(_) => ErrorCode::WrongState,
        }
    }
}

/// The mutable part, under one lock.
#[derive(Debug)]
struct Life {
    vm: VmState,
    /// Identifies the current (or last) boot; events of older boots are ignored.
    boot_id: u64,
    boots: u64,
    ready_at: Option<Instant>,
    connections: usize,
    idle_since: Option<Instant>,
    /// Bumped whenever the idle clock is (re)armed or cancelled; a timer fires only
    /// if its generation is still current.
    idle_generation: u64,
    last_boot: Option<BootTiming>,
    last_error: Option<String>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    planner: Planner,
    resetter: Resetter,
    options: SupervisorOptions,
    summary: ConfigSummary,
    started: Instant,
    life: Mutex<Life>,
    changed: watch::Sender<u64>,
}

/// Cheap to clone; all clones drive the same VM.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

/// Counts one open proxied connection until dropped.
pub struct ConnectionLease {
    inner: Arc<Inner>,
}

impl Drop for ConnectionLease {
    fn drop(&mut self) {
        let mut life = lock(&self.inner.life);
        life.connections = life.connections.saturating_sub(1);
        if life.connections == 0 {
            arm_idle(&self.inner, &mut life);
        }
        drop(life);
        notify(&self.inner);
    }
}

fn lock(life: &Mutex<Life>) -> MutexGuard<'_, Life> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    life.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn notify(inner: &Inner) {
    inner.changed.send_modify(|n| *n = n.wrapping_add(1));
}

impl Supervisor {
    pub fn new(
        backend: Arc<dyn Backend>,
        planner: Planner,
        resetter: Resetter,
        options: SupervisorOptions,
        summary: ConfigSummary,
    ) -> Supervisor {
        let (changed, _) = watch::channel(0);
        Supervisor {
            inner: Arc::new(Inner {
                backend,
                planner,
                resetter,
                options,
                summary,
                started: Instant::now(),
                life: Mutex::new(Life {
                    vm: VmState::Stopped,
                    boot_id: 0,
                    boots: 0,
                    ready_at: None,
                    connections: 0,
                    idle_since: None,
                    idle_generation: 0,
                    last_boot: None,
                    last_error: None,
                }),
                changed,
            }),
        }
    }

    pub fn options(&self) -> &SupervisorOptions {
        &self.inner.options
    }

    pub fn state(&self) -> VmState {
        lock(&self.inner.life).vm
    }

    pub fn status(&self) -> StatusReport {
        let life = lock(&self.inner.life);
        let now = Instant::now();
        let idle_remaining = match (life.idle_since, self.inner.options.idle_timeout) {
            (Some(since), Some(timeout)) if life.vm == VmState::Running => {
                Some(timeout.saturating_sub(now - since).as_secs_f64())
            }
            _ => None,
        };
        StatusReport {
            state: life.vm,
            backend: self.inner.backend.name().to_string(),
            supervisor_pid: std::process::id(),
            supervisor_uptime_secs: (now - self.inner.started).as_secs_f64(),
            vm_uptime_secs: life.ready_at.map(|t| (now - t).as_secs_f64()),
            connections: life.connections,
            idle_remaining_secs: idle_remaining,
            boots: life.boots,
            last_boot: life.last_boot,
            last_error: life.last_error.clone(),
            config: self.inner.summary.clone(),
        }
    }

    /// Boots the VM unless it runs, and waits until the guest's sshd answers.
    /// Concurrent callers share one boot.
    pub async fn ensure_running(
        &self,
        timeout: Duration,
    ) -> Result<Option<BootTiming>, SupervisorError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.changed.subscribe();
        let mut joined_boot: Option<u64> = None;
        loop {
            {
                let mut life = lock(&self.inner.life);
                match life.vm {
                    VmState::Running => return Ok(life.last_boot),
                    VmState::Stopped | VmState::Failed => {
                        if joined_boot == Some(life.boot_id) {
                            let why = life.last_error.clone().unwrap_or_else(|| {
                                "the VM was stopped before it became ready".into()
                            });
                            return Err(SupervisorError::BootFailed(why));
                        }
                        life.vm = VmState::Starting;
                        life.boot_id += 1;
                        life.boots += 1;
                        life.last_error = None;
                        joined_boot = Some(life.boot_id);
                        tokio::spawn(boot(self.inner.clone(), life.boot_id));
                        drop(life);
                        notify(&self.inner);
                    }
                    VmState::Starting => {
                        joined_boot.get_or_insert(life.boot_id);
                    }
                    // A stop is under way; once it is done, boot again.
                    VmState::Stopping => {}
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(SupervisorError::Timeout {
                    what: "the guest's sshd to answer",
                    secs: timeout.as_secs(),
                });
            }
        }
    }

    /// Starts a boot without waiting for it; `true` when the VM was already running.
    pub fn start_in_background(&self) -> bool {
        let running = self.state() == VmState::Running;
        if !running {
            let this = self.clone();
            let timeout = self.inner.options.boot_timeout;
            tokio::spawn(async move {
                let _ = this.ensure_running(timeout).await;
            });
        }
        running
    }

    /// Waits until the VM is ready, without booting it.
    pub async fn wait_ready(
        &self,
        timeout: Duration,
    ) -> Result<Option<BootTiming>, SupervisorError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.changed.subscribe();
        loop {
            {
                let life = lock(&self.inner.life);
                match life.vm {
                    VmState::Running => return Ok(life.last_boot),
                    VmState::Failed => {
                        return Err(SupervisorError::BootFailed(
                            life.last_error.clone().unwrap_or_default(),
                        ));
                    }
                    _ => {}
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(SupervisorError::Timeout {
                    what: "the VM to become ready",
                    secs: timeout.as_secs(),
                });
            }
        }
    }

    /// Powers the VM off: asks the guest first (unless `force`), pulls the plug after
    /// `timeout`. Concurrent stops share one.
    pub async fn stop(
        &self,
        force: bool,
        timeout: Duration,
    ) -> Result<StopOutcome, SupervisorError> {
        let mut changes = self.inner.changed.subscribe();
        let was_starting = loop {
            {
                let mut life = lock(&self.inner.life);
                match life.vm {
                    VmState::Stopped | VmState::Failed => return Ok(StopOutcome::AlreadyStopped),
                    VmState::Starting | VmState::Running => {
                        let was_starting = life.vm == VmState::Starting;
                        life.vm = VmState::Stopping;
                        life.idle_generation += 1;
                        life.idle_since = None;
                        drop(life);
                        notify(&self.inner);
                        break was_starting;
                    }
                    VmState::Stopping => {}
                }
            }
            // Someone else is stopping it; wait for them.
            let _ = changes.changed().await;
        };

        // A guest still booting cannot act on the power button.
        if !force && !was_starting {
            match self.inner.backend.request_stop().await {
                Ok(()) => {
                    let deadline = tokio::time::Instant::now() + timeout;
                    loop {
                        if lock(&self.inner.life).vm != VmState::Stopping {
                            return Ok(StopOutcome::Graceful);
                        }
                        if tokio::time::timeout_at(deadline, changes.changed())
                            .await
                            .is_err()
                        {
                            tracing::warn!(
                                "the guest did not power off within {} s; forcing",
                                timeout.as_secs()
                            );
                            break;
                        }
                    }
                }
                Err(e) => tracing::warn!("graceful stop failed ({e}); forcing"),
            }
        }
        let result = self.inner.backend.force_stop().await;
        let mut life = lock(&self.inner.life);
        life.ready_at = None;
        let outcome = match result {
            Ok(()) => {
                life.vm = VmState::Stopped;
                Ok(StopOutcome::Forced)
            }
            Err(e) => {
                life.vm = VmState::Failed;
                life.last_error = Some(e.to_string());
                Err(SupervisorError::StopFailed(e.to_string()))
            }
        };
        drop(life);
        notify(&self.inner);
        outcome
    }

    /// Counts a connection from now until the lease is dropped.
    pub fn lease(&self) -> ConnectionLease {
        let mut life = lock(&self.inner.life);
        life.connections += 1;
        life.idle_generation += 1;
        life.idle_since = None;
        ConnectionLease {
            inner: self.inner.clone(),
        }
    }

    /// A stream to a guest port, booting the VM first if needed. The lease counts the
    /// connection (keeping the VM up) until dropped.
    pub async fn connect(
        &self,
        port: u32,
        timeout: Duration,
    ) -> Result<(GuestStream, ConnectionLease), SupervisorError> {
        let lease = self.lease();
        self.ensure_running(timeout).await?;
        let mut last = None;
        // The guest answered the readiness probe, so this normally succeeds at once;
        // a few retries cover sshd being restarted by its socket unit.
        for _ in 0..10 {
            match self.inner.backend.connect(port).await {
                Ok(stream) => return Ok((stream, lease)),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(SupervisorError::ConnectFailed(
            last.map_or_else(|| "no attempt".into(), |e| e.to_string()),
        ))
    }

    /// Stops the VM (gracefully) and deletes state while nothing can boot.
    pub async fn reset(&self, keys_only: bool) -> Result<Vec<std::path::PathBuf>, SupervisorError> {
        loop {
            self.stop(false, self.inner.options.stop_timeout).await?;
            let life = lock(&self.inner.life);
            if matches!(life.vm, VmState::Stopped | VmState::Failed) {
                // Holding the lock keeps a concurrent connect from booting meanwhile.
                return (self.inner.resetter)(keys_only).map_err(SupervisorError::Internal);
            }
        }
    }
}

/// One boot, from plan to "guest sshd answered". Runs detached so that a client
/// giving up does not abandon a half-started VM.
async fn boot(inner: Arc<Inner>, id: u64) {
    let t0 = Instant::now();
    let plan = match (inner.planner)() {
        Ok(plan) => plan,
        Err(message) => return fail(&inner, id, message),
    };
    let planned = t0.elapsed();
    tracing::info!(
        boot = id,
        "booting: {} CPUs, {} MiB",
        plan.cpus,
        plan.memory_mib
    );
    tracing::debug!(boot = id, "command line: {}", plan.command_line_string());

    let (events, receiver) = mpsc::unbounded_channel();
    tokio::spawn(pump_events(inner.clone(), id, receiver));
    if let Err(e) = inner.backend.start(plan, events).await {
        return fail(&inner, id, e.to_string());
    }
    let vm_started = t0.elapsed();
    tracing::info!(
        boot = id,
        "VM started after {:.2} s; waiting for the guest's sshd",
        vm_started.as_secs_f64()
    );

    let deadline = Instant::now() + inner.options.boot_timeout;
    let mut backoff = Duration::from_millis(20);
    loop {
        if !still_starting(&inner, id) {
            // A stop arrived meanwhile; make sure the VM we just started goes too.
            let _ = inner.backend.force_stop().await;
            return;
        }
        match probe_ready(inner.backend.as_ref(), inner.options.ready_port).await {
            Ok(()) => break,
            Err(e) => tracing::trace!(boot = id, "not ready yet: {e}"),
        }
        if Instant::now() >= deadline {
            let _ = inner.backend.force_stop().await;
            let message = format!(
                "the guest's sshd did not answer on vsock port {} within {} s; see the guest console log {}",
                inner.options.ready_port,
                inner.options.boot_timeout.as_secs(),
                inner.options.console_log.display()
            );
            return fail(&inner, id, message);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 3 / 2).min(Duration::from_millis(250));
    }

    let ready = t0.elapsed();
    let mut life = lock(&inner.life);
    if life.boot_id != id || life.vm != VmState::Starting {
        return;
    }
    life.vm = VmState::Running;
    life.ready_at = Some(Instant::now());
    life.last_boot = Some(BootTiming {
        planned_secs: planned.as_secs_f64(),
        vm_started_secs: vm_started.as_secs_f64(),
        ready_secs: ready.as_secs_f64(),
    });
    if life.connections == 0 {
        arm_idle(&inner, &mut life);
    }
    drop(life);
    tracing::info!(boot = id, "guest ready after {:.2} s", ready.as_secs_f64());
    notify(&inner);
}

fn still_starting(inner: &Inner, id: u64) -> bool {
    let life = lock(&inner.life);
    life.boot_id == id && life.vm == VmState::Starting
}

fn fail(inner: &Inner, id: u64, message: String) {
    tracing::error!(boot = id, "boot failed: {message}");
    let mut life = lock(&inner.life);
    if life.boot_id == id && life.vm == VmState::Starting {
        life.vm = VmState::Failed;
        life.last_error = Some(message);
    }
    drop(life);
    notify(inner);
}

/// Applies what the VM did on its own to the state machine.
async fn pump_events(
    inner: Arc<Inner>,
    id: u64,
    mut events: mpsc::UnboundedReceiver<BackendEvent>,
) {
    while let Some(event) = events.recv().await {
        let mut life = lock(&inner.life);
        if life.boot_id != id {
            continue;
        }
        match (&event, life.vm) {
            (BackendEvent::StoppedByGuest, VmState::Starting) => {
                life.vm = VmState::Failed;
                life.last_error = Some(format!(
                    "the guest powered off while booting; see the guest console log {}",
                    inner.options.console_log.display()
                ));
            }
            (BackendEvent::StoppedByGuest, VmState::Running | VmState::Stopping) => {
                life.vm = VmState::Stopped;
            }
            (
                BackendEvent::Crashed(message),
                VmState::Starting | VmState::Running | VmState::Stopping,
            ) => {
                life.vm = VmState::Failed;
                life.last_error = Some(format!(
                    "the VM stopped with an error: {message}; see the guest console log {}",
                    inner.options.console_log.display()
                ));
            }
            _ => continue,
        }
        life.ready_at = None;
        life.idle_since = None;
        life.idle_generation += 1;
        tracing::info!(boot = id, "VM event {event:?}: now {}", life.vm.as_str());
        drop(life);
        notify(&inner);
    }
}

/// Starts the idle clock (the caller holds the lock and has checked the count is 0).
fn arm_idle(inner: &Arc<Inner>, life: &mut Life) {
    life.idle_generation += 1;
    if life.vm != VmState::Running {
        return;
    }
    let Some(timeout) = inner.options.idle_timeout else {
        return;
    };
    life.idle_since = Some(Instant::now());
    let generation = life.idle_generation;
    let inner = inner.clone();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        tokio::time::sleep(timeout).await;
        let fire = {
            let life = lock(&inner.life);
            life.idle_generation == generation
                && life.connections == 0
                && life.vm == VmState::Running
        };
        if fire {
            tracing::info!(
                "idle for {} s with no connection: powering off",
                timeout.as_secs()
            );
            let supervisor = Supervisor {
                inner: inner.clone(),
            };
            if let Err(e) = supervisor.stop(false, inner.options.stop_timeout).await {
                tracing::error!("idle poweroff failed: {e}");
            }
        }
    });
}

/// Connects to the guest port and waits for an SSH banner: proof that sshd itself
/// (not just a listening socket) answers.
async fn probe_ready(backend: &dyn Backend, port: u32) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let stream = backend
        .connect(port)
        .await
        .map_err(|e: BackendError| e.to_string())?;
    let (fd, _keepalive) = stream.into_parts();
    // Both backends hand out Unix stream sockets (VZ's connection descriptor is an
    // AF_UNIX socket to the framework; the test backend uses a socketpair).
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let mut stream = tokio::net::UnixStream::from_std(std_stream).map_err(|e| e.to_string())?;
    let read = async {
        let mut banner = Vec::new();
        let mut buf = [0u8; 256];
        while banner.len() < 4 {
            match stream.read(&mut buf).await {
                Ok(0) => return Err("closed before the SSH banner".to_string()),
                Ok(n) => banner.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
        if banner.starts_with(b"SSH-") {
            Ok(())
        } else {
            Err(format!(
                "not an SSH banner: {:?}",
                String::from_utf8_lossy(&banner)
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| "no SSH banner within 5 s".to_string())?
}
