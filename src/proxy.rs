//! `darwin-vz-nix proxy`: ssh's `ProxyCommand`.
//!
//! The supervisor hands us the guest stream's descriptor over the control socket; the
//! bytes never pass through the supervisor. Then, in the order we prefer:
//!
//! * **Hand-off** (`--fdpass`, with ssh's `ProxyUseFdpass yes`): we pass the
//!   descriptor on to ssh, which then talks to the guest stream itself — no copy at
//!   all. ssh waits for its ProxyCommand to exit before it goes on, so we fork: the
//!   parent exits, and a detached child keeps the control connection open until ssh
//!   exits (or the supervisor goes away). The open control connection is how the
//!   supervisor counts the SSH session for the idle poweroff.
//! * **Relay** (otherwise, or when stdout is not a socket): ssh → pipe → this process →
//!   guest socket, one copy each way; the control connection closes when we exit.
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

/// Connects to guest `port` through the supervisor of `state_dir`; hands the stream
/// to ssh (`fdpass`, when stdout is a socket) or relays stdin/stdout until either side
/// closes. With a hand-off this process exits inside; it returns only after a relay.
pub fn run(
    state_dir: &std::path::Path,
    port: u32,
    timeout: Duration,
    fdpass: bool,
) -> Result<RelayEnd, crate::control::ClientError> {
    let mut client = ControlClient::connect(state_dir)?;
    let stream = client.connect_port(port, timeout)?;
    if fdpass {
        match hand_to_ssh(&stream) {
            Ok(()) => {
                drop(stream);
                stay_until_ssh_exits(client);
            }
            // Not a socket: we were not started with ProxyUseFdpass; relay instead.
            Err(nix::errno::Errno::ENOTSOCK) => {}
            Err(e) => {
                return Err(crate::control::ClientError::Io {
                    socket: "stdout (ProxyUseFdpass)".into(),
                    source: e.into(),
                });
            }
        }
    }
    let stdin = dup_file(&std::io::stdin())?;
    let stdout = dup_file(&std::io::stdout())?;
    let end = relay(stdin, stdout, stream);
    drop(client);
    Ok(end)
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

/// Lets ssh go on (it waits for this process to exit) while a detached child keeps
/// the control connection — and so the session's place in the idle count — until
/// ssh exits or the supervisor closes the connection. Never returns.
fn stay_until_ssh_exits(client: ControlClient) -> ! {
    let ssh = nix::unistd::getppid();
    // SAFETY: this process has no other threads yet (the relay's start later), so the
    // child may run ordinary code after fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            // Do not hold ssh's pipes open: whoever reads ssh's stderr waits for EOF.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let _ = nix::unistd::dup2_stdin(&null);
                let _ = nix::unistd::dup2_stdout(&null);
                let _ = nix::unistd::dup2_stderr(&null);
            }
            watch(&client, ssh);
            std::process::exit(0);
        }
        // The parent (or a failed fork, which leaves nothing to watch) exits, and ssh
        // goes on with the descriptor.
        _ => std::process::exit(0),
    }
}

/// Returns when `ssh` is gone or the supervisor closed the control connection.
fn watch(client: &ControlClient, ssh: nix::unistd::Pid) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let mut fds = [PollFd::new(client.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            // Readable means EOF or an error here: the supervisor is gone.
            Ok(n) if n > 0 => return,
            Err(nix::errno::Errno::EINTR) | Ok(_) => {}
            Err(_) => return,
        }
        if nix::sys::signal::kill(ssh, None) == Err(nix::errno::Errno::ESRCH) {
            return;
        }
    }
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
