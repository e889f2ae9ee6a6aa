//! The VM's delegate: turns "the guest powered off" and "the VM stopped with an
//! error" into `BackendEvent`s, and lets the stopped VM go.
//!
//! VZ calls the delegate on the VM's queue and holds it weakly, so `Running` keeps
//! the strong reference for as long as the VM lives.

use std::sync::Weak;

use objc2::rc::Retained;
use objc2::runtime::NSObject;
use objc2::{AnyThread, DefinedClass, define_class, msg_send};
use objc2_foundation::{NSError, NSObjectProtocol};
use objc2_virtualization::{VZVirtualMachine, VZVirtualMachineDelegate};
use tokio::sync::mpsc::UnboundedSender;

use super::config::describe;
use super::machine::Shared;
use crate::backend::BackendEvent;

pub struct DelegateState {
    /// Where this VM's events go (the supervisor's receiver for this boot).
    pub events: UnboundedSender<BackendEvent>,
    /// The backend's VM slot; weak so that VM → delegate → slot is no cycle.
    pub shared: Weak<Shared>,
    /// Which boot this delegate belongs to; only that VM is released.
    pub generation: u64,
}

impl DelegateState {
    fn stopped(&self, event: BackendEvent) {
        // The supervisor may already have moved on to another boot; nothing to do.
        let _ = self.events.send(event);
        if let Some(shared) = self.shared.upgrade() {
            shared.release_later(self.generation);
        }
    }
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and VmDelegate does not
    // implement Drop.
    #[unsafe(super(NSObject))]
    #[ivars = DelegateState]
    pub struct VmDelegate;

    // SAFETY: NSObjectProtocol adds no requirements to an NSObject subclass.
    unsafe impl NSObjectProtocol for VmDelegate {}

    // SAFETY: the signatures match VZVirtualMachineDelegate in VZVirtualMachineDelegate.h
    // (as translated by objc2-virtualization).
    unsafe impl VZVirtualMachineDelegate for VmDelegate {
        #[unsafe(method(guestDidStopVirtualMachine:))]
        fn guest_did_stop(&self, _virtual_machine: &VZVirtualMachine) {
            self.ivars().stopped(BackendEvent::StoppedByGuest);
        }

        #[unsafe(method(virtualMachine:didStopWithError:))]
        fn did_stop_with_error(&self, _virtual_machine: &VZVirtualMachine, error: &NSError) {
            self.ivars().stopped(BackendEvent::Crashed(describe(error)));
        }
    }
);

impl VmDelegate {
    pub fn new(state: DelegateState) -> Retained<VmDelegate> {
        let this = VmDelegate::alloc().set_ivars(state);
        // SAFETY: NSObject's designated initializer, on a fresh allocation whose
        // ivars are set.
        unsafe { msg_send![super(this), init] }
    }
}
