//! The host store as the guest's first source of build inputs.
//!
//! When the Mac's Nix sends a build to the VM, the guest's Nix first asks its
//! substituters for every input it lacks (`builders-use-substitutes`), and only what
//! none of them has is pushed by the Mac over the SSH session. This module makes the
//! supervisor one of those substituters, the first one: an ordinary Nix binary
//! cache, served over vsock (guest → host port `hostCachePort`; the guest reaches it
//! as `http://127.0.0.1:<port>` through a local forwarder, nix/nixos/hostcache.nix).
//!
//! * `db`: what the host store holds, read-only from the host's Nix database.
//! * `nar`: NARs made in Rust from the host's `/nix/store`, with Nix's macOS case
//!   hack undone exactly as Nix undoes it.
//! * `narinfo`, `nix32`: the narinfo text and the fingerprint it is signed over.
//! * `key`: the per-install ed25519 signing key; its public half reaches the guest
//!   through the one-shot key share, so the guest's Nix accepts only what this
//!   supervisor signed (and checks each NAR's hash besides).
//! * `http`, `server`: HTTP/1.1 over each guest stream, many streams at once.
//!
//! Failure is harmless by construction: a path the host lacks, a database that is
//! busy, a path collected between the narinfo and the NAR — each is a 404 or a
//! response cut short, and the guest's Nix moves on to its next substituter and then
//! to the Mac's push. The host never listens on TCP or UDP: streams come from the
//! VM's virtio socket device only.

pub mod db;
pub mod http;
pub mod key;
pub mod nar;
pub mod narinfo;
pub mod nix32;
pub mod server;

pub use key::CacheKey;
pub use server::{CacheStats, HostCache, StoreSource};

use std::path::PathBuf;

/// Where the host's Nix keeps its database.
pub const HOST_DB: &str = "/nix/var/nix/db/db.sqlite";

impl StoreSource {
    /// The host's own store, as this platform's Nix keeps it.
    pub fn host() -> StoreSource {
        StoreSource {
            store_dir: PathBuf::from(narinfo::STORE_DIR),
            db: PathBuf::from(HOST_DB),
            // Nix's `use-case-hack` is on by default on macOS only.
            case_hack: cfg!(target_os = "macos"),
        }
    }

    /// A chroot store made with `nix --store <root>`: its files and database live
    /// under `root`, its paths are still named `/nix/store/…`.
    pub fn chroot(root: &std::path::Path, case_hack: bool) -> StoreSource {
        StoreSource {
            store_dir: root.join("nix/store"),
            db: root.join("nix/var/nix/db/db.sqlite"),
            case_hack,
        }
    }
}
