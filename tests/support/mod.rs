//! What the integration tests share: a fake VM backend whose guest port 22 is a real
//! `sshd -i`, and a harness that runs the real supervisor (`daemon::serve`) with it —
//! in this process, or in a child process when a test must kill it.
//!
//! This backend lives with the tests and never ships in the binary.

#![allow(dead_code)]

mod fake_nix;
pub use fake_nix::*;

pub mod hoststore;

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use darwin_vz_nix::backend::{
    Backend, BackendError, BackendEvent, BootId, BoxFuture, GuestConnections, GuestStream, StopCall,
};
use darwin_vz_nix::config::{Config, ConfigLayer, Origin, Source};
use darwin_vz_nix::control::ControlClient;
use darwin_vz_nix::control::protocol::{Reply, Request, StatusReport, VmState};
use darwin_vz_nix::daemon::{self, DaemonOptions};
use darwin_vz_nix::host::HostInfo;
use darwin_vz_nix::plan::BootPlan;
use darwin_vz_nix::power::{PowerError, PowerEvent, PowerManager};
use tokio::sync::mpsc::UnboundedSender;

/// Guest port whose "service" echoes bytes back (for throughput measurements).
pub const ECHO_PORT: u32 = 7;
/// Like `ECHO_PORT`, with one more copying hop in between: what relaying the bytes
/// through the supervisor (instead of handing the proxy the descriptor) would add.
pub const ECHO_RELAYED_PORT: u32 = 8;

/// How the fake VM behaves.
#[derive(Debug, Clone)]
pub struct FakeVmBehaviour {
    /// How long `start` takes.
    pub boot_delay: Duration,
    /// How long after start guest port 22 keeps refusing connections.
    pub listen_delay: Duration,
    /// How long a connection attempt takes to fail while nothing listens (VZ's
    /// `connectToPort` can take seconds before it gives up).
    pub refuse_delay: Duration,
    /// How long a connection that succeeds takes to be made (VZ's `connectToPort`
    /// completes when it completes).
    pub accept_delay: Duration,
    /// `start` fails with this message.
    pub fail_boot: Option<String>,
    /// The guest ignores the ACPI power button.
    pub ignore_graceful_stop: bool,
    /// Extra lines for the guest's sshd_config.
    pub sshd_extra: Vec<String>,
    /// What the guest says on its console about `/dev/kvm` at boot, as
    /// nix/nixos/scripts/kvm.sh does; `None`: it says nothing (an older guest).
    pub guest_kvm: Option<bool>,
    /// `start` never finishes, as if VZ never called back.
    pub start_hangs: bool,
    /// `force_stop` of the current VM never finishes.
    pub force_stop_hangs: bool,
    /// What the guest's clock setter (vsock port 1025) answers; `None`: nothing
    /// listens there, as in a guest without one.
    pub clock_reply: Option<String>,
    /// Relay every SSH stream through a copying thread that counts its bytes
    /// (`FakeVm::ssh_bytes`): what crossed the SSH session, in each direction.
    pub count_ssh_bytes: bool,
    /// The guest sides of streams stay open when the VM stops: nothing but the
    /// supervisor's own bookkeeping can end their sessions then.
    pub streams_outlive_the_vm: bool,
}

impl Default for FakeVmBehaviour {
    fn default() -> Self {
        FakeVmBehaviour {
            boot_delay: Duration::from_millis(50),
            listen_delay: Duration::from_millis(100),
            refuse_delay: Duration::ZERO,
            accept_delay: Duration::ZERO,
            fail_boot: None,
            ignore_graceful_stop: false,
            sshd_extra: Vec::new(),
            guest_kvm: Some(false),
            start_hangs: false,
            force_stop_hangs: false,
            clock_reply: Some("OK +0.000000000\n".into()),
            count_ssh_bytes: false,
            streams_outlive_the_vm: false,
        }
    }
}

/// A lifecycle call the supervisor made, with the boot it named and what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub boot: BootId,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    RequestStop,
    ForceStop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It acted on that boot's VM.
    Done,
    /// That boot was not the current VM: nothing was touched.
    NotCurrent,
    /// It failed (e.g. `start` told to fail, a stop of a VM that is not running).
    Failed,
}

#[derive(Default)]
struct FakeVmState {
    /// The boot whose VM is the current one (running or stopped).
    current: Option<BootId>,
    running_since: Option<Instant>,
    events: Option<UnboundedSender<BackendEvent>>,
    boots: u32,
    calls: Vec<Call>,
    /// The kernel of every VM started, in order: which guest each boot booted.
    kernels: Vec<PathBuf>,
}

/// The guest side of the current VM's open streams, so that a stopping VM closes
/// them as VZ does. Entries leave when their stream ends.
#[derive(Default)]
struct GuestEnds {
    next: u64,
    ends: Vec<(u64, GuestEnd)>,
}

enum GuestEnd {
    /// A per-connection `sshd -i`, alive or not yet reaped (so its pid is not reused).
    Process(nix::unistd::Pid),
    Socket(UnixStream),
}

/// A VM played by the test process: "boot" is a delay, guest port 22 is `sshd -i`
/// started per connection with the keys from the state directory. It records every
/// lifecycle call with the boot it named (also in `<state>/fake-vm-calls.log`, for
/// tests whose supervisor runs in a child process), and acts only on its current
/// boot, as the real backend does.
pub struct FakeVm {
    behaviour: Mutex<FakeVmBehaviour>,
    state: Mutex<FakeVmState>,
    guest_ends: Arc<Mutex<GuestEnds>>,
    state_dir: PathBuf,
    sshd_log: PathBuf,
    /// Every line the guest's clock setter received, in order.
    clock_requests: Arc<Mutex<Vec<String>>>,
    /// Host ports the guest may connect to (`Backend::listen`).
    host_ports: Mutex<Vec<(u32, GuestConnections)>>,
    /// Bytes relayed over SSH streams when `count_ssh_bytes` is on.
    ssh_bytes: Arc<SshBytes>,
}

/// What crossed the SSH streams of a `count_ssh_bytes` VM.
#[derive(Debug, Default)]
pub struct SshBytes {
    pub to_guest: std::sync::atomic::AtomicU64,
    pub from_guest: std::sync::atomic::AtomicU64,
}

impl FakeVm {
    pub fn new(state_dir: &Path, behaviour: FakeVmBehaviour) -> Arc<FakeVm> {
        Arc::new(FakeVm {
            behaviour: Mutex::new(behaviour),
            state: Mutex::new(FakeVmState::default()),
            guest_ends: Arc::new(Mutex::new(GuestEnds::default())),
            state_dir: state_dir.to_path_buf(),
            sshd_log: state_dir.join("logs/fake-sshd.log"),
            clock_requests: Arc::new(Mutex::new(Vec::new())),
            host_ports: Mutex::new(Vec::new()),
            ssh_bytes: Arc::new(SshBytes::default()),
        })
    }

    /// The lines the guest's clock setter (port 1025) received so far.
    pub fn clock_requests(&self) -> Vec<String> {
        self.clock_requests.lock().unwrap().clone()
    }

    /// (to the guest, from the guest): bytes relayed over SSH streams so far, when
    /// the VM counts them (`count_ssh_bytes`).
    pub fn ssh_bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.ssh_bytes.to_guest.load(Ordering::SeqCst),
            self.ssh_bytes.from_guest.load(Ordering::SeqCst),
        )
    }

    /// What a guest program gets when it connects to host vsock `port` (CID 2): a
    /// stream whose other end the backend hands to whoever listens there. Refused
    /// while the VM is not running or nothing listens, as vsock refuses.
    pub fn connect_to_host(&self, port: u32) -> std::io::Result<UnixStream> {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        if self.state.lock().unwrap().running_since.is_none() {
            return Err(refused());
        }
        let connections = self
            .host_ports
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, c)| c.clone())
            .ok_or_else(refused)?;
        let (guest, host) = UnixStream::pair()?;
        // A stopping VM ends the stream, as VZ does.
        self.remember_end(GuestEnd::Socket(guest.try_clone()?));
        connections
            .send(GuestStream::new(host.into(), None))
            .map_err(|_| refused())?;
        Ok(guest)
    }

    pub fn boots(&self) -> u32 {
        self.state.lock().unwrap().boots
    }

    /// The kernel each started VM booted, in order.
    pub fn booted_kernels(&self) -> Vec<PathBuf> {
        self.state.lock().unwrap().kernels.clone()
    }

    /// Every lifecycle call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The boot whose VM runs now, if one does.
    pub fn running_boot(&self) -> Option<BootId> {
        let state = self.state.lock().unwrap();
        state.running_since.and(state.current)
    }

    /// Changes how the VM behaves from now on (e.g. the next boots).
    pub fn set_behaviour(&self, behaviour: FakeVmBehaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn record(&self, state: &mut FakeVmState, op: Op, boot: BootId, outcome: Outcome) {
        state.calls.push(Call { op, boot, outcome });
        let line = format!("{op:?} {} {outcome:?}\n", boot.0);
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("fake-vm-calls.log"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    }

    /// The current VM stops: its guest streams close, as VZ closes them.
    fn power_off(&self, state: &mut FakeVmState, event: Option<BackendEvent>) {
        state.running_since = None;
        if let (Some(events), Some(event)) = (&state.events, event) {
            let _ = events.send(event);
        }
        if self.behaviour.lock().unwrap().streams_outlive_the_vm {
            return;
        }
        let ends = std::mem::take(&mut self.guest_ends.lock().unwrap().ends);
        for (_, end) in ends {
            match end {
                GuestEnd::Process(pid) => {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
                GuestEnd::Socket(socket) => {
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }

    /// The VM dies with an error, as if the hypervisor failed.
    pub fn crash(&self, message: &str) {
        let mut state = self.state.lock().unwrap();
        self.power_off(&mut state, Some(BackendEvent::Crashed(message.to_string())));
    }

    /// The guest powers itself off.
    pub fn guest_poweroff(&self) {
        let mut state = self.state.lock().unwrap();
        self.power_off(&mut state, Some(BackendEvent::StoppedByGuest));
    }

    /// Remembers a guest side of a stream; returns its key for `forget_end`.
    fn remember_end(&self, end: GuestEnd) -> u64 {
        let mut ends = self.guest_ends.lock().unwrap();
        ends.next += 1;
        let key = ends.next;
        ends.ends.push((key, end));
        key
    }

    /// Writes the guest's sshd_config and returns its path.
    pub fn sshd_config(&self) -> PathBuf {
        let keys = self.state_dir.join("keys/guest");
        let path = self.state_dir.join("fake-sshd_config");
        let mut lines = vec![
            format!(
                "HostKey \"{}\"",
                keys.join("ssh_host_ed25519_key").display()
            ),
            format!(
                "AuthorizedKeysFile \"{}\"",
                keys.join("authorized_keys").display()
            ),
            "StrictModes no".into(),
            "UsePAM no".into(),
            "PermitRootLogin prohibit-password".into(),
            "PasswordAuthentication no".into(),
            "KbdInteractiveAuthentication no".into(),
            "PidFile none".into(),
            "LogLevel VERBOSE".into(),
            // vsock sends no RST, and the supervisor holds its own copy of every
            // stream: a client that dies without a disconnect is found by these
            // probes (the guest has 15 s × 4; the tests need seconds).
            "ClientAliveInterval 1".into(),
            "ClientAliveCountMax 2".into(),
        ];
        lines.extend(self.behaviour.lock().unwrap().sshd_extra.iter().cloned());
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    }

    fn spawn_sshd(&self) -> Result<GuestStream, BackendError> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| connect_error(22, e))?;
        let stdout: OwnedFd = theirs.try_clone().map_err(|e| connect_error(22, e))?.into();
        let stdin: OwnedFd = theirs.into();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-i", "-f"])
            .arg(self.sshd_config())
            .arg("-E")
            .arg(&self.sshd_log)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| connect_error(22, e))?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let key = self.remember_end(GuestEnd::Process(pid));
        let reaper = Reaper {
            child,
            key,
            ends: self.guest_ends.clone(),
        };
        let ours = if self.behaviour.lock().unwrap().count_ssh_bytes {
            self.counting_relay(ours)
                .map_err(|e| connect_error(22, e))?
        } else {
            ours
        };
        Ok(GuestStream::new(ours.into(), Some(Box::new(reaper))))
    }

    /// Puts two counting copy threads between the host's end of an SSH stream and
    /// sshd's; returns the new host end. Either side ending ends both (vsock has no
    /// half-close).
    fn counting_relay(&self, sshd_side: UnixStream) -> std::io::Result<UnixStream> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (host_side, relay) = UnixStream::pair()?;
        let copy = |from: UnixStream, to: UnixStream, count: Arc<SshBytes>, to_guest: bool| {
            std::thread::spawn(move || {
                let counter: &AtomicU64 = if to_guest {
                    &count.to_guest
                } else {
                    &count.from_guest
                };
                let mut buffer = vec![0u8; 64 * 1024];
                let (mut reader, mut writer) = (&from, &to);
                loop {
                    let n = match std::io::Read::read(&mut reader, &mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                    if std::io::Write::write_all(&mut writer, &buffer[..n]).is_err() {
                        break;
                    }
                }
                let _ = from.shutdown(std::net::Shutdown::Both);
                let _ = to.shutdown(std::net::Shutdown::Both);
            });
        };
        copy(
            relay.try_clone()?,
            sshd_side.try_clone()?,
            self.ssh_bytes.clone(),
            true,
        );
        copy(sshd_side, relay, self.ssh_bytes.clone(), false);
        Ok(host_side)
    }

    /// An echo "service": the guest side closes when the stream is shut down.
    fn spawn_echo(&self, port: u32) -> Result<GuestStream, BackendError> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| connect_error(port, e))?;
        let key = self.remember_end(GuestEnd::Socket(
            theirs.try_clone().map_err(|e| connect_error(port, e))?,
        ));
        let ends = self.guest_ends.clone();
        std::thread::spawn(move || {
            let mut reader = theirs.try_clone().unwrap();
            let mut writer = theirs;
            let _ = std::io::copy(&mut reader, &mut writer);
            ends.lock().unwrap().ends.retain(|(k, _)| *k != key);
        });
        Ok(GuestStream::new(ours.into(), None))
    }
}

impl FakeVm {
    /// The guest's clock setter: reads one line (at most 64 bytes, within 5 s),
    /// records it, answers as told, and closes.
    fn spawn_clock(&self, reply: String) -> Result<GuestStream, BackendError> {
        let port = darwin_vz_nix::contract::CLOCK_VSOCK_PORT;
        let (ours, theirs) = UnixStream::pair().map_err(|e| connect_error(port, e))?;
        let key = self.remember_end(GuestEnd::Socket(
            theirs.try_clone().map_err(|e| connect_error(port, e))?,
        ));
        let ends = self.guest_ends.clone();
        let requests = self.clock_requests.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut stream = theirs;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.len() < 64 && !line.ends_with(b"\n") {
                match stream.read(&mut byte) {
                    Ok(1) => line.push(byte[0]),
                    _ => break,
                }
            }
            requests
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&line).into_owned());
            let _ = stream.write_all(reply.as_bytes());
            let _ = stream.shutdown(std::net::Shutdown::Both);
            ends.lock().unwrap().ends.retain(|(k, _)| *k != key);
        });
        Ok(GuestStream::new(ours.into(), None))
    }

    fn spawn_relayed_echo(&self) -> Result<GuestStream, BackendError> {
        let (ours, relay_in) =
            UnixStream::pair().map_err(|e| connect_error(ECHO_RELAYED_PORT, e))?;
        let (relay_out, echo) =
            UnixStream::pair().map_err(|e| connect_error(ECHO_RELAYED_PORT, e))?;
        let copy = |mut from: UnixStream, mut to: UnixStream| {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        };
        copy(
            relay_in.try_clone().unwrap(),
            relay_out.try_clone().unwrap(),
        );
        copy(relay_out, relay_in);
        std::thread::spawn(move || {
            let mut reader = echo.try_clone().unwrap();
            let mut writer = echo;
            let _ = std::io::copy(&mut reader, &mut writer);
            let _ = writer.shutdown(std::net::Shutdown::Both);
        });
        Ok(GuestStream::new(ours.into(), None))
    }
}

fn connect_error(port: u32, e: std::io::Error) -> BackendError {
    BackendError::Connect {
        port,
        reason: e.to_string(),
    }
}

/// Ends a per-connection sshd with its stream.
struct Reaper {
    child: Child,
    key: u64,
    ends: Arc<Mutex<GuestEnds>>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Forget the pid before reaping it, so that it is never killed once reused.
        self.ends
            .lock()
            .unwrap()
            .ends
            .retain(|(k, _)| *k != self.key);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Backend for FakeVm {
    fn name(&self) -> &'static str {
        "fake (tests)"
    }

    fn start(
        &self,
        boot: BootId,
        plan: BootPlan,
        events: UnboundedSender<BackendEvent>,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let behaviour = self.behaviour.lock().unwrap().clone();
            if behaviour.start_hangs {
                return std::future::pending().await;
            }
            tokio::time::sleep(behaviour.boot_delay).await;
            if let (Some(kvm), Some(console)) = (behaviour.guest_kvm, plan.console_log()) {
                // What nix/nixos/scripts/kvm.sh prints on the console at boot.
                let line = format!(
                    "{} {} (Linux 6.12.5)\r\n",
                    darwin_vz_nix::contract::CONSOLE_MARKER_KVM,
                    if kvm { "present" } else { "absent" }
                );
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(console)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
            }
            let mut state = self.state.lock().unwrap();
            if let Some(message) = behaviour.fail_boot {
                self.record(&mut state, Op::Start, boot, Outcome::Failed);
                return Err(BackendError::Start(message));
            }
            // A new VM replaces the old one, whose streams close.
            self.power_off(&mut state, None);
            state.current = Some(boot);
            state.running_since = Some(Instant::now());
            state.events = Some(events);
            state.boots += 1;
            state.kernels.push(plan.kernel.clone());
            self.record(&mut state, Op::Start, boot, Outcome::Done);
            Ok(())
        })
    }

    fn request_stop(&self, boot: BootId) -> BoxFuture<'_, Result<StopCall, BackendError>> {
        Box::pin(async move {
            {
                let mut state = self.state.lock().unwrap();
                if state.current != Some(boot) {
                    self.record(&mut state, Op::RequestStop, boot, Outcome::NotCurrent);
                    return Ok(StopCall::NotCurrent);
                }
                if state.running_since.is_none() {
                    self.record(&mut state, Op::RequestStop, boot, Outcome::Failed);
                    return Err(BackendError::NotRunning);
                }
                self.record(&mut state, Op::RequestStop, boot, Outcome::Done);
            }
            if self.behaviour.lock().unwrap().ignore_graceful_stop {
                return Ok(StopCall::Done);
            }
            // The guest takes a moment to shut down, then reports it stopped.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let mut state = self.state.lock().unwrap();
            if state.current == Some(boot) && state.running_since.is_some() {
                self.power_off(&mut state, Some(BackendEvent::StoppedByGuest));
            }
            Ok(StopCall::Done)
        })
    }

    fn force_stop(&self, boot: BootId) -> BoxFuture<'_, Result<StopCall, BackendError>> {
        Box::pin(async move {
            let hangs = self.behaviour.lock().unwrap().force_stop_hangs;
            if hangs && self.state.lock().unwrap().current == Some(boot) {
                return std::future::pending().await;
            }
            let mut state = self.state.lock().unwrap();
            if state.current != Some(boot) {
                self.record(&mut state, Op::ForceStop, boot, Outcome::NotCurrent);
                return Ok(StopCall::NotCurrent);
            }
            self.power_off(&mut state, None);
            self.record(&mut state, Op::ForceStop, boot, Outcome::Done);
            Ok(StopCall::Done)
        })
    }

    fn connect(&self, port: u32) -> BoxFuture<'_, Result<GuestStream, BackendError>> {
        Box::pin(async move {
            let since = self
                .state
                .lock()
                .unwrap()
                .running_since
                .ok_or(BackendError::NotRunning)?;
            let behaviour = self.behaviour.lock().unwrap().clone();
            if since.elapsed() < behaviour.listen_delay {
                tokio::time::sleep(behaviour.refuse_delay).await;
                return Err(BackendError::Connect {
                    port,
                    reason: "Connection reset by peer".into(),
                });
            }
            tokio::time::sleep(behaviour.accept_delay).await;
            match port {
                22 => self.spawn_sshd(),
                darwin_vz_nix::contract::CLOCK_VSOCK_PORT => match behaviour.clock_reply {
                    Some(reply) => self.spawn_clock(reply),
                    None => Err(BackendError::Connect {
                        port,
                        reason: "Connection reset by peer".into(),
                    }),
                },
                ECHO_PORT => self.spawn_echo(port),
                ECHO_RELAYED_PORT => self.spawn_relayed_echo(),
                _ => Err(BackendError::Connect {
                    port,
                    reason: "Connection refused".into(),
                }),
            }
        })
    }

    fn listen(&self, port: u32, connections: GuestConnections) -> Result<(), BackendError> {
        let mut ports = self.host_ports.lock().unwrap();
        ports.retain(|(p, _)| *p != port);
        ports.push((port, connections));
        Ok(())
    }
}

/// A call the supervisor made to the host's power management.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerCall {
    Hold(String),
    Release,
}

#[derive(Default)]
struct FakePowerState {
    held: Option<String>,
    calls: Vec<PowerCall>,
    events: Option<UnboundedSender<PowerEvent>>,
}

/// The host's power management, played by the test: it records every call and
/// sends the power events the test asks for.
#[derive(Default)]
pub struct FakePower {
    state: Mutex<FakePowerState>,
}

impl FakePower {
    /// The assertion held now, by name.
    pub fn held(&self) -> Option<String> {
        self.state.lock().unwrap().held.clone()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<PowerCall> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The host wakes from sleep.
    pub fn wake(&self) {
        let state = self.state.lock().unwrap();
        let events = state
            .events
            .as_ref()
            .expect("the supervisor watches power events");
        events.send(PowerEvent::Woke).unwrap();
    }
}

impl PowerManager for FakePower {
    fn name(&self) -> &'static str {
        "fake (tests)"
    }

    fn hold(&self, reason: &str) -> Result<(), PowerError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(PowerCall::Hold(reason.to_string()));
        state.held = Some(reason.to_string());
        Ok(())
    }

    fn release(&self) -> Result<(), PowerError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(PowerCall::Release);
        state.held = None;
        Ok(())
    }

    fn watch(&self, events: UnboundedSender<PowerEvent>) -> Result<(), PowerError> {
        self.state.lock().unwrap().events = Some(events);
        Ok(())
    }
}

/// A state directory with a fake guest, and the configuration that points at it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub guest_dir: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("dvn test ")
            .tempdir()
            .unwrap();
        // A space in the path proves quoting all the way through ssh.
        Fixture::in_dir(dir, "state dir")
    }

    /// A fixture in `dir`: the state directory `dir/<state_name>` (not made yet),
    /// and a fake guest in `dir/guest`.
    pub fn in_dir(dir: tempfile::TempDir, state_name: &str) -> Fixture {
        let state_dir = dir.path().join(state_name);
        let guest_dir = dir.path().join("guest");
        darwin_vz_nix::artifacts::write_fake_guest(&guest_dir, "loglevel=4\n").unwrap();
        Fixture {
            dir,
            state_dir,
            guest_dir,
        }
    }

    pub fn config(&self, extra: ConfigLayer) -> Config {
        let base = ConfigLayer {
            guest: Some(self.guest_dir.clone()),
            ..self.base_layer()
        };
        resolve_layers(base, extra)
    }

    /// Options that make tests fast: idle and stop in milliseconds.
    pub fn options(&self, idle: Option<Duration>) -> DaemonOptions {
        DaemonOptions {
            host_store: self.dir.path().to_path_buf(),
            boot_timeout: Duration::from_secs(20),
            idle_timeout: idle,
            stop_timeout: Duration::from_secs(2),
            handle_signals: false,
            request_timeout: Duration::from_secs(5),
            max_clients: None,
            socket_check: Duration::from_secs(2),
            guest_report_wait: Duration::from_secs(10),
            backend_timeout: Duration::from_secs(20),
            power: Arc::new(FakePower::default()),
            // Only tests that install a `FakeNix` there get one.
            nix_store: darwin_vz_nix::guest::nix::NixStore::at(
                self.dir.path().join("bin/nix-store"),
            ),
            guest: darwin_vz_nix::guest::GuestOptions {
                realise_timeout: Duration::from_secs(60),
                retry_after: Duration::from_secs(60),
                short_timeout: Duration::from_secs(30),
            },
            bootstrap: darwin_vz_nix::bootstrap::BootstrapOptions {
                fetch_timeout: Duration::from_secs(60),
                boot_timeout: Duration::from_secs(20),
                stop_timeout: Duration::from_secs(5),
                drain_timeout: Duration::from_secs(60),
            },
            // No database there: the host store cache answers every query with 404
            // unless a test points it at a store it made.
            host_store_db: self.dir.path().join("no-host-db/db.sqlite"),
            host_store_case_hack: false,
        }
    }

    /// The configuration for a guest the daemon realises itself (`guestDrv`,
    /// `guestOut`), with no guest directory.
    pub fn lazy_config(&self, guest: &FakeGuest, extra: ConfigLayer) -> Config {
        let base = ConfigLayer {
            guest_drv: Some(guest.drv.clone()),
            guest_out: Some(guest.out.clone()),
            ..self.base_layer()
        };
        resolve_layers(base, extra)
    }

    /// What every test configuration has: this state directory, a small VM, and
    /// the caller as the guest's user.
    fn base_layer(&self) -> ConfigLayer {
        ConfigLayer {
            state_dir: Some(self.state_dir.clone()),
            cores: Some(1),
            memory: Some(1024),
            disk_size: Some("1G".parse().unwrap()),
            ssh_user: Some(current_user()),
            ..Default::default()
        }
    }

    /// Runs the binary with this fixture's state directory and guest.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().unwrap()
    }

    /// The binary, as `cli` runs it, on a thread of its own: for a command that
    /// waits while the test makes something happen.
    pub fn cli_in_background(&self, args: &[&str]) -> std::thread::JoinHandle<Output> {
        let mut command = self.cli_command(args);
        std::thread::spawn(move || command.output().unwrap())
    }

    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"));
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .env_remove("DARWIN_VZ_NIX_CONFIG")
            .env("DARWIN_VZ_NIX_GUEST", &self.guest_dir)
            .env("DARWIN_VZ_NIX_SSH_USER", current_user());
        command
    }
}

/// `base` as a config file's layer under `extra` as flags, resolved.
fn resolve_layers(base: ConfigLayer, extra: ConfigLayer) -> Config {
    Config::resolve(
        &[
            Source {
                origin: Origin::File("test".into()),
                layer: base,
            },
            Source {
                origin: Origin::Flag,
                layer: extra,
            },
        ],
        None,
    )
    .unwrap()
}

/// The supervisor's `status`, through the control socket.
pub fn status(fixture: &Fixture) -> StatusReport {
    let mut client = ControlClient::connect(&fixture.state_dir).unwrap();
    match client
        .call(Request::Status, Duration::from_secs(5))
        .unwrap()
    {
        Reply::Status(report) => *report,
        other => panic!("unexpected {other:?}"),
    }
}

/// The bootstrap builder's phase in `status`, `off` when not shown.
pub fn bootstrap_phase(fixture: &Fixture) -> String {
    status(fixture)
        .guest
        .and_then(|g| g.bootstrap)
        .map_or_else(|| "off".to_string(), |b| b.phase)
}

/// The VM's state, as `status` reports it.
pub fn vm_state(fixture: &Fixture) -> VmState {
    status(fixture).state
}

/// Polls `status` until the VM is in `state`, or panics naming it.
pub fn wait_state(fixture: &Fixture, state: VmState, timeout: Duration) {
    wait_for(timeout, state.as_str(), || status(fixture).state == state);
}

/// `darwin-vz-nix proxy` with stdin, stdout and stderr piped (stdin kept open).
pub fn spawn_proxy(fixture: &Fixture) -> Child {
    spawn_proxy_with(fixture, &[])
}

/// `darwin-vz-nix proxy ARGS`, piped like [`spawn_proxy`].
pub fn spawn_proxy_with(fixture: &Fixture, args: &[&str]) -> Child {
    fixture
        .cli_command(&[&["proxy"], args].concat())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `darwin-vz-nix proxy ARGS` with no stdin, run to its end (e.g. to see it fail).
pub fn run_proxy(fixture: &Fixture, args: &[&str]) -> Output {
    fixture
        .cli_command(&[&["proxy"], args].concat())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A Nix configuration directory of the test's own, so that no machine's
/// `/etc/nix/nix.conf`, `~/.config/nix` or users and groups change what the test
/// does. Nix run as root defaults `build-users-group` to `nixbld`, a group a clean
/// machine does not have; an empty value builds as the calling user. No binary
/// cache unless `extra` names one: CI has no network.
pub fn own_nix_conf(dir: &Path, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("nix.conf"),
        format!("build-users-group =\nsubstituters =\n{extra}"),
    )
    .unwrap();
    dir.to_path_buf()
}

/// A fake VM whose `sshd -i` runs the builder's Nix on the chroot store `store`
/// with the configuration in `conf_dir`: the "guest" builds into a store of its own.
pub fn builder_on_own_store(store: &Path, conf_dir: &Path) -> FakeVmBehaviour {
    FakeVmBehaviour {
        sshd_extra: vec![format!(
            "SetEnv NIX_REMOTE={} NIX_CONF_DIR={} NIX_USER_CONF_FILES={}",
            store.display(),
            conf_dir.display(),
            conf_dir.join("nix.conf").display()
        )],
        ..Default::default()
    }
}

/// Runs Debian's `nix` with `ssh_config` for its ssh and `conf_dir` as its only
/// configuration, at home in the fixture's directory.
pub fn nix_over_ssh(
    fixture: &Fixture,
    conf_dir: &Path,
    ssh_config: &Path,
    args: &[&str],
) -> Output {
    Command::new("nix")
        .args(["--extra-experimental-features", "nix-command"])
        .args(args)
        .env("NIX_SSHOPTS", format!("-F {}", ssh_config.display()))
        .env("HOME", fixture.dir.path())
        .env("NIX_CONF_DIR", conf_dir)
        .env("NIX_USER_CONF_FILES", conf_dir.join("nix.conf"))
        .env_remove("NIX_CONFIG")
        .env_remove("NIX_REMOTE")
        .output()
        .expect("nix is installed (apt install nix-bin)")
}

pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name
}

/// The real supervisor with a fake VM, served from a thread of this process.
pub struct Harness {
    pub vm: Arc<FakeVm>,
    /// The host's power management the supervisor was given.
    pub power: Arc<FakePower>,
    /// The supervisor's runtime, e.g. to count its live tasks.
    pub runtime: tokio::runtime::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
    state_dir: PathBuf,
}

impl Harness {
    pub fn start(fixture: &Fixture, behaviour: FakeVmBehaviour, idle: Option<Duration>) -> Harness {
        Self::start_with(
            fixture,
            fixture.config(ConfigLayer::default()),
            behaviour,
            fixture.options(idle),
        )
    }

    pub fn start_with(
        fixture: &Fixture,
        config: Config,
        behaviour: FakeVmBehaviour,
        options: DaemonOptions,
    ) -> Harness {
        Self::start_on(fixture, config, behaviour, options, HostInfo::detect())
    }

    /// Like `start_with`, on a host described by `host` (e.g. a Mac that has nested
    /// virtualization). `options.power` is replaced by the harness's fake.
    pub fn start_on(
        fixture: &Fixture,
        config: Config,
        behaviour: FakeVmBehaviour,
        mut options: DaemonOptions,
        host: HostInfo,
    ) -> Harness {
        prepare_sshd_privsep_dir();
        let power = Arc::new(FakePower::default());
        options.power = power.clone();
        let vm = FakeVm::new(&fixture.state_dir, behaviour);
        let prepared = daemon::prepare(&config).expect("prepare the state directory");
        let backend: Arc<dyn Backend> = vm.clone();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(runtime.handle().clone()).unwrap();
            runtime
                .block_on(daemon::serve(prepared, config, host, backend, options))
                .unwrap();
        });
        let harness = Harness {
            vm,
            power,
            runtime: handle_rx.recv().unwrap(),
            thread: Some(thread),
            state_dir: fixture.state_dir.clone(),
        };
        wait_for(Duration::from_secs(10), "the control socket", || {
            darwin_vz_nix::control::ControlClient::connect(&harness.state_dir).is_ok()
        });
        harness
    }
}

impl Harness {
    /// Ends the supervisor (`stop --daemon`, forced) and waits until its thread has
    /// returned from `daemon::serve`.
    pub fn shut_down(&mut self) {
        self.stop_supervisor();
    }

    /// Waits until the supervisor's thread has returned from `daemon::serve`, for a
    /// test that ended it itself.
    pub fn wait_for_exit(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn stop_supervisor(&mut self) {
        if let Ok(mut client) = darwin_vz_nix::control::ControlClient::connect(&self.state_dir) {
            let _ = client.call(forced_exit(), Duration::from_secs(10));
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop_supervisor();
    }
}

/// `stop --daemon --force`: the VM off at once, then the supervisor exits.
pub fn forced_exit() -> darwin_vz_nix::control::protocol::Request {
    darwin_vz_nix::control::protocol::Request::Stop {
        force: true,
        timeout_ms: None,
        exit: true,
        unless_in_use: false,
    }
}

/// sshd run as root wants its privilege separation directory.
pub fn prepare_sshd_privsep_dir() {
    if nix::unistd::getuid().is_root() {
        let _ = std::fs::create_dir_all("/run/sshd");
    }
}

/// Says that a test skipped (part of) what it checks, and why, where `cargo test`
/// shows it: the harness captures `print!` and `eprint!` of passing tests and shows
/// nothing of them, so this writes to the process's stderr itself.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "skipped: {test}: {why}");
}

/// Polls `condition` until it holds, or panics naming `what`.
pub fn wait_for(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Reads the first line a child process prints (e.g. the SSH banner through `proxy`).
pub fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

/// Evaluates a builtins-only Nix file to JSON with Debian's `nix-instantiate`.
pub fn nix_eval_json(file: &Path) -> serde_json::Value {
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(file)
        .output()
        .expect("nix-instantiate is installed (apt install nix-bin)");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}
