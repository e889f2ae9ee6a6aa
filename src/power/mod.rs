//! The host's power management, as the supervisor needs it: keep the Mac from idle
//! sleep while builds run, and hear when it wakes up.
//!
//! The supervisor decides *when* (`supervisor::sleep` takes the assertion while a
//! build connection is open, `supervisor::clock` sets the guest's clock after a
//! wake); a [`PowerManager`] only does what it is told. On macOS that is IOKit
//! (`iokit`, the only code here that names it); elsewhere nothing can keep the
//! host awake, and [`Unsupported`] says so. Tests drive the supervisor with a fake
//! (`tests/support`).

#[cfg(target_os = "macos")]
mod iokit;

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

/// Something the host's power management reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// The host is about to sleep (it will, whatever we do).
    WillSleep,
    /// The host has woken up and its devices are back: a guest that stood still
    /// while it slept now lags by the time slept.
    Woke,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PowerError {
    /// This host has no power management the program can use.
    #[error("{0}")]
    Unsupported(String),
    /// The host refused or failed the request.
    #[error("{0}")]
    Failed(String),
}

/// What keeps the host awake and tells of its sleep. Calls are quick and may come
/// from any thread; the supervisor serialises `hold` and `release`.
pub trait PowerManager: Send + Sync + 'static {
    /// A short name for logs and `status`, e.g. "IOKit".
    fn name(&self) -> &'static str;

    /// Keeps the host from idle sleep under `reason`, the name the host shows for
    /// it (`pmset -g assertions` on macOS). While one is held, it takes the new
    /// reason instead: there is never more than one, and never a moment without.
    fn hold(&self, reason: &str) -> Result<(), PowerError>;

    /// Lets the host sleep again; does nothing when nothing is held.
    fn release(&self) -> Result<(), PowerError>;

    /// Sends the host's power events to `events` from now on, for as long as this
    /// manager lives. Called once.
    fn watch(&self, events: UnboundedSender<PowerEvent>) -> Result<(), PowerError>;
}

impl std::fmt::Debug for dyn PowerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A host whose sleep the program cannot prevent or hear (anything but macOS).
#[derive(Debug, Default)]
pub struct Unsupported;

impl Unsupported {
    fn error() -> PowerError {
        PowerError::Unsupported(format!(
            "preventing sleep and hearing wake-ups need macOS (this is {})",
            std::env::consts::OS
        ))
    }
}

impl PowerManager for Unsupported {
    fn name(&self) -> &'static str {
        "none"
    }

    fn hold(&self, _reason: &str) -> Result<(), PowerError> {
        Err(Self::error())
    }

    fn release(&self) -> Result<(), PowerError> {
        Ok(())
    }

    fn watch(&self, _events: UnboundedSender<PowerEvent>) -> Result<(), PowerError> {
        Err(Self::error())
    }
}

/// The power manager of this platform: IOKit on macOS, [`Unsupported`] elsewhere.
pub fn platform_power() -> Arc<dyn PowerManager> {
    #[cfg(target_os = "macos")]
    {
        Arc::new(iokit::IoKitPower::new())
    }
    #[cfg(not(target_os = "macos"))]
    {
        Arc::new(Unsupported)
    }
}

/// The name of the assertion while `connections` build connections are open, as
/// `pmset -g assertions` shows it: "darwin-vz-nix: 2 Linux build connections".
pub fn assertion_name(connections: usize) -> String {
    let plural = if connections == 1 { "" } else { "s" };
    format!("darwin-vz-nix: {connections} Linux build connection{plural}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assertion_name_counts_the_connections() {
        assert_eq!(assertion_name(1), "darwin-vz-nix: 1 Linux build connection");
        assert_eq!(
            assertion_name(2),
            "darwin-vz-nix: 2 Linux build connections"
        );
        // IOKit takes names of at most 128 characters.
        assert!(assertion_name(usize::MAX).len() <= 128);
    }

    #[test]
    fn without_macos_holding_is_refused_with_a_reason_and_release_is_harmless() {
        let power = Unsupported;
        let err = power.hold("x").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("preventing sleep and hearing wake-ups need macOS")
        );
        assert_eq!(power.release(), Ok(()));
    }
}
