//! What the guest says about itself after a boot: whether it has `/dev/kvm`.
//!
//! The guest prints one line on its console before its nix-daemon starts
//! (`nix/nixos/scripts/kvm.sh`): `darwin-vz-nix-kvm: present (Linux 6.12.5)` or
//! `… absent …`. Once the boot is ready, the supervisor reads the console log until
//! that line appears (or the wait runs out: `unknown`), keeps the answer for
//! `status`, and records it in the state directory, where root's `darwin-vz-nix
//! machines` reads it to take `kvm` and `nixos-test` away from a guest that has no
//! `/dev/kvm` (see `crate::nested`). A boot with nested virtualization whose guest
//! has none is said loudly: in the log, and in `status`.

use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use crate::backend::BootId;
use crate::nested::{self, GuestReport, Kvm, REPORT_VERSION};

/// How much of the console's end is searched for the line.
const CONSOLE_TAIL_BYTES: u64 = 1 << 20;

/// How often the console is read while waiting.
const POLL: Duration = Duration::from_millis(200);

/// What `status` shows about the guest of the current (or last) boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFacts {
    pub boot: BootId,
    /// The boot asked for nested virtualization.
    pub nested_virtualization: bool,
    /// `None` while the guest has not said yet.
    pub kvm: Option<Kvm>,
    pub kernel: Option<String>,
}

impl GuestFacts {
    /// The loud message for nested virtualization without `/dev/kvm`, if that is
    /// what happened.
    pub fn warning(&self) -> Option<String> {
        let kvm = self.kvm?;
        (self.nested_virtualization && kvm != Kvm::Present).then(|| {
            nested::missing_kvm(&GuestReport {
                version: REPORT_VERSION,
                boot: self.boot.0,
                nested_virtualization: true,
                kvm,
                kernel: self.kernel.clone(),
            })
        })
    }
}

/// Follows boot `boot` from "ready": waits for the guest's line, then records it.
pub(super) async fn follow(inner: Arc<Inner>, boot: BootId, nested_virtualization: bool) {
    set(&inner, boot, nested_virtualization, None, None);
    let deadline = super::deadline_after(inner.options.guest_report_wait);
    let marker = loop {
        if inner.life().boot_over(boot) {
            return;
        }
        let console = inner.options.console_log.clone();
        let found = tokio::task::spawn_blocking(move || {
            nested::console_tail(&console, CONSOLE_TAIL_BYTES)
                .and_then(|tail| nested::kvm_marker(&tail))
        })
        .await
        .ok()
        .flatten();
        if let Some(marker) = found {
            break marker;
        }
        if tokio::time::Instant::now() >= deadline {
            break nested::KvmMarker {
                kvm: Kvm::Unknown,
                kernel: None,
            };
        }
        tokio::time::sleep(POLL).await;
    };
    let facts = set(
        &inner,
        boot,
        nested_virtualization,
        Some(marker.kvm),
        marker.kernel.clone(),
    );
    let Some(facts) = facts else {
        return;
    };
    match facts.warning() {
        Some(warning) => inner.note(warning),
        None => tracing::info!(
            "{boot}: the guest's /dev/kvm is {} (nested virtualization {})",
            marker.kvm.as_str(),
            if nested_virtualization { "on" } else { "off" }
        ),
    }
    let report = GuestReport {
        version: REPORT_VERSION,
        boot: boot.0,
        nested_virtualization,
        kvm: marker.kvm,
        kernel: marker.kernel,
    };
    let recorded = {
        let _files = inner.state_files.lock().await;
        let keeper = inner.clone();
        tokio::task::spawn_blocking(move || keeper.keeper.record_guest_report(&report)).await
    };
    match recorded {
        Ok(Ok(())) => {}
        Ok(Err(message)) => inner.note(message),
        Err(e) => inner.note(format!("recording the guest's report failed: {e}")),
    }
}

/// Stores what is known about boot `boot`'s guest, unless a newer boot took over;
/// returns it.
fn set(
    inner: &Inner,
    boot: BootId,
    nested_virtualization: bool,
    kvm: Option<Kvm>,
    kernel: Option<String>,
) -> Option<GuestFacts> {
    let mut life = inner.life();
    if life.boot != boot {
        return None;
    }
    let facts = GuestFacts {
        boot,
        nested_virtualization,
        kvm,
        kernel,
    };
    life.guest_report = Some(facts.clone());
    drop(life);
    inner.notify();
    Some(facts)
}
