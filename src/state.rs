//! The state directory: everything the tool keeps between runs, in one place.
//!
//! ```text
//! <state>/                     0700 (0750 and group-owned with controlGroup)
//!   lock                       flock(2)-ed by the running supervisor; holds its pid
//!   control.sock               the supervisor's control socket (0600, or 0660 with controlGroup)
//!   disk.img                   the guest's raw, sparse disk image
//!   mac-address                the guest NIC's MAC address, stable across boots
//!   keys/                      0700
//!     client_ed25519(.pub)     the SSH identity used to log in to the guest
//!     known_hosts              pins the guest's host key under the alias `darwin-vz-nix`
//!     guest/                   shared read-only with the guest (and nothing else is)
//!       ssh_host_ed25519_key(.pub), authorized_keys
//!   logs/
//!     daemon.log               the supervisor's log
//!     console.log              the guest's console (this boot); console.previous.log
//! ```
//!
//! Liveness of a supervisor is decided by the lock, never by the existence of a file:
//! a supervisor killed with SIGKILL releases its flock with its last descriptor.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Uid};

use crate::contract;

/// Longest Unix socket path the platform accepts (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH: usize = if cfg!(target_os = "macos") { 103 } else { 107 };

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "cannot create {path}: {source}; check that the parent directory is writable, or choose another --state-dir"
    )]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists but is not a directory; remove it or choose another --state-dir")]
    NotADirectory { path: PathBuf },
    #[error(
        "{path} belongs to uid {owner}, not to this user (uid {me}); run as its owner or choose another --state-dir"
    )]
    WrongOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("cannot set permissions of {path}: {source}")]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another supervisor (pid {pid}) already owns {dir}; use it (darwin-vz-nix status), or stop it with `darwin-vz-nix stop --daemon`"
    )]
    Locked { dir: PathBuf, pid: String },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the control socket path {path} is {len} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket allows; choose a shorter --state-dir"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("group `{group}` (controlGroup) does not exist; create it or unset controlGroup")]
    NoSuchGroup { group: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who besides the owner may use the state directory and the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    OwnerOnly,
    Group(Gid),
}

impl Access {
    /// Looks the group up by name; `None` means owner only.
    pub fn from_group_name(group: Option<&str>) -> Result<Access, StateError> {
        let Some(name) = group else {
            return Ok(Access::OwnerOnly);
        };
        match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(Access::Group(group.gid)),
            _ => Err(StateError::NoSuchGroup {
                group: name.to_string(),
            }),
        }
    }

    /// Mode of directories the group may traverse.
    pub fn shared_dir_mode(self) -> u32 {
        match self {
            Access::OwnerOnly => 0o700,
            Access::Group(_) => 0o750,
        }
    }

    /// Mode of the control socket.
    pub fn socket_mode(self) -> u32 {
        match self {
            Access::OwnerOnly => 0o600,
            Access::Group(_) => 0o660,
        }
    }

    fn gid(self) -> Option<Gid> {
        match self {
            Access::OwnerOnly => None,
            Access::Group(gid) => Some(gid),
        }
    }
}

/// The paths of the state directory. Creating nothing by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("lock")
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    pub fn disk_image(&self) -> PathBuf {
        self.root.join("disk.img")
    }
    pub fn mac_address(&self) -> PathBuf {
        self.root.join("mac-address")
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub fn client_key(&self) -> PathBuf {
        self.keys_dir().join("client_ed25519")
    }
    pub fn client_key_pub(&self) -> PathBuf {
        self.keys_dir().join("client_ed25519.pub")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.keys_dir().join("known_hosts")
    }
    /// The only directory shared with the guest (read-only, tag `dvn-keys`).
    pub fn guest_keys_dir(&self) -> PathBuf {
        self.keys_dir().join("guest")
    }
    pub fn guest_host_key(&self) -> PathBuf {
        self.guest_keys_dir().join(contract::KEY_FILE_HOST_KEY)
    }
    pub fn guest_host_key_pub(&self) -> PathBuf {
        self.guest_keys_dir().join(contract::KEY_FILE_HOST_KEY_PUB)
    }
    pub fn guest_authorized_keys(&self) -> PathBuf {
        self.guest_keys_dir()
            .join(contract::KEY_FILE_AUTHORIZED_KEYS)
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.logs_dir().join("daemon.log")
    }
    pub fn console_log(&self) -> PathBuf {
        self.logs_dir().join("console.log")
    }
    pub fn previous_console_log(&self) -> PathBuf {
        self.logs_dir().join("console.previous.log")
    }

    /// The control socket path must fit in `sockaddr_un`.
    pub fn check_socket_path(&self) -> Result<(), StateError> {
        let path = self.socket();
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(StateError::SocketPathTooLong { path, len });
        }
        Ok(())
    }

    /// Creates the directory tree with its modes, tightening modes that are looser.
    pub fn create(&self, access: Access) -> Result<(), StateError> {
        self.check_socket_path()?;
        let shared = access.shared_dir_mode();
        ensure_dir(&self.root, shared, access.gid())?;
        ensure_dir(&self.keys_dir(), 0o700, None)?;
        ensure_dir(&self.guest_keys_dir(), 0o700, None)?;
        ensure_dir(&self.logs_dir(), shared, access.gid())?;
        Ok(())
    }

    /// Takes the exclusive lock that makes this process the directory's supervisor.
    /// Fails at once (never waits) when another process holds it.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let path = self.lock_file();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StateError::Lock {
                path: path.clone(),
                source,
            })?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StateError::Locked {
                    dir: self.root.clone(),
                    pid: self.lock_holder().unwrap_or_else(|| "unknown".into()),
                });
            }
            Err((_, errno)) => {
                return Err(StateError::Lock {
                    path,
                    source: errno.into(),
                });
            }
        };
        let pid = std::process::id().to_string();
        let written = lock
            .set_len(0)
            .and_then(|_| lock.rewind())
            .and_then(|_| lock.write_all(pid.as_bytes()));
        written.map_err(|source| StateError::Io { path, source })?;
        Ok(StateLock { _lock: lock })
    }

    /// True when a live process holds the lock (probes without keeping it).
    pub fn is_locked(&self) -> bool {
        let Ok(file) = File::open(self.lock_file()) else {
            return false;
        };
        matches!(
            Flock::lock(file, FlockArg::LockSharedNonblock),
            Err((_, nix::errno::Errno::EWOULDBLOCK))
        )
    }

    /// The pid recorded by the last supervisor, for messages only.
    pub fn lock_holder(&self) -> Option<String> {
        let mut text = String::new();
        File::open(self.lock_file())
            .ok()?
            .read_to_string(&mut text)
            .ok()?;
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_string())
    }
}

/// Held for the life of a supervisor; dropping it (or dying) releases the directory.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
}

fn ensure_dir(path: &Path, mode: u32, group: Option<Gid>) -> Result<(), StateError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_dir() => {
            return Err(StateError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        Ok(meta) => {
            let me = Uid::effective().as_raw();
            if meta.uid() != me && me != 0 {
                return Err(StateError::WrongOwner {
                    path: path.to_path_buf(),
                    owner: meta.uid(),
                    me,
                });
            }
        }
        Err(_) => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)
                .map_err(|source| StateError::Create {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
    }
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| StateError::Permissions {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        StateError::Permissions {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Writes `contents` to `path` with `mode`, atomically (temp file + rename).
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_the_tree_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("a/b/state"));
        state.create(Access::OwnerOnly).unwrap();
        assert_eq!(mode(state.root()), 0o700);
        assert_eq!(mode(&state.keys_dir()), 0o700);
        assert_eq!(mode(&state.guest_keys_dir()), 0o700);
        assert_eq!(mode(&state.logs_dir()), 0o700);
    }

    #[test]
    fn tightens_loose_modes_and_opens_to_a_group_when_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        fs::create_dir_all(state.root()).unwrap();
        fs::set_permissions(state.root(), fs::Permissions::from_mode(0o777)).unwrap();
        state.create(Access::OwnerOnly).unwrap();
        assert_eq!(mode(state.root()), 0o700);

        let gid = nix::unistd::getegid();
        state.create(Access::Group(gid)).unwrap();
        assert_eq!(mode(state.root()), 0o750);
        assert_eq!(
            mode(&state.keys_dir()),
            0o700,
            "keys never open to the group"
        );
    }

    #[test]
    fn refuses_a_file_where_the_directory_should_be() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state");
        fs::write(&path, "x").unwrap();
        let err = StateDir::new(&path).create(Access::OwnerOnly).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} exists but is not a directory; remove it or choose another --state-dir",
                path.display()
            )
        );
    }

    #[test]
    fn the_lock_is_exclusive_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.create(Access::OwnerOnly).unwrap();
        assert!(!state.is_locked());
        let lock = state.lock().unwrap();
        assert!(state.is_locked());
        let err = state.lock().unwrap_err();
        assert!(
            matches!(&err, StateError::Locked { pid, .. } if *pid == std::process::id().to_string()),
            "{err}"
        );
        drop(lock);
        assert!(!state.is_locked());
        state.lock().unwrap();
    }

    #[test]
    fn rejects_socket_paths_that_do_not_fit() {
        let long = format!("/{}", "x".repeat(120));
        let err = StateDir::new(&long).check_socket_path().unwrap_err();
        assert!(
            err.to_string().contains("choose a shorter --state-dir"),
            "{err}"
        );
    }

    #[test]
    fn atomic_writes_set_the_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        write_file_atomic(&path, b"one", 0o600).unwrap();
        write_file_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o644);
    }
}
