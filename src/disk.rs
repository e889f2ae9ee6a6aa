//! The guest's disk: one sparse raw image, created at `diskSize`, grown in place when
//! `diskSize` grows, never recreated and never shrunk. The guest formats it on first
//! boot and grows its filesystem on every boot.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::size::ByteSize;

/// What `ensure` did to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskChange {
    Created,
    Grown { from: ByteSize },
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "{path} is a QEMU qcow2 image (left over from nix.linux-builder?), not a raw disk; move it away or run `darwin-vz-nix destroy` — booting it as raw would corrupt it"
    )]
    Qcow2 { path: PathBuf },
    #[error(
        "{path} is {existing}, larger than diskSize {wanted}; disks are never shrunk — set diskSize to at least {existing}, or run `darwin-vz-nix destroy` to start over"
    )]
    WouldShrink {
        path: PathBuf,
        existing: ByteSize,
        wanted: ByteSize,
    },
    #[error("{path} is not a regular file; remove it or choose another --state-dir")]
    NotAFile { path: PathBuf },
    #[error("disk image {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// The size of the image at `path`, if there is one (a link is not an image).
pub fn existing_size(path: &Path) -> Option<ByteSize> {
    fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| ByteSize::from_bytes(m.len()))
}

/// Makes sure a raw image of exactly `size` exists at `path` (never losing data).
pub fn ensure(path: &Path, size: ByteSize) -> Result<DiskChange, DiskError> {
    let io = |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // create_new: never clobber an image that appeared meanwhile.
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            // set_len on a new file makes a sparse file: no blocks are written.
            file.set_len(size.bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(DiskChange::Created)
        }
        Err(e) => Err(io(e)),
        Ok(meta) if !meta.is_file() => Err(DiskError::NotAFile {
            path: path.to_path_buf(),
        }),
        Ok(meta) => {
            if is_qcow2(path).map_err(io)? {
                return Err(DiskError::Qcow2 {
                    path: path.to_path_buf(),
                });
            }
            let existing = ByteSize::from_bytes(meta.len());
            if size < existing {
                return Err(DiskError::WouldShrink {
                    path: path.to_path_buf(),
                    existing,
                    wanted: size,
                });
            }
            if size == existing {
                return Ok(DiskChange::Unchanged);
            }
            // The same file that was checked: a link swapped in meanwhile is refused.
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
                .open(path)
                .map_err(io)?;
            if !file.metadata().map_err(io)?.is_file() {
                return Err(DiskError::NotAFile {
                    path: path.to_path_buf(),
                });
            }
            file.set_len(size.bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(DiskChange::Grown { from: existing })
        }
    }
}

/// True when the file starts with QEMU's qcow2 magic. Never reads through a link,
/// and never waits on a FIFO planted at the path.
pub fn is_qcow2(path: &Path) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    let mut file = match crate::files::open_state_file(path) {
        Ok(file) => file,
        Err(crate::files::FileError::Io { source, .. }) => return Err(source),
        Err(_) => return Ok(false),
    };
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == QCOW2_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn creates_a_sparse_image_then_grows_it_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("disk.img");
        assert_eq!(
            ensure(&path, ByteSize::from_gib(10)).unwrap(),
            DiskChange::Created
        );
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 10 << 30);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "image is sparse: {} blocks",
            meta.blocks()
        );

        // Data written by the guest survives a grow.
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| std::os::unix::fs::FileExt::write_at(&f, b"ext4", 1024))
            .unwrap();
        let inode = meta.ino();
        assert_eq!(
            ensure(&path, ByteSize::from_gib(10)).unwrap(),
            DiskChange::Unchanged
        );
        assert_eq!(
            ensure(&path, ByteSize::from_gib(20)).unwrap(),
            DiskChange::Grown {
                from: ByteSize::from_gib(10)
            }
        );
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 20 << 30);
        assert_eq!(meta.ino(), inode, "grown in place, not recreated");
        let mut head = [0u8; 4];
        std::os::unix::fs::FileExt::read_at(&fs::File::open(&path).unwrap(), &mut head, 1024)
            .unwrap();
        assert_eq!(&head, b"ext4");
    }

    #[test]
    fn refuses_to_shrink() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("disk.img");
        ensure(&path, ByteSize::from_gib(20)).unwrap();
        let err = ensure(&path, ByteSize::from_gib(10)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is 20G, larger than diskSize 10G; disks are never shrunk — set diskSize to at least 20G, or run `darwin-vz-nix destroy` to start over",
                path.display()
            )
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), 20 << 30, "untouched");
    }

    #[test]
    fn refuses_a_link_or_fifo_in_place_of_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"QFI\xfb").unwrap();
        let path = tmp.path().join("disk.img");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert_eq!(existing_size(&path), None);
        assert!(!is_qcow2(&path).unwrap(), "not read through the link");
        assert!(matches!(
            ensure(&path, ByteSize::from_gib(1)),
            Err(DiskError::NotAFile { .. })
        ));
        assert_eq!(fs::metadata(&victim).unwrap().len(), 4, "target untouched");

        let fifo = tmp.path().join("fifo.img");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(!is_qcow2(&fifo).unwrap(), "returns at once");
    }

    #[test]
    fn refuses_a_qcow2_image() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("disk.img");
        fs::write(&path, b"QFI\xfb\0\0\0\x03rest").unwrap();
        let err = ensure(&path, ByteSize::from_gib(1)).unwrap_err();
        assert!(matches!(err, DiskError::Qcow2 { .. }), "{err}");
        assert!(err.to_string().contains("is a QEMU qcow2 image"));
        assert_eq!(
            fs::read(&path).unwrap(),
            b"QFI\xfb\0\0\0\x03rest",
            "untouched"
        );
    }
}
