//! The lazy guest: the daemon builds the guest itself, when it is first needed.
//!
//! The nix-darwin switch (and `nix run … -- start`) carries only the guest's
//! derivation (`guestDrv`) and the output path it will build (`guestOut`), so it
//! needs no `aarch64-linux` builder. The daemon realises the derivation through the
//! nix-daemon, as its own unprivileged account:
//!
//! ```text
//!              daemon start, a boot that needs it, `start`, `bootstrap`
//!   missing ──────────────────────────────────────────────────────> realising ──> ready
//!      ^                                                               │
//!      └── retried by `start`/`bootstrap` at once, by a connection ─── failed
//!          only after RETRY_AFTER
//! ```
//!
//! What boots meanwhile: the guest the daemon booted before (the target of the GC
//! root `<state>/gcroots/guest`) keeps serving while a newer one is realised, and
//! after a failed realisation. The newer guest boots at the first boot after it is
//! ready. With no earlier guest a boot waits for the realisation, and fails with its
//! one-line reason when it fails.
//!
//! **GC roots.** The realisation keeps its output with `gcroots/guest-pending`; the
//! guest being booted is kept by `gcroots/guest`, replaced only when another guest
//! boots (the guest relies on it: it reads its system from the Mac's store, and
//! adopts only the case-hacked paths, see nix/nixos/store.nix).

pub mod nix;
pub mod progress;
pub(crate) mod run;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::bootstrap::{Bootstrap, BootstrapStatus};
use crate::state::StateDir;
use nix::{DryRun, NixStore};
use progress::{Cause, Progress};

/// The guest's derivation and the output path it builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    pub drv: PathBuf,
    pub out: PathBuf,
}

/// Bounds of the lifecycle. Tests shrink them.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// A realisation is stopped after this long (the first guest takes minutes,
    /// mostly fetching; this bound is for a hung one).
    pub realise_timeout: Duration,
    /// A failed realisation is retried by a connection only this long after it
    /// failed (`start` and `bootstrap` retry at once).
    pub retry_after: Duration,
    /// Bound of the short `nix-store` calls (dry run, GC root).
    pub short_timeout: Duration,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            realise_timeout: Duration::from_secs(4 * 3600),
            retry_after: Duration::from_secs(60),
            short_timeout: Duration::from_secs(600),
        }
    }
}

/// Where the lazy guest stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not in the store yet, and nothing is realising it.
    Missing,
    Realising,
    Ready,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Missing => "missing",
            Phase::Realising => "building",
            Phase::Ready => "ready",
            Phase::Failed => "failed",
        }
    }
}

/// The lazy guest at one instant, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStatus {
    pub phase: Phase,
    pub drv: PathBuf,
    pub out: PathBuf,
    /// The guest directory the next boot uses, if one can boot.
    pub next_boot: Option<PathBuf>,
    /// While realising: what it is doing (`3 of 41 derivations built, …`).
    pub progress: Option<String>,
    /// After a failure: the one-line reason with its fix.
    pub error: Option<String>,
    pub log: PathBuf,
    /// How long it has been realising, or since it failed.
    pub for_how_long: Option<Duration>,
    /// The bootstrap builder, when one is configured and not off.
    pub bootstrap: Option<BootstrapStatus>,
}

/// What a realisation is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// `nix-store --realise --dry-run`: what will be built and fetched.
    Planning,
    /// Bringing up the bootstrap builder for the guest's aarch64-linux builds.
    Bootstrapping { plan: String },
    /// `nix-store --realise`: building and fetching.
    Building { plan: Option<String> },
}

#[derive(Debug)]
enum LifePhase {
    Missing,
    Realising {
        since: Instant,
        step: Step,
        progress: Progress,
    },
    Ready,
    Failed {
        at: Instant,
        message: String,
    },
}

#[derive(Debug)]
struct Life {
    phase: LifePhase,
    /// An earlier guest the root keeps (booted before), while the wanted one is not
    /// ready.
    previous: Option<PathBuf>,
}

impl Life {
    /// The guest directory the next boot uses: the wanted guest (`out`) once ready,
    /// otherwise the earlier one, if any.
    fn next_boot(&self, out: &Path) -> Option<PathBuf> {
        match self.phase {
            LifePhase::Ready => Some(out.to_path_buf()),
            _ => self.previous.clone(),
        }
    }
}

struct Inner {
    spec: GuestSpec,
    state: StateDir,
    nix: NixStore,
    options: GuestOptions,
    life: Mutex<Life>,
    changed: watch::Sender<u64>,
    /// Brought up for the guest's aarch64-linux builds while no guest can boot.
    bootstrap: Option<Bootstrap>,
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
}

/// The lazy guest's lifecycle; cheap to clone.
#[derive(Clone)]
pub struct Guests {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Guests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guests")
            .field("spec", &self.inner.spec)
            .finish_non_exhaustive()
    }
}

/// The target of a GC root link, if it is one.
fn root_target(root: &Path) -> Option<PathBuf> {
    std::fs::read_link(root).ok()
}

impl Guests {
    /// Reads where things stand: the wanted guest is ready when the guest root
    /// already points at it; an earlier guest the root keeps can boot meanwhile.
    /// Starts nothing (see [`Guests::kick`]). `bootstrap`: the builder brought up
    /// when the guest needs an aarch64-linux build and no guest can boot.
    pub fn new(
        spec: GuestSpec,
        state: StateDir,
        nix: NixStore,
        options: GuestOptions,
        bootstrap: Option<Bootstrap>,
    ) -> Guests {
        let booted = root_target(&state.guest_root()).filter(|dir| dir.is_dir());
        let phase = if booted.as_deref() == Some(spec.out.as_path()) {
            LifePhase::Ready
        } else {
            LifePhase::Missing
        };
        let previous = booted.filter(|dir| *dir != spec.out);
        let (changed, _) = watch::channel(0);
        Guests {
            inner: Arc::new(Inner {
                spec,
                state,
                nix,
                options,
                life: Mutex::new(Life { phase, previous }),
                changed,
                bootstrap,
            }),
        }
    }

    /// The bootstrap builder, when one is configured.
    pub fn bootstrap(&self) -> Option<&Bootstrap> {
        self.inner.bootstrap.as_ref()
    }

    /// True while the realisation still decides whether it needs the bootstrap
    /// builder, or brings it up.
    pub fn deciding_on_bootstrap(&self) -> bool {
        matches!(
            self.inner.life().phase,
            LifePhase::Realising {
                step: Step::Planning | Step::Bootstrapping { .. },
                ..
            }
        )
    }

    pub fn spec(&self) -> &GuestSpec {
        &self.inner.spec
    }

    /// Bumped on every change of phase or progress.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Starts realising the wanted guest when it is missing, or when it failed and
    /// a retry is due: at once when `explicit` (someone asked: `start`,
    /// `bootstrap`), otherwise [`GuestOptions::retry_after`] after the failure.
    /// Must be called inside a Tokio runtime.
    pub fn kick(&self, explicit: bool) {
        let mut life = self.inner.life();
        let due = match &life.phase {
            LifePhase::Missing => true,
            LifePhase::Failed { at, .. } => {
                explicit || at.elapsed() >= self.inner.options.retry_after
            }
            LifePhase::Realising { .. } | LifePhase::Ready => false,
        };
        if !due {
            return;
        }
        life.phase = LifePhase::Realising {
            since: Instant::now(),
            step: Step::Planning,
            progress: Progress::default(),
        };
        drop(life);
        self.inner.notify();
        tracing::info!(
            "realising the guest {} ({})",
            self.inner.spec.out.display(),
            self.inner.spec.drv.display()
        );
        tokio::spawn(realise(self.inner.clone()));
    }

    /// The guest directory the next boot uses: the wanted guest once ready,
    /// otherwise the earlier one, if any.
    pub fn bootable(&self) -> Option<PathBuf> {
        self.inner.life().next_boot(&self.inner.spec.out)
    }

    /// Why no guest can boot: the failure, when the wanted guest failed and no
    /// earlier one exists. `None` while it can boot or is still being realised.
    pub fn failure(&self) -> Option<String> {
        let life = self.inner.life();
        match (&life.phase, &life.previous) {
            (LifePhase::Failed { message, .. }, None) => Some(message.clone()),
            _ => None,
        }
    }

    /// What a boot is waiting for, for a timeout message.
    pub fn waiting_for(&self) -> String {
        let status = self.status();
        let doing = match (&status.progress, &status.error) {
            (Some(progress), _) => format!("building: {progress}"),
            (None, Some(error)) => format!("failed: {error}"),
            (None, None) => status.phase.as_str().to_string(),
        };
        format!("{doing}; log {}", status.log.display())
    }

    pub fn status(&self) -> GuestStatus {
        let life = self.inner.life();
        let (phase, progress, error, since) = match &life.phase {
            LifePhase::Missing => (Phase::Missing, None, None, None),
            LifePhase::Realising {
                since,
                step,
                progress,
            } => {
                let text = match step {
                    Step::Planning => "planning (nix-store --realise --dry-run)".to_string(),
                    Step::Bootstrapping { plan } => {
                        format!("{plan}; bringing up the bootstrap builder for them first")
                    }
                    Step::Building { plan } => match plan {
                        Some(plan)
                            if progress.builds_expected == 0 && progress.fetches_expected == 0 =>
                        {
                            format!("{plan}; starting")
                        }
                        _ => progress.describe(),
                    },
                };
                (Phase::Realising, Some(text), None, Some(since.elapsed()))
            }
            LifePhase::Ready => (Phase::Ready, None, None, None),
            LifePhase::Failed { at, message } => (
                Phase::Failed,
                None,
                Some(message.clone()),
                Some(at.elapsed()),
            ),
        };
        GuestStatus {
            phase,
            drv: self.inner.spec.drv.clone(),
            out: self.inner.spec.out.clone(),
            next_boot: life.next_boot(&self.inner.spec.out),
            progress,
            error,
            log: self.inner.state.guest_build_log(),
            for_how_long: since,
            bootstrap: self
                .inner
                .bootstrap
                .as_ref()
                .map(Bootstrap::status)
                .filter(|b| b.phase != crate::bootstrap::Phase::Off),
        }
    }

    /// Keeps `dir`, the guest about to boot, with the GC root `gcroots/guest`,
    /// unless it already does; drops the pending root once the wanted guest has
    /// the boot root. Blocks (runs `nix-store`); returns notices for `status`.
    pub fn keep_booted(&self, dir: &Path) -> Vec<String> {
        let state = &self.inner.state;
        if root_target(&state.guest_root()).as_deref() == Some(dir) {
            return Vec::new();
        }
        if let Err(e) = state.create_gcroots_dir() {
            return vec![root_notice(dir, &e.to_string())];
        }
        let args = nix::root_args(dir, &state.guest_root());
        match run::blocking(
            &self.inner.nix,
            &args,
            state.root(),
            self.inner.options.short_timeout,
        ) {
            Ok(_) => {
                tracing::info!(
                    "{} keeps the booted guest {}",
                    state.guest_root().display(),
                    dir.display()
                );
                if dir == self.inner.spec.out {
                    let _ = std::fs::remove_file(state.pending_guest_root());
                    self.inner.life().previous = None;
                }
                Vec::new()
            }
            Err(message) => vec![root_notice(dir, &message)],
        }
    }
}

fn root_notice(dir: &Path, why: &str) -> String {
    format!(
        "could not keep a GC root for the booted guest {} ({why}); it boots anyway, but a garbage collection on the Mac could delete paths the guest reads",
        dir.display()
    )
}

/// Realises the wanted guest to the end: ready, or failed with a one-line reason.
async fn realise(inner: Arc<Inner>) {
    let outcome = realise_steps(&inner).await;
    let mut life = inner.life();
    life.phase = match outcome {
        Ok(()) => {
            tracing::info!("the guest {} is ready", inner.spec.out.display());
            LifePhase::Ready
        }
        Err(message) => {
            tracing::error!("{message}");
            LifePhase::Failed {
                at: Instant::now(),
                message,
            }
        }
    };
    drop(life);
    inner.notify();
}

async fn realise_steps(inner: &Arc<Inner>) -> Result<(), String> {
    let spec = &inner.spec;
    let state = &inner.state;
    state
        .create_gcroots_dir()
        .map_err(|e| format!("cannot make {}: {e}", state.gcroots_dir().display()))?;

    // What will be built and fetched: said in `status` until Nix counts itself.
    let plan = {
        let (nix, drv, home, timeout) = (
            inner.nix.clone(),
            spec.drv.clone(),
            state.root().to_path_buf(),
            inner.options.short_timeout,
        );
        tokio::task::spawn_blocking(move || dry_run(&nix, &drv, &home, timeout))
            .await
            .map_err(|e| format!("planning the guest's build failed: {e}"))?
    };
    let (plan_text, preamble, linux_builds) = match plan {
        Ok((dry, said)) => {
            let linux = dry.aarch64_linux_builds().len();
            (Some(describe_plan(&dry)), said, linux)
        }
        // Realising says the same, in more words; the dry run only informs.
        Err(message) => (None, message, 0),
    };

    // aarch64-linux builds and no guest to run them: the bootstrap builder.
    let no_guest = inner.life().previous.is_none();
    let bootstrap = inner
        .bootstrap
        .as_ref()
        .filter(|_| no_guest && linux_builds > 0);
    if let Some(bootstrap) = bootstrap {
        set_step(
            inner,
            Step::Bootstrapping {
                plan: format!("{linux_builds} aarch64-linux build(s) and no guest to run them"),
            },
        );
        let claim = bootstrap.up().await.map_err(|why| {
            format!(
                "the guest {} could not be built: it needs {linux_builds} aarch64-linux build(s), and {why}",
                spec.out.display()
            )
        })?;
        set_step(inner, Step::Building { plan: plan_text });
        let result = realise_guest(inner, &preamble).await;
        // Removed once the last build connection to it closed.
        tokio::spawn({
            let bootstrap = bootstrap.clone();
            async move { bootstrap.retire(claim).await }
        });
        return result;
    }
    set_step(inner, Step::Building { plan: plan_text });
    realise_guest(inner, &preamble).await
}

/// `nix-store --realise` of the guest, to its end.
async fn realise_guest(inner: &Arc<Inner>, preamble: &str) -> Result<(), String> {
    let spec = &inner.spec;
    let state = &inner.state;

    let args = nix::realise_args(&spec.drv, &state.pending_guest_root());
    let log = state.guest_build_log();
    let updates = inner.clone();
    let finished = run::logged(
        &inner.nix,
        &args,
        state.root(),
        (&log, preamble),
        inner.options.realise_timeout,
        move |progress| {
            let mut life = updates.life();
            if let LifePhase::Realising { progress: now, .. } = &mut life.phase {
                *now = progress.clone();
            }
            drop(life);
            updates.notify();
        },
    )
    .await
    .map_err(|message| {
        failed_message(
            spec,
            &log,
            &message,
            "install Nix (or put nix-store on the daemon's PATH), then run `darwin-vz-nix bootstrap`".into(),
        )
    })?;

    if !finished.success {
        let (why, fix) = explain(&finished.progress, &finished.status, state);
        return Err(failed_message(spec, &log, &why, fix));
    }
    if !spec.out.is_dir() {
        return Err(failed_message(
            spec,
            &log,
            &format!(
                "nix-store finished, but {} is not a directory: guestOut is not what guestDrv builds",
                spec.out.display()
            ),
            "set guestOut to the derivation's output (`nix-store --query --outputs GUEST_DRV`)"
                .into(),
        ));
    }
    Ok(())
}

fn set_step(inner: &Inner, step: Step) {
    let mut life = inner.life();
    if let LifePhase::Realising { step: now, .. } = &mut life.phase {
        *now = step;
    }
    drop(life);
    inner.notify();
}

/// How long a dry run may take when nothing else says (it asks the binary caches
/// about every path).
pub const DRY_RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// What realising `drv` would build and fetch (`nix-store --realise --dry-run`),
/// and Nix's words for it; bounded by `timeout`. Blocks.
pub fn dry_run(
    nix: &NixStore,
    drv: &Path,
    home: &Path,
    timeout: Duration,
) -> Result<(DryRun, String), String> {
    let output = run::blocking(nix, &nix::dry_run_args(drv), home, timeout)?;
    Ok((DryRun::parse(&output.stderr), output.stderr))
}

/// `dry_run` within [`DRY_RUN_TIMEOUT`], the plan only.
pub fn run_dry(nix: &NixStore, drv: &Path, home: &Path) -> Result<DryRun, String> {
    dry_run(nix, drv, home, DRY_RUN_TIMEOUT).map(|(dry, _)| dry)
}

/// `5 derivations to build, 812 paths to fetch`.
pub fn describe_plan(dry: &DryRun) -> String {
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut parts = Vec::new();
    if !dry.to_build.is_empty() {
        parts.push(format!(
            "{} to build",
            count(dry.to_build.len(), "derivation")
        ));
    }
    if !dry.to_fetch.is_empty() {
        parts.push(format!("{} to fetch", count(dry.to_fetch.len(), "path")));
    }
    if parts.is_empty() {
        "nothing to build or fetch".into()
    } else {
        parts.join(", ")
    }
}

/// The one line a failed realisation leaves: what failed, the log, the fix.
fn failed_message(spec: &GuestSpec, log: &Path, why: &str, fix: String) -> String {
    format!(
        "the guest {} could not be built: {why}; log {}; to fix: {fix}",
        spec.out.display(),
        log.display()
    )
}

/// Why a realisation failed, and the command that fixes it.
fn explain(progress: &Progress, status: &str, state: &StateDir) -> (String, String) {
    let said = progress
        .last_error
        .clone()
        .unwrap_or_else(|| format!("nix-store ended with {status}"));
    match Cause::of(progress) {
        Cause::Network => (
            format!("no binary cache could be reached ({said})"),
            "connect to the network, then run `darwin-vz-nix bootstrap`".into(),
        ),
        Cause::NoBuilder { system } => (
            format!("Nix has no {system} builder for it ({said})"),
            format!(
                "register this builder with Nix — `sudo darwin-vz-nix machines --state-dir {} --write {}` (the nix-darwin module does it at every switch) — then run `darwin-vz-nix bootstrap`",
                nix::shell_quote(&state.root().display().to_string()),
                crate::machines::NIX_MACHINES_FILE
            ),
        ),
        Cause::BuildFailed { drv } => (
            said,
            format!(
                "`nix log {drv}` shows why; change the guest's configuration (extraNixOSConfig), then run `darwin-vz-nix bootstrap`"
            ),
        ),
        Cause::Other => (
            said,
            "run `darwin-vz-nix bootstrap` to retry and see every step".into(),
        ),
    }
}
