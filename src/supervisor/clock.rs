//! The guest's clock follows the host's.
//!
//! A VZ guest's clock stands still while the Mac sleeps. So the supervisor gives the
//! running guest the host's time when each boot becomes ready and after each wake of
//! the Mac (`PowerEvent::Woke`), over guest vsock port `clock_port`, and records what
//! the guest corrected (`crate::clock` has the exchange). A wake while no VM runs
//! syncs nothing: the next boot does. The supervisor never pauses a VM, so there is
//! no resume of its own to follow.
//!
//! One task per supervisor does the syncs, one at a time; triggers that arrive while
//! one runs are served by a single sync after it (they would all send the same
//! "now"). A sync never counts as a session: it keeps neither the VM nor the Mac up.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, error::TryRecvError};

use super::{Inner, VmState, seconds};
use crate::backend::{Backend, BootId};
use crate::clock::{self, ClockStep, MAX_REPLY_BYTES};
use crate::power::PowerEvent;

/// Connection attempts per sync: the guest's clock socket may come up a moment after
/// its sshd answered.
const CONNECT_ATTEMPTS: u32 = 10;
const CONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// The guest answers within its own read timeout (5 s) plus the step itself.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a sync happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncReason {
    /// A boot became ready.
    Boot,
    /// The Mac woke from sleep.
    Wake,
}

impl SyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncReason::Boot => "boot",
            SyncReason::Wake => "wake",
        }
    }
}

/// The last sync: when, why, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockSync {
    pub at: SystemTime,
    pub reason: SyncReason,
    /// What the guest corrected, or why nothing was.
    pub result: Result<ClockStep, String>,
}

/// Runs until the supervisor is dropped (its trigger channel then closes).
pub(super) async fn run(
    inner: Weak<Inner>,
    mut boots: UnboundedReceiver<BootId>,
    mut power: UnboundedReceiver<PowerEvent>,
) {
    let mut power_open = true;
    loop {
        let woke = tokio::select! {
            boot = boots.recv() => match boot {
                Some(_) => false,
                None => return,
            },
            event = power.recv(), if power_open => match event {
                Some(PowerEvent::Woke) => true,
                Some(PowerEvent::WillSleep) => {
                    tracing::info!("the Mac is going to sleep");
                    continue;
                }
                None => {
                    power_open = false;
                    continue;
                }
            },
        };
        let Some(woke) = take_pending(&mut boots, &mut power, woke) else {
            return;
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let reason = if woke {
            inner.life().host_woke = Some(SystemTime::now());
            inner.notify();
            SyncReason::Wake
        } else {
            SyncReason::Boot
        };
        sync_running_guest(&inner, reason).await;
    }
}

/// Takes every trigger that arrived meanwhile, to be served by the same sync:
/// whether the sync is a wake's (it is if `woke`, or a wake is among them), or
/// `None` when the supervisor is gone.
fn take_pending(
    boots: &mut UnboundedReceiver<BootId>,
    power: &mut UnboundedReceiver<PowerEvent>,
    mut woke: bool,
) -> Option<bool> {
    loop {
        match boots.try_recv() {
            Ok(_) => {}
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => return None,
        }
    }
    while let Ok(event) = power.try_recv() {
        woke |= event == PowerEvent::Woke;
    }
    Some(woke)
}

/// Gives the running guest the host's time and records the outcome.
async fn sync_running_guest(inner: &Arc<Inner>, reason: SyncReason) {
    let boot = {
        let life = inner.life();
        (life.vm == VmState::Running).then_some(life.boot)
    };
    let Some(boot) = boot else {
        tracing::debug!(
            "{}: no VM runs; its next boot sets its clock",
            reason.as_str()
        );
        return;
    };
    let result = exchange(inner.backend.as_ref(), inner.options.clock_port).await;
    match &result {
        Ok(step) => tracing::info!(
            "{boot}: set the guest's clock ({}): {}",
            reason.as_str(),
            clock::describe_step(step.as_secs_f64())
        ),
        Err(e) => tracing::warn!(
            "{boot}: could not set the guest's clock ({}): {e}",
            reason.as_str()
        ),
    }
    let mut life = inner.life();
    // A sync that raced a stop or a newer boot says nothing about the VM now.
    if life.boot == boot {
        life.clock = Some(ClockSync {
            at: SystemTime::now(),
            reason,
            result,
        });
    }
    drop(life);
    inner.notify();
}

/// One exchange with the guest's clock setter on `port`.
async fn exchange(backend: &dyn Backend, port: u32) -> Result<ClockStep, String> {
    let mut last = None;
    let mut stream = None;
    for attempt in 1..=CONNECT_ATTEMPTS {
        match backend.connect(port).await {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(e) => last = Some(e.to_string()),
        }
        if attempt < CONNECT_ATTEMPTS {
            tokio::time::sleep(CONNECT_BACKOFF).await;
        }
    }
    let Some(stream) = stream else {
        return Err(format!(
            "the guest's clock setter on vsock port {port} did not answer ({}); a guest built before darwin-vz-nix set clocks lacks it",
            last.unwrap_or_default()
        ));
    };
    let (mut stream, _keepalive) = stream.into_tokio().map_err(|e| e.to_string())?;
    // The time is read as late as possible: right before it is sent.
    let request = clock::request_line(SystemTime::now()).map_err(|e| e.to_string())?;
    let talk = async {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send the time: {e}"))?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 128];
        while !reply.ends_with(b"\n") && reply.len() < MAX_REPLY_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(e) => return Err(format!("no answer from the guest: {e}")),
            }
        }
        reply.truncate(MAX_REPLY_BYTES);
        clock::parse_reply(&reply).map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(REPLY_TIMEOUT, talk)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}", seconds(REPLY_TIMEOUT))));
    // vsock has no half-close: end both directions together.
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&stream),
        nix::sys::socket::Shutdown::Both,
    );
    result
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc::unbounded_channel;

    use super::*;

    #[test]
    fn triggers_that_arrived_during_a_sync_make_one_sync_a_wake_if_one_was_a_wake() {
        let (boot_triggers, mut boots) = unbounded_channel();
        let (power_events, mut power) = unbounded_channel();
        let pending = |boots: &mut _, power: &mut _, woke| take_pending(boots, power, woke);

        boot_triggers.send(BootId(2)).unwrap();
        power_events.send(PowerEvent::WillSleep).unwrap();
        assert_eq!(pending(&mut boots, &mut power, false), Some(false));

        boot_triggers.send(BootId(3)).unwrap();
        power_events.send(PowerEvent::WillSleep).unwrap();
        power_events.send(PowerEvent::Woke).unwrap();
        assert_eq!(pending(&mut boots, &mut power, false), Some(true));
        assert!(
            boots.try_recv().is_err() && power.try_recv().is_err(),
            "all taken"
        );

        assert_eq!(pending(&mut boots, &mut power, true), Some(true));
        drop(boot_triggers);
        assert_eq!(pending(&mut boots, &mut power, false), None);
    }
}
