//! The Virtualization.framework backend (macOS only): the one module that names VZ.
//!
//! It translates an already checked [`BootPlan`] into VZ objects (`config`), runs the
//! VM on its own serial dispatch queue (`machine`), and reports what the VM does on
//! its own through a delegate (`delegate`); the guest's connections to host ports arrive
//! through socket listeners set before each VM starts (`listener`). Decisions that need
//! no VZ object live in `crate::limits`, as plain functions over plain numbers tested
//! on every platform.
//!
//! # Availability
//!
//! The floor is macOS 13; [`VzBackend::new`] refuses older systems, so nothing below
//! needs its own check. Anything newer than 13 is guarded with `objc2::available!`:
//! today only nested virtualization (macOS 15). Minimum versions are from Apple's
//! Virtualization documentation; names and signatures from objc2-virtualization
//! 0.3.2 (see `notes/vz-api.md` in the project notes for where each was checked).
//!
//! # Bounded, and never two VMs on one disk
//!
//! `startWithCompletionHandler:` and a forced stop are awaited at most
//! `limits::VZ_CALLBACK_TIMEOUT` (30 s, as Lima waits for a stop). A call that does
//! not answer in time is reported as failed, and its VM stays in the slot: the next
//! start finds it and, unless it has stopped, stops it first, or refuses to boot —
//! a second VM must never open the same `disk.img`.
//!
//! | API | macOS |
//! |---|---|
//! | `VZVirtualMachine`: `isSupported`, `initWithConfiguration:queue:`, `state`, `setDelegate:`, `canRequestStop`, `requestStopWithError:`, `startWithCompletionHandler:`, `socketDevices` | 11.0 |
//! | `VZVirtualMachine`: `canStop`, `stopWithCompletionHandler:` | 12.0 |
//! | `VZVirtualMachineDelegate`: `guestDidStopVirtualMachine:`, `virtualMachine:didStopWithError:` | 11.0 |
//! | `VZVirtualMachineConfiguration`: `new`, `setBootLoader:`, `setCPUCount:`, `setMemorySize:`, `minimumAllowedCPUCount`, `maximumAllowedCPUCount`, `minimumAllowedMemorySize`, `maximumAllowedMemorySize`, `validateWithError:`, `setStorageDevices:`, `setNetworkDevices:`, `setSocketDevices:`, `setEntropyDevices:`, `setSerialPorts:`, `setMemoryBalloonDevices:` | 11.0 |
//! | `VZVirtualMachineConfiguration`: `setPlatform:`, `setDirectorySharingDevices:` | 12.0 |
//! | `VZGenericPlatformConfiguration` | 12.0 |
//! | `VZGenericPlatformConfiguration`: `isNestedVirtualizationSupported`, `setNestedVirtualizationEnabled:` (guarded) | 15.0 |
//! | `VZLinuxBootLoader`: `initWithKernelURL:`, `setInitialRamdiskURL:`, `setCommandLine:` | 11.0 |
//! | `VZDiskImageStorageDeviceAttachment`: `initWithURL:readOnly:cachingMode:synchronizationMode:error:`; `VZDiskImageCachingModeCached`; `VZDiskImageSynchronizationModeFsync` | 12.0 |
//! | `VZVirtioBlockDeviceConfiguration`: `initWithAttachment:` | 11.0 |
//! | `VZNATNetworkDeviceAttachment`, `VZVirtioNetworkDeviceConfiguration`, `setAttachment:`, `setMACAddress:`, `VZMACAddress`: `initWithString:` | 11.0 |
//! | `VZSharedDirectory`: `initWithURL:readOnly:`; `VZSingleDirectoryShare`: `initWithDirectory:` | 12.0 |
//! | `VZVirtioFileSystemDeviceConfiguration`: `validateTag:error:`, `initWithTag:`, `setShare:` | 12.0 |
//! | `VZLinuxRosettaDirectoryShare`: `availability`, `initWithError:` | 13.0 |
//! | `VZVirtioSocketDeviceConfiguration`; `VZVirtioSocketDevice`: `connectToPort:completionHandler:`; `VZVirtioSocketConnection`: `fileDescriptor`, `close` | 11.0 |
//! | `NSError`: `domain`, `code`, `localizedFailureReason` (to tell the missing entitlement) | Foundation |
//! | `VZVirtioSocketDevice`: `setSocketListener:forPort:`; `VZVirtioSocketListener`: `new`, `setDelegate:`; `VZVirtioSocketListenerDelegate`: `listener:shouldAcceptNewConnection:fromSocketDevice:` (`listener`) | 11.0 |
//! | `VZVirtioEntropyDeviceConfiguration` | 11.0 |
//! | `VZVirtioConsoleDeviceSerialPortConfiguration`, `VZSerialPortConfiguration.setAttachment:`, `VZFileSerialPortAttachment`: `initWithURL:append:error:` | 11.0 |
//! | `VZVirtioTraditionalMemoryBalloonDeviceConfiguration` | 11.0 |
//! | not used: `VZLinuxRosettaCachingOptions` and subclasses (would need a runtime check) | 14.0 |

mod config;
mod delegate;
mod listener;
mod machine;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use objc2::available;
use objc2_virtualization::VZVirtualMachine;
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::{
    Backend, BackendError, BackendEvent, BootId, BoxFuture, GuestConnections, GuestStream, StopCall,
};
use crate::doctor::PlatformFacts;
use crate::limits;
use crate::plan::BootPlan;
use machine::{Shared, StartRefusal};

/// How long one `connectToPort` may take. Apple documents that it "does nothing"
/// while the guest does not listen (in practice it fails with ECONNRESET); this
/// bound keeps a silent attempt from stalling the supervisor's readiness loop.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs VMs through Virtualization.framework.
///
/// Each VM is tagged with the supervisor's [`BootId`] (its `generation`), so a late
/// callback or a late stop of an old boot never touches a newer VM.
pub struct VzBackend {
    shared: Arc<Shared>,
    /// Host ports the guest may connect to (`listen`), set on every VM at its start.
    host_ports: Mutex<Vec<listener::HostPort>>,
}

impl VzBackend {
    pub fn new() -> Result<VzBackend, BackendError> {
        if !available!(macos = 13.0) {
            return Err(BackendError::Unsupported(
                "darwin-vz-nix needs macOS 13 (Ventura) or later; update macOS".into(),
            ));
        }
        Ok(VzBackend {
            shared: Shared::new(),
            host_ports: Mutex::new(Vec::new()),
        })
    }
}

impl Drop for VzBackend {
    fn drop(&mut self) {
        // Release any VM on its queue, never on whichever thread drops us.
        self.shared.release_all();
    }
}

/// The reply channel was dropped unanswered: VZ never called back.
fn unanswered(what: &str) -> String {
    format!("Virtualization.framework never answered the {what} request")
}

impl VzBackend {
    /// Starts the VM of `generation`, with a listener for each of `host_ports`,
    /// bounded by `VZ_CALLBACK_TIMEOUT`. A start that does not call back in time is
    /// reported as failed and its VM stays in the slot, where the next start finds it.
    async fn start_once(
        &self,
        generation: u64,
        plan: BootPlan,
        events: UnboundedSender<BackendEvent>,
        host_ports: Vec<listener::HostPort>,
    ) -> Result<(), StartRefusal> {
        let attempt = machine::on_queue(&self.shared, move |shared, reply| {
            // SAFETY: `on_queue` runs this closure on the VM queue.
            unsafe { machine::start(shared, plan, events, generation, host_ports, reply) }
        });
        match tokio::time::timeout(limits::VZ_CALLBACK_TIMEOUT, attempt).await {
            Ok(Some(result)) => result,
            Ok(None) => Err(StartRefusal::Failed(BackendError::Start(unanswered(
                "start",
            )))),
            Err(_) => Err(StartRefusal::Failed(BackendError::Start(
                limits::vz_timeout("start"),
            ))),
        }
    }

    /// Pulls the plug of boot `generation`'s VM, bounded by `VZ_CALLBACK_TIMEOUT`.
    /// On a timeout the VM stays in the slot (it may still stop later, or run).
    async fn force_stop_bounded(&self, generation: u64) -> Result<StopCall, BackendError> {
        let attempt = machine::on_queue(&self.shared, move |shared, reply| {
            // SAFETY: `on_queue` runs this closure on the VM queue.
            unsafe { machine::force_stop(shared, generation, reply) }
        });
        match tokio::time::timeout(limits::VZ_CALLBACK_TIMEOUT, attempt).await {
            Ok(Some(result)) => result,
            Ok(None) => Err(BackendError::Stop(unanswered("stop"))),
            Err(_) => Err(BackendError::Stop(limits::vz_timeout("forced stop"))),
        }
    }
}

impl Backend for VzBackend {
    fn name(&self) -> &'static str {
        "Virtualization.framework"
    }

    fn start(
        &self,
        boot: BootId,
        plan: BootPlan,
        events: UnboundedSender<BackendEvent>,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        let generation = boot.0;
        let host_ports = self
            .host_ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        Box::pin(async move {
            let refusal = match self
                .start_once(generation, plan.clone(), events.clone(), host_ports.clone())
                .await
            {
                Ok(()) => return Ok(()),
                Err(StartRefusal::Failed(error)) => return Err(error),
                Err(StartRefusal::Leftover { generation, state }) => (generation, state),
            };
            // Never two VMs on one disk image: the VM an earlier boot left behind
            // (its start or stop timed out) is stopped first, then this boot starts.
            let (leftover, state) = refusal;
            tracing::warn!("the VM of boot {leftover} is still {state}; stopping it first");
            let why = match self.force_stop_bounded(leftover).await {
                Ok(_) => match self.start_once(generation, plan, events, host_ports).await {
                    Ok(()) => return Ok(()),
                    Err(StartRefusal::Failed(error)) => return Err(error),
                    Err(StartRefusal::Leftover { .. }) => {
                        "it was still held after its stop was confirmed".to_string()
                    }
                },
                Err(error) => error.to_string(),
            };
            Err(BackendError::Start(limits::leftover_refused(
                leftover, state, &why,
            )))
        })
    }

    fn request_stop(&self, boot: BootId) -> BoxFuture<'_, Result<StopCall, BackendError>> {
        Box::pin(async move {
            machine::on_queue(&self.shared, move |shared, reply| {
                // SAFETY: `on_queue` runs this closure on the VM queue.
                unsafe { machine::request_stop(shared, boot.0, reply) }
            })
            .await
            .unwrap_or_else(|| Err(BackendError::Stop(unanswered("stop"))))
        })
    }

    fn force_stop(&self, boot: BootId) -> BoxFuture<'_, Result<StopCall, BackendError>> {
        Box::pin(self.force_stop_bounded(boot.0))
    }

    fn connect(&self, port: u32) -> BoxFuture<'_, Result<GuestStream, BackendError>> {
        Box::pin(async move {
            let attempt = machine::on_queue(&self.shared, move |shared, reply| {
                // SAFETY: `on_queue` runs this closure on the VM queue.
                unsafe { machine::connect(shared, port, reply) }
            });
            let reason = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Some(result)) => return result,
                Ok(None) => unanswered("connect"),
                Err(_) => format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            };
            Err(BackendError::Connect { port, reason })
        })
    }

    fn listen(&self, port: u32, connections: GuestConnections) -> Result<(), BackendError> {
        let mut ports = self
            .host_ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // One listener per port, as VZ has it: the latest call wins.
        ports.retain(|p| p.port != port);
        ports.push(listener::HostPort { port, connections });
        Ok(())
    }
}

pub use config::nested_virtualization_supported;

/// What Virtualization.framework says about this Mac, for `doctor`.
pub fn platform_facts() -> PlatformFacts {
    // SAFETY: a class property without preconditions, callable on any thread.
    let vz_supported = unsafe { VZVirtualMachine::isSupported() };
    let rosetta = if available!(macos = 13.0) {
        crate::limits::rosetta_fact(config::rosetta_availability())
    } else {
        Err("Rosetta for Linux VMs needs macOS 13 or later".to_string())
    };
    PlatformFacts {
        vz_supported: Some(vz_supported),
        rosetta: Some(rosetta),
    }
}
