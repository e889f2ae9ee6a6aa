//! Guest → host connections: a `VZVirtioSocketListener` per host port, whose
//! delegate hands each accepted connection to the supervisor as a stream.
//!
//! The listeners are set on a VM's socket device on the VM queue, before the VM
//! starts, and stay for the VM's whole life (a guest that finds nothing listening
//! gets a refused connection, which Nix before 2.32 would count against the whole
//! build). VZ keeps each listener but holds its delegate weakly, so the VM's
//! `Running` keeps both (see [`Listeners`]).
//!
//! The delegate runs on the VM queue. Like apple/containerization's
//! `VsockListener`, it duplicates the connection's descriptor, closes the
//! connection's own, and accepts: the socket then lives exactly as long as the
//! duplicate, which the stream owns, and no VZ object has to outlive the callback.

use std::os::fd::{BorrowedFd, OwnedFd};

use objc2::rc::Retained;
use objc2::runtime::{NSObject, ProtocolObject};
use objc2::{AnyThread, DefinedClass, define_class, msg_send};
use objc2_foundation::NSObjectProtocol;
use objc2_virtualization::{
    VZVirtioSocketConnection, VZVirtioSocketDevice, VZVirtioSocketListener,
    VZVirtioSocketListenerDelegate, VZVirtualMachine,
};

use crate::backend::{GuestConnections, GuestStream};

/// A host port the guest may connect to, and where its connections go.
#[derive(Clone)]
pub struct HostPort {
    pub port: u32,
    pub connections: GuestConnections,
}

pub struct ListenerState {
    port: u32,
    connections: GuestConnections,
}

impl ListenerState {
    /// Takes the connection's stream; `false` refuses the connection.
    fn accept(&self, connection: &VZVirtioSocketConnection) -> bool {
        // SAFETY: VZ passes a live connection for the duration of the call, on the
        // VM queue.
        let raw = unsafe { connection.fileDescriptor() };
        if raw < 0 {
            return false;
        }
        // SAFETY: `raw` is open while the connection is, i.e. for this borrow.
        let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
        // `try_clone_to_owned` is `fcntl(F_DUPFD_CLOEXEC)`.
        let fd: OwnedFd = match borrowed.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(error) => {
                tracing::warn!(
                    "host port {}: cannot duplicate a guest connection's descriptor: {error}",
                    self.port
                );
                return false;
            }
        };
        // SAFETY: as above; closing the connection closes only its own descriptor.
        unsafe { connection.close() };
        // The receiver is gone only while the supervisor shuts down.
        self.connections.send(GuestStream::new(fd, None)).is_ok()
    }
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and ListenerDelegate does
    // not implement Drop.
    #[unsafe(super(NSObject))]
    #[ivars = ListenerState]
    pub struct ListenerDelegate;

    // SAFETY: NSObjectProtocol adds no requirements to an NSObject subclass.
    unsafe impl NSObjectProtocol for ListenerDelegate {}

    // SAFETY: the signature matches VZVirtioSocketListenerDelegate in
    // VZVirtioSocketListener.h (as translated by objc2-virtualization).
    unsafe impl VZVirtioSocketListenerDelegate for ListenerDelegate {
        #[unsafe(method(listener:shouldAcceptNewConnection:fromSocketDevice:))]
        fn should_accept(
            &self,
            _listener: &VZVirtioSocketListener,
            connection: &VZVirtioSocketConnection,
            _socket_device: &VZVirtioSocketDevice,
        ) -> bool {
            self.ivars().accept(connection)
        }
    }
);

impl ListenerDelegate {
    fn new(state: ListenerState) -> Retained<ListenerDelegate> {
        let this = ListenerDelegate::alloc().set_ivars(state);
        // SAFETY: NSObject's designated initializer, on a fresh allocation whose
        // ivars are set.
        unsafe { msg_send![super(this), init] }
    }
}

/// The listeners of one VM, kept (with their delegates) for as long as it lives.
/// Created and dropped on the VM queue, inside `Running`.
pub struct Listeners {
    _kept: Vec<(Retained<VZVirtioSocketListener>, Retained<ListenerDelegate>)>,
}

/// Sets a listener for each of `ports` on `vm`'s socket device. A VM without a
/// socket device gets none (the plan always has one).
///
/// # Safety
/// Call only on the VM queue, before the VM starts.
pub unsafe fn install(vm: &VZVirtualMachine, ports: &[HostPort]) -> Listeners {
    let mut kept = Vec::new();
    // SAFETY: guaranteed by the caller (reading `socketDevices` off the queue traps).
    let device = unsafe { vm.socketDevices() }
        .firstObject()
        .and_then(|first| first.downcast::<VZVirtioSocketDevice>().ok());
    let Some(device) = device else {
        if !ports.is_empty() {
            tracing::warn!("the VM has no virtio socket device: the guest cannot reach the host");
        }
        return Listeners { _kept: kept };
    };
    for host_port in ports {
        let delegate = ListenerDelegate::new(ListenerState {
            port: host_port.port,
            connections: host_port.connections.clone(),
        });
        // SAFETY: a plain allocation and init, on the VM queue.
        let listener = unsafe { VZVirtioSocketListener::new() };
        // SAFETY: on the VM queue; the delegate outlives the listener's use of it,
        // because `Listeners` holds both as long as the VM lives.
        unsafe {
            listener.setDelegate(Some(ProtocolObject::from_ref(&*delegate)));
            device.setSocketListener_forPort(&listener, host_port.port);
        }
        kept.push((listener, delegate));
    }
    Listeners { _kept: kept }
}
