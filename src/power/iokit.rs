//! IOKit power management (macOS only): the one module that names IOKit.
//!
//! * **The assertion** is `IOPMAssertionCreateWithName` of type
//!   `PreventUserIdleSystemSleep` (the Mac does not idle-sleep; the display still
//!   may, and closing the lid or choosing Sleep still sleeps it), released with
//!   `IOPMAssertionRelease`. A new count renames it in place
//!   (`IOPMAssertionSetProperty` with `kIOPMAssertionNameKey`, which powerd applies to
//!   a live assertion: `kAssertionModName` in `PMAssertions.c`); should that fail, a
//!   new one is taken before the old one goes, so the Mac is never unprotected in
//!   between. If the process dies
//!   without releasing it, powerd releases it: powerd watches every process that
//!   holds an assertion (`DISPATCH_PROC_EXIT`) and drops its assertions when it exits
//!   (`HandleProcessExit` in `pmconfigd/PMAssertions.c` of Apple's PowerManagement
//!   sources).
//! * **Wake-ups** come from `IORegisterForSystemPower`, delivered on a serial
//!   dispatch queue of our own (`IONotificationPortSetDispatchQueue`): no run loop
//!   and no GUI session needed, which is how powerd itself, a launchd daemon,
//!   listens (`pmconfigd/pmconfigd.m`). IOKit requires an answer to "may the system
//!   sleep?" and "the system will sleep" (`IOAllowPowerChange`); without one every
//!   sleep of the Mac waits 30 s.
//!
//! Names and signatures are those of objc2-io-kit 0.3.2 (generated from the SDK's
//! `IOPMLib.h`, `IOKitLib.h`, `IOMessage.h`); the assertion type and the name key
//! are CFSTR macros in `IOPMLib.h`, spelled out below.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use dispatch2::{DispatchQueue, DispatchRetained};
use objc2_core_foundation::CFString;
use objc2_io_kit::{
    IOAllowPowerChange, IODeregisterForSystemPower, IONotificationPort, IONotificationPortRef,
    IOPMAssertionCreateWithName, IOPMAssertionID, IOPMAssertionRelease, IOPMAssertionSetProperty,
    IORegisterForSystemPower, IOReturn, IOServiceClose, io_connect_t, io_object_t, io_service_t,
    kIOMessageCanSystemSleep, kIOMessageSystemHasPoweredOn, kIOMessageSystemWillSleep,
    kIOPMAssertionLevelOn, kIOReturnSuccess,
};
use tokio::sync::mpsc::UnboundedSender;

use super::{PowerError, PowerEvent, PowerManager};

/// `kIOPMAssertionTypePreventUserIdleSystemSleep` (`IOPMLib.h`).
const PREVENT_USER_IDLE_SYSTEM_SLEEP: &str = "PreventUserIdleSystemSleep";
/// `kIOPMAssertionNameKey` (`IOPMLib.h`).
const ASSERTION_NAME_KEY: &str = "AssertName";

/// `IOPMAssertionCreateWithName` takes names of at most this many characters.
const MAX_NAME_CHARS: usize = 128;

/// The assertion held now.
struct Held {
    id: IOPMAssertionID,
    reason: String,
}

/// What the notification callback needs; lives until the registration is gone and
/// no callback can run any more.
struct CallbackState {
    /// The root power domain connection, for `IOAllowPowerChange`; set before the
    /// first message can arrive.
    root_port: AtomicU32,
    events: UnboundedSender<PowerEvent>,
}

/// A registration for sleep/wake messages.
struct Registration {
    root_port: io_connect_t,
    port: IONotificationPortRef,
    notifier: io_object_t,
    queue: DispatchRetained<DispatchQueue>,
    /// Handed to IOKit as the callback's `refcon`.
    state: *mut CallbackState,
}

// SAFETY: the raw pointers are touched only in `Drop`, which follows IOKit's
// documented teardown (deregister, close, destroy the port) and frees the callback
// state on the notification queue, after any callback still running there. IOKit
// ports are not tied to the thread that made them.
unsafe impl Send for Registration {}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: the values IORegisterForSystemPower returned, each released once,
        // in the order its documentation gives.
        unsafe {
            IODeregisterForSystemPower(&mut self.notifier);
            IOServiceClose(self.root_port);
            IONotificationPort::destroy(self.port);
        }
        let state = SendPtr(self.state);
        // The queue is serial: this runs after any callback already queued.
        // SAFETY: made by Box::into_raw in `watch`, freed once, after the last
        // callback that could use it.
        self.queue.exec_async(move || unsafe { state.free() });
    }
}

/// The callback state on its way to the queue that frees it.
struct SendPtr(*mut CallbackState);

// SAFETY: the state is Send (an atomic and a channel sender); only the pointer moves.
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// # Safety
    /// The pointer came from `Box::into_raw` and nothing uses it any more.
    unsafe fn free(self) {
        // SAFETY: guaranteed by the caller.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// Power management through IOKit.
pub struct IoKitPower {
    held: Mutex<Option<Held>>,
    registration: Mutex<Option<Registration>>,
}

impl IoKitPower {
    pub fn new() -> IoKitPower {
        IoKitPower {
            held: Mutex::new(None),
            registration: Mutex::new(None),
        }
    }

    fn held(&self) -> MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for IoKitPower {
    fn drop(&mut self) {
        if let Some(held) = self.held().take() {
            release_assertion(held.id);
        }
    }
}

fn io_error(what: &str, code: IOReturn) -> PowerError {
    PowerError::Failed(format!("{what} failed with IOReturn {code:#x}"))
}

/// Releases an assertion this process created (each id once).
fn release_assertion(id: IOPMAssertionID) -> IOReturn {
    IOPMAssertionRelease(id)
}

impl PowerManager for IoKitPower {
    fn name(&self) -> &'static str {
        "IOKit"
    }

    fn hold(&self, reason: &str) -> Result<(), PowerError> {
        if reason.chars().count() > MAX_NAME_CHARS {
            return Err(PowerError::Failed(format!(
                "the assertion name {reason:?} is longer than {MAX_NAME_CHARS} characters"
            )));
        }
        let mut held = self.held();
        let name = CFString::from_str(reason);
        if let Some(current) = held.as_mut() {
            if current.reason == reason {
                return Ok(());
            }
            let key = CFString::from_str(ASSERTION_NAME_KEY);
            // SAFETY: a live assertion of this process; a CFString key and value.
            let code = unsafe { IOPMAssertionSetProperty(current.id, Some(&key), Some(&name)) };
            if code == kIOReturnSuccess {
                current.reason = reason.to_string();
                return Ok(());
            }
        }
        let kind = CFString::from_str(PREVENT_USER_IDLE_SYSTEM_SLEEP);
        let mut id: IOPMAssertionID = 0;
        // SAFETY: both strings are valid CFStrings, `id` a valid place for the result.
        let code = unsafe {
            IOPMAssertionCreateWithName(Some(&kind), kIOPMAssertionLevelOn, Some(&name), &mut id)
        };
        if code != kIOReturnSuccess {
            return Err(io_error("IOPMAssertionCreateWithName", code));
        }
        let old = held.replace(Held {
            id,
            reason: reason.to_string(),
        });
        if let Some(old) = old {
            let code = release_assertion(old.id);
            if code != kIOReturnSuccess {
                return Err(io_error(
                    "IOPMAssertionRelease of the previous assertion",
                    code,
                ));
            }
        }
        Ok(())
    }

    fn release(&self) -> Result<(), PowerError> {
        let Some(held) = self.held().take() else {
            return Ok(());
        };
        match release_assertion(held.id) {
            code if code == kIOReturnSuccess => Ok(()),
            code => Err(io_error("IOPMAssertionRelease", code)),
        }
    }

    fn watch(&self, events: UnboundedSender<PowerEvent>) -> Result<(), PowerError> {
        let mut registration = self.registration.lock().unwrap_or_else(|p| p.into_inner());
        if registration.is_some() {
            return Err(PowerError::Failed(
                "already watching the system's power events".into(),
            ));
        }
        let state = Box::into_raw(Box::new(CallbackState {
            root_port: AtomicU32::new(0),
            events,
        }));
        let mut port: IONotificationPortRef = std::ptr::null_mut();
        let mut notifier: io_object_t = 0;
        // SAFETY: `state` stays valid until the registration is dropped (see
        // `Registration::drop`); `port` and `notifier` are valid places to write.
        let root_port = unsafe {
            IORegisterForSystemPower(
                state.cast::<c_void>(),
                &mut port,
                Some(on_power_message),
                &mut notifier,
            )
        };
        if root_port == 0 || port.is_null() {
            // SAFETY: IOKit kept no reference to a state it did not register.
            drop(unsafe { Box::from_raw(state) });
            return Err(PowerError::Failed(
                "IORegisterForSystemPower failed: no sleep/wake notifications".into(),
            ));
        }
        // SAFETY: `state` is valid (above); no message is delivered before the port
        // has a queue.
        unsafe { (*state).root_port.store(root_port, Ordering::Release) };
        let queue = DispatchQueue::new("darwin-vz-nix.power", None);
        // SAFETY: a port IORegisterForSystemPower just made, and a serial queue that
        // the registration keeps alive.
        unsafe { IONotificationPort::set_dispatch_queue(port, Some(&queue)) };
        *registration = Some(Registration {
            root_port,
            port,
            notifier,
            queue,
            state,
        });
        Ok(())
    }
}

/// Called by IOKit on the registration's queue for every system power message.
unsafe extern "C-unwind" fn on_power_message(
    refcon: *mut c_void,
    _service: io_service_t,
    message: u32,
    argument: *mut c_void,
) {
    // SAFETY: `refcon` is the registration's CallbackState, freed only on this queue
    // after the registration is gone.
    let state = unsafe { &*refcon.cast::<CallbackState>() };
    // The notification id is the argument's bits, not an address.
    let notification = isize::from_ne_bytes(argument.addr().to_ne_bytes());
    let allow = || {
        let root_port = state.root_port.load(Ordering::Acquire);
        // Answering lets the sleep go ahead now instead of after a 30 s timeout;
        // the assertion, not this answer, is what keeps an idle Mac awake.
        IOAllowPowerChange(root_port, notification);
    };
    // IOKit's names, compared rather than matched (they are not Rust-style constants).
    if message == kIOMessageCanSystemSleep {
        allow();
    } else if message == kIOMessageSystemWillSleep {
        let _ = state.events.send(PowerEvent::WillSleep);
        allow();
    } else if message == kIOMessageSystemHasPoweredOn {
        let _ = state.events.send(PowerEvent::Woke);
    }
}
