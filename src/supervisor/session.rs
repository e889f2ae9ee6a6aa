//! Sessions: what keeps the VM in use.
//!
//! A session is a guest stream, not a process. ssh may move the stream's descriptor
//! into another process (`ssh -f` forks into the background, a `ControlMaster` serves
//! later sessions over its own connection), and a client may close its control
//! connection while it still uses the stream. So the supervisor keeps a duplicate of
//! every stream descriptor it hands out and watches it for the end of the stream:
//! the guest side closing (sshd exits when its session ends, when the client
//! disconnects, or when its `ClientAlive` probes go unanswered after the client
//! died), or the stream being shut down (the copying proxy does that when ssh goes).
//! It never reads from it, so every byte stays for whoever holds the other copies.
//!
//! Holding a duplicate means the guest cannot see a client that merely closes its
//! descriptor: such a stream ends only through the guest (for sshd, by `ClientAlive`
//! within about a minute) or a `shutdown`. vsock carries no half-close, so the end of
//! either direction is the end of the session.
//!
//! A session also ends when its boot's VM stops: its stream is dead then.

use std::any::Any;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{Inner, SupervisorError};
use crate::backend::{BootId, GuestStream};

/// Counts one session until dropped: from the connect request (while it waits for a
/// boot) to the end of its stream.
pub(super) struct Lease {
    inner: Arc<Inner>,
}

impl Lease {
    pub(super) fn new(inner: &Arc<Inner>) -> Lease {
        let mut life = inner.life();
        life.connections = life.connections.saturating_add(1);
        life.update_idle(inner.options.idle_timeout);
        drop(life);
        inner.notify();
        Lease {
            inner: inner.clone(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut life = self.inner.life();
        life.connections = life.connections.saturating_sub(1);
        life.update_idle(self.inner.options.idle_timeout);
        drop(life);
        self.inner.notify();
    }
}

/// Starts watching `stream` of `boot` and returns the descriptor to hand out. The
/// watcher holds the lease and the stream's keepalive until the stream ends.
pub(super) fn open(
    inner: &Arc<Inner>,
    boot: BootId,
    stream: GuestStream,
    lease: Lease,
) -> Result<OwnedFd, SupervisorError> {
    let (fd, keepalive) = stream.into_parts();
    // Without our own copy the session could not be followed; refuse rather than
    // hand out a stream that nothing counts.
    let watched = fd.try_clone().map_err(|e| {
        SupervisorError::ConnectFailed(format!("cannot keep track of the guest stream: {e}"))
    })?;
    tokio::spawn(watch(inner.clone(), boot, watched, keepalive, lease));
    Ok(fd)
}

async fn watch(
    inner: Arc<Inner>,
    boot: BootId,
    fd: OwnedFd,
    keepalive: Option<Box<dyn Any + Send>>,
    lease: Lease,
) {
    let mut changes = inner.changed.subscribe();
    // SAFETY: the `AsyncFd` owns `fd`, an open descriptor that nothing else closes or
    // replaces while it is registered.
    let stream = match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::warn!("cannot watch a guest stream ({e}); it counts until the VM stops");
            None
        }
    };
    loop {
        changes.borrow_and_update();
        if inner.life().boot_over(boot) {
            break;
        }
        tokio::select! {
            () = ended(stream.as_ref()) => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    tracing::debug!("{boot}: a session ended");
    // Our copy goes first, then whatever kept the stream alive, then the count.
    drop(stream);
    drop(keepalive);
    drop(lease);
}

/// Resolves when the stream has ended: nothing more can be read from it (the guest
/// closed its side, or someone shut the stream down) or it failed.
async fn ended(stream: Option<&AsyncFd<OwnedFd>>) {
    let Some(stream) = stream else {
        return std::future::pending().await;
    };
    loop {
        match stream.ready(Interest::READABLE).await {
            Ok(mut guard) => {
                let ready = guard.ready();
                if ready.is_read_closed() || ready.is_error() {
                    return;
                }
                // Only data for the holder of the other copy: not ours to read.
                guard.clear_ready();
            }
            Err(_) => return,
        }
    }
}
