//! SSH keys, made on the host and pinned before the first boot: no trust on first use.
//!
//! The client key pair logs in to the guest; the guest's host key pair is generated
//! here too, handed to the guest through the read-only keys share, and pinned in
//! `known_hosts` under a fixed alias. Keys are never regenerated while they exist;
//! `destroy` and `rotate-keys` are the only ways to replace them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::contract;
use crate::state::{StateDir, StateError, write_file_atomic};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("ssh-keygen was not found on PATH; install OpenSSH (it ships with macOS) or fix PATH")]
    NoKeygen,
    #[error("ssh-keygen failed for {path}: {message}")]
    Keygen { path: PathBuf, message: String },
    #[error(
        "{path} is not a valid public key ({content:?}); run `darwin-vz-nix rotate-keys` to make new keys"
    )]
    BadPublicKey { path: PathBuf, content: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What `ensure` had to create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeysCreated {
    pub client: bool,
    pub host: bool,
}

/// Makes sure every key file exists with its mode, generating missing pairs, and
/// rewrites the derived files (`authorized_keys`, `known_hosts`) from the public keys.
pub fn ensure(state: &StateDir) -> Result<KeysCreated, KeyError> {
    let created = KeysCreated {
        client: ensure_pair(
            &state.client_key(),
            &state.client_key_pub(),
            "darwin-vz-nix client",
        )?,
        host: ensure_pair(
            &state.guest_host_key(),
            &state.guest_host_key_pub(),
            "darwin-vz-nix guest host key",
        )?,
    };
    let client_pub = read_public_key(&state.client_key_pub())?;
    write_file_atomic(
        &state.guest_authorized_keys(),
        format!("{client_pub}\n").as_bytes(),
        0o644,
    )?;
    let host_pub = read_public_key(&state.guest_host_key_pub())?;
    write_file_atomic(
        &state.known_hosts(),
        known_hosts_line(&host_pub).as_bytes(),
        0o644,
    )?;
    Ok(created)
}

/// The `known_hosts` line pinning `host_pub` (`type base64 [comment]`) under the alias.
pub fn known_hosts_line(host_pub: &str) -> String {
    let mut fields = host_pub.split_whitespace();
    let kind = fields.next().unwrap_or_default();
    let key = fields.next().unwrap_or_default();
    format!("{} {kind} {key}\n", contract::HOST_KEY_ALIAS)
}

/// Makes `known_hosts` again from the stored guest host key when it is missing: a
/// deleted pin would otherwise break `ssh` until the next boot rewrites it. Returns
/// true when it did. The supervisor calls this before every guest connection.
pub fn restore_known_hosts(state: &StateDir) -> Result<bool, KeyError> {
    if fs::symlink_metadata(state.known_hosts()).is_ok() {
        return Ok(false);
    }
    let host_pub = read_public_key(&state.guest_host_key_pub())?;
    write_file_atomic(
        &state.known_hosts(),
        known_hosts_line(&host_pub).as_bytes(),
        0o644,
    )?;
    Ok(true)
}

/// Deletes every key (they are made afresh by the next `ensure`).
pub fn remove_all(state: &StateDir) -> Vec<PathBuf> {
    let files = [
        state.client_key(),
        state.client_key_pub(),
        state.known_hosts(),
        state.guest_host_key(),
        state.guest_host_key_pub(),
        state.guest_authorized_keys(),
    ];
    files
        .into_iter()
        .filter(|f| fs::remove_file(f).is_ok())
        .collect()
}

/// `type base64` of a public key file, checked for shape.
pub fn read_public_key(path: &Path) -> Result<String, KeyError> {
    let content = fs::read_to_string(path).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let line = content
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut fields = line.split_whitespace();
    match (fields.next(), fields.next()) {
        (Some(kind), Some(key)) if kind.starts_with("ssh-") && key.len() > 16 => {
            Ok(format!("{kind} {key}"))
        }
        _ => Err(KeyError::BadPublicKey {
            path: path.to_path_buf(),
            content: line,
        }),
    }
}

/// Generates the pair unless the private key exists; repairs a missing public half
/// and modes. Returns true when a new pair was made.
fn ensure_pair(private: &Path, public: &Path, comment: &str) -> Result<bool, KeyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    if private.exists() {
        fs::set_permissions(private, fs::Permissions::from_mode(0o600)).map_err(io(private))?;
        if !public.exists() {
            let output = keygen(&["-y", "-f"], private)?;
            write_file_atomic(public, output.as_bytes(), 0o644)?;
        }
        fs::set_permissions(public, fs::Permissions::from_mode(0o644)).map_err(io(public))?;
        return Ok(false);
    }
    // A lone public key is useless without its private half.
    let _ = fs::remove_file(public);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(private)
        .stdin(std::process::Stdio::null())
        .output();
    match status {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyError::NoKeygen),
        Err(e) => {
            return Err(KeyError::Keygen {
                path: private.into(),
                message: e.to_string(),
            });
        }
        Ok(out) if !out.status.success() => {
            return Err(KeyError::Keygen {
                path: private.into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(_) => {}
    }
    fs::set_permissions(private, fs::Permissions::from_mode(0o600)).map_err(io(private))?;
    fs::set_permissions(public, fs::Permissions::from_mode(0o644)).map_err(io(public))?;
    Ok(true)
}

fn keygen(args: &[&str], path: &Path) -> Result<String, KeyError> {
    let out = Command::new("ssh-keygen")
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyError::NoKeygen,
            _ => KeyError::Keygen {
                path: path.into(),
                message: e.to_string(),
            },
        })?;
    if !out.status.success() {
        return Err(KeyError::Keygen {
            path: path.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Access;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn makes_both_pairs_once_with_private_modes_and_pins_the_host_key() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.create(Access::OwnerOnly).unwrap();

        assert_eq!(
            ensure(&state).unwrap(),
            KeysCreated {
                client: true,
                host: true
            }
        );
        assert_eq!(mode(&state.client_key()), 0o600);
        assert_eq!(mode(&state.guest_host_key()), 0o600);
        assert_eq!(mode(&state.client_key_pub()), 0o644);
        let host_pub = read_public_key(&state.guest_host_key_pub()).unwrap();
        assert!(host_pub.starts_with("ssh-ed25519 "));
        assert_eq!(
            fs::read_to_string(state.known_hosts()).unwrap(),
            format!("darwin-vz-nix {host_pub}\n")
        );
        assert_eq!(
            fs::read_to_string(state.guest_authorized_keys()).unwrap(),
            format!("{}\n", read_public_key(&state.client_key_pub()).unwrap())
        );

        // Never regenerated while they exist.
        let before = fs::read(state.client_key()).unwrap();
        fs::remove_file(state.client_key_pub()).unwrap();
        assert_eq!(ensure(&state).unwrap(), KeysCreated::default());
        assert_eq!(fs::read(state.client_key()).unwrap(), before);
        assert!(state.client_key_pub().exists(), "public half repaired");

        // Only the guest's keys are in the shared directory.
        let mut shared: Vec<String> = fs::read_dir(state.guest_keys_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        shared.sort();
        assert_eq!(
            shared,
            [
                "authorized_keys",
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub"
            ]
        );

        assert_eq!(remove_all(&state).len(), 6);
        assert_eq!(
            ensure(&state).unwrap(),
            KeysCreated {
                client: true,
                host: true
            }
        );
        assert_ne!(fs::read(state.client_key()).unwrap(), before);
    }

    #[test]
    fn a_deleted_known_hosts_is_restored_from_the_stored_host_key() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.create(Access::OwnerOnly).unwrap();
        ensure(&state).unwrap();
        let pinned = fs::read_to_string(state.known_hosts()).unwrap();
        assert!(!restore_known_hosts(&state).unwrap(), "present: left alone");
        fs::remove_file(state.known_hosts()).unwrap();
        assert!(restore_known_hosts(&state).unwrap());
        assert_eq!(fs::read_to_string(state.known_hosts()).unwrap(), pinned);
    }

    #[test]
    fn a_corrupt_public_key_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k.pub");
        fs::write(&path, "garbage").unwrap();
        let err = read_public_key(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains("is not a valid public key (\"garbage\")"),
            "{err}"
        );
    }
}
