//! One boot, from plan to "guest sshd answered", and what its VM does on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{BootTiming, Inner, VmState, deadline_after, seconds};
use crate::backend::{Backend, BackendError, BackendEvent, BootId};

/// Runs boot `boot` to the end. Runs detached, so that a client giving up does not
/// abandon a half-started VM; every step first checks that `boot` is still the
/// current one, and a boot that finds itself superseded stops only its own VM.
pub(super) async fn run(inner: Arc<Inner>, boot: BootId) {
    let t0 = Instant::now();
    if let Some(guests) = inner.guests.clone() {
        match wait_for_guest(&inner, &guests, boot).await {
            GuestWait::Bootable => {}
            GuestWait::Superseded => {
                tracing::info!("{boot}: superseded while it waited for the guest");
                return;
            }
            GuestWait::Failed(message) => return fail(&inner, boot, message),
        }
    }
    let planned = {
        // One writer of the state directory at a time; a boot superseded while it
        // waited for its turn plans nothing.
        let _files = inner.state_files.lock().await;
        if !still_starting(&inner, boot) {
            tracing::info!("{boot}: superseded before it was planned");
            return;
        }
        // Planning touches the disk and may run ssh-keygen: off the async workers.
        let keeper = inner.clone();
        tokio::task::spawn_blocking(move || keeper.keeper.plan_boot()).await
    };
    let planned = match planned {
        Ok(Ok(planned)) => planned,
        Ok(Err(message)) => return fail(&inner, boot, message),
        Err(e) => return fail(&inner, boot, format!("planning the boot failed: {e}")),
    };
    for notice in planned.notices {
        inner.note(notice);
    }
    let plan = planned.plan;
    let nested_virtualization = plan.nested_virtualization.enabled;
    let planned_after = t0.elapsed();
    tracing::info!(
        "{boot}: booting: {} CPUs, {} MiB",
        plan.cpus,
        plan.memory_mib
    );
    tracing::debug!("{boot}: command line: {}", plan.command_line_string());

    let (events, receiver) = mpsc::unbounded_channel();
    tokio::spawn(pump_events(inner.clone(), boot, receiver));
    let started = {
        // Holding the lifecycle lock, no stop can slip in between this check and
        // the start: a boot superseded meanwhile never starts its VM.
        let _calls = inner.lifecycle.lock().await;
        if !still_starting(&inner, boot) {
            tracing::info!("{boot}: superseded before its VM started");
            return;
        }
        tokio::time::timeout(
            inner.options.backend_timeout,
            inner.backend.start(boot, plan, events),
        )
        .await
    };
    match started {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return fail(&inner, boot, e.to_string()),
        Err(_) => {
            let message = format!(
                "the VM backend did not confirm the start within {}",
                seconds(inner.options.backend_timeout)
            );
            fail(&inner, boot, message);
            // The VM may still come up later: make sure this boot's goes.
            inner.force_stop_own(boot).await;
            return;
        }
    }
    let vm_started = t0.elapsed();
    tracing::info!(
        "{boot}: VM started after {:.2} s; waiting for the guest's sshd",
        vm_started.as_secs_f64()
    );

    let deadline = deadline_after(inner.options.boot_timeout);
    let mut backoff = Duration::from_millis(20);
    loop {
        if !still_starting(&inner, boot) {
            // A stop or a crash ended this boot; make sure its VM goes too. The
            // backend ignores this when a newer boot has replaced it.
            inner.force_stop_own(boot).await;
            return;
        }
        match probe_ready(inner.backend.as_ref(), inner.options.ready_port).await {
            Ok(()) => break,
            Err(e) => tracing::trace!("{boot}: not ready yet: {e}"),
        }
        if tokio::time::Instant::now() >= deadline {
            inner.force_stop_own(boot).await;
            let message = format!(
                "the guest's sshd did not answer on vsock port {} within {}; see the guest console log {}",
                inner.options.ready_port,
                seconds(inner.options.boot_timeout),
                inner.options.console_log.display()
            );
            return fail(&inner, boot, message);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff.saturating_mul(3) / 2).min(Duration::from_millis(250));
    }

    let ready = t0.elapsed();
    let mut life = inner.life();
    if life.boot != boot || life.vm != VmState::Starting {
        // A stop took over after the probe; it stops this boot's VM.
        return;
    }
    life.last_boot = Some(BootTiming {
        planned: planned_after,
        vm_started,
        ready,
    });
    life.set_vm(VmState::Running, inner.options.idle_timeout);
    drop(life);
    tracing::info!("{boot}: guest ready after {:.2} s", ready.as_secs_f64());
    inner.notify();
    tokio::spawn(super::guest_report::follow(
        inner.clone(),
        boot,
        nested_virtualization,
    ));
    // The guest's clock starts from whatever the VM gave it: set it now.
    let _ = inner.clock_boots.send(boot);
}

enum GuestWait {
    Bootable,
    Superseded,
    Failed(String),
}

/// Waits until a guest can boot (realising the wanted one when it is missing), or
/// its realisation failed with no earlier guest to boot, or `boot` was superseded.
/// Bounded by the realisation's own bound; a stop ends it at once.
async fn wait_for_guest(inner: &Inner, guests: &crate::guest::Guests, boot: BootId) -> GuestWait {
    let mut guest_changes = guests.subscribe();
    let mut changes = inner.changed.subscribe();
    loop {
        guest_changes.borrow_and_update();
        changes.borrow_and_update();
        if !still_starting(inner, boot) {
            return GuestWait::Superseded;
        }
        guests.kick(false);
        if guests.bootable().is_some() {
            return GuestWait::Bootable;
        }
        if let Some(message) = guests.failure() {
            return GuestWait::Failed(message);
        }
        tokio::select! {
            changed = guest_changes.changed() => if changed.is_err() { return GuestWait::Superseded },
            changed = changes.changed() => if changed.is_err() { return GuestWait::Superseded },
        }
    }
}

fn still_starting(inner: &Inner, boot: BootId) -> bool {
    let life = inner.life();
    life.boot == boot && life.vm == VmState::Starting
}

fn fail(inner: &Inner, boot: BootId, message: String) {
    tracing::error!("{boot}: boot failed: {message}");
    let mut life = inner.life();
    if life.boot == boot && life.vm == VmState::Starting {
        life.set_vm(VmState::Failed, inner.options.idle_timeout);
        life.last_error = Some(message);
    }
    drop(life);
    inner.notify();
}

/// Applies what the VM of `boot` did on its own to the state machine.
async fn pump_events(
    inner: Arc<Inner>,
    boot: BootId,
    mut events: mpsc::UnboundedReceiver<BackendEvent>,
) {
    while let Some(event) = events.recv().await {
        let mut life = inner.life();
        if life.boot != boot {
            continue;
        }
        let (vm, error) = match (&event, life.vm) {
            (BackendEvent::StoppedByGuest, VmState::Starting) => (
                VmState::Failed,
                Some(format!(
                    "the guest powered off while booting; see the guest console log {}",
                    inner.options.console_log.display()
                )),
            ),
            (BackendEvent::StoppedByGuest, VmState::Running | VmState::Stopping) => {
                (VmState::Stopped, None)
            }
            (
                BackendEvent::Crashed(message),
                VmState::Starting | VmState::Running | VmState::Stopping,
            ) => (
                VmState::Failed,
                Some(format!(
                    "the VM stopped with an error: {message}; see the guest console log {}",
                    inner.options.console_log.display()
                )),
            ),
            _ => continue,
        };
        life.set_vm(vm, inner.options.idle_timeout);
        if error.is_some() {
            life.last_error = error;
        }
        tracing::info!("{boot}: VM event {event:?}: now {:?}", life.vm);
        drop(life);
        inner.notify();
    }
}

/// Connects to the guest port and waits for an SSH banner: proof that sshd itself
/// (not just a listening socket) answers.
async fn probe_ready(backend: &dyn Backend, port: u32) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let stream = backend
        .connect(port)
        .await
        .map_err(|e: BackendError| e.to_string())?;
    let (mut stream, _keepalive) = stream.into_tokio().map_err(|e| e.to_string())?;
    let read = async {
        let mut banner = Vec::new();
        let mut buf = [0u8; 256];
        while banner.len() < 4 {
            match stream.read(&mut buf).await {
                Ok(0) => return Err("closed before the SSH banner".to_string()),
                Ok(n) => banner.extend_from_slice(buf.get(..n).unwrap_or_default()),
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
    let result = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| "no SSH banner within 5 s".to_string())?;
    // The probe's stream ends here, in both directions (vsock has no half-close).
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&stream),
        nix::sys::socket::Shutdown::Both,
    );
    result
}
