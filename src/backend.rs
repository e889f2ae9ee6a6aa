//! The small interface between the supervisor and whatever runs the VM.
//!
//! On macOS the implementation is the Virtualization.framework backend (`crate::vz`).
//! Tests implement it with a fake VM whose guest port 22 is a real `sshd -i`; that
//! implementation lives in `tests/support`, never in the shipped binary.

use std::any::Any;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;

use tokio::sync::mpsc::UnboundedSender;

/// Where a backend hands the guest's connections to a host port (see
/// [`Backend::listen`]).
pub type GuestConnections = UnboundedSender<GuestStream>;

use crate::plan::BootPlan;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something the VM did on its own, reported by the backend at any time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    /// The guest powered off (or rebooted, which VZ turns into a stop).
    StoppedByGuest,
    /// The VM stopped because of an error.
    Crashed(String),
}

/// A connected byte stream to a guest vsock port.
///
/// `fd` is a stream socket the holder reads and writes; it can be passed to another
/// process with `SCM_RIGHTS`. `keepalive` is whatever must live as long as the stream
/// (VZ closes the connection's descriptor when its `VZVirtioSocketConnection` is
/// released; the test backend keeps its `sshd` child here).
pub struct GuestStream {
    fd: OwnedFd,
    keepalive: Option<Box<dyn Any + Send>>,
}

impl GuestStream {
    pub fn new(fd: OwnedFd, keepalive: Option<Box<dyn Any + Send>>) -> GuestStream {
        GuestStream { fd, keepalive }
    }

    /// Splits the stream into its descriptor and the object that keeps it alive.
    pub fn into_parts(self) -> (OwnedFd, Option<Box<dyn Any + Send>>) {
        (self.fd, self.keepalive)
    }

    /// The stream as a Tokio stream, and the object that keeps it alive (hold it as
    /// long as the stream). Both backends hand out Unix stream sockets (VZ's
    /// connection descriptor is an AF_UNIX socket to the framework; the test backend
    /// uses a socketpair). Must be called inside a Tokio runtime.
    pub fn into_tokio(
        self,
    ) -> std::io::Result<(tokio::net::UnixStream, Option<Box<dyn Any + Send>>)> {
        let stream = std::os::unix::net::UnixStream::from(self.fd);
        stream.set_nonblocking(true)?;
        Ok((tokio::net::UnixStream::from_std(stream)?, self.keepalive))
    }
}

impl AsFd for GuestStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl std::fmt::Debug for GuestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestStream")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// This build cannot run VMs here: not macOS, too old a macOS, or a binary
    /// without the virtualization entitlement (VZ's invalid-configuration error
    /// that names it, with the codesign command as the fix).
    #[error("{0}")]
    Unsupported(String),
    /// The configuration or host is not fit for this plan (caught before starting).
    #[error("{0}")]
    Invalid(String),
    /// The VM did not start.
    #[error("the VM failed to start: {0}")]
    Start(String),
    /// Stopping failed.
    #[error("the VM failed to stop: {0}")]
    Stop(String),
    /// Nothing accepted the connection (yet): the guest is not listening on the port.
    #[error("guest port {port} refused the connection: {reason}")]
    Connect { port: u32, reason: String },
    #[error("the VM is not running")]
    NotRunning,
}

/// Identifies one boot. The supervisor numbers its boots 1, 2, 3, … and names the
/// boot in every lifecycle call, so that a task acting late (a boot that was
/// superseded, a timeout that fired after a retry) can only ever touch its own VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BootId(pub u64);

impl BootId {
    /// The id of the boot after this one.
    pub fn next(self) -> BootId {
        BootId(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for BootId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "boot {}", self.0)
    }
}

/// What a stop call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCall {
    /// It acted on the named boot's VM (or found that VM already stopped).
    Done,
    /// The named boot's VM is not the backend's current one (a newer boot replaced
    /// it, or it was already released): nothing was touched.
    NotCurrent,
}

/// What the supervisor needs from a VM runner. The supervisor never overlaps
/// `start`, `request_stop` and `force_stop` calls; `connect` may run concurrently
/// with itself and with them.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and `status`, e.g. "Virtualization.framework".
    fn name(&self) -> &'static str;

    /// Creates and starts the VM of `boot` from `plan`, which becomes the backend's
    /// current VM (replacing any older one); resolves once the VM runs (the guest may
    /// still be booting). Later events of this VM go to `events`.
    fn start(
        &self,
        boot: BootId,
        plan: BootPlan,
        events: UnboundedSender<BackendEvent>,
    ) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Asks the guest of `boot` to power off (ACPI power button). Resolves when the
    /// request was delivered; the stop itself arrives later as
    /// `BackendEvent::StoppedByGuest`. `NotCurrent` when `boot` is not the current VM.
    fn request_stop(&self, boot: BootId) -> BoxFuture<'_, Result<StopCall, BackendError>>;

    /// Stops the VM of `boot` at once, like pulling the plug; resolves when it has
    /// stopped. `NotCurrent`, touching nothing, when `boot` is not the current VM.
    fn force_stop(&self, boot: BootId) -> BoxFuture<'_, Result<StopCall, BackendError>>;

    /// Opens a stream to a guest vsock port of the current VM. Fails with `Connect`
    /// while nothing listens.
    fn connect(&self, port: u32) -> BoxFuture<'_, Result<GuestStream, BackendError>>;

    /// Accepts the guest's connections to host vsock `port` (the guest dials CID 2)
    /// on every VM started from now on, for the VM's whole life, and hands each to
    /// `connections` as a stream. Call it before the first `start`. The host listens
    /// on vsock only, never on TCP or UDP. By default a backend cannot do this.
    fn listen(&self, port: u32, connections: GuestConnections) -> Result<(), BackendError> {
        drop(connections);
        Err(BackendError::Unsupported(format!(
            "the {} backend cannot accept guest connections (host port {port})",
            self.name()
        )))
    }
}
