//! The clients' side of the control socket: blocking, small, used by every command.

use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::protocol::{self, ErrorCode, MAX_LINE_BYTES, Reply, ReplyLine, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no supervisor is running for {state_dir} (no one answers on {socket}); start one with `darwin-vz-nix start`, or enable services.darwin-vz in nix-darwin"
    )]
    NotRunning { state_dir: PathBuf, socket: PathBuf },
    /// The directory's lock is held (a supervisor lives) but its socket does not
    /// answer: it was deleted, and the supervisor makes it again shortly.
    #[error(
        "a supervisor (pid {pid}) owns {state_dir} but its control socket {socket} is missing; it makes the socket again within {within_secs} s — try again then (see its log {log})"
    )]
    SocketMissing {
        pid: String,
        state_dir: PathBuf,
        socket: PathBuf,
        within_secs: u64,
        log: PathBuf,
    },
    #[error(
        "permission denied on the control socket {socket}; run as the daemon's user or root (sudo), or ask for membership of its controlGroup"
    )]
    PermissionDenied { socket: PathBuf },
    #[error("no reply from the supervisor within {secs} s; see its log {log}")]
    Timeout { secs: u64, log: PathBuf },
    #[error("the supervisor closed the connection without a reply; see its log {log}")]
    Closed { log: PathBuf },
    #[error("cannot talk to the supervisor on {socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the supervisor sent a reply this client does not understand ({0}); are the client and daemon the same version?"
    )]
    Protocol(String),
    /// The supervisor answered with an error.
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
}

/// How often a supervisor checks that its socket file still exists (the server's
/// `ServerOptions::DEFAULT_SOCKET_CHECK` is this).
pub const SOCKET_CHECK_SECS: u64 = 2;

/// How long a client waits for a live supervisor to make its deleted socket again.
const SOCKET_WAIT: Duration = Duration::from_secs(SOCKET_CHECK_SECS + 1);

pub struct ControlClient {
    stream: UnixStream,
    socket: PathBuf,
    log: PathBuf,
    buffer: Vec<u8>,
}

impl std::os::fd::AsFd for ControlClient {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl ControlClient {
    /// Connects to the supervisor of `state_dir`. When no one answers on the socket
    /// but the directory's lock is held, the supervisor lives and its socket was
    /// deleted: wait for it to make the socket again (it checks every
    /// `SOCKET_CHECK_SECS`), and say so if it does not.
    pub fn connect(state_dir: &Path) -> Result<ControlClient, ClientError> {
        let state = crate::state::StateDir::new(state_dir);
        let socket = state.socket();
        let mut waited_since: Option<Instant> = None;
        loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => {
                    return Ok(ControlClient {
                        stream,
                        socket,
                        log: state.daemon_log(),
                        buffer: Vec::new(),
                    });
                }
                Err(source) => match source.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        if !state.is_locked() {
                            return Err(ClientError::NotRunning {
                                state_dir: state_dir.to_path_buf(),
                                socket,
                            });
                        }
                        let since = *waited_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= SOCKET_WAIT {
                            return Err(ClientError::SocketMissing {
                                pid: state.lock_holder().unwrap_or_else(|| "unknown".into()),
                                state_dir: state_dir.to_path_buf(),
                                socket,
                                within_secs: SOCKET_CHECK_SECS,
                                log: state.daemon_log(),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        return Err(ClientError::PermissionDenied { socket });
                    }
                    _ => return Err(ClientError::Io { socket, source }),
                },
            }
        }
    }

    /// Sends a request and waits up to `timeout` for its reply. Error replies become
    /// `ClientError::Remote`.
    pub fn call(&mut self, request: Request, timeout: Duration) -> Result<Reply, ClientError> {
        self.send(request)?;
        let (reply, _) = self.receive(timeout)?;
        Ok(reply)
    }

    /// Asks for a stream to a guest port; returns its descriptor. The stream is the
    /// session: it counts as in use until the guest closes it or someone shuts it
    /// down (`shutdown(2)`; closing a descriptor is not enough while the supervisor
    /// holds its own copy). The control connection ends with the reply.
    pub fn connect_port(&mut self, port: u32, timeout: Duration) -> Result<OwnedFd, ClientError> {
        self.connect_for_build(port, timeout, false)
    }

    /// `connect_port` for a build connection on the aarch64-linux alias
    /// (`allow_bootstrap`): while no guest exists and the bootstrap builder runs
    /// for the first guest's build, the stream goes to it.
    pub fn connect_for_build(
        &mut self,
        port: u32,
        timeout: Duration,
        allow_bootstrap: bool,
    ) -> Result<OwnedFd, ClientError> {
        self.send(Request::Connect {
            port,
            timeout_ms: Some(protocol::millis(timeout)),
            allow_bootstrap,
        })?;
        // Allow a little more than the supervisor's own bound so that its error
        // reply, not our timeout, tells what happened.
        let (reply, fd) = self.receive(timeout.saturating_add(Duration::from_secs(5)))?;
        match (reply, fd) {
            (Reply::Connected { .. }, Some(fd)) => Ok(fd),
            (Reply::Connected { .. }, None) => Err(ClientError::Protocol(
                "connected without a descriptor".into(),
            )),
            (other, _) => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Sends a raw line, for tests of malformed input.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream
            .write_all(bytes)
            .map_err(|source| self.io(source))
    }

    /// Reads one reply line as it came.
    pub fn receive_raw(&mut self, timeout: Duration) -> Result<Reply, ClientError> {
        self.receive(timeout).map(|(reply, _)| reply)
    }

    fn send(&mut self, request: Request) -> Result<(), ClientError> {
        let line = protocol::request_line(request);
        self.send_raw(&line)
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Reads one reply line and any descriptor that came with it.
    fn receive(&mut self, timeout: Duration) -> Result<(Reply, Option<OwnedFd>), ClientError> {
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|source| self.io(source))?;
        let mut fd = None;
        let line = loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                break line;
            }
            if self.buffer.len() > MAX_LINE_BYTES * 16 {
                return Err(ClientError::Protocol("reply too long".into()));
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let message = recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::empty(),
            );
            let (bytes, received) = match message {
                Ok(message) => {
                    let mut received = Vec::new();
                    for cmsg in message.cmsgs().map_err(|e| self.io(e.into()))? {
                        if let ControlMessageOwned::ScmRights(fds) = cmsg {
                            received.extend(fds);
                        }
                    }
                    (message.bytes, received)
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err(ClientError::Timeout {
                        secs: timeout.as_secs().max(1),
                        log: self.log.clone(),
                    });
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.io(e.into())),
            };
            for raw in received {
                // SAFETY: SCM_RIGHTS gave us a fresh descriptor that nothing else owns.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                let _ = nix::fcntl::fcntl(
                    &owned,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                fd.get_or_insert(owned);
            }
            if bytes == 0 {
                return Err(ClientError::Closed {
                    log: self.log.clone(),
                });
            }
            self.buffer.extend_from_slice(&chunk[..bytes]);
        };
        let parsed: ReplyLine =
            serde_json::from_slice(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match parsed.reply {
            Reply::Error { code, message } => Err(ClientError::Remote { code, message }),
            reply => Ok((reply, fd)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A "supervisor" that reads the request, then answers with `reply`, then
    /// holds the connection open until the client goes away.
    fn fake_supervisor(reply: Vec<u8>) -> (tempfile::TempDir, std::thread::JoinHandle<()>) {
        let tmp = tempfile::tempdir().unwrap();
        let state = crate::state::StateDir::new(tmp.path());
        let listener = UnixListener::bind(state.socket()).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(&reply);
            let _ = stream.read(&mut request); // until the client closes
        });
        (tmp, server)
    }

    #[test]
    fn a_reply_without_an_end_is_refused_once_it_is_too_long() {
        // More than the client buffers, with no newline: the client must give up
        // with a protocol error, not keep reading until its timeout.
        let endless = vec![b'x'; MAX_LINE_BYTES * 16 + 256 * 1024];
        let (tmp, server) = fake_supervisor(endless);
        let mut client = ControlClient::connect(tmp.path()).unwrap();
        let started = Instant::now();
        let err = client
            .call(Request::Status, Duration::from_secs(20))
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Protocol(why) if why == "reply too long"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn a_long_reply_within_the_cap_arrives_whole() {
        // The cap is sixteen request lines: a reply eight lines long is fine.
        let message = "m".repeat(MAX_LINE_BYTES * 8);
        let (tmp, server) = fake_supervisor(protocol::reply_line(Reply::Error {
            code: ErrorCode::BadRequest,
            message: message.clone(),
        }));
        let mut client = ControlClient::connect(tmp.path()).unwrap();
        match client.call(Request::Status, Duration::from_secs(10)) {
            Err(ClientError::Remote { message: got, .. }) => assert!(got == message),
            other => panic!("{other:?}"),
        }
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn a_reply_line_is_parsed_and_an_error_reply_is_an_error() {
        let (tmp, server) = fake_supervisor(protocol::reply_line(Reply::Error {
            code: ErrorCode::BadRequest,
            message: "no".into(),
        }));
        let mut client = ControlClient::connect(tmp.path()).unwrap();
        let err = client
            .call(Request::Status, Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Remote { message, .. } if message == "no"),
            "{err:?}"
        );
        drop(client);
        server.join().unwrap();
    }
}
