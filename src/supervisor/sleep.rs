//! Keeping the Mac awake while builds run: the power assertion's bookkeeping.
//!
//! The assertion is held exactly while at least one build connection is open —
//! a session (see `session`) to a VM that is booting or running, or one relayed
//! to the bootstrap builder while the first guest is built (`crate::bootstrap`) —
//! and it is named after how many there are ("darwin-vz-nix: 2 Linux build connections"), so
//! `pmset -g assertions` tells the user why the Mac stays up. It goes when the last
//! connection closes, when the VM stops (its sessions end with it), and when the
//! supervisor shuts down ([`SleepGuard::close`]); if the process dies instead, the
//! system drops it (see `crate::power`). `preventSleep = false` never takes it.
//!
//! One task per supervisor follows the state machine's changes (and the bootstrap
//! builder's), like the idle timer;
//! the calls themselves go through a [`SleepGuard`] under a lock, so the task and
//! the shutdown never interleave them.

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use tokio::sync::watch;

use super::{Inner, Life, VmState};
use crate::power::{PowerManager, assertion_name};

/// The assertion as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldAssertion {
    /// Its name, as the host shows it.
    pub reason: String,
    /// When it was first taken (a rename keeps this).
    pub since: SystemTime,
}

/// Takes, renames and releases the assertion through a [`PowerManager`].
pub(super) struct SleepGuard {
    power: Arc<dyn PowerManager>,
    /// `preventSleep`.
    enabled: bool,
    held: Option<HeldAssertion>,
    last_error: Option<String>,
    /// The supervisor is shutting down: never take it again.
    closed: bool,
}

impl SleepGuard {
    pub(super) fn new(power: Arc<dyn PowerManager>, enabled: bool) -> SleepGuard {
        SleepGuard {
            power,
            enabled,
            held: None,
            last_error: None,
            closed: false,
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(super) fn held(&self) -> Option<&HeldAssertion> {
        self.held.as_ref()
    }

    pub(super) fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Holds the assertion under `wanted`, or none when `wanted` is `None`.
    pub(super) fn apply(&mut self, wanted: Option<String>) {
        let wanted = wanted.filter(|_| self.enabled && !self.closed);
        match (wanted, &self.held) {
            (Some(reason), Some(held)) if held.reason == reason => {}
            (Some(reason), held) => {
                let since = held
                    .as_ref()
                    .map_or_else(SystemTime::now, |held| held.since);
                match self.power.hold(&reason) {
                    Ok(()) => {
                        tracing::info!("keeping the Mac from idle sleep: {reason}");
                        self.held = Some(HeldAssertion { reason, since });
                        self.last_error = None;
                    }
                    Err(e) => self.failed(format!("cannot keep the Mac from idle sleep: {e}")),
                }
            }
            (None, Some(_)) => match self.power.release() {
                Ok(()) => {
                    tracing::info!("the Mac may idle-sleep again");
                    self.held = None;
                    self.last_error = None;
                }
                // Still held as far as we know: the next change tries again.
                Err(e) => self.failed(format!("cannot let the Mac sleep again: {e}")),
            },
            (None, None) => {}
        }
    }

    /// Releases the assertion for good: the supervisor is shutting down.
    pub(super) fn close(&mut self) {
        self.closed = true;
        self.apply(None);
    }

    fn failed(&mut self, message: String) {
        // Once per distinct failure, not on every change.
        if self.last_error.as_deref() != Some(message.as_str()) {
            tracing::warn!("{message}");
        }
        self.last_error = Some(message);
    }
}

/// The assertion the state machine asks for: one while a build connection is open
/// to a VM that is booting or running, or to the bootstrap builder
/// (`bootstrap_sessions`: none unless it runs).
fn wanted(life: &Life, bootstrap_sessions: usize) -> Option<String> {
    let up = matches!(life.vm, VmState::Starting | VmState::Running);
    let guest_sessions = if up { life.connections } else { 0 };
    let open = guest_sessions.saturating_add(bootstrap_sessions);
    (open > 0).then(|| assertion_name(open))
}

/// Follows the state machine, and the bootstrap builder when there is one, until
/// the supervisor is dropped.
pub(super) async fn run(inner: Weak<Inner>, mut changes: watch::Receiver<u64>) {
    let mut bootstrap_changes = inner.upgrade().and_then(|inner| {
        let bootstrap = inner.guests.as_ref()?.bootstrap()?;
        Some(bootstrap.subscribe())
    });
    loop {
        // Mark the current versions seen before reading, so no change is missed.
        changes.borrow_and_update();
        if let Some(bootstrap_changes) = &mut bootstrap_changes {
            bootstrap_changes.borrow_and_update();
        }
        {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let bootstrap_sessions = inner
                .guests
                .as_ref()
                .and_then(|guests| guests.bootstrap())
                .map_or(0, |bootstrap| bootstrap.open_sessions());
            let want = wanted(&inner.life(), bootstrap_sessions);
            inner.sleep_guard().apply(want);
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            changed = changed_or_never(bootstrap_changes.as_mut()) => {
                // The bootstrap builder is gone for good: follow the VM alone.
                if changed.is_err() {
                    bootstrap_changes = None;
                }
            }
        }
    }
}

/// The next change, or never when there is nothing to follow.
async fn changed_or_never(
    changes: Option<&mut watch::Receiver<u64>>,
) -> Result<(), watch::error::RecvError> {
    match changes {
        Some(changes) => changes.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::mpsc::UnboundedSender;

    use super::*;
    use crate::power::{PowerError, PowerEvent};

    /// Records calls; fails `hold` while `refuse` is set.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        refuse: Mutex<bool>,
    }

    impl PowerManager for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn hold(&self, reason: &str) -> Result<(), PowerError> {
            self.calls.lock().unwrap().push(format!("hold {reason}"));
            if *self.refuse.lock().unwrap() {
                return Err(PowerError::Failed("refused".into()));
            }
            Ok(())
        }
        fn release(&self) -> Result<(), PowerError> {
            self.calls.lock().unwrap().push("release".into());
            Ok(())
        }
        fn watch(&self, _events: UnboundedSender<PowerEvent>) -> Result<(), PowerError> {
            Ok(())
        }
    }

    fn guard(enabled: bool) -> (Arc<Recorder>, SleepGuard) {
        let recorder = Arc::new(Recorder::default());
        let guard = SleepGuard::new(recorder.clone(), enabled);
        (recorder, guard)
    }

    #[test]
    fn closing_releases_and_nothing_is_taken_afterwards() {
        let (recorder, mut guard) = guard(true);
        guard.apply(Some("a".into()));
        guard.close();
        guard.apply(Some("b".into()));
        assert_eq!(*recorder.calls.lock().unwrap(), ["hold a", "release"]);
        assert_eq!(guard.held(), None);
    }

    #[test]
    fn a_rename_keeps_the_first_time_and_an_unchanged_name_calls_nothing() {
        let (recorder, mut guard) = guard(true);
        guard.apply(Some("a".into()));
        let since = guard.held().unwrap().since;
        guard.apply(Some("a".into()));
        guard.apply(Some("b".into()));
        assert_eq!(guard.held().unwrap().since, since);
        assert_eq!(guard.held().unwrap().reason, "b");
        assert_eq!(*recorder.calls.lock().unwrap(), ["hold a", "hold b"]);
    }

    #[test]
    fn a_refused_hold_is_reported_and_tried_again_on_the_next_change() {
        let (recorder, mut guard) = guard(true);
        *recorder.refuse.lock().unwrap() = true;
        guard.apply(Some("a".into()));
        assert_eq!(guard.held(), None);
        assert_eq!(
            guard.last_error(),
            Some("cannot keep the Mac from idle sleep: refused")
        );
        *recorder.refuse.lock().unwrap() = false;
        guard.apply(Some("a".into()));
        assert_eq!(guard.held().unwrap().reason, "a");
        assert_eq!(guard.last_error(), None);
    }

    /// What is logged while `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_failure_repeated_on_every_change_is_logged_once() {
        let (recorder, mut guard) = guard(true);
        *recorder.refuse.lock().unwrap() = true;
        let log = logged(|| {
            for reason in ["a", "b", "c"] {
                guard.apply(Some(reason.into()));
            }
        });
        let warning = "cannot keep the Mac from idle sleep: refused";
        assert_eq!(log.matches(warning).count(), 1, "{log}");
        assert_eq!(recorder.calls.lock().unwrap().len(), 3, "each change tries");
    }

    #[test]
    fn disabled_never_calls_the_power_manager() {
        let (recorder, mut guard) = guard(false);
        guard.apply(Some("a".into()));
        guard.close();
        assert!(recorder.calls.lock().unwrap().is_empty());
    }
}
