//! `darwin-vz-nix proxy`: ssh's `ProxyCommand`.
//!
//! The supervisor hands us the guest stream's descriptor over the control socket; the
//! bytes never pass through the supervisor. Then, in the order we prefer:
//!
//! * **Hand-off** (`--fdpass`, with ssh's `ProxyUseFdpass yes`): we pass the
//!   descriptor on to ssh, which then talks to the guest stream itself — no copy at
//!   all — and exit (ssh waits for that before it goes on).
//! * **Relay** (otherwise, or when stdout is not a socket): ssh → pipe → this process →
//!   guest socket, one copy each way, until either side ends.
//!
//! Either way the session is the stream itself: the supervisor keeps watching its own
//! copy and counts the session until the stream ends, whichever process holds it
//! (`ssh -f` and `ControlMaster` move it into another one). This process and its
//! control connection do not matter to that count.
//!
//! vsock has no half-close, so when either direction ends both are torn down; the
//! `shutdown` is also what tells the supervisor that a relayed session ended.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use crate::control::ControlClient;

const BUFFER: usize = 256 * 1024;

/// How the proxy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyEnd {
    /// The descriptor went to ssh.
    HandedOver,
    /// Relayed until our input (ssh) closed.
    ClientClosed,
    /// Relayed until the guest closed the stream.
    GuestClosed,
}

/// Connects to guest `port` through the supervisor of `state_dir`; hands the stream
/// to ssh (`fdpass`, when stdout is a socket) or relays stdin/stdout until either side
/// closes. `alias` is the host name ssh was asked for (`%n`): the aarch64-linux
/// alias may be answered by the bootstrap builder (see `crate::bootstrap`).
pub fn run(
    state_dir: &std::path::Path,
    port: u32,
    timeout: Duration,
    fdpass: bool,
    alias: Option<&str>,
) -> Result<ProxyEnd, crate::control::ClientError> {
    let mut client = ControlClient::connect(state_dir)?;
    let stream = client.connect_for_build(port, timeout, allows_bootstrap(alias))?;
    drop(client);
    if fdpass {
        match hand_to_ssh(&stream) {
            Ok(()) => return Ok(ProxyEnd::HandedOver),
            // Not a socket: we were not started with ProxyUseFdpass; relay instead.
            Err(nix::errno::Errno::ENOTSOCK) => {}
            Err(e) => {
                // Nobody got the stream: end it, so its session ends at once.
                end_stream(&stream);
                return Err(crate::control::ClientError::Io {
                    socket: "stdout (ProxyUseFdpass)".into(),
                    source: e.into(),
                });
            }
        }
    }
    let stdin = dup_file(&std::io::stdin())?;
    let stdout = dup_file(&std::io::stdout())?;
    Ok(relay(stdin, stdout, stream))
}

/// Whether a connection for `alias` may be answered by the bootstrap builder: only
/// the builder's own alias, which Nix's machines line uses for aarch64-linux — the
/// one system the bootstrap builder builds. Any other name (the x86_64 alias, a
/// user's own Host block, no `--alias`) waits for the guest.
pub fn allows_bootstrap(alias: Option<&str>) -> bool {
    alias == Some(crate::contract::HOST_KEY_ALIAS)
}

/// Sends the stream's descriptor to ssh over stdout, as OpenSSH's `ProxyUseFdpass`
/// expects: one byte of data carrying one descriptor.
fn hand_to_ssh(stream: &OwnedFd) -> Result<(), nix::errno::Errno> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [stream.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"\0")];
    let stdout = std::io::stdout();
    sendmsg::<()>(
        stdout.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Shuts the stream down in both directions: the guest and the supervisor both see
/// its end, whoever else still holds a copy.
fn end_stream(stream: &OwnedFd) {
    let _ = nix::sys::socket::shutdown(stream.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

fn dup_file(fd: &impl AsFd) -> Result<File, crate::control::ClientError> {
    fd.as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|source| crate::control::ClientError::Io {
            socket: "stdio".into(),
            source,
        })
}

/// Copies `input` → `stream` and `stream` → `output` on two threads; returns when the
/// first direction ends, after shutting the stream down in both directions. A thread
/// still blocked on `input` is left behind: callers exit the process next.
pub fn relay(input: File, output: File, stream: OwnedFd) -> ProxyEnd {
    // Blocking I/O: the descriptor may come from a non-blocking owner.
    let _ = nix::fcntl::fcntl(
        &stream,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    );
    let (Ok(to_guest), Ok(from_guest)) = (stream.try_clone(), stream.try_clone()) else {
        end_stream(&stream);
        return ProxyEnd::GuestClosed;
    };
    let (to_guest, from_guest) = (File::from(to_guest), File::from(from_guest));
    let (done, finished) = mpsc::channel();

    let client_done = done.clone();
    std::thread::spawn(move || {
        copy(input, to_guest);
        let _ = client_done.send(ProxyEnd::ClientClosed);
    });
    std::thread::spawn(move || {
        copy(from_guest, output);
        let _ = done.send(ProxyEnd::GuestClosed);
    });
    let end = finished.recv().unwrap_or(ProxyEnd::GuestClosed);
    // Tear down both directions: the guest must see the end even though vsock
    // cannot carry a half-close, the supervisor must see the session end, and our
    // other thread must wake up.
    end_stream(&stream);
    end
}

fn copy(mut from: File, mut to: File) {
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buffer[..n]).is_err() {
            return;
        }
    }
}
