//! Nix archives (NARs) of host store paths, byte for byte as the host's Nix makes
//! them (`nix-store --dump`, src/libutil/archive.cc).
//!
//! A NAR is a sequence of strings, each a little-endian u64 length, the bytes, and
//! zero padding to a multiple of 8: `nix-archive-1`, then the tree — `(` `type`
//! `regular` [`executable` ``] `contents` <bytes> `)`, `(` `type` `symlink` `target`
//! <bytes> `)`, or `(` `type` `directory` { `entry` `(` `name` <name> `node` <tree>
//! `)` } `)` with the entries sorted by name, byte by byte.
//!
//! **The macOS case hack.** Nix on macOS (`use-case-hack`, on by default there) stores
//! the second and later of names that differ only in case as `name~nix~case~hack~N`.
//! Its dumper cuts every name at the first `~nix~case~hack~`, sorts by the cut names,
//! and refuses two entries whose cut names are equal. This writer does the same, so
//! the guest only ever sees canonical archives — and the caller checks the result
//! against the host database's hash anyway.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::libc;

/// What Nix appends to the second and later of names that collide case-insensitively.
const CASE_HACK_MARKER: &[u8] = b"~nix~case~hack~";

/// No real store path nests deeper; a deeper tree is refused rather than followed
/// down to a stack overflow (Linux paths end at 4096 bytes anyway).
const MAX_DEPTH: usize = 512;

const BUFFER: usize = 256 * 1024;

/// `S_IXUSR`: Nix marks a file executable when its owner may execute it (`mode_t` is
/// 16 bits on macOS, 32 on Linux; the bit is the same).
const OWNER_EXECUTE: u32 = 0o100;

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {kind}, which a Nix archive cannot hold")]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{dir}: the names {first:?} and {second:?} are the same once the case hack is removed")]
    Collision {
        dir: PathBuf,
        first: OsString,
        second: OsString,
    },
    #[error("{path} nests more than {MAX_DEPTH} directories deep")]
    TooDeep { path: PathBuf },
    #[error("{path} changed size while it was read")]
    Changed { path: PathBuf },
    /// Writing the archive failed (the receiver went away).
    #[error("the archive could not be written on: {0}")]
    Output(std::io::Error),
}

impl NarError {
    /// True when the path itself does not exist (collected, or never there).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NarError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// How to read the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpOptions {
    /// Undo Nix's macOS case hack (what the host's Nix does when `use-case-hack` is on).
    pub case_hack: bool,
}

/// Writes the NAR of `path` (a file, directory or symbolic link; not followed) to `out`.
pub fn dump(path: &Path, options: DumpOptions, out: &mut impl Write) -> Result<(), NarError> {
    let mut writer = Tokens { out };
    writer.string(b"nix-archive-1")?;
    dump_node(path, options, &mut writer, 0)
}

struct Tokens<'a, W: Write> {
    out: &'a mut W,
}

impl<W: Write> Tokens<'_, W> {
    fn string(&mut self, bytes: &[u8]) -> Result<(), NarError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.out
            .write_all(&len.to_le_bytes())
            .map_err(NarError::Output)?;
        self.out.write_all(bytes).map_err(NarError::Output)?;
        self.padding(len)
    }

    fn strings(&mut self, tokens: &[&[u8]]) -> Result<(), NarError> {
        tokens.iter().try_for_each(|t| self.string(t))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = (8 - len % 8) % 8;
        let zeros = [0u8; 8];
        let pad = usize::try_from(pad).unwrap_or(0);
        self.out
            .write_all(zeros.get(..pad).unwrap_or_default())
            .map_err(NarError::Output)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NarError + '_ {
    move |source| NarError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn dump_node<W: Write>(
    path: &Path,
    options: DumpOptions,
    out: &mut Tokens<'_, W>,
    depth: usize,
) -> Result<(), NarError> {
    if depth > MAX_DEPTH {
        return Err(NarError::TooDeep {
            path: path.to_path_buf(),
        });
    }
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    let file_type = meta.file_type();
    out.string(b"(")?;
    if file_type.is_file() {
        out.strings(&[b"type", b"regular"])?;
        if meta.mode() & OWNER_EXECUTE != 0 {
            out.strings(&[b"executable", b""])?;
        }
        out.string(b"contents")?;
        dump_contents(path, meta.len(), out)?;
    } else if file_type.is_dir() {
        out.strings(&[b"type", b"directory"])?;
        for (name, on_disk) in entries(path, options)? {
            out.strings(&[b"entry", b"(", b"name", name.as_bytes(), b"node"])?;
            dump_node(&path.join(&on_disk), options, out, depth + 1)?;
            out.string(b")")?;
        }
    } else if file_type.is_symlink() {
        let target = std::fs::read_link(path).map_err(io(path))?;
        out.strings(&[
            b"type",
            b"symlink",
            b"target",
            target.as_os_str().as_bytes(),
        ])?;
    } else {
        return Err(NarError::Unsupported {
            path: path.to_path_buf(),
            kind: crate::files::kind_of(file_type),
        });
    }
    out.string(b")")
}

/// A directory's entries as (name in the archive, name on disk), sorted by the
/// former.
fn entries(dir: &Path, options: DumpOptions) -> Result<Vec<(OsString, OsString)>, NarError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let on_disk = entry.map_err(io(dir))?.file_name();
        let name = if options.case_hack {
            unhacked(&on_disk)
        } else {
            on_disk.clone()
        };
        entries.push((name, on_disk));
    }
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    if let Some(pair) = entries.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(NarError::Collision {
            dir: dir.to_path_buf(),
            first: pair[0].1.clone(),
            second: pair[1].1.clone(),
        });
    }
    Ok(entries)
}

/// `name` cut at the first case-hack marker.
fn unhacked(name: &OsString) -> OsString {
    let bytes = name.as_bytes();
    match bytes
        .windows(CASE_HACK_MARKER.len())
        .position(|w| w == CASE_HACK_MARKER)
    {
        Some(at) => std::ffi::OsStr::from_bytes(bytes.get(..at).unwrap_or_default()).to_owned(),
        None => name.clone(),
    }
}

/// The file's `size` bytes (as its metadata said), then the padding.
fn dump_contents<W: Write>(
    path: &Path,
    size: u64,
    out: &mut Tokens<'_, W>,
) -> Result<(), NarError> {
    // Not through a symbolic link that replaced the file after it was looked at.
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path))?;
    out.out
        .write_all(&size.to_le_bytes())
        .map_err(NarError::Output)?;
    let mut left = size;
    let mut buffer = vec![0u8; BUFFER];
    let mut reader = file.take(size);
    while left > 0 {
        let n = reader.read(&mut buffer).map_err(io(path))?;
        if n == 0 {
            return Err(NarError::Changed {
                path: path.to_path_buf(),
            });
        }
        out.out
            .write_all(buffer.get(..n).unwrap_or_default())
            .map_err(NarError::Output)?;
        left = left.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX));
    }
    out.padding(size)
}
