//! The supervisor's side of the control socket.
//!
//! The socket's file mode and owner are the outer boundary: 0600 (owner only), or
//! 0660 with a group when `controlGroup` is set; inside it every request is checked
//! against its peer's credentials (`access`). Each client is served by its own task,
//! so a slow or malicious client cannot wedge the others, and resources stay bounded:
//! at most `max_clients` are served at once (more wait in the listen backlog), a
//! client that sends no complete request line within `request_timeout` is dropped
//! (one that waits for a boot or a stop it asked for is not: it has sent its line),
//! and running out of descriptors pauses accepting instead of spinning.
//!
//! The socket file is checked every `socket_check`: when someone deleted it, it is
//! made again, so clients never lose a running supervisor. A socket this server did
//! not make is never removed while something answers on it.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::access::{self, Owner, Peer};
use super::protocol::{
    self, AssertionReport, BootTiming, BootstrapReport, ClockSyncReport, ConfigSummary, ErrorCode,
    GuestLifecycle, GuestSummary, HostCacheReport, MAX_LINE_BYTES, NoticeReport, Reply, Request,
    SleepReport, StatusReport, StopOutcome, VmState,
};
use crate::state::Access;
use crate::supervisor::{self, StopRequest, Supervisor, SupervisorError};

/// Default bound for requests that wait on the VM when the client gives none.
const DEFAULT_WAIT: Duration = Duration::from_secs(180);

/// Longest pause between accept attempts while the process has no descriptor left.
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(2);

/// Bounds the server keeps; the daemon derives them from the descriptor limit.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub access: Access,
    /// A client must send a complete request line within this long after it
    /// connects or after its last reply.
    pub request_timeout: Duration,
    /// Clients served at once.
    pub max_clients: usize,
    /// How often the socket file is checked (and made again when deleted).
    pub socket_check: Duration,
}

impl ServerOptions {
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// Clients wait this long (and a little more) for a deleted socket to return.
    pub const DEFAULT_SOCKET_CHECK: Duration =
        Duration::from_secs(super::client::SOCKET_CHECK_SECS);

    /// Defaults for a process allowed `open_files` descriptors: a quarter of them
    /// for control clients, between 16 and 1024 (the rest is for guest streams).
    pub fn for_limit(access: Access, open_files: u64) -> ServerOptions {
        let max_clients = usize::try_from(open_files / 4)
            .unwrap_or(usize::MAX)
            .clamp(16, 1024);
        ServerOptions {
            access,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_clients,
            socket_check: Self::DEFAULT_SOCKET_CHECK,
        }
    }
}

/// What the server answers from.
pub struct ServerContext {
    pub supervisor: Supervisor,
    /// The settings `status` reports.
    pub summary: ConfigSummary,
    /// The daemon's own user: with root, the only peer that may stop or reset.
    pub owner: Owner,
    /// The host store's cache, when it is served (for `status`).
    pub host_cache: Option<std::sync::Arc<crate::hostcache::HostCache>>,
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this server made.
    identity: (u64, u64),
    options: ServerOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "something already answers on {path}; another supervisor may own this state directory — stop it first (`darwin-vz-nix stop --daemon`)"
    )]
    Answering { path: PathBuf },
}

impl ControlServer {
    /// Binds the control socket. The caller holds the state directory's lock, so a
    /// socket file already there is stale — unless something answers on it, which is
    /// refused rather than taken over.
    pub fn bind(path: &Path, options: ServerOptions) -> Result<ControlServer, ServerError> {
        if answers(path) {
            return Err(ServerError::Answering {
                path: path.to_path_buf(),
            });
        }
        let (listener, identity) = listen(path, options.access)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            identity,
            options,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until `shutdown` is notified (by a `stop` with `exit`, or by
    /// the daemon's signal handler).
    pub async fn serve(mut self, context: Arc<ServerContext>, shutdown: Arc<Notify>) {
        let permits = Arc::new(Semaphore::new(self.options.max_clients));
        let mut check = tokio::time::interval(self.options.socket_check);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pause = Duration::ZERO;
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = check.tick() => { self.check_socket(); continue; }
                () = shutdown.notified() => break,
            };
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        pause = Duration::ZERO;
                        let task = serve_client(
                            stream,
                            context.clone(),
                            shutdown.clone(),
                            self.options.request_timeout,
                            permit,
                        );
                        tokio::spawn(task);
                    }
                    Err(e) => {
                        // Out of descriptors (or memory): the pending client stays in
                        // the backlog and the socket stays readable, so accepting again
                        // at once would spin. Back off, doubling up to a bound.
                        pause = pause.saturating_mul(2).clamp(Duration::from_millis(50), MAX_ACCEPT_PAUSE);
                        tracing::warn!("accept failed: {e}; pausing new control connections");
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = shutdown.notified() => break,
                        }
                    }
                },
                _ = check.tick() => self.check_socket(),
                () = shutdown.notified() => break,
            }
        }
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// True when the socket file at our path is the one this server made.
    fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.identity)
    }

    /// Makes the socket again when its file was deleted or replaced by a dead one.
    fn check_socket(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => return,
            Ok(_) if answers(&self.path) => {
                tracing::error!(
                    "{} was replaced by a socket something else answers on; leaving it",
                    self.path.display()
                );
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(
                    "cannot check the control socket {}: {e}",
                    self.path.display()
                );
                return;
            }
        }
        match listen(&self.path, self.options.access) {
            Ok((listener, identity)) => {
                self.listener = listener;
                self.identity = identity;
                tracing::warn!(
                    "the control socket {} had been deleted or replaced; made it again",
                    self.path.display()
                );
            }
            Err(e) => tracing::error!("cannot make the control socket again: {e}"),
        }
    }
}

/// True when something accepts connections on `path` now.
fn answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Replaces whatever (dead) file is at `path` by a listening socket with the mode
/// and group of `access`; returns it with its file's device and inode.
fn listen(path: &Path, access: Access) -> Result<(UnixListener, (u64, u64)), ServerError> {
    let fail = |source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!("removed stale control socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    // The directory is private to the owner (and group), so nobody else can race
    // us between the bind and setting the final mode.
    let listener = UnixListener::bind(path).map_err(fail)?;
    if let Access::Group(gid) = access {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| fail(e.into()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.socket_mode()))
        .map_err(fail)?;
    let meta = std::fs::symlink_metadata(path).map_err(fail)?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Reads requests line by line and answers each, as long as the client keeps its
/// permit (and so its place among `max_clients`).
async fn serve_client(
    stream: UnixStream,
    context: Arc<ServerContext>,
    shutdown: Arc<Notify>,
    request_timeout: Duration,
    _permit: OwnedSemaphorePermit,
) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer {
            uid: cred.uid(),
            gid: cred.gid(),
        },
        Err(e) => {
            tracing::warn!("cannot read a control client's credentials ({e}); closing");
            return;
        }
    };
    let mut reader = LineReader::default();
    loop {
        let line = match tokio::time::timeout(request_timeout, reader.next_line(&stream)).await {
            Err(_) => {
                let reply = Reply::Error {
                    code: ErrorCode::Timeout,
                    message: format!(
                        "no complete request line within {}; closing the connection",
                        supervisor::seconds(request_timeout)
                    ),
                };
                let _ = send(&stream, &protocol::reply_line(reply), None).await;
                return;
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return,
            Ok(Err(LineError::TooLong)) => {
                let reply = Reply::Error {
                    code: ErrorCode::TooLarge,
                    message: format!(
                        "request longer than {MAX_LINE_BYTES} bytes; closing the connection"
                    ),
                };
                let _ = send(&stream, &protocol::reply_line(reply), None).await;
                return;
            }
            Ok(Err(LineError::Io(e))) => {
                tracing::debug!("control client went away: {e}");
                return;
            }
        };
        let request = match protocol::parse_request(&line) {
            Ok(request) => request,
            Err(bad) => {
                tracing::debug!("bad control request: {}", bad.message);
                let reply = Reply::Error {
                    code: bad.code,
                    message: bad.message,
                };
                if send(&stream, &protocol::reply_line(reply), None)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        tracing::debug!("control request from uid {}: {}", peer.uid, request.name());
        if let Err(message) = access::authorize(&context.owner, peer, &request) {
            tracing::warn!("{message}");
            let reply = Reply::Error {
                code: ErrorCode::Forbidden,
                message,
            };
            if send(&stream, &protocol::reply_line(reply), None)
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        if let Request::Connect {
            port,
            timeout_ms,
            allow_bootstrap,
        } = request
        {
            let wait = wait_bound(timeout_ms);
            hand_out_stream(&stream, &context.supervisor, port, wait, allow_bootstrap).await;
            // The stream is the session now; this control connection is done.
            return;
        }
        let (reply, exit) = answer(&context, request).await;
        let sent = send(&stream, &protocol::reply_line(reply), None).await;
        if exit {
            shutdown.notify_waiters();
            shutdown.notify_one();
            return;
        }
        if sent.is_err() {
            return;
        }
    }
}

/// Connects to a guest port and passes the stream's descriptor with the reply.
async fn hand_out_stream(
    stream: &UnixStream,
    supervisor: &Supervisor,
    port: u32,
    timeout: Duration,
    allow_bootstrap: bool,
) {
    match supervisor
        .connect_for_build(port, timeout, allow_bootstrap)
        .await
    {
        Ok(fd) => {
            let reply = protocol::reply_line(Reply::Connected { port });
            if let Err(e) = send(stream, &reply, Some(&fd)).await {
                // Nobody got the stream: end it, so its session ends at once.
                tracing::debug!("could not hand the stream to the client ({e}); ending it");
                let _ =
                    nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            }
        }
        Err(e) => {
            let _ = send(stream, &protocol::reply_line(error_reply(e)), None).await;
        }
    }
}

/// Answers every request but `connect`; `true` asks the daemon to exit afterwards.
async fn answer(context: &ServerContext, request: Request) -> (Reply, bool) {
    let supervisor = &context.supervisor;
    match request {
        Request::Status => (
            Reply::Status(Box::new(StatusReport {
                host_cache: context
                    .host_cache
                    .as_ref()
                    .map(|c| host_cache_report(c.stats())),
                ..status_report(supervisor.snapshot(), &context.summary)
            })),
            false,
        ),
        Request::Start { wait: false, .. } => {
            let already_running = supervisor.start_in_background();
            (
                Reply::Started {
                    already_running,
                    boot: None,
                },
                false,
            )
        }
        Request::Start {
            wait: true,
            timeout_ms,
        } => {
            let already_running = supervisor.state() == supervisor::VmState::Running;
            match supervisor.ensure_running(wait_bound(timeout_ms)).await {
                Ok(boot) => (
                    Reply::Started {
                        already_running,
                        boot: boot.map(boot_timing),
                    },
                    false,
                ),
                Err(e) => (error_reply(e), false),
            }
        }
        Request::WaitReady { timeout_ms } => {
            match supervisor.wait_ready(wait_bound(timeout_ms)).await {
                Ok(boot) => (
                    Reply::Ready {
                        boot: boot.map(boot_timing),
                    },
                    false,
                ),
                Err(e) => (error_reply(e), false),
            }
        }
        Request::Stop {
            force,
            timeout_ms,
            exit,
            unless_in_use,
        } => {
            let timeout =
                timeout_ms.map_or(supervisor.options().stop_timeout, Duration::from_millis);
            let request = StopRequest {
                force,
                timeout,
                unless_in_use,
            };
            match supervisor.stop(request).await {
                Ok(outcome) => (
                    Reply::Stopped {
                        outcome: stop_outcome(outcome),
                    },
                    exit,
                ),
                // A stop refused because the VM is in use leaves the daemon running.
                Err(e @ SupervisorError::InUse { .. }) => (error_reply(e), false),
                Err(e) => (error_reply(e), exit),
            }
        }
        Request::Reset { keys_only } => match supervisor.reset(keys_only).await {
            Ok(removed) => (Reply::Reset { removed }, false),
            Err(e) => (error_reply(e), false),
        },
        Request::Connect { .. } => (
            Reply::Error {
                code: ErrorCode::Internal,
                message: "connect is served on its own".into(),
            },
            false,
        ),
    }
}

fn wait_bound(timeout_ms: Option<u64>) -> Duration {
    timeout_ms.map_or(DEFAULT_WAIT, Duration::from_millis)
}

// ---- the supervisor's types on the wire ----------------------------------------

fn status_report(snapshot: supervisor::Snapshot, summary: &ConfigSummary) -> StatusReport {
    let now = std::time::SystemTime::now();
    // Wall-clock ages: they include time the Mac slept.
    let age = |at: std::time::SystemTime| {
        now.duration_since(at)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    };
    let unix = |at: std::time::SystemTime| {
        at.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    };
    let sleep = SleepReport {
        enabled: snapshot.sleep.enabled,
        assertion: snapshot.sleep.held.map(|held| AssertionReport {
            reason: held.reason,
            since_unix_secs: unix(held.since),
            held_secs: age(held.since),
        }),
        last_error: snapshot.sleep.last_error,
        wake_error: snapshot.sleep.wake_error,
    };
    let clock_sync = snapshot.clock.map(|sync| ClockSyncReport {
        reason: sync.reason.as_str().to_string(),
        age_secs: age(sync.at),
        offset_secs: sync.result.as_ref().ok().map(|step| step.as_secs_f64()),
        error: sync.result.err(),
    });
    StatusReport {
        state: vm_state(snapshot.state),
        backend: snapshot.backend.to_string(),
        supervisor_pid: std::process::id(),
        supervisor_uptime_secs: snapshot.uptime.as_secs_f64(),
        vm_uptime_secs: snapshot.vm_uptime.map(|d| d.as_secs_f64()),
        connections: snapshot.connections,
        idle_remaining_secs: snapshot.idle_remaining.map(|d| d.as_secs_f64()),
        boots: snapshot.boots,
        last_boot: snapshot.last_boot.map(boot_timing),
        last_error: snapshot.last_error,
        notices: snapshot
            .notices
            .into_iter()
            .map(|notice| NoticeReport {
                message: notice.message,
                age_secs: notice.age.as_secs_f64(),
            })
            .collect(),
        config: summary.clone(),
        guest_report: snapshot.guest_report.map(|guest| GuestSummary {
            boot: guest.boot.0,
            nested_virtualization: guest.nested_virtualization,
            kvm: guest.kvm,
            warning: guest.warning(),
            kernel: guest.kernel,
        }),
        sleep: Some(sleep),
        clock_sync,
        host_woke_secs_ago: snapshot.host_woke.map(age),
        guest: snapshot.guest.map(guest_lifecycle),
        host_cache: None,
    }
}

fn guest_lifecycle(status: crate::guest::GuestStatus) -> GuestLifecycle {
    GuestLifecycle {
        phase: status.phase.as_str().to_string(),
        drv: status.drv,
        out: status.out,
        next_boot: status.next_boot,
        progress: status.progress,
        error: status.error,
        log: status.log,
        for_secs: status.for_how_long.map(|d| d.as_secs_f64()),
        bootstrap: status.bootstrap.map(|b| BootstrapReport {
            phase: b.phase.as_str().to_string(),
            progress: b.progress,
            endpoint: b.endpoint,
            sessions: b.sessions,
            console_log: b.console_log,
            error: b.error,
        }),
    }
}

fn host_cache_report(stats: crate::hostcache::CacheStats) -> HostCacheReport {
    HostCacheReport {
        narinfo_hits: stats.narinfo_hits,
        narinfo_misses: stats.narinfo_misses,
        nars_served: stats.nars_served,
        nar_bytes: stats.nar_bytes,
        nars_aborted: stats.nars_aborted,
        streams_refused: stats.streams_refused,
        last_problem: stats.last_problem,
    }
}

fn vm_state(state: supervisor::VmState) -> VmState {
    match state {
        supervisor::VmState::Stopped => VmState::Stopped,
        supervisor::VmState::Starting => VmState::Starting,
        supervisor::VmState::Running => VmState::Running,
        supervisor::VmState::Stopping => VmState::Stopping,
        supervisor::VmState::Failed => VmState::Failed,
    }
}

fn boot_timing(timing: supervisor::BootTiming) -> BootTiming {
    BootTiming {
        planned_secs: timing.planned.as_secs_f64(),
        vm_started_secs: timing.vm_started.as_secs_f64(),
        ready_secs: timing.ready.as_secs_f64(),
    }
}

fn stop_outcome(outcome: supervisor::StopOutcome) -> StopOutcome {
    match outcome {
        supervisor::StopOutcome::AlreadyStopped => StopOutcome::AlreadyStopped,
        supervisor::StopOutcome::Graceful => StopOutcome::Graceful,
        supervisor::StopOutcome::Forced => StopOutcome::Forced,
    }
}

fn error_reply(error: SupervisorError) -> Reply {
    let code = match &error {
        SupervisorError::BootFailed(_) => ErrorCode::BootFailed,
        SupervisorError::Timeout { .. } | SupervisorError::GuestNotReady { .. } => {
            ErrorCode::Timeout
        }
        SupervisorError::ConnectFailed(_) => ErrorCode::ConnectFailed,
        SupervisorError::InUse { .. } => ErrorCode::Busy,
        SupervisorError::StopFailed(_) | SupervisorError::Internal(_) => ErrorCode::Internal,
    };
    Reply::Error {
        code,
        message: error.to_string(),
    }
}

// ---- bytes on the socket ---------------------------------------------------------

/// Writes `bytes`, passing `fd` along with the first chunk.
async fn send(stream: &UnixStream, bytes: &[u8], fd: Option<&OwnedFd>) -> std::io::Result<()> {
    let mut sent = 0;
    while let Some(rest) = bytes.get(sent..).filter(|rest| !rest.is_empty()) {
        stream.writable().await?;
        let result = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(rest)];
            let raw;
            let cmsgs: &[ControlMessage] = match fd {
                Some(fd) if sent == 0 => {
                    raw = [fd.as_raw_fd()];
                    &[ControlMessage::ScmRights(&raw)]
                }
                _ => &[],
            };
            sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
                .map_err(std::io::Error::from)
        });
        match result {
            Ok(n) => sent = sent.saturating_add(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[derive(Debug)]
enum LineError {
    TooLong,
    Io(std::io::Error),
}

/// Splits a byte stream into lines of at most `MAX_LINE_BYTES`. A last line without
/// its newline (the client wrote it and closed, or shut down its sending side) is a
/// line too: it gets its answer instead of vanishing.
#[derive(Default)]
struct LineReader {
    buffer: Vec<u8>,
}

impl LineReader {
    async fn next_line(&mut self, stream: &UnixStream) -> Result<Option<Vec<u8>>, LineError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                return Self::finish(line).map(Some);
            }
            if self.buffer.len() > MAX_LINE_BYTES {
                return Err(LineError::TooLong);
            }
            stream.readable().await.map_err(LineError::Io)?;
            let mut chunk = [0u8; 8192];
            match stream.try_read(&mut chunk) {
                Ok(0) if self.buffer.is_empty() => return Ok(None),
                Ok(0) => return Self::finish(std::mem::take(&mut self.buffer)).map(Some),
                Ok(n) => self
                    .buffer
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }

    fn finish(mut line: Vec<u8>) -> Result<Vec<u8>, LineError> {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > MAX_LINE_BYTES {
            return Err(LineError::TooLong);
        }
        Ok(line)
    }
}
