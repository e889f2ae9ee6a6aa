//! The supervisor: the one owner of the VM's lifecycle.
//!
//! ```text
//!            start / connect              guest sshd answered
//!   Stopped ─────────────────> Starting ───────────────────────> Running
//!     ^  ^                        │ plan, boot or readiness fails    │ stop, idle,
//!     │  └──── guest powered off ─┼──────────────────────────────────┤ a signal
//!     │                           v                                  v
//!     │                        Failed  <─── VM crashed ───────── Stopping
//!     └────────────────── stopped (gracefully or forced) ────────────┘
//! ```
//!
//! Every request (`start`, `stop`, `connect`, idle poweroff, a signal) goes through
//! the state machine, so concurrent requests share one boot and one stop. State lives
//! behind a plain mutex that is never held across an `.await`; waiters watch a
//! counter that is bumped on every change.
//!
//! **Identity, not position.** Every boot gets a [`BootId`], and every call that acts
//! on a VM later (a boot task that wakes after a stop, a readiness timeout, a stop)
//! names the boot it acts on; the backend ignores calls for a boot that is not its
//! current one. Lifecycle calls to the backend (`start`, `request_stop`,
//! `force_stop`) are serialised, and a boot checks that it is still current right
//! before it starts its VM, so a superseded boot never starts or stops a newer VM.
//!
//! **A session is its stream** (`session`): the VM is in use while a connection waits
//! for its boot, and then for as long as its guest stream lives — whichever process
//! holds the descriptor. **Idle** (`idle`): when a running VM has no session, one timer
//! per supervisor powers it off after the idle timeout; the supervisor stays, ready to
//! boot again on the next connection.
//!
//! **Sleep** (`sleep`): while a build connection is open, the Mac is kept from idle
//! sleep; **clock** (`clock`): the guest's clock is set from the host's at every boot
//! and after every wake of the Mac. Both go through a `PowerManager`
//! (`crate::power`), IOKit on macOS.
//!
//! **Idle time counts only while the Mac is awake.** The idle deadline is an
//! `Instant`, and Rust's `Instant` (like Tokio's timers, built on it) stands still
//! while macOS sleeps: the standard library reads `CLOCK_UPTIME_RAW` on Darwin. That is the choice, not an accident: a
//! VM idle for 2 h 59 min when the lid closes powers off a minute after the lid
//! opens again, not at once — so a build started right after a wake (Nix retrying
//! one that sleep interrupted) finds the VM still up — and a sleeping Mac has no use
//! for the memory it would get back. Wall-clock time would also jump with every
//! change of the host's clock.
//!
//! **The guest may not exist yet** (`crate::guest`): with a lazy guest, a boot first
//! waits until a guest can boot — the one realised for this configuration, or the
//! one booted before while a newer one is realised — and a client that times out
//! meanwhile is told how far the realisation got.
//!
//! The supervisor speaks its own types ([`Snapshot`], [`BootTiming`], [`StopOutcome`],
//! [`SupervisorError`]); the control layer translates them to the wire format.

mod boot;
mod clock;
mod guest_report;
mod idle;
mod session;
mod sleep;

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::backend::{Backend, BootId, StopCall};
use crate::nested::GuestReport;
use crate::plan::BootPlan;
use crate::power::PowerManager;

pub use clock::{ClockSync, SyncReason};
pub use guest_report::GuestFacts;
pub use sleep::HeldAssertion;

/// A graceful poweroff never waits longer than this, whatever it is given (a huge
/// `stopTimeout` must not hang a shutdown): then the VM is forced off.
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long the backend's `start` and `force_stop` may take by default before the
/// supervisor gives up on them. Above the VZ backend's own bounds, whose messages say
/// more: 30 s per call (`limits::VZ_CALLBACK_TIMEOUT`), twice for a start that first
/// stops the VM an earlier boot left behind.
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a client waits for the reply to a request that may force a stop: the
/// supervisor's bound on it, and room for the reply.
pub const FORCED_STOP_REPLY_BOUND: Duration = Duration::from_secs(120);

/// How many notices `status` keeps (the most recent ones).
const MAX_NOTICES: usize = 16;

/// Timing and policy knobs. Tests shrink them to milliseconds.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// Power off after this long without a session; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// How long a graceful poweroff may take before it is forced (at most
    /// [`MAX_STOP_TIMEOUT`]).
    pub stop_timeout: Duration,
    /// How long a boot may take until the guest's sshd answers.
    pub boot_timeout: Duration,
    /// The guest port whose SSH banner means "ready".
    pub ready_port: u32,
    /// Where the guest console goes, named in boot errors.
    pub console_log: PathBuf,
    /// How long after "ready" to wait for the guest to say whether it has
    /// `/dev/kvm` (`guest_report`).
    pub guest_report_wait: Duration,
    /// How long the backend's `start` and `force_stop` may take before they are
    /// reported as failed ([`DEFAULT_BACKEND_TIMEOUT`]).
    pub backend_timeout: Duration,
    /// Keep the host from idle sleep while a session is open (`preventSleep`).
    pub prevent_sleep: bool,
    /// The host's power management: the assertion, and wake-ups.
    pub power: Arc<dyn PowerManager>,
    /// The guest port whose clock setter takes the host's time.
    pub clock_port: u32,
}

/// A boot plan and the warnings found while making it (e.g. "the client key was
/// missing and was made afresh", or a MAC address made anew), which `status` shows.
#[derive(Debug, Clone)]
pub struct PlannedBoot {
    pub plan: BootPlan,
    pub notices: Vec<String>,
}

/// What the supervisor asks of the state directory; the daemon implements it.
/// Each method may block on the file system: the supervisor calls them where that is
/// harmless.
pub trait StateKeeper: Send + Sync + 'static {
    /// A fresh, checked boot plan (config, artifacts, disk, keys), before each boot.
    fn plan_boot(&self) -> Result<PlannedBoot, String>;
    /// Deletes state (everything, or only the keys) while the VM is off.
    fn reset(&self, keys_only: bool) -> Result<Vec<PathBuf>, String>;
    /// Repairs what an ssh client needs on the host before each connection (e.g. a
    /// deleted `known_hosts`); returns what it repaired, as notices.
    fn before_connect(&self) -> Vec<String>;
    /// Records what the guest of a boot said about itself, where root's
    /// `darwin-vz-nix machines` reads it. Nothing by default.
    fn record_guest_report(&self, _report: &GuestReport) -> Result<(), String> {
        Ok(())
    }
}

/// The lifecycle of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
}

/// How long a boot took, from the moment it was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTiming {
    /// The plan was built and checked (config, artifacts, disk, keys).
    pub planned: Duration,
    /// The backend reported the VM started.
    pub vm_started: Duration,
    /// The guest's sshd answered.
    pub ready: Duration,
}

/// Something worth telling whoever looks at `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub message: String,
    /// How long ago it was noted.
    pub age: Duration,
}

/// What the supervisor and its VM are doing, at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub state: VmState,
    pub backend: &'static str,
    pub uptime: Duration,
    /// Since the VM became ready, while it runs.
    pub vm_uptime: Option<Duration>,
    /// Sessions: connections waiting for a boot, and open guest streams.
    pub connections: usize,
    /// Until the idle poweroff, while the idle clock runs.
    pub idle_remaining: Option<Duration>,
    pub boots: u64,
    pub last_boot: Option<BootTiming>,
    pub last_error: Option<String>,
    /// Most recent last.
    pub notices: Vec<Notice>,
    /// What the guest of the current (or last) boot said about `/dev/kvm`.
    pub guest_report: Option<GuestFacts>,
    pub sleep: SleepSnapshot,
    /// The last time the guest's clock was set (or failed to be).
    pub clock: Option<ClockSync>,
    /// When the host last woke from sleep, as far as this supervisor heard.
    pub host_woke: Option<SystemTime>,
    /// The lazy guest's lifecycle, when the daemon realises the guest itself.
    pub guest: Option<crate::guest::GuestStatus>,
}

/// The power assertion as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SleepSnapshot {
    /// `preventSleep`.
    pub enabled: bool,
    pub held: Option<HeldAssertion>,
    pub last_error: Option<String>,
    /// Why the host's wake-ups are not heard, if they are not.
    pub wake_error: Option<String>,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Nothing was running.
    AlreadyStopped,
    /// The guest powered off when asked.
    Graceful,
    /// The guest did not power off in time, or a forced stop was asked.
    Forced,
}

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopRequest {
    /// Pull the plug at once.
    pub force: bool,
    /// How long the guest may take to power off before it is forced (capped at
    /// [`MAX_STOP_TIMEOUT`]).
    pub timeout: Duration,
    /// Refuse (with [`SupervisorError::InUse`]) while a session is open, decided
    /// atomically with the stop itself.
    pub unless_in_use: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    BootFailed(String),
    #[error("timed out after {} waiting for {what}", seconds(*after))]
    Timeout { what: &'static str, after: Duration },
    #[error("{0}")]
    ConnectFailed(String),
    #[error("{0}")]
    StopFailed(String),
    #[error(
        "the VM is in use: {sessions} session(s) open (a build may be running); nothing was stopped"
    )]
    InUse { sessions: usize },
    #[error("{0}")]
    Internal(String),
    /// A boot waited for the guest to be realised, and the client's wait ran out.
    #[error(
        "timed out after {} waiting for the guest to be built ({progress}); `darwin-vz-nix status` shows how far it got",
        seconds(*after)
    )]
    GuestNotReady { after: Duration, progress: String },
}

/// `1.5 s`, `250 ms`: a duration for messages.
pub fn seconds(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else if duration.subsec_millis() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

/// `now + after`, or a moment so far ahead that it never comes when that overflows.
fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let far = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(after)
        .or_else(|| now.checked_add(far))
        .unwrap_or(now)
}

/// Who answers a build connection on the aarch64-linux alias.
enum Answer {
    Bootstrap,
    Guest,
    TimedOut,
}

/// The mutable part, under one lock.
#[derive(Debug)]
struct Life {
    vm: VmState,
    /// The current (or last) boot; events and tasks of other boots are ignored.
    boot: BootId,
    boots: u64,
    ready_at: Option<Instant>,
    connections: usize,
    /// When the idle poweroff is due; set while the VM runs with no session.
    idle_deadline: Option<Instant>,
    last_boot: Option<BootTiming>,
    last_error: Option<String>,
    notices: VecDeque<(Instant, String)>,
    /// What the guest of the current (or last) boot said about itself.
    guest_report: Option<GuestFacts>,
    clock: Option<ClockSync>,
    host_woke: Option<SystemTime>,
}

impl Life {
    /// Moves to `vm`, keeping the derived fields (uptime, idle clock) consistent.
    fn set_vm(&mut self, vm: VmState, idle_timeout: Option<Duration>) {
        match vm {
            VmState::Running if self.vm != VmState::Running => self.ready_at = Some(Instant::now()),
            VmState::Running | VmState::Stopping => {}
            VmState::Stopped | VmState::Starting | VmState::Failed => self.ready_at = None,
        }
        self.vm = vm;
        self.update_idle(idle_timeout);
    }

    /// Runs the idle clock exactly while the VM runs with no session; an already
    /// running clock keeps its deadline.
    fn update_idle(&mut self, idle_timeout: Option<Duration>) {
        let idle = self.vm == VmState::Running && self.connections == 0;
        if !idle {
            self.idle_deadline = None;
        } else if self.idle_deadline.is_none() {
            self.idle_deadline = idle_timeout.and_then(|t| Instant::now().checked_add(t));
        }
    }

    /// The VM of `boot` is gone (stopped, failed, or replaced by a newer boot).
    fn boot_over(&self, boot: BootId) -> bool {
        self.boot != boot || matches!(self.vm, VmState::Stopped | VmState::Failed)
    }
}

struct Inner {
    backend: Arc<dyn Backend>,
    keeper: Box<dyn StateKeeper>,
    options: SupervisorOptions,
    started: Instant,
    life: Mutex<Life>,
    changed: watch::Sender<u64>,
    /// Serialises the backend's lifecycle calls (`start`, `request_stop`,
    /// `force_stop`), as the `Backend` contract promises.
    lifecycle: tokio::sync::Mutex<()>,
    /// Serialises what writes the state directory (planning a boot, repairing
    /// before a connection, resetting): two writers of the same key file at once
    /// would trip over each other's temporary files.
    state_files: tokio::sync::Mutex<()>,
    /// The power assertion; see `sleep`.
    sleep: Mutex<sleep::SleepGuard>,
    /// Boots that became ready, for the clock task.
    clock_boots: mpsc::UnboundedSender<BootId>,
    /// Why wake-ups are not heard, if they are not.
    wake_error: Option<String>,
    /// The lazy guest, when the daemon realises the guest itself.
    guests: Option<crate::guest::Guests>,
}

impl Inner {
    fn life(&self) -> MutexGuard<'_, Life> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.life
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sleep_guard(&self) -> MutexGuard<'_, sleep::SleepGuard> {
        self.sleep
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes everyone who waits for a change.
    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Logs a notice and keeps it for `status`.
    fn note(&self, message: String) {
        tracing::warn!("{message}");
        keep_notice(&mut self.life().notices, Instant::now(), message);
    }

    /// Stops the VM of `boot` at once, unless a newer boot replaced it (then the
    /// backend touches nothing). For tasks that find their boot superseded.
    async fn force_stop_own(&self, boot: BootId) {
        let _calls = self.lifecycle.lock().await;
        let bound = self.options.backend_timeout;
        match tokio::time::timeout(bound, self.backend.force_stop(boot)).await {
            Ok(Ok(StopCall::Done)) => tracing::debug!("{boot}: its VM is stopped"),
            Ok(Ok(StopCall::NotCurrent)) => {
                tracing::debug!("{boot}: its VM is already gone; nothing to stop")
            }
            Ok(Err(e)) => tracing::warn!("{boot}: stopping its VM failed: {e}"),
            Err(_) => tracing::warn!(
                "{boot}: the backend did not confirm the stop within {}",
                seconds(bound)
            ),
        }
    }
}

/// Cheap to clone; all clones drive the same VM.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// Must be called inside a Tokio runtime: it starts the supervisor's tasks (the
    /// idle timer, the sleep assertion's bookkeeping, the clock syncs), which end
    /// when the last clone is dropped.
    pub fn new(
        backend: Arc<dyn Backend>,
        keeper: Box<dyn StateKeeper>,
        options: SupervisorOptions,
    ) -> Supervisor {
        Self::with_guests(backend, keeper, options, None)
    }

    /// Like `new`, with the lazy guest's lifecycle: boots wait for a guest that can
    /// boot (see `crate::guest`).
    pub fn with_guests(
        backend: Arc<dyn Backend>,
        keeper: Box<dyn StateKeeper>,
        options: SupervisorOptions,
        guests: Option<crate::guest::Guests>,
    ) -> Supervisor {
        let (changed, _) = watch::channel(0);
        let (clock_boots, boots) = mpsc::unbounded_channel();
        let (power_events, power) = mpsc::unbounded_channel();
        let wake_error = match options.power.watch(power_events) {
            Ok(()) => None,
            Err(e) => {
                tracing::info!(
                    "the host's wake-ups are not heard ({e}); the guest's clock is set at boot only"
                );
                Some(e.to_string())
            }
        };
        let sleep = sleep::SleepGuard::new(options.power.clone(), options.prevent_sleep);
        let inner = Arc::new(Inner {
            backend,
            keeper,
            options,
            started: Instant::now(),
            life: Mutex::new(Life {
                vm: VmState::Stopped,
                boot: BootId::default(),
                boots: 0,
                ready_at: None,
                connections: 0,
                idle_deadline: None,
                last_boot: None,
                last_error: None,
                notices: VecDeque::new(),
                guest_report: None,
                clock: None,
                host_woke: None,
            }),
            changed,
            lifecycle: tokio::sync::Mutex::new(()),
            state_files: tokio::sync::Mutex::new(()),
            sleep: Mutex::new(sleep),
            clock_boots,
            wake_error,
            guests,
        });
        tokio::spawn(idle::run(Arc::downgrade(&inner), inner.changed.subscribe()));
        tokio::spawn(sleep::run(
            Arc::downgrade(&inner),
            inner.changed.subscribe(),
        ));
        tokio::spawn(clock::run(Arc::downgrade(&inner), boots, power));
        Supervisor { inner }
    }

    pub fn options(&self) -> &SupervisorOptions {
        &self.inner.options
    }

    pub fn state(&self) -> VmState {
        self.inner.life().vm
    }

    pub fn snapshot(&self) -> Snapshot {
        let sleep = {
            let guard = self.inner.sleep_guard();
            SleepSnapshot {
                enabled: guard.enabled(),
                held: guard.held().cloned(),
                last_error: guard.last_error().map(str::to_string),
                wake_error: self.inner.wake_error.clone(),
            }
        };
        let life = self.inner.life();
        let now = Instant::now();
        Snapshot {
            state: life.vm,
            backend: self.inner.backend.name(),
            uptime: now.saturating_duration_since(self.inner.started),
            vm_uptime: life.ready_at.map(|t| now.saturating_duration_since(t)),
            connections: life.connections,
            idle_remaining: life
                .idle_deadline
                .map(|deadline| deadline.saturating_duration_since(now)),
            boots: life.boots,
            last_boot: life.last_boot,
            last_error: life.last_error.clone(),
            notices: life
                .notices
                .iter()
                .map(|(at, message)| Notice {
                    message: message.clone(),
                    age: now.saturating_duration_since(*at),
                })
                .collect(),
            guest_report: life.guest_report.clone(),
            sleep,
            clock: life.clock.clone(),
            host_woke: life.host_woke,
            guest: self.inner.guests.as_ref().map(|g| g.status()),
        }
    }

    /// Lets the host sleep again for good, whatever is still open: the supervisor
    /// is shutting down.
    pub fn release_sleep_assertion(&self) {
        self.inner.sleep_guard().close();
    }

    /// Boots the VM unless it runs, and waits until the guest's sshd answers.
    /// Concurrent callers share one boot. Someone asked for it: a lazy guest whose
    /// realisation failed is retried at once.
    pub async fn ensure_running(
        &self,
        timeout: Duration,
    ) -> Result<Option<BootTiming>, SupervisorError> {
        if let Some(guests) = &self.inner.guests {
            guests.kick(true);
        }
        self.ensure_boot(timeout).await.map(|(_, timing)| timing)
    }

    /// Like `ensure_running`, also naming the boot that runs.
    async fn ensure_boot(
        &self,
        timeout: Duration,
    ) -> Result<(BootId, Option<BootTiming>), SupervisorError> {
        self.ensure_boot_by(deadline_after(timeout), timeout).await
    }

    /// `ensure_boot` until `deadline`; a timeout error says `timeout`, the client's
    /// whole wait.
    async fn ensure_boot_by(
        &self,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(BootId, Option<BootTiming>), SupervisorError> {
        let mut changes = self.inner.changed.subscribe();
        let mut joined: Option<BootId> = None;
        loop {
            {
                let mut life = self.inner.life();
                match life.vm {
                    VmState::Running => return Ok((life.boot, life.last_boot)),
                    VmState::Stopped | VmState::Failed => {
                        if joined == Some(life.boot) {
                            let why = life.last_error.clone().unwrap_or_else(|| {
                                "the VM was stopped before it became ready".into()
                            });
                            return Err(SupervisorError::BootFailed(why));
                        }
                        let boot = life.boot.next();
                        life.boot = boot;
                        life.boots = life.boots.saturating_add(1);
                        life.last_error = None;
                        life.set_vm(VmState::Starting, self.inner.options.idle_timeout);
                        joined = Some(boot);
                        tokio::spawn(boot::run(self.inner.clone(), boot));
                        drop(life);
                        self.inner.notify();
                    }
                    // Follow the boot under way, whoever asked for it.
                    VmState::Starting => joined = Some(life.boot),
                    // A stop is under way; once it is done, boot again.
                    VmState::Stopping => {}
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                if let Some(guests) = &self.inner.guests
                    && guests.bootable().is_none()
                {
                    return Err(SupervisorError::GuestNotReady {
                        after: timeout,
                        progress: guests.waiting_for(),
                    });
                }
                return Err(SupervisorError::Timeout {
                    what: "the guest's sshd to answer",
                    after: timeout,
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
        let deadline = deadline_after(timeout);
        let mut changes = self.inner.changed.subscribe();
        loop {
            {
                let life = self.inner.life();
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
                    after: timeout,
                });
            }
        }
    }

    /// Powers the VM off: asks the guest first (unless `force`), pulls the plug after
    /// the timeout. Concurrent stops share one.
    pub async fn stop(&self, request: StopRequest) -> Result<StopOutcome, SupervisorError> {
        let mut changes = self.inner.changed.subscribe();
        let (boot, was_starting) = loop {
            {
                let mut life = self.inner.life();
                match life.vm {
                    VmState::Stopped | VmState::Failed => return Ok(StopOutcome::AlreadyStopped),
                    VmState::Starting | VmState::Running => {
                        if request.unless_in_use && life.connections > 0 {
                            return Err(SupervisorError::InUse {
                                sessions: life.connections,
                            });
                        }
                        let was_starting = life.vm == VmState::Starting;
                        life.set_vm(VmState::Stopping, self.inner.options.idle_timeout);
                        break (life.boot, was_starting);
                    }
                    VmState::Stopping => {}
                }
            }
            // Someone else is stopping it; wait for them.
            let _ = changes.changed().await;
        };
        self.inner.notify();
        tracing::info!(
            "{boot}: stopping{}",
            if request.force { " (forced)" } else { "" }
        );

        // A guest still booting cannot act on the power button.
        if !request.force && !was_starting {
            let call = {
                let _calls = self.inner.lifecycle.lock().await;
                self.inner.backend.request_stop(boot).await
            };
            match call {
                Ok(StopCall::Done) => {
                    let timeout = request.timeout.min(MAX_STOP_TIMEOUT);
                    if let Some(outcome) = self.wait_stopped(boot, timeout, &mut changes).await {
                        return outcome;
                    }
                    tracing::warn!(
                        "the guest did not power off within {}; forcing",
                        seconds(timeout)
                    );
                }
                // The backend holds no VM of this boot: nothing to ask.
                Ok(StopCall::NotCurrent) => {
                    self.finish_stop(boot, VmState::Stopped, None);
                    return Ok(StopOutcome::AlreadyStopped);
                }
                Err(e) => tracing::warn!("graceful stop failed ({e}); forcing"),
            }
        }
        let result = {
            let _calls = self.inner.lifecycle.lock().await;
            tokio::time::timeout(
                self.inner.options.backend_timeout,
                self.inner.backend.force_stop(boot),
            )
            .await
        };
        match result {
            Ok(Ok(_)) => {
                self.finish_stop(boot, VmState::Stopped, None);
                Ok(StopOutcome::Forced)
            }
            Ok(Err(e)) => {
                self.finish_stop(boot, VmState::Failed, Some(e.to_string()));
                Err(SupervisorError::StopFailed(e.to_string()))
            }
            Err(_) => {
                let message = format!(
                    "the VM backend did not confirm the stop within {}",
                    seconds(self.inner.options.backend_timeout)
                );
                self.finish_stop(boot, VmState::Failed, Some(message.clone()));
                Err(SupervisorError::StopFailed(message))
            }
        }
    }

    /// Waits up to `timeout` for the guest of `boot` to power off; `None` on timeout.
    async fn wait_stopped(
        &self,
        boot: BootId,
        timeout: Duration,
        changes: &mut watch::Receiver<u64>,
    ) -> Option<Result<StopOutcome, SupervisorError>> {
        let deadline = deadline_after(timeout);
        loop {
            {
                let life = self.inner.life();
                if life.boot != boot || life.vm != VmState::Stopping {
                    return Some(match life.vm {
                        VmState::Failed => Err(SupervisorError::StopFailed(
                            life.last_error
                                .clone()
                                .unwrap_or_else(|| "the VM failed while powering off".into()),
                        )),
                        _ => Ok(StopOutcome::Graceful),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Ends the stop of `boot` in `vm`, unless something else (a guest event) already
    /// ended it.
    fn finish_stop(&self, boot: BootId, vm: VmState, error: Option<String>) {
        let mut life = self.inner.life();
        if life.boot == boot && life.vm == VmState::Stopping {
            life.set_vm(vm, self.inner.options.idle_timeout);
            if error.is_some() {
                life.last_error = error;
            }
        }
        drop(life);
        self.inner.notify();
    }

    /// A stream to a guest port, booting the VM first if needed. The returned
    /// descriptor is the caller's to hand out; the supervisor keeps its own watch on
    /// the stream and counts it as a session until the stream ends (see `session`).
    pub async fn connect(&self, port: u32, timeout: Duration) -> Result<OwnedFd, SupervisorError> {
        self.connect_by(port, deadline_after(timeout), timeout)
            .await
    }

    /// `connect` until `deadline` (`timeout` is the client's whole wait, for
    /// messages).
    async fn connect_by(
        &self,
        port: u32,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<OwnedFd, SupervisorError> {
        let lease = session::Lease::new(&self.inner);
        let (boot, _) = self.ensure_boot_by(deadline, timeout).await?;
        let repaired = {
            let _files = self.inner.state_files.lock().await;
            self.inner.keeper.before_connect()
        };
        for notice in repaired {
            self.inner.note(notice);
        }
        let mut last = None;
        // The guest answered the readiness probe, so this normally succeeds at once;
        // a few retries cover sshd being restarted by its socket unit.
        for _ in 0..10 {
            match self.inner.backend.connect(port).await {
                Ok(stream) => return session::open(&self.inner, boot, stream, lease),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(SupervisorError::ConnectFailed(
            last.map_or_else(|| "no attempt".into(), |e| e.to_string()),
        ))
    }

    /// A stream for a build connection: `connect`, except that while no guest can
    /// boot and the bootstrap builder runs (or comes up) for the first guest's
    /// build, a connection that may use it (`allow_bootstrap`: the aarch64-linux
    /// alias) gets the bootstrap builder instead of waiting for the guest — which
    /// is waiting for that very build.
    pub async fn connect_for_build(
        &self,
        port: u32,
        timeout: Duration,
        allow_bootstrap: bool,
    ) -> Result<OwnedFd, SupervisorError> {
        let deadline = deadline_after(timeout);
        if allow_bootstrap
            && port == self.inner.options.ready_port
            && let Some(guests) = &self.inner.guests
            && let Some(bootstrap) = guests.bootstrap()
        {
            match Self::who_answers(guests, bootstrap, deadline).await {
                Answer::Bootstrap => {
                    return bootstrap
                        .connect()
                        .await
                        .map_err(SupervisorError::ConnectFailed);
                }
                Answer::Guest => {}
                Answer::TimedOut => {
                    return Err(SupervisorError::GuestNotReady {
                        after: timeout,
                        progress: guests.waiting_for(),
                    });
                }
            }
        }
        self.connect_by(port, deadline, timeout).await
    }

    /// Waits (until `deadline`) until it is clear who answers a build connection:
    /// the bootstrap builder (running, no guest can boot), or the guest (one can
    /// boot, or no bootstrap builder is coming).
    async fn who_answers(
        guests: &crate::guest::Guests,
        bootstrap: &crate::bootstrap::Bootstrap,
        deadline: tokio::time::Instant,
    ) -> Answer {
        use crate::bootstrap::Phase;
        let mut guest_changes = guests.subscribe();
        let mut bootstrap_changes = bootstrap.subscribe();
        loop {
            guest_changes.borrow_and_update();
            bootstrap_changes.borrow_and_update();
            guests.kick(false);
            if guests.bootable().is_some() {
                return Answer::Guest;
            }
            match bootstrap.phase() {
                Phase::Running => return Answer::Bootstrap,
                Phase::Fetching | Phase::Booting => {}
                _ if guests.deciding_on_bootstrap() => {}
                _ => return Answer::Guest,
            }
            tokio::select! {
                changed = guest_changes.changed() => if changed.is_err() { return Answer::Guest },
                changed = bootstrap_changes.changed() => if changed.is_err() { return Answer::Guest },
                () = tokio::time::sleep_until(deadline) => return Answer::TimedOut,
            }
        }
    }

    /// Stops the VM (gracefully) and deletes state while nothing can boot.
    pub async fn reset(&self, keys_only: bool) -> Result<Vec<PathBuf>, SupervisorError> {
        // No boot plans (writes keys) while state is deleted.
        let _files = self.inner.state_files.lock().await;
        // Each round stops whatever a new connection booted meanwhile; a stream of
        // connections that keeps booting it wins after a few rounds.
        for _ in 0..5 {
            self.stop(StopRequest {
                force: false,
                timeout: self.inner.options.stop_timeout,
                unless_in_use: false,
            })
            .await?;
            let life = self.inner.life();
            if matches!(life.vm, VmState::Stopped | VmState::Failed) {
                // Holding the lock keeps a concurrent connect from booting meanwhile.
                return self
                    .inner
                    .keeper
                    .reset(keys_only)
                    .map_err(SupervisorError::Internal);
            }
        }
        Err(SupervisorError::Internal(
            "new connections kept booting the VM; nothing was deleted — try again".into(),
        ))
    }
}

/// Keeps `message` among the last `MAX_NOTICES` notices, dropping the oldest.
fn keep_notice(notices: &mut VecDeque<(Instant, String)>, at: Instant, message: String) {
    if notices.len() >= MAX_NOTICES {
        notices.pop_front();
    }
    notices.push_back((at, message));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_keeps_the_last_sixteen_notices() {
        let mut notices = VecDeque::new();
        let now = Instant::now();
        for n in 0..3 {
            keep_notice(&mut notices, now, format!("notice {n}"));
        }
        let kept = |notices: &VecDeque<(Instant, String)>| -> Vec<String> {
            notices.iter().map(|(_, m)| m.clone()).collect()
        };
        assert_eq!(kept(&notices), ["notice 0", "notice 1", "notice 2"]);
        for n in 3..40 {
            keep_notice(&mut notices, now, format!("notice {n}"));
        }
        let expected: Vec<String> = (24..40).map(|n| format!("notice {n}")).collect();
        assert_eq!(kept(&notices), expected);
    }

    #[test]
    fn a_deadline_that_would_overflow_is_a_century_away_not_now() {
        let now = tokio::time::Instant::now();
        let year = Duration::from_secs(365 * 24 * 3600);
        assert!(deadline_after(Duration::MAX) >= now + 99 * year);
        let soon = deadline_after(Duration::from_secs(5));
        assert!(soon >= now + Duration::from_secs(5) && soon < now + Duration::from_secs(60));
    }
}
