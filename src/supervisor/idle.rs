//! The idle poweroff: one timer per supervisor.
//!
//! The state machine keeps an idle deadline while the VM runs with no session
//! (`Life::update_idle`). This one task sleeps until that deadline, re-reading it on
//! every change, so a session that opens and closes a thousand times re-arms the
//! same timer instead of leaving a thousand sleepers behind.

use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::sync::watch;

use super::{Inner, StopRequest, Supervisor, SupervisorError, VmState, seconds};

/// Runs until the supervisor is dropped (its change channel then closes).
pub(super) async fn run(inner: Weak<Inner>, mut changes: watch::Receiver<u64>) {
    loop {
        // Mark the current version seen before reading, so no change is missed.
        changes.borrow_and_update();
        let Some(deadline) = read_deadline(&inner) else {
            return;
        };
        let Some(deadline) = deadline else {
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                let Some(inner) = inner.upgrade() else { return };
                power_off_if_still_idle(inner).await;
            }
        }
    }
}

/// `None` when the supervisor is gone; otherwise its idle deadline, if any.
fn read_deadline(inner: &Weak<Inner>) -> Option<Option<Instant>> {
    let inner = inner.upgrade()?;
    let deadline = inner.life().idle_deadline;
    Some(deadline)
}

async fn power_off_if_still_idle(inner: Arc<Inner>) {
    let due = {
        let life = inner.life();
        life.vm == VmState::Running
            && life.connections == 0
            && life.idle_deadline.is_some_and(|d| d <= Instant::now())
    };
    if !due {
        return;
    }
    let idle = inner.options.idle_timeout.unwrap_or_default();
    tracing::info!("idle for {} with no session: powering off", seconds(idle));
    let timeout = inner.options.stop_timeout;
    let supervisor = Supervisor { inner };
    // `unless_in_use` decides atomically: a session that opened just now wins.
    match supervisor
        .stop(StopRequest {
            force: false,
            timeout,
            unless_in_use: true,
        })
        .await
    {
        Ok(outcome) => tracing::info!("idle poweroff: {outcome:?}"),
        Err(SupervisorError::InUse { .. }) => tracing::info!("idle poweroff skipped: in use"),
        Err(e) => tracing::error!("idle poweroff failed: {e}"),
    }
}
