//! Opening files without surprises.
//!
//! Two kinds of files reach this program. *State files* live in the state directory,
//! which another account may own and fill (root runs commands on the service
//! account's directory): they are opened without following a symbolic link, must be
//! regular files, and are replaced by writing a temporary file and renaming it, never
//! by writing through whatever sits at the path. *Input files* are named by the user
//! (`--config`, the guest's files): symbolic links are followed (nix-darwin's
//! `/etc` is made of them), but a FIFO or a device is refused instead of blocking the
//! process or reading forever. Every read has a size limit.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::libc;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path} is {kind}, not a regular file; remove it{hint}")]
    NotRegular {
        path: PathBuf,
        kind: &'static str,
        hint: &'static str,
    },
    #[error(
        "{path} is larger than {limit} bytes, more than such a file ever holds; check that it is the right file"
    )]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FileError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        move |source| FileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// True when the file (or a directory on its path) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// What a path that should be a regular file is instead, in words.
pub fn kind_of(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "a regular file"
    }
}

/// Opens a state file for reading, without following a symbolic link and without
/// blocking on a FIFO; anything but a regular file is refused.
pub fn open_state_file(path: &Path) -> Result<File, FileError> {
    let mut options = OpenOptions::new();
    options.read(true);
    open_regular(path, &mut options, libc::O_NOFOLLOW, STATE_HINT)
}

/// Opens a state file for appending, creating it with `mode` when it is missing;
/// never through a symbolic link (a planted `daemon.log → /etc/…` is refused, not
/// appended to).
pub fn open_state_log(path: &Path, mode: u32) -> Result<File, FileError> {
    let mut options = OpenOptions::new();
    options.append(true).create(true).mode(mode);
    open_regular(path, &mut options, libc::O_NOFOLLOW, STATE_HINT)
}

/// Opens a file the user named (following symbolic links), refusing what is not a
/// regular file instead of blocking on a FIFO or reading a device forever.
pub fn open_input(path: &Path) -> Result<File, FileError> {
    let mut options = OpenOptions::new();
    options.read(true);
    open_regular(path, &mut options, 0, INPUT_HINT)
}

const STATE_HINT: &str = " (darwin-vz-nix makes its state files itself)";
const INPUT_HINT: &str = "";

fn open_regular(
    path: &Path,
    options: &mut OpenOptions,
    extra_flags: libc::c_int,
    hint: &'static str,
) -> Result<File, FileError> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    // It changes nothing for the regular files that get past the check below.
    let file = options
        .custom_flags(extra_flags | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            // O_NOFOLLOW on a symbolic link.
            Some(libc::ELOOP) if extra_flags & libc::O_NOFOLLOW != 0 => FileError::NotRegular {
                path: path.to_path_buf(),
                kind: "a symbolic link",
                hint,
            },
            _ => FileError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let file_type = file.metadata().map_err(FileError::io(path))?.file_type();
    if !file_type.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(file_type),
            hint,
        });
    }
    Ok(file)
}

/// Reads at most `limit` bytes; a longer file is an error, not silently cut.
pub fn read_capped(mut file: File, path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::new();
    (&mut file)
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(FileError::io(path))?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > limit {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

/// The content of a state file, or `None` when it does not exist.
pub fn read_state_file(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, FileError> {
    match open_state_file(path) {
        Ok(file) => read_capped(file, path, limit).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// A name no other writer uses: this process, a counter, and the file it stands for.
pub fn temporary_name(for_name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TEMPORARY_PREFIX}{}-{n}-{for_name}", std::process::id())
}

/// Every temporary name starts with this; leftovers of a crash are recognised by it.
pub const TEMPORARY_PREFIX: &str = ".tmp-";

/// Replaces `path` with `contents` (mode `mode`) atomically: the data goes to a new
/// file in `staging` (same filesystem, created exclusively, so nothing planted there
/// is followed), then one rename puts it in place. A rename replaces a symbolic link
/// at `path` rather than writing through it. On every failure the temporary file is
/// removed, so `staging` can be outside a directory that others read (the guest's
/// share) and still never show a half-written file.
pub fn write_atomic(
    path: &Path,
    staging: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), FileError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = staging.join(temporary_name(&name));
    let result = write_new(&tmp, contents, mode)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(FileError::io(path)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_new(tmp: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)
        .map_err(FileError::io(tmp))?;
    // The umask may have narrowed `mode`; set it exactly, on the descriptor.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(FileError::io(tmp))?;
    file.write_all(contents).map_err(FileError::io(tmp))?;
    file.sync_all().map_err(FileError::io(tmp))
}

/// Sets the mode of a state file through its descriptor (never through a symbolic
/// link that might have replaced it).
pub fn set_state_file_mode(path: &Path, mode: u32) -> Result<(), FileError> {
    let file = open_state_file(path)?;
    let current = file.metadata().map_err(FileError::io(path))?.mode() & 0o7777;
    if current != mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(FileError::io(path))?;
    }
    Ok(())
}

/// A private directory for files that are not ready yet; removed with everything in
/// it when dropped, so a failure leaves nothing behind.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
}

impl StagingDir {
    /// Makes `<parent>/.tmp-…` with mode 0700. `mkdir` fails on anything already
    /// there, symbolic links included.
    pub fn new(parent: &Path, purpose: &str) -> Result<StagingDir, FileError> {
        let path = parent.join(temporary_name(purpose));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(FileError::io(&path))?;
        Ok(StagingDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        // remove_dir_all does not follow symbolic links inside the directory.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes what a crashed writer left in `dir`: entries named with the temporary
/// prefix, and `legacy` names of older versions. Only call it while holding the
/// state directory's lock (no live writer can own those names then).
pub fn remove_leftovers(dir: &Path, legacy: &[&str]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(TEMPORARY_PREFIX) && !legacy.contains(&name.as_ref()) {
            continue;
        }
        let path = entry.path();
        // file_type() does not follow links: a link is removed, never its target.
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
}

/// Why a file for a privileged reader was not written (see [`write_trusted`]).
#[derive(Debug, thiserror::Error)]
pub enum TrustedFileError {
    #[error("{path} names no file; give the file to write, e.g. /etc/nix/darwin-vz-nix.machines")]
    NotAFile { path: PathBuf },
    #[error(
        "{dir} belongs to uid {owner}, which could replace the file; write into a directory owned by root (or by you, uid {euid}), such as /etc/nix"
    )]
    DirectoryOwner { dir: PathBuf, owner: u32, euid: u32 },
    #[error(
        "{dir} is writable by {who} (mode {mode:o}), who could replace the file; write into a directory only its owner can change, such as /etc/nix"
    )]
    DirectoryWritable {
        dir: PathBuf,
        who: &'static str,
        mode: u32,
    },
    #[error(
        "{path} is a symbolic link; something else manages that path (an environment.etc entry?): remove the link, then run again"
    )]
    Symlink { path: PathBuf },
    #[error("{path} is {kind}, not a regular file; remove it, then run again")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TrustedFileError {
    /// True when the caller named a path that cannot be used (rather than I/O failing).
    pub fn is_bad_path(&self) -> bool {
        !matches!(self, TrustedFileError::Io { .. })
    }
}

/// Writes a file that a privileged reader trusts (root's nix-daemon reads
/// `/etc/nix/…`), so that only the directory's owner — root, or the user writing —
/// can have put anything there:
///
/// - the directory must belong to root or to the effective user and be writable by
///   no one else (its path may pass through symbolic links: macOS's `/etc` is one);
/// - a symbolic link (or anything but a regular file) at `path` is refused, never
///   followed nor silently replaced;
/// - the text goes to a new file in the same directory (created exclusively, mode set
///   on the descriptor whatever the umask), which one rename puts in place, so a
///   reader sees the old file or the new one, never half of one.
///
/// Everything after the checks acts on the directory's descriptor, so a directory
/// swapped behind the path in between is not written into.
pub fn write_trusted(path: &Path, contents: &[u8], mode: u32) -> Result<(), TrustedFileError> {
    use nix::fcntl::{AtFlags, OFlag, openat, renameat};
    use nix::sys::stat::{Mode, SFlag, fstatat};
    use nix::unistd::{UnlinkatFlags, unlinkat};

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| TrustedFileError::Io { path, source }
    };
    let not_a_file = || TrustedFileError::NotAFile {
        path: path.to_path_buf(),
    };
    // "/etc/nix/" or "/etc/nix/.." would name a directory, not a file in it.
    if path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return Err(not_a_file());
    }
    let name = match path.components().next_back() {
        Some(std::path::Component::Normal(name)) => name,
        _ => return Err(not_a_file()),
    };
    let dir_path = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };

    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir_path)
        .map_err(io(dir_path))?;
    let meta = dir.metadata().map_err(io(dir_path))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(TrustedFileError::DirectoryOwner {
            dir: dir_path.to_path_buf(),
            owner: meta.uid(),
            euid,
        });
    }
    let dir_mode = meta.mode() & 0o7777;
    if dir_mode & 0o022 != 0 {
        return Err(TrustedFileError::DirectoryWritable {
            dir: dir_path.to_path_buf(),
            who: if dir_mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode: dir_mode,
        });
    }

    match fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => {
            let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFLNK {
                return Err(TrustedFileError::Symlink {
                    path: path.to_path_buf(),
                });
            }
            if kind != SFlag::S_IFREG {
                return Err(TrustedFileError::NotRegular {
                    path: path.to_path_buf(),
                    kind: match kind {
                        SFlag::S_IFDIR => "a directory",
                        SFlag::S_IFIFO => "a FIFO",
                        SFlag::S_IFSOCK => "a socket",
                        SFlag::S_IFCHR => "a character device",
                        SFlag::S_IFBLK => "a block device",
                        _ => "something else",
                    },
                });
            }
        }
        Err(nix::errno::Errno::ENOENT) => {}
        Err(errno) => return Err(io(path)(errno.into())),
    }

    let tmp_name = temporary_name(&name.to_string_lossy());
    let tmp_path = dir_path.join(&tmp_name);
    let fd = openat(
        &dir,
        tmp_name.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(|errno| io(&tmp_path)(errno.into()))?;
    let mut file = File::from(fd);
    let written = file
        .write_all(contents)
        // The umask narrowed the mode at creation; set it exactly, on the descriptor.
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp_path))
        .and_then(|()| {
            renameat(&dir, tmp_name.as_str(), &dir, name).map_err(|errno| io(path)(errno.into()))
        });
    if written.is_err() {
        let _ = unlinkat(&dir, tmp_name.as_str(), UnlinkatFlags::NoRemoveDir);
        return written;
    }
    // The rename itself survives a crash once the directory is synced; a reader
    // already sees the new file either way.
    let _ = nix::unistd::fsync(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_are_never_opened_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();

        let err = open_state_file(&link).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is a symbolic link, not a regular file; remove it (darwin-vz-nix makes its state files itself)",
                link.display()
            )
        );
        let err = open_state_log(&link, 0o600).unwrap_err();
        assert!(matches!(err, FileError::NotRegular { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        assert!(open_input(&link).is_ok(), "inputs may be symbolic links");
    }

    #[test]
    fn a_fifo_is_refused_at_once_instead_of_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = open_input(&fifo).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is a FIFO, not a regular file; remove it",
                fifo.display()
            )
        );
        assert!(matches!(
            open_input(Path::new("/dev/zero")),
            Err(FileError::NotRegular {
                kind: "a character device",
                ..
            })
        ));
    }

    #[test]
    fn reads_are_capped() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, [b'x'; 11]).unwrap();
        assert!(matches!(
            read_state_file(&path, 10),
            Err(FileError::TooLarge { limit: 10, .. })
        ));
        assert_eq!(read_state_file(&path, 11).unwrap().unwrap().len(), 11);
        assert_eq!(read_state_file(&tmp.path().join("none"), 1).unwrap(), None);
    }

    #[test]
    fn atomic_writes_replace_a_symlink_instead_of_writing_through_it() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let path = tmp.path().join("f");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, tmp.path(), b"new", 0o640).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_failed_atomic_write_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let staging = tmp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        // A directory where the file should go: the rename fails.
        let path = tmp.path().join("target");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "x").unwrap();
        assert!(write_atomic(&path, &staging, b"data", 0o644).is_err());
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
    }

    #[test]
    fn a_trusted_write_needs_a_file_name_and_writes_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        for path in [
            tmp.path().join("sub/"),
            tmp.path().join("sub/.."),
            PathBuf::from("/"),
        ] {
            let err = write_trusted(&path, b"x", 0o644).unwrap_err();
            assert!(matches!(err, TrustedFileError::NotAFile { .. }), "{err}");
            assert!(err.is_bad_path());
        }
        let missing = tmp.path().join("missing/file");
        let err = write_trusted(&missing, b"x", 0o644).unwrap_err();
        assert!(!err.is_bad_path(), "{err}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

        let path = tmp.path().join("f");
        write_trusted(&path, b"one", 0o644).unwrap();
        write_trusted(&path, b"two", 0o640).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn staging_directories_and_leftovers_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = {
            let stage = StagingDir::new(tmp.path(), "key").unwrap();
            std::fs::write(stage.path().join("key"), "half").unwrap();
            stage.path().to_path_buf()
        };
        assert!(!staged.exists());
        std::fs::write(tmp.path().join(".tmp-1-0-key"), "").unwrap();
        std::fs::create_dir(tmp.path().join(".tmp-1-1-stage")).unwrap();
        std::fs::write(tmp.path().join("authorized_keys.tmp"), "").unwrap();
        std::fs::write(tmp.path().join("keep"), "").unwrap();
        remove_leftovers(tmp.path(), &["authorized_keys.tmp"]);
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["keep"]);
    }
}
