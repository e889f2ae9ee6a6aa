//! Who may ask the supervisor for what.
//!
//! The control socket's mode is the outer boundary: 0600 lets in only the daemon's
//! user (and root), 0660 with `controlGroup` also the group's members. Inside it,
//! every connection's peer is identified by the kernel (`SO_PEERCRED` on Linux,
//! `getpeereid` on macOS) and every request is checked against this table:
//!
//! | peer                              | may ask for                                        |
//! |-----------------------------------|----------------------------------------------------|
//! | the daemon's own user, root       | everything                                         |
//! | anyone else (controlGroup member) | `status`, `wait-ready`, `start`, `connect` to sshd |
//!
//! So the group may look, boot and build; stopping the VM (`stop`), ending the
//! supervisor (`stop --daemon`), deleting state (`reset`: `destroy`, `rotate-keys`)
//! and reaching guest ports other than sshd's (the clock setter runs as root in the
//! guest) are for the daemon's user and root.

use super::protocol::Request;
use crate::contract::SSH_VSOCK_PORT;

/// The credentials the kernel reports for a control connection's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
}

/// The daemon's own identity, to compare peers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    /// For messages: the user's name, when it has one.
    pub name: Option<String>,
}

impl Owner {
    /// The user this process runs as.
    pub fn current() -> Owner {
        let uid = nix::unistd::geteuid();
        Owner {
            uid: uid.as_raw(),
            name: nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map(|user| user.name),
        }
    }

    fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("{name} (uid {})", self.uid),
            None => format!("uid {}", self.uid),
        }
    }
}

/// True when `peer` may make `request`.
pub fn allows(owner: &Owner, peer: Peer, request: &Request) -> bool {
    let full = peer.uid == owner.uid || peer.uid == 0;
    full || match request {
        Request::Status | Request::Start { .. } | Request::WaitReady { .. } => true,
        Request::Connect { port, .. } => *port == SSH_VSOCK_PORT,
        Request::Stop { .. } | Request::Reset { .. } => false,
    }
}

/// `Ok` when `peer` may make `request`; otherwise the refusal, naming the operation
/// and who may ask for it.
pub fn authorize(owner: &Owner, peer: Peer, request: &Request) -> Result<(), String> {
    if allows(owner, peer, request) {
        return Ok(());
    }
    Err(format!(
        "`{}` is refused for uid {}: only the daemon's user, {}, and root may stop the VM, end the supervisor, reset its state or reach guest ports other than sshd's ({SSH_VSOCK_PORT}); other members of its control group may use status, start, wait-ready and connect (ssh)",
        request.name(),
        peer.uid,
        owner.describe()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_for_every_operation_and_peer() {
        let owner = Owner {
            uid: 455,
            name: Some("_darwin-vz".into()),
        };
        let requests = [
            (Request::Status, true),
            (
                Request::Start {
                    wait: true,
                    timeout_ms: None,
                },
                true,
            ),
            (Request::WaitReady { timeout_ms: None }, true),
            (
                Request::Connect {
                    port: 22,
                    timeout_ms: None,
                    allow_bootstrap: false,
                },
                true,
            ),
            (
                Request::Connect {
                    port: 22,
                    timeout_ms: None,
                    allow_bootstrap: true,
                },
                true,
            ),
            (
                Request::Connect {
                    port: crate::contract::CLOCK_VSOCK_PORT,
                    timeout_ms: None,
                    allow_bootstrap: false,
                },
                false,
            ),
            (
                Request::Connect {
                    port: crate::contract::CLOCK_VSOCK_PORT,
                    timeout_ms: None,
                    allow_bootstrap: true,
                },
                false,
            ),
            (
                Request::Stop {
                    force: false,
                    timeout_ms: None,
                    exit: false,
                    unless_in_use: false,
                },
                false,
            ),
            (
                Request::Stop {
                    force: true,
                    timeout_ms: None,
                    exit: true,
                    unless_in_use: false,
                },
                false,
            ),
            (Request::Reset { keys_only: true }, false),
            (Request::Reset { keys_only: false }, false),
        ];
        for (request, member_may) in requests {
            for (uid, expected) in [(455, true), (0, true), (501, member_may)] {
                let peer = Peer { uid, gid: 20 };
                assert_eq!(
                    allows(&owner, peer, &request),
                    expected,
                    "uid {uid} {request:?}"
                );
            }
        }
        assert_eq!(
            authorize(
                &owner,
                Peer { uid: 501, gid: 20 },
                &Request::Reset { keys_only: false }
            )
            .unwrap_err(),
            "`reset` is refused for uid 501: only the daemon's user, _darwin-vz (uid 455), and root may stop the VM, end the supervisor, reset its state or reach guest ports other than sshd's (22); other members of its control group may use status, start, wait-ready and connect (ssh)"
        );
    }
}
