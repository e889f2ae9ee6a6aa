//! The cache's signing key: ed25519, made on the Mac at first use, kept in Nix's own
//! key file format so that Nix's tools can read it (`nix store sign --key-file`).
//!
//! The secret key file is `<name>:<base64 of seed ‖ public key>` (64 bytes, what
//! libsodium and `nix-store --generate-binary-cache-key` write), mode 0600 in
//! `keys/`. The public half, `<name>:<base64 of the public key>`, goes into the
//! guest's one-shot key share, from which the guest's Nix learns to trust it. The
//! name carries a random part: Nix finds a signature's key by name, so two installs
//! must never share one.

use std::path::PathBuf;

use data_encoding::BASE64;
use ed25519_dalek::{Signer, SigningKey};

use crate::contract;
use crate::files::{self, FileError};
use crate::state::StateDir;

/// The secret key's file name in `keys/`.
pub const SECRET_KEY_FILE: &str = "nix-cache-key.secret";

/// More than a key file ever holds.
const KEY_FILE_LIMIT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CacheKeyError {
    #[error("cannot make the host cache's signing key: the system gave no random bytes ({0})")]
    Random(String),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// A signing key with its name.
#[derive(Clone)]
pub struct CacheKey {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("CacheKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CacheKey {
    /// A new key from the system's random source, named `darwin-vz-nix-<random>-1`.
    pub fn generate() -> Result<CacheKey, CacheKeyError> {
        let mut seed = [0u8; 32];
        let mut tag = [0u8; 4];
        getrandom::fill(&mut seed).map_err(|e| CacheKeyError::Random(e.to_string()))?;
        getrandom::fill(&mut tag).map_err(|e| CacheKeyError::Random(e.to_string()))?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        Ok(CacheKey {
            name: format!("{}-{tag}-1", contract::HOST_KEY_ALIAS),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads a secret key file's text; `None` unless it is a well-formed ed25519 key
    /// whose public half matches its seed.
    pub fn parse_secret(text: &[u8]) -> Option<CacheKey> {
        let text = std::str::from_utf8(text).ok()?.trim_end_matches('\n');
        let (name, encoded) = text.split_once(':')?;
        if !valid_name(name) {
            return None;
        }
        let bytes = BASE64.decode(encoded.as_bytes()).ok()?;
        let pair: [u8; 64] = bytes.try_into().ok()?;
        let key = SigningKey::from_keypair_bytes(&pair).ok()?;
        Some(CacheKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret key file's text, as Nix writes it (no newline).
    pub fn secret_text(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.key.to_keypair_bytes())
        )
    }

    /// `<name>:<base64>`, what `trusted-public-keys` lists.
    pub fn public_text(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.verifying_key().as_bytes())
        )
    }

    /// A narinfo `Sig` value over `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let signature = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(&signature.to_bytes()))
    }
}

/// A key name Nix reads back unchanged and that fits on a nix.conf line.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Where the secret key lives.
pub fn secret_key_path(state: &StateDir) -> PathBuf {
    state.keys_dir().join(SECRET_KEY_FILE)
}

/// Where the public half is handed to the guest.
pub fn public_key_path(state: &StateDir) -> PathBuf {
    state
        .guest_keys_dir()
        .join(contract::KEY_FILE_HOST_CACHE_KEY)
}

/// The cache's key, made at first use: an unreadable or damaged key file is replaced
/// by a new key (said in a notice), and the public half in the guest's share is
/// rewritten whenever it differs. Call it while holding the state directory's lock.
pub fn ensure(state: &StateDir) -> Result<(CacheKey, Vec<String>), CacheKeyError> {
    state.create_key_dirs()?;
    let path = secret_key_path(state);
    let mut notices = Vec::new();
    let existing = match files::read_state_file(&path, KEY_FILE_LIMIT) {
        Ok(Some(bytes)) => {
            let key = CacheKey::parse_secret(&bytes);
            if key.is_none() {
                notices.push(format!(
                    "the host cache's signing key {} was not a usable key; made a new one — the guest trusts the new one from its next boot",
                    path.display()
                ));
            }
            key
        }
        Ok(None) => None,
        Err(e @ (FileError::NotRegular { .. } | FileError::TooLarge { .. })) => {
            notices.push(format!(
                "{e}; made a new host cache signing key in its place"
            ));
            let _ = std::fs::remove_file(&path);
            None
        }
        Err(e) => return Err(e.into()),
    };
    let key = match existing {
        Some(key) => {
            files::set_state_file_mode(&path, 0o600)?;
            key
        }
        None => {
            let key = CacheKey::generate()?;
            files::write_atomic(
                &path,
                &state.keys_dir(),
                key.secret_text().as_bytes(),
                0o600,
            )?;
            key
        }
    };
    let public = public_key_path(state);
    let wanted = key.public_text();
    if files::read_state_file(&public, KEY_FILE_LIMIT)
        .ok()
        .flatten()
        != Some(wanted.clone().into_bytes())
    {
        // Staged in keys/, so the share never shows a half-written file.
        files::write_atomic(&public, &state.keys_dir(), wanted.as_bytes(), 0o644)?;
    }
    Ok((key, notices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Access;
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};
    use std::os::unix::fs::PermissionsExt;

    fn state() -> (tempfile::TempDir, StateDir) {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        state.create(Access::OwnerOnly).unwrap();
        (tmp, state)
    }

    #[test]
    fn the_key_is_made_once_private_and_its_public_half_is_shared() {
        let (_tmp, state) = state();
        let (key, notices) = ensure(&state).unwrap();
        assert!(notices.is_empty());
        let secret = secret_key_path(&state);
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), key.secret_text());
        assert_eq!(
            std::fs::read_to_string(public_key_path(&state)).unwrap(),
            key.public_text()
        );
        assert!(key.name().starts_with("darwin-vz-nix-") && key.name().ends_with("-1"));

        let (again, notices) = ensure(&state).unwrap();
        assert!(notices.is_empty());
        assert_eq!(again.secret_text(), key.secret_text(), "kept, never remade");
    }

    #[test]
    fn a_damaged_key_file_is_replaced_with_a_notice_and_the_share_follows() {
        let (_tmp, state) = state();
        let (old, _) = ensure(&state).unwrap();
        std::fs::write(secret_key_path(&state), "garbage").unwrap();
        let (new, notices) = ensure(&state).unwrap();
        assert_ne!(new.public_text(), old.public_text());
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].contains("was not a usable key"), "{notices:?}");
        assert_eq!(
            std::fs::read_to_string(public_key_path(&state)).unwrap(),
            new.public_text()
        );
    }

    #[test]
    fn signatures_verify_with_the_public_half_and_the_file_round_trips() {
        let key = CacheKey::generate().unwrap();
        let parsed = CacheKey::parse_secret(key.secret_text().as_bytes()).unwrap();
        assert_eq!(parsed.public_text(), key.public_text());
        let sig = key.sign("1;/nix/store/x;sha256:0;1;");
        let (name, b64) = sig.split_once(':').unwrap();
        assert_eq!(name, key.name());
        let bytes: [u8; 64] = BASE64.decode(b64.as_bytes()).unwrap().try_into().unwrap();
        let public: [u8; 32] = BASE64
            .decode(key.public_text().split_once(':').unwrap().1.as_bytes())
            .unwrap()
            .try_into()
            .unwrap();
        VerifyingKey::from_bytes(&public)
            .unwrap()
            .verify(
                b"1;/nix/store/x;sha256:0;1;",
                &Signature::from_bytes(&bytes),
            )
            .unwrap();
        // A public half that does not belong to the seed is not a key.
        let mut pair = key.key.to_keypair_bytes();
        pair[63] ^= 1;
        let forged = format!("{}:{}", key.name(), BASE64.encode(&pair));
        assert!(CacheKey::parse_secret(forged.as_bytes()).is_none());
        assert!(CacheKey::parse_secret(b"bad name:AAAA").is_none());
    }
}
