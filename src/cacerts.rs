//! The CA certificates the host's Nix trusts, handed to the guest.
//!
//! Behind a TLS-intercepting proxy, substitution from the guest fails unless the
//! guest trusts the proxy's root, which the user has added to the bundle their Mac's
//! Nix uses. Before every boot the bundle is copied (size-capped) into the one-shot
//! keys share; the guest's Nix then trusts it besides NixOS's own bundle
//! (nix/nixos/scripts/host-handover.sh). With no bundle found, the stale copy is
//! removed and the guest keeps NixOS's bundle alone.
//!
//! Where the bundle is looked for, in this order: `NIX_SSL_CERT_FILE`; the
//! `ssl-cert-file` setting in nix.conf (`NIX_CONF_DIR`, else /etc/nix; the last
//! setting wins, includes are followed one level); then where Nix on macOS keeps it:
//! nix-darwin's /etc/ssl/certs/ca-certificates.crt, the Nix installer's profile
//! bundle, macOS's /etc/ssl/cert.pem.

use std::fs;
use std::path::{Path, PathBuf};

use crate::contract::KEY_FILE_CA_BUNDLE;
use crate::files::{self, FileError};
use crate::state::{StateError, write_file_atomic};

/// Larger than any real bundle (Mozilla's is about 220 KiB); the guest refuses more
/// too.
pub const MAX_BUNDLE_BYTES: u64 = 4 << 20;

/// nix.conf files larger than this are not read.
const MAX_NIX_CONF_BYTES: u64 = 1 << 20;

const PEM_CERTIFICATE: &[u8] = b"-----BEGIN CERTIFICATE-----";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "the CA bundle {path} is larger than {MAX_BUNDLE_BYTES} bytes; point NIX_SSL_CERT_FILE or ssl-cert-file at a real bundle"
    )]
    TooLarge { path: PathBuf },
    #[error(
        "the CA bundle {path} holds no PEM certificate; point NIX_SSL_CERT_FILE or ssl-cert-file at a PEM bundle"
    )]
    NotPem { path: PathBuf },
    #[error("cannot read the CA bundle {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a directory (a symlink?); run `darwin-vz-nix rotate-keys` to remake it")]
    NotADirectory { path: PathBuf },
    #[error(transparent)]
    Write(#[from] StateError),
}

/// Where to look for the bundle: plain data, so that tests can point it anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// `NIX_SSL_CERT_FILE`.
    pub env_cert_file: Option<PathBuf>,
    /// nix.conf files in the order Nix reads them.
    pub nix_conf: Vec<PathBuf>,
    /// Well-known locations, in order.
    pub well_known: Vec<PathBuf>,
}

impl Sources {
    /// What Nix on this host would use.
    pub fn from_host() -> Sources {
        let conf_dir = std::env::var_os("NIX_CONF_DIR")
            .filter(|dir| !dir.is_empty())
            .map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from);
        Sources {
            env_cert_file: std::env::var_os("NIX_SSL_CERT_FILE")
                .filter(|file| !file.is_empty())
                .map(PathBuf::from),
            nix_conf: vec![conf_dir.join("nix.conf")],
            well_known: [
                "/etc/ssl/certs/ca-certificates.crt",
                "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .map(PathBuf::from)
            .to_vec(),
        }
    }
}

/// The bundle Nix on this host uses, if one exists.
pub fn find(sources: &Sources) -> Option<PathBuf> {
    let configured = sources
        .nix_conf
        .iter()
        .filter_map(|conf| ssl_cert_file_setting(conf, 1))
        .next_back();
    sources
        .env_cert_file
        .iter()
        .chain(configured.iter())
        .chain(sources.well_known.iter())
        .find(|path| path.is_file())
        .cloned()
}

/// The last `ssl-cert-file` in a nix.conf, following `include`/`!include` lines
/// `depth` levels deep.
fn ssl_cert_file_setting(conf: &Path, depth: u32) -> Option<PathBuf> {
    let text = read_capped(conf, MAX_NIX_CONF_BYTES).ok()?;
    let text = String::from_utf8_lossy(&text);
    let mut found = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if let Some(included) = line
            .strip_prefix("!include ")
            .or_else(|| line.strip_prefix("include "))
        {
            if depth > 0 {
                let included = conf
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .join(included.trim());
                if let Some(setting) = ssl_cert_file_setting(&included, depth - 1) {
                    found = Some(setting);
                }
            }
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && key.trim() == "ssl-cert-file"
        {
            let value = value.trim();
            found = (!value.is_empty()).then(|| PathBuf::from(value));
        }
    }
    found
}

/// What `stage` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    Copied { from: PathBuf, bytes: usize },
    NoBundle,
}

/// Copies the bundle into the guest's share directory `share` (or removes the copy
/// there when there is none). Writes through a fresh temporary file and a rename, so
/// a symlink planted at the destination is replaced, never followed.
pub fn stage(share: &Path, sources: &Sources) -> Result<Staged, CaError> {
    let destination = share.join(KEY_FILE_CA_BUNDLE);
    let is_dir = fs::symlink_metadata(share).is_ok_and(|meta| meta.is_dir());
    if !is_dir {
        return Err(CaError::NotADirectory {
            path: share.to_path_buf(),
        });
    }
    let Some(source) = find(sources) else {
        remove(&destination);
        return Ok(Staged::NoBundle);
    };
    let bundle = read_capped(&source, MAX_BUNDLE_BYTES).map_err(|error| match error {
        ReadError::TooLarge => CaError::TooLarge {
            path: source.clone(),
        },
        ReadError::Io(source_error) => CaError::Read {
            path: source.clone(),
            source: source_error,
        },
    })?;
    if !bundle
        .windows(PEM_CERTIFICATE.len())
        .any(|w| w == PEM_CERTIFICATE)
    {
        return Err(CaError::NotPem { path: source });
    }
    write_file_atomic(&destination, &bundle, 0o644)?;
    Ok(Staged::Copied {
        from: source,
        bytes: bundle.len(),
    })
}

/// `stage` for the supervisor: a bundle that cannot be passed is logged and the
/// guest falls back to NixOS's bundle; the boot goes on either way.
pub fn share_with_guest(share: &Path) {
    match stage(share, &Sources::from_host()) {
        Ok(Staged::Copied { from, bytes }) => {
            tracing::info!(
                "passing the CA bundle {} ({bytes} bytes) to the guest",
                from.display()
            )
        }
        Ok(Staged::NoBundle) => tracing::debug!("no CA bundle to pass to the guest"),
        Err(error) => {
            remove(&share.join(KEY_FILE_CA_BUNDLE));
            tracing::warn!("{error}; the guest uses NixOS's CA bundle only");
        }
    }
}

fn remove(path: &Path) {
    // remove_file unlinks a symlink itself, never its target.
    if let Err(error) = fs::remove_file(path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {error}", path.display());
    }
}

enum ReadError {
    TooLarge,
    Io(std::io::Error),
}

/// Reads a regular file of at most `cap` bytes, through `files::open_input`: a FIFO
/// put where a file is expected cannot hang the boot.
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    files::open_input(path)
        .and_then(|file| files::read_capped(file, path, cap))
        .map_err(|error| match error {
            FileError::TooLarge { .. } => ReadError::TooLarge,
            FileError::Io { source, .. } => ReadError::Io(source),
            FileError::NotRegular { .. } => {
                ReadError::Io(std::io::Error::other("not a regular file"))
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn file(path: &Path, content: &str) -> PathBuf {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
        path.to_path_buf()
    }

    #[test]
    fn the_environment_wins_then_nix_conf_then_the_well_known_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let env = file(&tmp.path().join("env.pem"), PEM);
        let configured = file(&tmp.path().join("configured.pem"), PEM);
        let well_known = file(&tmp.path().join("well-known.pem"), PEM);
        let conf = file(
            &tmp.path().join("nix.conf"),
            &format!(
                "# ssl-cert-file = /commented/out\nssl-cert-file = /first\nssl-cert-file = {}  # the last wins\n",
                configured.display()
            ),
        );
        let mut sources = Sources {
            env_cert_file: Some(env.clone()),
            nix_conf: vec![conf],
            well_known: vec![tmp.path().join("missing.pem"), well_known.clone()],
        };
        assert_eq!(find(&sources), Some(env));
        sources.env_cert_file = Some(tmp.path().join("gone.pem"));
        assert_eq!(
            find(&sources),
            Some(configured),
            "a missing file is skipped"
        );
        sources.nix_conf.clear();
        assert_eq!(find(&sources), Some(well_known));
        sources.well_known.clear();
        assert_eq!(find(&sources), None);
    }

    #[test]
    fn the_setting_is_found_through_an_include() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = file(&tmp.path().join("corp.pem"), PEM);
        file(
            &tmp.path().join("nix.custom.conf"),
            &format!("ssl-cert-file = {}\n", bundle.display()),
        );
        let conf = file(
            &tmp.path().join("nix.conf"),
            "build-users-group = nixbld\n!include nix.custom.conf\n",
        );
        let sources = Sources {
            nix_conf: vec![conf],
            ..Sources::default()
        };
        assert_eq!(find(&sources), Some(bundle));
    }

    #[test]
    fn stage_copies_the_bundle_and_replaces_a_planted_symlink_without_following_it() {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("guest");
        fs::create_dir(&share).unwrap();
        let outside = file(&tmp.path().join("outside"), "do not touch\n");
        std::os::unix::fs::symlink(&outside, share.join(KEY_FILE_CA_BUNDLE)).unwrap();
        let bundle = file(&tmp.path().join("bundle.pem"), PEM);
        let sources = Sources {
            env_cert_file: Some(bundle.clone()),
            ..Sources::default()
        };

        assert_eq!(
            stage(&share, &sources).unwrap(),
            Staged::Copied {
                from: bundle,
                bytes: PEM.len()
            }
        );
        let copy = share.join(KEY_FILE_CA_BUNDLE);
        let meta = fs::symlink_metadata(&copy).unwrap();
        assert!(meta.is_file(), "the symlink was replaced by a file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(fs::read_to_string(&copy).unwrap(), PEM);
        assert_eq!(fs::read_to_string(&outside).unwrap(), "do not touch\n");

        // Nothing to pass any more: the stale copy goes.
        assert_eq!(
            stage(&share, &Sources::default()).unwrap(),
            Staged::NoBundle
        );
        assert!(!copy.exists());
    }

    #[test]
    fn oversized_non_pem_fifo_and_symlinked_share_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("guest");
        fs::create_dir(&share).unwrap();
        let with = |path: PathBuf| Sources {
            env_cert_file: Some(path),
            ..Sources::default()
        };

        let big = tmp.path().join("big.pem");
        let mut content = PEM.repeat(1 + usize::try_from(MAX_BUNDLE_BYTES).unwrap() / PEM.len());
        content.truncate(usize::try_from(MAX_BUNDLE_BYTES).unwrap() + 1);
        fs::write(&big, content).unwrap();
        assert!(matches!(
            stage(&share, &with(big)),
            Err(CaError::TooLarge { .. })
        ));

        let text = file(&tmp.path().join("notes.txt"), "not a certificate\n");
        let error = stage(&share, &with(text.clone())).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "the CA bundle {} holds no PEM certificate; point NIX_SSL_CERT_FILE or ssl-cert-file at a PEM bundle",
                text.display()
            )
        );

        // A FIFO is not a file: find skips it, and reading one never blocks.
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(find(&with(fifo.clone())), None);
        assert!(read_capped(&fifo, 10).is_err());

        let linked = tmp.path().join("linked");
        std::os::unix::fs::symlink(&share, &linked).unwrap();
        let bundle = file(&tmp.path().join("ok.pem"), PEM);
        assert!(matches!(
            stage(&linked, &with(bundle)),
            Err(CaError::NotADirectory { .. })
        ));
    }
}
