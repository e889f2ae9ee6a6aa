//! `darwin-vz-nix proxy`: ssh's `ProxyCommand`.
//!
//! The supervisor hands us the guest stream's descriptor over the control socket, so
//! bytes go ssh → pipe → this process → guest socket, with no hop through the
//! supervisor. The control connection stays open while we run: its closing (when we
//! exit) is how the supervisor counts the connection as ended.
//!
//! vsock has no half-close, so when either direction ends both are torn down.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use crate::control::ControlClient;

const BUFFER: usize = 256 * 1024;

/// Which side ended the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Our input (ssh) closed.
    Client,
    /// The guest closed the stream.
    Guest,
}

/// Connects to guest `port` through the supervisor of `state_dir` and relays
/// stdin/stdout until either side closes.
pub fn run(
    state_dir: &std::path::Path,
    port: u32,
    timeout: Duration,
) -> Result<RelayEnd, crate::control::ClientError> {
    let mut client = ControlClient::connect(state_dir)?;
    let stream = client.connect_port(port, timeout)?;
    let stdin = dup_file(&std::io::stdin())?;
    let stdout = dup_file(&std::io::stdout())?;
    let end = relay(stdin, stdout, stream);
    drop(client);
    Ok(end)
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
pub fn relay(input: File, output: File, stream: OwnedFd) -> RelayEnd {
    // Blocking I/O: the descriptor may come from a non-blocking owner.
    let _ = nix::fcntl::fcntl(
        &stream,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    );
    let (Ok(to_guest), Ok(from_guest)) = (stream.try_clone(), stream.try_clone()) else {
        return RelayEnd::Guest;
    };
    let (to_guest, from_guest) = (File::from(to_guest), File::from(from_guest));
    let (done, finished) = mpsc::channel();

    let client_done = done.clone();
    std::thread::spawn(move || {
        copy(input, to_guest);
        let _ = client_done.send(RelayEnd::Client);
    });
    std::thread::spawn(move || {
        copy(from_guest, output);
        let _ = done.send(RelayEnd::Guest);
    });
    let end = finished.recv().unwrap_or(RelayEnd::Guest);
    // Tear down both directions: the guest must see the end even though vsock
    // cannot carry a half-close, and our other thread must wake up.
    let _ = nix::sys::socket::shutdown(stream.as_raw_fd(), nix::sys::socket::Shutdown::Both);
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
