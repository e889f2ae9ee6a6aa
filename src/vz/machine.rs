//! Running the VM: every VZ call happens on one serial dispatch queue.
//!
//! VZ objects are not thread-safe; Apple's rule is that a `VZVirtualMachine` and its
//! devices are used only on the queue given to `initWithConfiguration:queue:`, and
//! VZ calls completion handlers and the delegate on that queue too. So each
//! operation here is a closure sent to the queue with `exec_async`, and its result
//! comes back to async Rust through a `tokio::sync::oneshot`. Nothing VZ ever leaves
//! the queue except inside [`OnQueue`], which is only opened on the queue and always
//! dropped there.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchRetained, DispatchTime};
use objc2::AnyThread;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_foundation::NSError;
use objc2_virtualization::{
    VZVirtioSocketConnection, VZVirtioSocketDevice, VZVirtualMachine, VZVirtualMachineState,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use super::config::{self, describe};
use super::delegate::{DelegateState, VmDelegate};
use crate::backend::{BackendError, BackendEvent, GuestStream, StopCall};
use crate::limits::{self, LeftoverVm};
use crate::plan::BootPlan;

/// A value that may only be used on the VM's queue, and that is dropped there.
///
/// It may be moved to any thread (the VM slot is shared with async code), but its
/// value is reachable only through the unsafe [`OnQueue::get`], whose callers are on
/// the queue, and its `Drop` hands the value to the queue instead of dropping it
/// wherever the wrapper happens to be: the rule "VZ objects are used and released
/// only on the VM's queue" is kept by the type, not by each caller.
pub struct OnQueue<T: 'static> {
    value: ManuallyDrop<T>,
    queue: DispatchRetained<DispatchQueue>,
}

// SAFETY: VZ objects may be used from any thread as long as every use is serialized
// on the VM's serial queue. The value inside is only reached through `get`, which
// must be called on that queue, and is only dropped by `Drop` below, which sends it
// to the queue; so moving the wrapper to another thread never lets a second thread
// touch the value.
unsafe impl<T: 'static> Send for OnQueue<T> {}

impl<T: 'static> OnQueue<T> {
    fn new(value: T, queue: &DispatchRetained<DispatchQueue>) -> OnQueue<T> {
        OnQueue {
            value: ManuallyDrop::new(value),
            queue: queue.clone(),
        }
    }

    /// # Safety
    /// Call only on the VM's queue.
    unsafe fn get(&self) -> &T {
        &self.value
    }
}

/// Carries a value to the queue in `OnQueue::drop`; private, so nothing else can
/// send a queue-bound value anywhere.
struct ToQueue<T>(T);

// SAFETY: only `OnQueue::drop` makes one, to move its value into a closure that the
// VM queue runs; the value is dropped there and nowhere else.
unsafe impl<T> Send for ToQueue<T> {}

impl<T: 'static> Drop for OnQueue<T> {
    fn drop(&mut self) {
        // SAFETY: `value` is never used again: this is the wrapper's drop.
        let value = ToQueue(unsafe { ManuallyDrop::take(&mut self.value) });
        // Dropped in a later turn of the queue, also when this runs on the queue
        // itself: a VZ callback never sees its own VM deallocated under it.
        // `drop(value)` moves the whole `ToQueue` into the closure (destructuring it
        // there would capture only its field, which is not `Send`).
        self.queue.exec_async(move || drop(value));
    }
}

/// The VM of one boot. Created, used and dropped on the queue.
struct Running {
    /// The supervisor's boot id (`BootId`) of this VM.
    generation: u64,
    vm: Retained<VZVirtualMachine>,
    /// VZ holds its delegate weakly; this is the strong reference.
    _delegate: Retained<VmDelegate>,
    /// The guest → host listeners, with their (weakly held) delegates.
    _listeners: super::listener::Listeners,
}

/// What the backend, the delegate and queued closures share.
pub struct Shared {
    queue: DispatchRetained<DispatchQueue>,
    /// The current VM, if any. Locked only on the queue (the mutex makes `Shared`
    /// `Sync`; the queue already serializes every access).
    vm: Mutex<Option<OnQueue<Running>>>,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            queue: DispatchQueue::new("darwin-vz-nix.vm", None),
            vm: Mutex::new(None),
        })
    }

    fn slot(&self) -> MutexGuard<'_, Option<OnQueue<Running>>> {
        self.vm
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the current VM out. Dropping it (anywhere: `OnQueue` sends it to the
    /// queue) releases the VM and gives its memory back to macOS.
    fn take(&self) -> Option<OnQueue<Running>> {
        self.slot().take()
    }

    /// Releases the VM of boot `generation` in a later turn of the queue, so that a
    /// VZ callback never runs while its own VM is deallocated under it.
    pub fn release_later(self: &Arc<Shared>, generation: u64) {
        let shared = Arc::clone(self);
        self.queue.exec_async(move || {
            let mut slot = shared.slot();
            // SAFETY: this closure runs on the VM queue.
            let current = slot.as_ref().map(|r| unsafe { r.get() }.generation);
            let released = if current == Some(generation) {
                slot.take()
            } else {
                None
            };
            drop(slot);
            drop(released);
        });
    }

    /// Runs `f` with the current VM; `None` when there is none.
    ///
    /// # Safety
    /// Call only on the VM queue.
    unsafe fn with_vm<R>(&self, f: impl FnOnce(&Running) -> R) -> Option<R> {
        let slot = self.slot();
        // SAFETY: guaranteed by the caller.
        slot.as_ref().map(|running| f(unsafe { running.get() }))
    }

    /// Releases whatever VM is still held, on the queue.
    pub fn release_all(self: &Arc<Shared>) {
        let shared = Arc::clone(self);
        self.queue.exec_async(move || drop(shared.take()));
    }

    /// The boot and state of the VM held now, if any.
    ///
    /// # Safety
    /// Call only on the VM queue.
    unsafe fn held(&self) -> Option<(u64, isize)> {
        // SAFETY: guaranteed by the caller.
        // The closure is inside the unsafe block too: `state` is read on the queue.
        unsafe { self.with_vm(|running| (running.generation, running.vm.state().0)) }
    }
}

/// Runs `op` on the queue and hands its result back to async code.
pub async fn on_queue<T: Send + 'static>(
    shared: &Arc<Shared>,
    op: impl FnOnce(&Arc<Shared>, oneshot::Sender<T>) + Send + 'static,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    let for_queue = Arc::clone(shared);
    shared.queue.exec_async(move || op(&for_queue, tx));
    rx.await.ok()
}

/// A oneshot sender usable from a VZ completion block, which must be `Fn`.
struct Reply<T>(Cell<Option<oneshot::Sender<T>>>);

impl<T> Reply<T> {
    fn new(tx: oneshot::Sender<T>) -> Reply<T> {
        Reply(Cell::new(Some(tx)))
    }

    fn send(&self, value: T) {
        if let Some(tx) = self.0.take() {
            // The caller may have given up waiting; nothing to do then.
            let _ = tx.send(value);
        }
    }
}

/// # Safety
/// Call only on the VM queue.
unsafe fn state_name(vm: &VZVirtualMachine) -> &'static str {
    // SAFETY: guaranteed by the caller.
    limits::state_name(unsafe { vm.state() }.0)
}

/// `*mut NSError` from a completion handler as an optional reference.
///
/// # Safety
/// `error` must be nil or a valid `NSError` for the duration of the handler call.
unsafe fn error_ref<'a>(error: *mut NSError) -> Option<&'a NSError> {
    // SAFETY: guaranteed by the caller.
    unsafe { error.as_ref() }
}

// ---- start -------------------------------------------------------------------

/// Why `start` did not start a VM.
pub enum StartRefusal {
    /// The VM of an earlier boot is still held and may still run (its start or
    /// stop timed out): it must be stopped before a second VM opens the same disk.
    Leftover {
        generation: u64,
        state: &'static str,
    },
    Failed(BackendError),
}

/// Creates and starts the VM for `plan`; replies once it runs. Refuses, touching
/// nothing, while the VM of an earlier boot may still run.
///
/// # Safety
/// Call only on the VM queue (through `on_queue`).
pub unsafe fn start(
    shared: &Arc<Shared>,
    plan: BootPlan,
    events: UnboundedSender<BackendEvent>,
    generation: u64,
    host_ports: Vec<super::listener::HostPort>,
    reply: oneshot::Sender<Result<(), StartRefusal>>,
) {
    // SAFETY: guaranteed by the caller.
    if let Some((held, raw_state)) = unsafe { shared.held() } {
        match limits::leftover_vm(raw_state) {
            LeftoverVm::Release => {
                tracing::info!("releasing the stopped VM of boot {held}");
                drop(shared.take());
            }
            LeftoverVm::StopFirst => {
                let _ = reply.send(Err(StartRefusal::Leftover {
                    generation: held,
                    state: limits::state_name(raw_state),
                }));
                return;
            }
        }
    }
    let config = match config::build(&plan) {
        Ok(config) => config,
        Err(error) => {
            let _ = reply.send(Err(StartRefusal::Failed(error)));
            return;
        }
    };
    // SAFETY: on the VM queue, with the (serial) queue the VM will use and a
    // configuration that passed validation.
    let vm = unsafe {
        VZVirtualMachine::initWithConfiguration_queue(
            VZVirtualMachine::alloc(),
            &config,
            &shared.queue,
        )
    };
    let delegate = VmDelegate::new(DelegateState {
        events,
        shared: Arc::downgrade(shared),
        generation,
    });
    // SAFETY: on the VM queue; the delegate outlives the VM because `Running`
    // holds both.
    unsafe { vm.setDelegate(Some(ProtocolObject::from_ref(&*delegate))) };
    // The guest → host listeners, set before the VM starts so that a guest never
    // finds a host port refusing.
    // SAFETY: on the VM queue, before the VM starts.
    let listeners = unsafe { super::listener::install(&vm, &host_ports) };
    *shared.slot() = Some(OnQueue::new(
        Running {
            generation,
            vm: vm.clone(),
            _delegate: delegate,
            _listeners: listeners,
        },
        &shared.queue,
    ));

    let reply = Reply::new(reply);
    let weak = Arc::downgrade(shared);
    let handler = RcBlock::new(move |error: *mut NSError| {
        // SAFETY: VZ passes nil or a valid NSError for the duration of the call.
        let result = match unsafe { error_ref(error) } {
            None => Ok(()),
            Some(error) => {
                if let Some(shared) = weak.upgrade() {
                    shared.release_later(generation);
                }
                Err(StartRefusal::Failed(config::start_error(error)))
            }
        };
        reply.send(result);
    });
    // SAFETY: on the VM queue; VZ copies the block and calls it on the queue.
    unsafe { vm.startWithCompletionHandler(&handler) };
}

// ---- stop --------------------------------------------------------------------

/// Presses the virtual power button of boot `generation`'s VM; `NotCurrent` when
/// that VM is not the one held.
///
/// # Safety
/// Call only on the VM queue (through `on_queue`).
pub unsafe fn request_stop(
    shared: &Arc<Shared>,
    generation: u64,
    reply: oneshot::Sender<Result<StopCall, BackendError>>,
) {
    // SAFETY: guaranteed by the caller.
    let result = unsafe {
        shared.with_vm(|running| {
            if running.generation != generation {
                return Ok(StopCall::NotCurrent);
            }
            request_stop_vm(&running.vm).map(|()| StopCall::Done)
        })
    }
    .unwrap_or(Ok(StopCall::NotCurrent));
    let _ = reply.send(result);
}

/// # Safety
/// Call only on the VM queue.
unsafe fn request_stop_vm(vm: &VZVirtualMachine) -> Result<(), BackendError> {
    // SAFETY: guaranteed by the caller.
    if !unsafe { vm.canRequestStop() } {
        return Err(BackendError::Stop(format!(
            "the guest cannot be asked to stop while the VM is {}",
            // SAFETY: guaranteed by the caller.
            unsafe { state_name(vm) }
        )));
    }
    // SAFETY: on the VM queue, in a state that allows it.
    unsafe { vm.requestStopWithError() }.map_err(|error| BackendError::Stop(describe(&error)))
}

/// How often, and how many times, `force_stop` looks again at a VM that is between
/// two states (starting, stopping, …) before deciding: VZ cannot stop a VM in the
/// middle of its start, and a stop that arrives then should wait, not fail.
const SETTLE_POLL: Duration = Duration::from_millis(100);
const SETTLE_POLLS: u32 = 100;

/// Pulls the plug of boot `generation`'s VM; replies once it has stopped and is
/// released. `NotCurrent`, touching nothing, when that VM is not the one held.
///
/// # Safety
/// Call only on the VM queue (through `on_queue`).
pub unsafe fn force_stop(
    shared: &Arc<Shared>,
    generation: u64,
    reply: oneshot::Sender<Result<StopCall, BackendError>>,
) {
    // SAFETY: guaranteed by the caller.
    unsafe { force_stop_attempt(shared, generation, reply, SETTLE_POLLS) };
}

/// # Safety
/// Call only on the VM queue.
unsafe fn force_stop_attempt(
    shared: &Arc<Shared>,
    generation: u64,
    reply: oneshot::Sender<Result<StopCall, BackendError>>,
    polls_left: u32,
) {
    // SAFETY: guaranteed by the caller.
    let outcome = unsafe {
        shared.with_vm(|running| {
            if running.generation != generation {
                return StopOutcome::NotCurrent;
            }
            stop_outcome(running, polls_left > 0)
        })
    };
    match outcome {
        // No VM of this boot is held: nothing to touch.
        None | Some(StopOutcome::NotCurrent) => {
            let _ = reply.send(Ok(StopCall::NotCurrent));
        }
        Some(StopOutcome::AlreadyStopped) => {
            drop(shared.take());
            let _ = reply.send(Ok(StopCall::Done));
        }
        Some(StopOutcome::Settling) => {
            let again = Arc::clone(shared);
            let when = DispatchTime::try_from(SETTLE_POLL).unwrap_or(DispatchTime::NOW);
            // `after` only fails to schedule on invalid input; the reply would then
            // be dropped and the caller told that VZ never answered.
            let _ = shared.queue.after(when, move || {
                // SAFETY: `after` runs this closure on the VM queue.
                unsafe {
                    force_stop_attempt(&again, generation, reply, polls_left.saturating_sub(1))
                };
            });
        }
        Some(StopOutcome::Refused(why)) => {
            let _ = reply.send(Err(BackendError::Stop(why)));
        }
        Some(StopOutcome::Stop(generation, vm)) => {
            // SAFETY: guaranteed by the caller.
            unsafe { stop_vm(shared, &vm, generation, Reply::new(reply)) };
        }
    }
}

enum StopOutcome {
    /// The VM held belongs to another boot.
    NotCurrent,
    AlreadyStopped,
    /// Between two states; look again shortly.
    Settling,
    Refused(String),
    Stop(u64, Retained<VZVirtualMachine>),
}

/// What `force_stop` should do with the VM as it is now.
///
/// # Safety
/// Call only on the VM queue.
unsafe fn stop_outcome(running: &Running, may_wait: bool) -> StopOutcome {
    let vm = &running.vm;
    // SAFETY: guaranteed by the caller.
    let state = unsafe { vm.state() };
    if state == VZVirtualMachineState::Stopped || state == VZVirtualMachineState::Error {
        return StopOutcome::AlreadyStopped;
    }
    // SAFETY: guaranteed by the caller.
    if unsafe { vm.canStop() } {
        return StopOutcome::Stop(running.generation, vm.clone());
    }
    if may_wait && is_transient(state) {
        return StopOutcome::Settling;
    }
    StopOutcome::Refused(format!(
        "the VM cannot be stopped while it is {}",
        // SAFETY: guaranteed by the caller.
        unsafe { state_name(vm) }
    ))
}

fn is_transient(state: VZVirtualMachineState) -> bool {
    [
        VZVirtualMachineState::Starting,
        VZVirtualMachineState::Stopping,
        VZVirtualMachineState::Pausing,
        VZVirtualMachineState::Resuming,
        VZVirtualMachineState::Saving,
        VZVirtualMachineState::Restoring,
    ]
    .contains(&state)
}

/// # Safety
/// Call only on the VM queue, when `canStop` said yes.
unsafe fn stop_vm(
    shared: &Arc<Shared>,
    vm: &VZVirtualMachine,
    generation: u64,
    reply: Reply<Result<StopCall, BackendError>>,
) {
    let weak = Arc::downgrade(shared);
    let handler = RcBlock::new(move |error: *mut NSError| {
        // SAFETY: VZ passes nil or a valid NSError for the duration of the call.
        let result = match unsafe { error_ref(error) } {
            Some(error) => Err(BackendError::Stop(describe(error))),
            None => {
                if let Some(shared) = weak.upgrade() {
                    shared.release_later(generation);
                }
                Ok(StopCall::Done)
            }
        };
        reply.send(result);
    });
    // SAFETY: guaranteed by the caller; VZ copies the block and calls it on the
    // queue.
    unsafe { vm.stopWithCompletionHandler(&handler) };
}

// ---- connect -----------------------------------------------------------------

/// Opens a connection to guest vsock `port`.
///
/// # Safety
/// Call only on the VM queue (through `on_queue`): reading `socketDevices` off the
/// queue traps.
pub unsafe fn connect(
    shared: &Arc<Shared>,
    port: u32,
    reply: oneshot::Sender<Result<GuestStream, BackendError>>,
) {
    // SAFETY: guaranteed by the caller.
    let device = match unsafe { shared.with_vm(|running| socket_device(&running.vm)) } {
        Some(Some(device)) => device,
        Some(None) => {
            let _ = reply.send(Err(BackendError::Invalid(
                "the VM has no virtio socket device, so no guest port can be reached".into(),
            )));
            return;
        }
        None => {
            let _ = reply.send(Err(BackendError::NotRunning));
            return;
        }
    };
    let reply = Reply::new(reply);
    let handler = RcBlock::new(
        move |connection: *mut VZVirtioSocketConnection, error: *mut NSError| {
            // SAFETY: VZ passes nil or valid objects for the duration of the call.
            let result = unsafe { connection_result(connection, error) };
            reply.send(result.map_err(|reason| BackendError::Connect { port, reason }));
        },
    );
    // SAFETY: guaranteed by the caller; VZ copies the block and calls it on the
    // queue.
    unsafe { device.connectToPort_completionHandler(port, &handler) };
}

/// # Safety
/// Call only on the VM queue.
unsafe fn socket_device(vm: &VZVirtualMachine) -> Option<Retained<VZVirtioSocketDevice>> {
    // SAFETY: guaranteed by the caller.
    let first = unsafe { vm.socketDevices() }.firstObject()?;
    first.downcast::<VZVirtioSocketDevice>().ok()
}

/// The outcome of `connectToPort`, as a stream or the reason it failed.
///
/// # Safety
/// On the VM queue; `connection` and `error` are nil or valid for this call.
unsafe fn connection_result(
    connection: *mut VZVirtioSocketConnection,
    error: *mut NSError,
) -> Result<GuestStream, String> {
    // SAFETY: guaranteed by the caller; retaining keeps the connection for the
    // duplication below.
    if let Some(connection) = unsafe { Retained::retain(connection) } {
        // SAFETY: guaranteed by the caller.
        return unsafe { guest_stream(&connection) };
    }
    // SAFETY: guaranteed by the caller.
    Err(match unsafe { error_ref(error) } {
        Some(error) => describe(error),
        None => "Virtualization.framework returned neither a connection nor an error".into(),
    })
}

/// Our own descriptor for the connection; VZ's is closed at once.
///
/// The connection owns its descriptor (an AF_UNIX socket to the framework) and
/// closes it when closed or released. We `dup()` it (with `FD_CLOEXEC`) and then
/// close the connection right away, as apple/containerization's `dupHandle()` does
/// (dup, then `close()`): from here on the duplicate is this process's descriptor
/// for the stream, besides the copy the supervisor keeps to watch the session
/// (`supervisor::session`). Keeping VZ's descriptor open until the stream ended
/// made the guest see the end of a stream only when the supervisor let go of it.
///
/// # Safety
/// Call only on the VM queue.
unsafe fn guest_stream(connection: &VZVirtioSocketConnection) -> Result<GuestStream, String> {
    // SAFETY: guaranteed by the caller.
    let raw = unsafe { connection.fileDescriptor() };
    let duplicate = if raw < 0 {
        Err("the connection was closed before it could be used".to_string())
    } else {
        // SAFETY: `raw` is open until the `close()` below.
        let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
        // `try_clone_to_owned` is `fcntl(F_DUPFD_CLOEXEC)`: a new descriptor with
        // close-on-exec set, sharing the socket.
        borrowed
            .try_clone_to_owned()
            .map_err(|error| format!("could not duplicate the connection's descriptor: {error}"))
    };
    // Closes VZ's descriptor only; the socket lives on in the duplicate.
    // SAFETY: guaranteed by the caller.
    unsafe { connection.close() };
    let fd: OwnedFd = duplicate?;
    Ok(GuestStream::new(fd, None))
}
