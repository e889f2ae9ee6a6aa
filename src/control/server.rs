//! The supervisor's side of the control socket.
//!
//! The socket's file mode and owner are the access boundary: 0600 (owner only), or
//! 0660 with a group when `controlGroup` is set. Each client connection is served by
//! its own task, so a slow or malicious client cannot wedge the others; a bad line gets
//! an error reply, an oversized one also closes the connection.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use super::protocol::{self, ErrorCode, MAX_LINE_BYTES, Reply, Request};
use crate::state::Access;
use crate::supervisor::Supervisor;

/// Default bound for requests that wait on the VM when the client gives none.
const DEFAULT_WAIT: Duration = Duration::from_secs(180);

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ControlServer {
    /// Binds the control socket. The caller holds the state directory's lock, which
    /// proves that any socket file already there is stale; it is replaced.
    pub fn bind(path: &Path, access: Access) -> Result<ControlServer, ServerError> {
        let fail = |source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!("removed stale control socket {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        // Bind under a private umask window: set the final mode right after.
        let listener = UnixListener::bind(path).map_err(fail)?;
        if let Access::Group(gid) = access {
            nix::unistd::chown(path, None, Some(gid)).map_err(|e| fail(e.into()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.socket_mode()))
            .map_err(fail)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until `shutdown` is notified (by a `stop` with `exit`, or by
    /// the daemon's signal handler).
    pub async fn serve(self, supervisor: Supervisor, shutdown: Arc<Notify>) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_client(stream, supervisor.clone(), shutdown.clone()));
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.notified() => break,
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads requests line by line and answers each.
async fn serve_client(stream: UnixStream, supervisor: Supervisor, shutdown: Arc<Notify>) {
    let mut reader = LineReader::default();
    loop {
        let line = match reader.next_line(&stream).await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(LineError::TooLong) => {
                let reply = Reply::Error {
                    code: ErrorCode::TooLarge,
                    message: format!(
                        "request longer than {MAX_LINE_BYTES} bytes; closing the connection"
                    ),
                };
                let _ = send(&stream, &protocol::reply_line(reply), None).await;
                return;
            }
            Err(LineError::Io(e)) => {
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
        tracing::debug!("control request: {}", request.name());
        match request {
            Request::Connect { port, timeout_ms } => {
                let timeout = wait_bound(timeout_ms);
                match supervisor.connect(port, timeout).await {
                    Ok((stream_to_guest, lease)) => {
                        let (fd, keepalive) = stream_to_guest.into_parts();
                        let reply = protocol::reply_line(Reply::Connected { port });
                        if let Err(e) = send(&stream, &reply, Some(&fd)).await {
                            tracing::debug!("could not hand the stream to the client: {e}");
                            return;
                        }
                        // Our copy of the descriptor goes; the client's keeps the
                        // stream open. The lease and keepalive live until the client
                        // closes its control connection.
                        drop(fd);
                        wait_for_close(&stream).await;
                        drop(keepalive);
                        drop(lease);
                        return;
                    }
                    Err(e) => {
                        let reply = Reply::Error {
                            code: e.code(),
                            message: e.to_string(),
                        };
                        let _ = send(&stream, &protocol::reply_line(reply), None).await;
                        return;
                    }
                }
            }
            other => {
                let (reply, exit) = answer(&supervisor, other).await;
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
    }
}

/// Answers every request but `connect`; `true` asks the daemon to exit afterwards.
async fn answer(supervisor: &Supervisor, request: Request) -> (Reply, bool) {
    let error = |e: crate::supervisor::SupervisorError| Reply::Error {
        code: e.code(),
        message: e.to_string(),
    };
    match request {
        Request::Status => (Reply::Status(Box::new(supervisor.status())), false),
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
            let already_running = supervisor.state() == protocol::VmState::Running;
            match supervisor.ensure_running(wait_bound(timeout_ms)).await {
                Ok(boot) => (
                    Reply::Started {
                        already_running,
                        boot,
                    },
                    false,
                ),
                Err(e) => (error(e), false),
            }
        }
        Request::WaitReady { timeout_ms } => {
            match supervisor.wait_ready(wait_bound(timeout_ms)).await {
                Ok(boot) => (Reply::Ready { boot }, false),
                Err(e) => (error(e), false),
            }
        }
        Request::Stop {
            force,
            timeout_ms,
            exit,
        } => {
            let timeout =
                timeout_ms.map_or(supervisor.options().stop_timeout, Duration::from_millis);
            match supervisor.stop(force, timeout).await {
                Ok(outcome) => (Reply::Stopped { outcome }, exit),
                Err(e) => (error(e), exit),
            }
        }
        Request::Reset { keys_only } => match supervisor.reset(keys_only).await {
            Ok(removed) => (Reply::Reset { removed }, false),
            Err(e) => (error(e), false),
        },
        Request::Connect { .. } => unreachable!("connect is served by serve_client"),
    }
}

fn wait_bound(timeout_ms: Option<u64>) -> Duration {
    timeout_ms.map_or(DEFAULT_WAIT, Duration::from_millis)
}

/// Writes `bytes`, passing `fd` along with the first chunk.
async fn send(stream: &UnixStream, bytes: &[u8], fd: Option<&OwnedFd>) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let result = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(&bytes[sent..])];
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
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until the client closes its end (or sends anything, which it must not).
async fn wait_for_close(stream: &UnixStream) {
    let mut buf = [0u8; 512];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

#[derive(Debug)]
enum LineError {
    TooLong,
    Io(std::io::Error),
}

/// Splits a byte stream into lines of at most `MAX_LINE_BYTES`.
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
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > MAX_LINE_BYTES {
                    return Err(LineError::TooLong);
                }
                return Ok(Some(line));
            }
            if self.buffer.len() > MAX_LINE_BYTES {
                return Err(LineError::TooLong);
            }
            stream.readable().await.map_err(LineError::Io)?;
            let mut chunk = [0u8; 8192];
            match stream.try_read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }
}
