//! The state directory: everything the tool keeps between runs, in one place.
//!
//! ```text
//! <state>/                     0700 (0750 and group-owned with controlGroup)
//!   supervisor.pid             the running supervisor's pid, for messages only
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
//!     guest-build.log          the last realisation of the guest's derivation
//!   gcroots/                   0700; indirect GC roots (Nix follows them)
//!     guest                    the guest being booted, replaced only when another boots
//!     guest-pending            a newer guest, realised but not booted yet
//!     bootstrap                the bootstrap builder's VM runner, while it is used
//!   bootstrap/                 the bootstrap builder (QEMU) while it runs: disk, tmp, keys
//! ```
//!
//! Ownership of the directory is an exclusive flock(2) on the directory itself, not on
//! a file in it: a file can be deleted while its lock is held (and a second owner
//! would lock a new file of the same name); a directory that holds the VM's disk
//! cannot. A supervisor killed with SIGKILL releases the lock with its last
//! descriptor. The pid file only names the owner in messages.
//!
//! The directory is input like any other: root runs commands on a directory the
//! service account owns and can fill with anything. Root therefore acts *as the
//! owner* (`act_as_owner`), and every file here is opened without following
//! symbolic links (see `files`).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::libc;
use nix::unistd::{Gid, Uid, User};

use crate::contract;
use crate::files::{self, FileError};

/// Longest Unix socket path the platform accepts (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH: usize = if cfg!(target_os = "macos") { 103 } else { 107 };

/// How long `lock` retries before it believes another owner: a client probing with
/// `is_locked` holds a shared lock for a few microseconds.
const LOCK_PATIENCE: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "cannot create {path}: {source}; check that the parent directory is writable, or choose another --state-dir"
    )]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} exists but is {kind}, not a directory; remove it or choose another --state-dir"
    )]
    NotADirectory { path: PathBuf, kind: &'static str },
    #[error(
        "{path} is a symbolic link to {target}, which {problem}; point --state-dir at an existing directory"
    )]
    BadLink {
        path: PathBuf,
        target: PathBuf,
        problem: String,
    },
    #[error(
        "{path} belongs to uid {owner}, not to this user (uid {me}); run as its owner (or as root, which acts as the owner) or choose another --state-dir"
    )]
    WrongOwner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "{path} belongs to uid {owner}, which has no user account; give it to the account that runs darwin-vz-nix (chown), or choose another --state-dir"
    )]
    NoAccount { path: PathBuf, owner: u32 },
    #[error("cannot act as {user}, the owner of {path}: {source}")]
    BecomeOwner {
        path: PathBuf,
        user: String,
        source: nix::errno::Errno,
    },
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
    #[error(transparent)]
    File(#[from] FileError),
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

/// Who a command runs as, once `act_as_owner` has looked at the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acting {
    /// As whoever started it (the owner, a group member, or nobody owns it yet).
    Myself,
    /// Root, now running as the directory's owner.
    AsOwner { user: String },
}

/// Makes root act as the owner of the state directory at `root`: its user, group and
/// supplementary groups, for the rest of the process (and whatever it spawns). Files
/// a root command makes then belong to the owner, and nothing the owner planted in
/// the directory (a symbolic link to `/etc/…`) gains root's rights. Does nothing for
/// other users (the kernel's permissions apply to them) or when the directory is
/// missing or root's own. Call it before any thread is started.
pub fn act_as_owner(root: &Path) -> Result<Acting, StateError> {
    let meta = match fs::metadata(root) {
        Ok(meta) if meta.is_dir() => meta,
        // Missing, or not a directory: whoever creates or reports it acts as itself.
        _ => return Ok(Acting::Myself),
    };
    let me = Uid::effective();
    let owner = Uid::from_raw(meta.uid());
    if owner == me || !me.is_root() {
        return Ok(Acting::Myself);
    }
    let user = match User::from_uid(owner) {
        Ok(Some(user)) => user,
        _ => {
            return Err(StateError::NoAccount {
                path: root.to_path_buf(),
                owner: owner.as_raw(),
            });
        }
    };
    become_user(&user).map_err(|source| StateError::BecomeOwner {
        path: root.to_path_buf(),
        user: user.name.clone(),
        source,
    })?;
    Ok(Acting::AsOwner { user: user.name })
}

/// Switches every id of this process to `user`'s, for good (root cannot come back).
fn become_user(user: &User) -> nix::Result<()> {
    let name = std::ffi::CString::new(user.name.as_bytes()).map_err(|_| nix::Error::EINVAL)?;
    init_groups(&name, user.gid)?;
    nix::unistd::setgid(user.gid)?;
    nix::unistd::setuid(user.uid)?;
    if Uid::effective() != user.uid || Uid::current() != user.uid {
        return Err(nix::Error::EPERM);
    }
    Ok(())
}

/// Sets the supplementary groups of `name`. One function with a body per platform
/// (not one function per platform), so that a mutation test on Linux changes the
/// code that runs there.
fn init_groups(name: &std::ffi::CStr, gid: Gid) -> nix::Result<()> {
    #[cfg(not(target_os = "macos"))]
    {
        nix::unistd::initgroups(name, gid)
    }
    #[cfg(target_os = "macos")]
    {
        // The nix crate leaves initgroups out on Apple targets, whose libc takes the
        // group as an int.
        let base = libc::c_int::try_from(gid.as_raw()).map_err(|_| nix::Error::EINVAL)?;
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::initgroups(name.as_ptr(), base) };
        nix::Error::result(rc).map(drop)
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
    /// The running supervisor's pid, for messages; ownership is the directory's lock.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("supervisor.pid")
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
    /// What the supervisor learnt about the last boot's guest (`nested::GuestReport`);
    /// root's `machines` reads it, and nix-darwin's launchd watches it
    /// (`nix/lib.nix` `guestReportFile` names the same path).
    pub fn guest_report(&self) -> PathBuf {
        self.root.join("guest-report.json")
    }
    /// What Nix printed while realising the guest's derivation (the last attempt).
    pub fn guest_build_log(&self) -> PathBuf {
        self.logs_dir().join("guest-build.log")
    }
    /// Indirect GC roots: symbolic links to store paths that Nix's collector keeps.
    pub fn gcroots_dir(&self) -> PathBuf {
        self.root.join("gcroots")
    }
    /// The root of the guest being booted (the guest relies on it: the host's store
    /// must keep the booted system while the guest reads it).
    pub fn guest_root(&self) -> PathBuf {
        self.gcroots_dir().join("guest")
    }
    /// The root of a newer guest, realised and waiting for the next boot.
    pub fn pending_guest_root(&self) -> PathBuf {
        self.gcroots_dir().join("guest-pending")
    }

    /// The bootstrap builder's VM runner, kept while the bootstrap builder is used.
    pub fn bootstrap_root(&self) -> PathBuf {
        self.gcroots_dir().join("bootstrap")
    }
    /// The bootstrap builder's working directory (its disk image, temporary files
    /// and the public key it accepts), deleted with it.
    pub fn bootstrap_dir(&self) -> PathBuf {
        self.root.join("bootstrap")
    }
    /// The bootstrap builder's host key under the alias, for ssh, while it runs.
    pub fn bootstrap_known_hosts(&self) -> PathBuf {
        self.keys_dir().join("bootstrap_known_hosts")
    }
    /// What the bootstrap builder (QEMU and its guest) printed.
    pub fn bootstrap_console_log(&self) -> PathBuf {
        self.logs_dir().join("bootstrap-console.log")
    }
    /// What Nix printed while fetching the bootstrap builder.
    pub fn bootstrap_build_log(&self) -> PathBuf {
        self.logs_dir().join("bootstrap-build.log")
    }

    /// Makes sure `gcroots/` exists, private (the state directory must exist).
    pub fn create_gcroots_dir(&self) -> Result<(), StateError> {
        ensure_dir(&self.gcroots_dir(), 0o700, None, Link::Refused)
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
    /// Every directory must belong to this user; none but the root itself may be a
    /// symbolic link.
    pub fn create(&self, access: Access) -> Result<(), StateError> {
        self.check_socket_path()?;
        let shared = access.shared_dir_mode();
        ensure_dir(&self.root, shared, access.gid(), Link::Allowed)?;
        self.create_key_dirs()?;
        ensure_dir(&self.logs_dir(), shared, access.gid(), Link::Refused)?;
        Ok(())
    }

    /// Makes sure `keys/` and `keys/guest/` exist, private (the root must exist).
    pub fn create_key_dirs(&self) -> Result<(), StateError> {
        ensure_dir(&self.keys_dir(), 0o700, None, Link::Refused)?;
        ensure_dir(&self.guest_keys_dir(), 0o700, None, Link::Refused)?;
        Ok(())
    }

    /// Opens the state directory itself (following the root if it is a link).
    fn open_root(&self) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&self.root)
    }

    /// Takes the exclusive lock that makes this process the directory's supervisor:
    /// a flock on the directory itself, which no deleted file can undo. Fails (after
    /// a short grace for clients that are probing it) when another process holds it.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let fail = |source: std::io::Error| StateError::Lock {
            path: self.root.clone(),
            source,
        };
        let mut dir = self.open_root().map_err(fail)?;
        let deadline = Instant::now().checked_add(LOCK_PATIENCE);
        let lock = loop {
            match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => break lock,
                Err((again, nix::errno::Errno::EWOULDBLOCK))
                    if deadline.is_some_and(|d| Instant::now() < d) =>
                {
                    dir = again;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(StateError::Locked {
                        dir: self.root.clone(),
                        pid: self.lock_holder().unwrap_or_else(|| "unknown".into()),
                    });
                }
                Err((_, errno)) => return Err(fail(errno.into())),
            }
        };
        // Only the owner writes here: what a crashed writer left can go.
        files::remove_leftovers(&self.root, &["mac-address.tmp"]);
        let pid_file = self.pid_file();
        files::write_atomic(
            &pid_file,
            &self.root,
            std::process::id().to_string().as_bytes(),
            0o644,
        )?;
        Ok(StateLock {
            pid_file,
            _lock: lock,
        })
    }

    /// True when a live process holds the lock (probes without keeping it).
    pub fn is_locked(&self) -> bool {
        let Ok(dir) = self.open_root() else {
            return false;
        };
        matches!(
            Flock::lock(dir, FlockArg::LockSharedNonblock),
            Err((_, nix::errno::Errno::EWOULDBLOCK))
        )
    }

    /// The pid recorded by the supervisor, for messages only (read without following
    /// a link, at most a few bytes, and only ever a number).
    pub fn lock_holder(&self) -> Option<String> {
        let bytes = files::read_state_file(&self.pid_file(), 32).ok()??;
        let pid: u32 = std::str::from_utf8(&bytes).ok()?.trim().parse().ok()?;
        Some(pid.to_string())
    }

    /// Opens `logs/daemon.log` for appending (made with `mode` when missing), never
    /// through a symbolic link.
    pub fn open_daemon_log(&self, mode: u32) -> Result<File, StateError> {
        Ok(files::open_state_log(&self.daemon_log(), mode)?)
    }
}

/// Held for the life of a supervisor; dropping it (or dying) releases the directory.
#[derive(Debug)]
pub struct StateLock {
    pid_file: PathBuf,
    _lock: Flock<File>,
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Still the owner here: the flock is released after this, with the field.
        let _ = fs::remove_file(&self.pid_file);
    }
}

/// Whether a directory of the state may be a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// The state directory itself: a link to a directory is accepted (a user may
    /// keep the state on another volume), if the link is this user's or root's.
    Allowed,
    /// Everything inside: only real directories, made by this program.
    Refused,
}

fn ensure_dir(path: &Path, mode: u32, group: Option<Gid>, link: Link) -> Result<(), StateError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = fs::DirBuilder::new();
            builder.mode(mode).recursive(link == Link::Allowed);
            match builder.create(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(StateError::Create {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(meta) if meta.file_type().is_symlink() && link == Link::Allowed => {
            check_root_link(path, &meta)?;
        }
        Ok(meta) if !meta.is_dir() => {
            return Err(StateError::NotADirectory {
                path: path.to_path_buf(),
                kind: files::kind_of(meta.file_type()),
            });
        }
        Ok(_) => {}
    }
    let nofollow = if link == Link::Refused {
        libc::O_NOFOLLOW
    } else {
        0
    };
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | nofollow)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => StateError::NotADirectory {
                path: path.to_path_buf(),
                kind: "a symbolic link",
            },
            Some(libc::ENOTDIR) => StateError::NotADirectory {
                path: path.to_path_buf(),
                kind: "not a directory",
            },
            _ => StateError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
    // From here on, the descriptor: whatever is swapped in at `path` is not touched.
    let perms = |source| StateError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    let meta = dir.metadata().map_err(perms)?;
    let me = Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(StateError::WrongOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    if let Some(gid) = group
        && meta.gid() != gid.as_raw()
    {
        std::os::unix::fs::fchown(&dir, None, Some(gid.as_raw())).map_err(perms)?;
    }
    if meta.mode() & 0o7777 != mode {
        dir.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(perms)?;
    }
    Ok(())
}

/// A state directory that is a symbolic link: fine when it points at a directory
/// and belongs to this user or root (who else could swap it is then the owner).
fn check_root_link(path: &Path, link: &fs::Metadata) -> Result<(), StateError> {
    let target = fs::read_link(path).unwrap_or_default();
    let bad = |problem: String| StateError::BadLink {
        path: path.to_path_buf(),
        target: target.clone(),
        problem,
    };
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad("does not exist".into()));
        }
        Err(e) => return Err(bad(format!("cannot be read ({e})"))),
        Ok(meta) if !meta.is_dir() => {
            return Err(bad(format!(
                "is {}, not a directory",
                files::kind_of(meta.file_type())
            )));
        }
        Ok(_) => {}
    }
    let me = Uid::effective().as_raw();
    if link.uid() != me && link.uid() != 0 {
        return Err(bad(format!(
            "is a directory, but the link belongs to uid {} (neither this user nor root), who could point it elsewhere",
            link.uid()
        )));
    }
    Ok(())
}

/// Writes `contents` to `path` with `mode`, atomically (temporary file in the same
/// directory, then rename; see `files::write_atomic`).
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    let staging = path.parent().unwrap_or(Path::new("."));
    Ok(files::write_atomic(path, staging, contents, mode)?)
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
                "{} exists but is a regular file, not a directory; remove it or choose another --state-dir",
                path.display()
            )
        );
    }

    #[test]
    fn a_state_dir_that_is_a_link_to_a_directory_is_used_and_a_dangling_one_explained() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("state");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let state = StateDir::new(&link);
        state.create(Access::OwnerOnly).unwrap();
        assert!(real.join("keys/guest").is_dir());
        let _lock = state.lock().unwrap();
        assert!(
            StateDir::new(&real).is_locked(),
            "the lock is the directory's"
        );

        let dangling = tmp.path().join("dangling");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        let err = StateDir::new(&dangling)
            .create(Access::OwnerOnly)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is a symbolic link to {}, which does not exist; point --state-dir at an existing directory",
                dangling.display(),
                tmp.path().join("nowhere").display()
            )
        );
    }

    #[test]
    fn a_state_dir_link_that_cannot_be_followed_says_why_not_that_it_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let looped = tmp.path().join("state");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let err = StateDir::new(&looped)
            .create(Access::OwnerOnly)
            .unwrap_err()
            .to_string();
        let prefix = format!(
            "{} is a symbolic link to {}, which cannot be read (",
            looped.display(),
            looped.display()
        );
        assert!(err.starts_with(&prefix), "{err}");
        assert!(err.contains("symbolic links"), "the system's reason: {err}");
    }

    #[test]
    fn directories_inside_the_state_must_not_be_links() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o755)).unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        fs::create_dir(state.root()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, state.logs_dir()).unwrap();
        let err = state.create(Access::OwnerOnly).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} exists but is a symbolic link, not a directory; remove it or choose another --state-dir",
                state.logs_dir().display()
            )
        );
        assert_eq!(mode(&elsewhere), 0o755, "the link's target is not touched");
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
        assert!(
            !state.pid_file().exists(),
            "the pid file goes with the owner"
        );
        state.lock().unwrap();
    }

    #[test]
    fn a_client_probing_the_lock_for_a_moment_does_not_keep_the_owner_out() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.create(Access::OwnerOnly).unwrap();
        // A client's probe: a shared lock held briefly (well within LOCK_PATIENCE).
        let dir = File::open(state.root()).unwrap();
        let probe = Flock::lock(dir, FlockArg::LockSharedNonblock).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(LOCK_PATIENCE / 5);
            drop(probe);
        });
        let lock = state.lock();
        release.join().unwrap();
        assert!(lock.is_ok(), "{:?}", lock.err());
    }

    #[test]
    fn a_state_dir_under_a_file_is_reported_as_unreachable_not_as_a_failed_create() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("file"), "x").unwrap();
        let state = StateDir::new(tmp.path().join("file/state"));
        let err = state.create(Access::OwnerOnly).unwrap_err();
        assert!(matches!(err, StateError::Io { .. }), "{err:?}");
    }

    /// A parent directory nobody may create in: for root, sysfs refuses every
    /// `mkdir` at its top; for anyone else, a read-only directory of their own.
    #[cfg(target_os = "linux")]
    fn uncreatable_parent(tmp: &Path) -> PathBuf {
        if Uid::effective().is_root() {
            PathBuf::from("/sys")
        } else {
            let parent = tmp.join("read-only");
            fs::create_dir(&parent).unwrap();
            fs::set_permissions(&parent, fs::Permissions::from_mode(0o555)).unwrap();
            parent
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_state_dir_that_cannot_be_made_says_so_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let path = uncreatable_parent(tmp.path()).join("darwin-vz-nix-test-state");
        let err = StateDir::new(&path).create(Access::OwnerOnly).unwrap_err();
        let StateError::Create {
            path: named,
            source,
        } = &err
        else {
            panic!("not a create error: {err:?}");
        };
        assert_eq!(named, &path);
        assert!(
            matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("choose another --state-dir"),
            "{err}"
        );
    }

    #[test]
    fn commands_making_the_same_directories_at_once_all_succeed() {
        // Two commands run at once on a fresh state (a `start` and a `status`)
        // both find a subdirectory missing, and one of them loses the race to
        // `mkdir`: that is not an error. Eight threads released together make the
        // race happen in most rounds.
        const THREADS: usize = 8;
        let tmp = tempfile::tempdir().unwrap();
        for round in 0..100 {
            let dir = tmp.path().join(format!("round-{round}"));
            let barrier = std::sync::Barrier::new(THREADS);
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            ensure_dir(&dir, 0o700, None, Link::Refused)
                        })
                    })
                    .collect();
                for handle in handles {
                    let result = handle.join().unwrap();
                    assert!(result.is_ok(), "round {round}: {result:?}");
                }
            });
            assert_eq!(mode(&dir), 0o700);
        }
    }

    /// Runs `ensure_dir` on `path` over and over while another thread keeps
    /// exchanging `path` and `other` (renameat2 swaps the two names atomically), as
    /// someone who can write in the state directory might, until `watched` loses
    /// its mode 0751 or the rounds run out; returns the kinds the errors named.
    #[cfg(target_os = "linux")]
    fn ensure_dir_while_swapped(
        path: &Path,
        other: &Path,
        watched: &Path,
    ) -> std::collections::BTreeSet<&'static str> {
        use std::os::unix::ffi::OsStrExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let c_other = std::ffi::CString::new(other.as_os_str().as_bytes()).unwrap();
        let stop = AtomicBool::new(false);
        let mut kinds = std::collections::BTreeSet::new();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: two valid NUL-terminated paths; no memory is shared.
                    let rc = unsafe {
                        libc::renameat2(
                            libc::AT_FDCWD,
                            c_path.as_ptr(),
                            libc::AT_FDCWD,
                            c_other.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
                }
            });
            for _ in 0..50_000 {
                match ensure_dir(path, 0o700, None, Link::Refused) {
                    Ok(()) => {}
                    Err(StateError::NotADirectory { kind, .. }) => {
                        kinds.insert(kind);
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        panic!("not a NotADirectory error: {e:?}");
                    }
                }
                if mode(watched) != 0o751 {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        kinds
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_directory_swapped_for_a_link_or_a_file_while_it_is_checked_is_never_followed() {
        let fresh_keys = || {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("keys");
            fs::create_dir(&path).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
            (tmp, path)
        };

        let (tmp, path) = fresh_keys();
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o751)).unwrap();
        let link = tmp.path().join("keys.link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let kinds = ensure_dir_while_swapped(&path, &link, &elsewhere);
        assert_eq!(mode(&elsewhere), 0o751, "the link was followed");
        // Swapped before the check or after it, it is refused as not a directory
        // (Linux's open says ENOTDIR for a link with O_DIRECTORY|O_NOFOLLOW,
        // macOS's ELOOP).
        assert!(!kinds.is_empty());
        assert!(
            kinds
                .iter()
                .all(|k| matches!(*k, "a symbolic link" | "not a directory")),
            "{kinds:?}"
        );

        let (tmp, path) = fresh_keys();
        let file = tmp.path().join("keys.file");
        fs::write(&file, "").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o751)).unwrap();
        // The file keeps this second name while its first one is swapped.
        let watched = tmp.path().join("watched");
        fs::hard_link(&file, &watched).unwrap();
        let kinds = ensure_dir_while_swapped(&path, &file, &watched);
        assert_eq!(
            mode(&watched),
            0o751,
            "the file was taken for the directory"
        );
        assert!(!kinds.is_empty());
        assert!(
            kinds
                .iter()
                .all(|k| matches!(*k, "a regular file" | "not a directory")),
            "{kinds:?}"
        );
    }

    #[test]
    fn deleting_the_pid_file_does_not_release_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.create(Access::OwnerOnly).unwrap();
        let _lock = state.lock().unwrap();
        assert_eq!(state.lock_holder(), Some(std::process::id().to_string()));
        fs::remove_file(state.pid_file()).unwrap();
        assert!(state.is_locked());
        let err = state.lock().unwrap_err();
        assert!(
            matches!(&err, StateError::Locked { pid, .. } if pid == "unknown"),
            "{err}"
        );
    }

    #[test]
    fn the_pid_file_is_read_as_a_number_only() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        fs::write(state.pid_file(), "not a pid\n").unwrap();
        assert_eq!(state.lock_holder(), None);
        fs::remove_file(state.pid_file()).unwrap();
        let secret = tmp.path().join("secret");
        fs::write(&secret, "4242").unwrap();
        std::os::unix::fs::symlink(&secret, state.pid_file()).unwrap();
        assert_eq!(state.lock_holder(), None, "never through a link");
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
    fn every_path_is_where_the_readme_says() {
        let state = StateDir::new("/s");
        let readme = include_str!("../README.md");
        let layout = readme
            .split("### State directory")
            .nth(1)
            .and_then(|rest| rest.split("```").nth(1))
            .expect("the README documents the state directory in a code block");
        let paths = [
            (state.guest_report(), "guest-report.json"),
            (state.guest_build_log(), "logs/guest-build.log"),
            (state.gcroots_dir(), "gcroots"),
            (state.guest_root(), "gcroots/guest"),
            (state.pending_guest_root(), "gcroots/guest-pending"),
            (state.bootstrap_root(), "gcroots/bootstrap"),
            (state.bootstrap_dir(), "bootstrap"),
            (state.bootstrap_known_hosts(), "keys/bootstrap_known_hosts"),
            (state.bootstrap_console_log(), "logs/bootstrap-console.log"),
            (state.bootstrap_build_log(), "logs/bootstrap-build.log"),
            (state.previous_console_log(), "logs/console.previous.log"),
        ];
        for (path, relative) in paths {
            assert_eq!(path, Path::new("/s").join(relative));
            let name = relative.rsplit('/').next().unwrap();
            assert!(
                layout.contains(name),
                "{name} is missing from the README's layout"
            );
        }
    }

    #[test]
    fn the_gcroots_directory_is_made_private_and_never_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        state.create(Access::OwnerOnly).unwrap();
        state.create_gcroots_dir().unwrap();
        assert!(state.gcroots_dir().is_dir());
        assert_eq!(mode(&state.gcroots_dir()), 0o700);

        fs::remove_dir(state.gcroots_dir()).unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, state.gcroots_dir()).unwrap();
        assert!(
            state.create_gcroots_dir().is_err(),
            "a planted link is refused"
        );
    }

    #[test]
    fn a_socket_path_of_exactly_the_limit_fits() {
        // root + "/control.sock" is exactly MAX_SOCKET_PATH bytes, then one more.
        let root_len = MAX_SOCKET_PATH - "/control.sock".len();
        let fits = format!("/{}", "x".repeat(root_len - 1));
        assert_eq!(
            StateDir::new(&fits).socket().as_os_str().len(),
            MAX_SOCKET_PATH
        );
        StateDir::new(&fits).check_socket_path().unwrap();
        let too_long = format!("/{}", "x".repeat(root_len));
        StateDir::new(&too_long).check_socket_path().unwrap_err();
    }

    #[test]
    fn a_control_group_owns_the_shared_directories() {
        // Only root may give a directory to a group it is not a member of: that is
        // what shows the group is really set, not left at the creator's.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: a_control_group_owns_the_shared_directories: it needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        let group = Gid::from_raw(54321);
        state.create(Access::Group(group)).unwrap();
        for dir in [state.root().to_path_buf(), state.logs_dir()] {
            assert_eq!(
                fs::metadata(&dir).unwrap().gid(),
                54321,
                "{}",
                dir.display()
            );
        }
        assert_ne!(fs::metadata(state.keys_dir()).unwrap().gid(), 54321);
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
