//! SSH keys, made on the host and pinned before the first boot: no trust on first use.
//!
//! The client key pair logs in to the guest; the guest's host key pair is generated
//! here too, handed to the guest through the read-only keys share, and pinned in
//! `known_hosts` under a fixed alias. Keys are never regenerated while they are
//! intact; `destroy` and `rotate-keys` are the only ways to replace good keys.
//!
//! Key material is written so that no failure (a full disk, a crash) leaves half a
//! pair: `ssh-keygen` writes into a private staging directory outside the guest's
//! share, the pair is checked, and renames put it in place. A half pair found later
//! (an empty `.pub` from an older version, a deleted file) is repaired — the public
//! half re-derived from the private one — or, when the private half is unusable,
//! replaced, and said so in a notice.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::Uid;
use std::os::unix::fs::MetadataExt;

use crate::contract;
use crate::files::{self, FileError, StagingDir};
use crate::state::{StateDir, StateError};

/// More than any OpenSSH key file holds; a larger file is not ours.
const KEY_FILE_LIMIT: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("ssh-keygen was not found on PATH; install OpenSSH (it ships with macOS) or fix PATH")]
    NoKeygen,
    #[error("ssh-keygen failed for {path}: {message}")]
    Keygen { path: PathBuf, message: String },
    #[error("{path} is not a valid public key; run `darwin-vz-nix rotate-keys` to make new keys")]
    BadPublicKey { path: PathBuf },
    #[error(
        "{path} belongs to uid {owner}, not to this user (uid {me}); run `darwin-vz-nix rotate-keys` as the state directory's owner (or as root, which acts as the owner)"
    )]
    ForeignKey { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "{path} is {kind}, not a key file darwin-vz-nix made; remove it, or run `darwin-vz-nix rotate-keys` to replace it with a new key"
    )]
    NotAKeyFile { path: PathBuf, kind: &'static str },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    File(#[from] FileError),
}

/// What `ensure` had to do, and what a user should hear about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeysCreated {
    pub client: bool,
    pub host: bool,
    /// Repairs and replacements of keys that existed (never the first creation),
    /// one sentence each; also logged as warnings.
    pub notices: Vec<String>,
}

/// One key pair: where it lives and what it is called in messages.
#[derive(Debug, Clone)]
struct Pair {
    what: &'static str,
    private: PathBuf,
    public: PathBuf,
    comment: &'static str,
    /// What replacing the pair means for a user.
    consequence: &'static str,
}

fn client_pair(state: &StateDir) -> Pair {
    Pair {
        what: "the client key",
        private: state.client_key(),
        public: state.client_key_pub(),
        comment: "darwin-vz-nix client",
        consequence: "the guest accepts the new one (authorized_keys is rewritten)",
    }
}

fn host_pair(state: &StateDir) -> Pair {
    Pair {
        what: "the guest host key",
        private: state.guest_host_key(),
        public: state.guest_host_key_pub(),
        comment: "darwin-vz-nix guest host key",
        consequence: "known_hosts pins the new one",
    }
}

/// Makes sure both pairs exist, intact and with their modes, generating missing or
/// unusable ones, and rewrites the derived files (`authorized_keys`, `known_hosts`)
/// from the public keys. Call it while holding the state directory's lock.
pub fn ensure(state: &StateDir) -> Result<KeysCreated, KeyError> {
    state.create_key_dirs()?;
    remove_leftovers(state);
    let had_keys = key_files(state)
        .iter()
        .any(|f| std::fs::symlink_metadata(f).is_ok());
    let mut report = KeysCreated::default();
    report.client = ensure_pair(state, &client_pair(state), had_keys, &mut report.notices)?;
    report.host = ensure_pair(state, &host_pair(state), had_keys, &mut report.notices)?;
    write_derived(state)?;
    for notice in &report.notices {
        tracing::warn!("{notice}");
    }
    Ok(report)
}

/// New pairs for both keys, complete and checked, not yet in place.
pub struct StagedKeys {
    state: StateDir,
    client: StagedPair,
    host: StagedPair,
}

/// Makes new pairs for both keys in staging directories. Nothing in place changes:
/// a failure (no ssh-keygen, a full disk) leaves the old keys as they were. Call it
/// while holding the state directory's lock.
pub fn stage_all(state: &StateDir) -> Result<StagedKeys, KeyError> {
    state.create_key_dirs()?;
    remove_leftovers(state);
    Ok(StagedKeys {
        state: state.clone(),
        client: generate(state, client_pair(state))?,
        host: generate(state, host_pair(state))?,
    })
}

impl StagedKeys {
    /// Puts the new pairs in place, each file by one rename (there is never a moment
    /// without a key), and rewrites `authorized_keys` and `known_hosts`. Returns the
    /// key files that existed before and were replaced.
    pub fn install(self) -> Result<Vec<PathBuf>, KeyError> {
        let existed: Vec<PathBuf> = key_files(&self.state)
            .into_iter()
            .filter(|f| std::fs::symlink_metadata(f).is_ok())
            .collect();
        self.client.install()?;
        self.host.install()?;
        write_derived(&self.state)?;
        Ok(existed)
    }
}

/// Replaces both pairs with new ones (`stage_all`, then `install`).
pub fn replace_all(state: &StateDir) -> Result<Vec<PathBuf>, KeyError> {
    stage_all(state)?.install()
}

/// Every file this module keeps.
fn key_files(state: &StateDir) -> [PathBuf; 6] {
    [
        state.client_key(),
        state.client_key_pub(),
        state.known_hosts(),
        state.guest_host_key(),
        state.guest_host_key_pub(),
        state.guest_authorized_keys(),
    ]
}

/// What a crash of this or an older version can have left: staging directories and
/// temporary files (older versions wrote `<name>.tmp` next to the file, even inside
/// the guest's share).
fn remove_leftovers(state: &StateDir) {
    files::remove_leftovers(
        &state.keys_dir(),
        &["known_hosts.tmp", "client_ed25519.tmp"],
    );
    files::remove_leftovers(
        &state.guest_keys_dir(),
        &["authorized_keys.tmp", "ssh_host_ed25519_key.tmp"],
    );
}

/// `authorized_keys` (in the share) and `known_hosts`, from the public keys; staged
/// in `keys/`, so the share never holds a temporary file.
fn write_derived(state: &StateDir) -> Result<(), KeyError> {
    let staging = state.keys_dir();
    let client_pub = read_public_key(&state.client_key_pub())?;
    files::write_atomic(
        &state.guest_authorized_keys(),
        &staging,
        format!("{client_pub}\n").as_bytes(),
        0o644,
    )?;
    let host_pub = read_public_key(&state.guest_host_key_pub())?;
    files::write_atomic(
        &state.known_hosts(),
        &staging,
        known_hosts_line(&host_pub).as_bytes(),
        0o644,
    )?;
    Ok(())
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
    if std::fs::symlink_metadata(state.known_hosts()).is_ok() {
        return Ok(false);
    }
    let host_pub = read_public_key(&state.guest_host_key_pub())?;
    files::write_atomic(
        &state.known_hosts(),
        &state.keys_dir(),
        known_hosts_line(&host_pub).as_bytes(),
        0o644,
    )?;
    Ok(true)
}

/// `type base64` of a public key file, checked for shape. The file's content never
/// appears in an error: it may be anything a link pointed at.
pub fn read_public_key(path: &Path) -> Result<String, KeyError> {
    let bytes = files::read_state_file(path, KEY_FILE_LIMIT)?.ok_or_else(|| FileError::Io {
        path: path.to_path_buf(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    public_key_fields(&bytes).ok_or_else(|| KeyError::BadPublicKey {
        path: path.to_path_buf(),
    })
}

/// `type base64` when the text's first line looks like an OpenSSH public key.
fn public_key_fields(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut fields = text.lines().next()?.split_whitespace();
    match (fields.next(), fields.next()) {
        (Some(kind), Some(key))
            if kind.starts_with("ssh-")
                && key.len() > 16
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=')) =>
        {
            Some(format!("{kind} {key}"))
        }
        _ => None,
    }
}

/// Keeps an intact pair (fixing modes), re-derives a broken public half, replaces an
/// unusable private half. Returns true when a new pair was made.
fn ensure_pair(
    state: &StateDir,
    pair: &Pair,
    had_keys: bool,
    notices: &mut Vec<String>,
) -> Result<bool, KeyError> {
    let replaced = |why: String| {
        format!(
            "{} {} {why}; made a new pair — {}",
            pair.what,
            pair.private.display(),
            pair.consequence
        )
    };
    if !private_key_exists(&pair.private)? {
        generate(state, pair.clone())?.install()?;
        if had_keys {
            notices.push(replaced("was missing".into()));
        }
        return Ok(true);
    }
    files::set_state_file_mode(&pair.private, 0o600)?;
    let derived = match derive_public(&pair.private) {
        Ok(derived) => derived,
        Err(KeyError::NoKeygen) if read_public_key(&pair.public).is_ok() => {
            // Without ssh-keygen the pair cannot be checked; a well-formed public
            // half is trusted rather than stopping a working setup.
            files::set_state_file_mode(&pair.public, 0o644)?;
            return Ok(false);
        }
        Err(KeyError::Keygen { message, .. }) => {
            generate(state, pair.clone())?.install()?;
            notices.push(replaced(format!("is not a usable private key ({message})")));
            return Ok(true);
        }
        Err(e) => return Err(e),
    };
    let problem = match read_public_key(&pair.public) {
        Ok(existing) if existing == derived => None,
        Ok(_) => Some("did not match the private key"),
        Err(KeyError::File(e)) if e.is_not_found() => Some("was missing"),
        Err(KeyError::File(FileError::NotRegular { .. })) => Some("was not a regular file"),
        Err(_) => Some("was empty or not a public key"),
    };
    match problem {
        None => files::set_state_file_mode(&pair.public, 0o644)?,
        Some(problem) => {
            let staging = state.keys_dir();
            let line = format!("{derived} {}\n", pair.comment);
            files::write_atomic(&pair.public, &staging, line.as_bytes(), 0o644)?;
            notices.push(format!(
                "the public half of {} ({}) {problem}; re-derived it from the private key",
                pair.what,
                pair.public.display()
            ));
        }
    }
    Ok(false)
}

/// True when the private key file is there; an error when something is there that
/// this program must not use or change (a link, another user's file).
fn private_key_exists(path: &Path) -> Result<bool, KeyError> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(FileError::Io {
                path: path.to_path_buf(),
                source,
            }
            .into());
        }
        Ok(meta) => meta,
    };
    if !meta.is_file() {
        return Err(KeyError::NotAKeyFile {
            path: path.to_path_buf(),
            kind: files::kind_of(meta.file_type()),
        });
    }
    let me = Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(KeyError::ForeignKey {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    Ok(true)
}

/// `type base64` of the public half, computed from the private key by ssh-keygen.
fn derive_public(private: &Path) -> Result<String, KeyError> {
    let out = keygen(
        Command::new("ssh-keygen").arg("-y").arg("-f").arg(private),
        private,
    )?;
    public_key_fields(out.as_bytes()).ok_or_else(|| KeyError::Keygen {
        path: private.to_path_buf(),
        message: "`ssh-keygen -y` printed no public key".into(),
    })
}

/// A new, checked pair in a staging directory, not yet in place.
struct StagedPair {
    pair: Pair,
    stage: StagingDir,
}

/// Runs ssh-keygen into a fresh staging directory in `keys/` (outside the guest's
/// share) and checks that both halves are complete and belong together. On any
/// failure the staging directory goes, and with it any half-written file.
fn generate(state: &StateDir, pair: Pair) -> Result<StagedPair, KeyError> {
    let stage = StagingDir::new(&state.keys_dir(), "keygen")?;
    let private = stage.path().join("key");
    keygen(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", pair.comment, "-f"])
            .arg(&private),
        &pair.private,
    )?;
    let public = stage.path().join("key.pub");
    let written = read_public_key(&public).map_err(|_| KeyError::Keygen {
        path: pair.public.clone(),
        message: "ssh-keygen left no complete public key (is the disk full?)".into(),
    })?;
    if derive_public(&private)? != written {
        return Err(KeyError::Keygen {
            path: pair.private.clone(),
            message: "the new private and public keys do not belong together".into(),
        });
    }
    for (path, mode) in [(&private, 0o600), (&public, 0o644)] {
        files::set_state_file_mode(path, mode)?;
        let file = files::open_state_file(path)?;
        file.sync_all().map_err(|source| FileError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(StagedPair { pair, stage })
}

impl StagedPair {
    /// Renames the pair into place: the private half first, so that an interruption
    /// leaves a private key whose public half the next `ensure` re-derives.
    fn install(self) -> Result<(), KeyError> {
        let moves = [
            (self.stage.path().join("key"), &self.pair.private),
            (self.stage.path().join("key.pub"), &self.pair.public),
        ];
        for (from, to) in moves {
            std::fs::rename(&from, to).map_err(|source| FileError::Io {
                path: to.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Runs ssh-keygen and returns what it printed; `path` names the key in errors.
fn keygen(command: &mut Command, path: &Path) -> Result<String, KeyError> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyError::NoKeygen,
            _ => KeyError::Keygen {
                path: path.into(),
                message: e.to_string(),
            },
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(KeyError::Keygen {
            path: path.into(),
            message: stderr
                .lines()
                .next()
                .unwrap_or("no message")
                .trim()
                .to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Access;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn state() -> (tempfile::TempDir, StateDir) {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        state.create(Access::OwnerOnly).unwrap();
        (tmp, state)
    }

    fn both_created() -> KeysCreated {
        KeysCreated {
            client: true,
            host: true,
            notices: vec![],
        }
    }

    /// Names in a directory, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn makes_both_pairs_once_with_private_modes_and_pins_the_host_key() {
        let (_tmp, state) = state();
        assert_eq!(
            ensure(&state).unwrap(),
            both_created(),
            "first keys: no notice"
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

        // Never regenerated while they are intact.
        let before = fs::read(state.client_key()).unwrap();
        assert_eq!(ensure(&state).unwrap(), KeysCreated::default());
        assert_eq!(fs::read(state.client_key()).unwrap(), before);

        // Only the guest's keys are in the shared directory; no staging is left.
        assert_eq!(
            names(&state.guest_keys_dir()),
            [
                "authorized_keys",
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub"
            ]
        );
        assert_eq!(
            names(&state.keys_dir()),
            [
                "client_ed25519",
                "client_ed25519.pub",
                "guest",
                "known_hosts"
            ]
        );

        let replaced = replace_all(&state).unwrap();
        assert_eq!(replaced.len(), 6);
        assert_ne!(fs::read(state.client_key()).unwrap(), before);
        assert_eq!(ensure(&state).unwrap(), KeysCreated::default());
    }

    #[test]
    fn a_deleted_known_hosts_is_restored_from_the_stored_host_key() {
        let (_tmp, state) = state();
        ensure(&state).unwrap();
        let pinned = fs::read_to_string(state.known_hosts()).unwrap();
        assert!(!restore_known_hosts(&state).unwrap(), "present: left alone");
        fs::remove_file(state.known_hosts()).unwrap();
        assert!(restore_known_hosts(&state).unwrap());
        assert_eq!(fs::read_to_string(state.known_hosts()).unwrap(), pinned);
    }

    #[test]
    fn an_empty_or_missing_public_half_is_re_derived_with_a_notice() {
        let (_tmp, state) = state();
        ensure(&state).unwrap();
        let private = fs::read(state.client_key()).unwrap();
        let public = read_public_key(&state.client_key_pub()).unwrap();

        fs::write(state.client_key_pub(), "").unwrap();
        let report = ensure(&state).unwrap();
        assert_eq!((report.client, report.host), (false, false));
        assert_eq!(
            report.notices,
            [format!(
                "the public half of the client key ({}) was empty or not a public key; re-derived it from the private key",
                state.client_key_pub().display()
            )]
        );
        assert_eq!(read_public_key(&state.client_key_pub()).unwrap(), public);
        assert_eq!(fs::read(state.client_key()).unwrap(), private, "kept");

        fs::remove_file(state.guest_host_key_pub()).unwrap();
        let report = ensure(&state).unwrap();
        assert!(
            report.notices[0].ends_with("was missing; re-derived it from the private key"),
            "{:?}",
            report.notices
        );
    }

    #[test]
    fn a_public_half_of_another_key_is_re_derived_from_the_private_key() {
        let (_tmp, state) = state();
        ensure(&state).unwrap();
        let public = read_public_key(&state.client_key_pub()).unwrap();
        fs::copy(state.guest_host_key_pub(), state.client_key_pub()).unwrap();
        let report = ensure(&state).unwrap();
        assert_eq!(
            report.notices,
            [format!(
                "the public half of the client key ({}) did not match the private key; re-derived it from the private key",
                state.client_key_pub().display()
            )]
        );
        assert_eq!(read_public_key(&state.client_key_pub()).unwrap(), public);
    }

    /// Set in the copy of this test binary that `ensure_without_keygen` runs.
    const NO_KEYGEN_CHILD: &str = "DARWIN_VZ_NIX_TEST_ENSURE_WITHOUT_KEYGEN";

    /// What `ensure(state)` returns in a copy of this test binary whose PATH has no
    /// ssh-keygen (PATH belongs to the whole process: changing it here would reach
    /// the tests running beside this one).
    fn ensure_without_keygen(state: &StateDir) -> String {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "keys::tests::without_ssh_keygen_an_intact_looking_public_half_is_trusted_and_a_broken_one_is_an_error",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(NO_KEYGEN_CHILD, state.root())
            .env("PATH", state.root().join("no-such-dir"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .find_map(|line| line.split_once("outcome: ").map(|(_, outcome)| outcome))
            .unwrap_or_else(|| panic!("the child said nothing: {stdout}"))
            .to_string()
    }

    #[test]
    fn without_ssh_keygen_an_intact_looking_public_half_is_trusted_and_a_broken_one_is_an_error() {
        if let Some(root) = std::env::var_os(NO_KEYGEN_CHILD) {
            let outcome = match ensure(&StateDir::new(root)) {
                Ok(report) => format!("ok {report:?}"),
                Err(e) => format!("error {e}"),
            };
            println!("outcome: {outcome}");
            return;
        }
        let (_tmp, state) = state();
        ensure(&state).unwrap();
        fs::set_permissions(state.client_key_pub(), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            ensure_without_keygen(&state),
            format!("ok {:?}", KeysCreated::default()),
            "kept as they are"
        );
        assert_eq!(mode(&state.client_key_pub()), 0o644, "with its mode fixed");

        fs::write(state.client_key_pub(), "garbage\n").unwrap();
        assert_eq!(
            ensure_without_keygen(&state),
            "error ssh-keygen was not found on PATH; install OpenSSH (it ships with macOS) or fix PATH"
        );
        assert_eq!(
            fs::read_to_string(state.client_key_pub()).unwrap(),
            "garbage\n",
            "nothing is replaced without ssh-keygen"
        );
    }

    #[test]
    fn a_deleted_or_corrupt_private_key_is_replaced_with_a_notice() {
        let (_tmp, state) = state();
        ensure(&state).unwrap();
        let old_pub = read_public_key(&state.client_key_pub()).unwrap();

        fs::remove_file(state.client_key()).unwrap();
        let report = ensure(&state).unwrap();
        assert!(report.client);
        assert_eq!(
            report.notices,
            [format!(
                "the client key {} was missing; made a new pair — the guest accepts the new one (authorized_keys is rewritten)",
                state.client_key().display()
            )]
        );
        let new_pub = read_public_key(&state.client_key_pub()).unwrap();
        assert_ne!(new_pub, old_pub, "the old public half went with its key");
        assert_eq!(
            fs::read_to_string(state.guest_authorized_keys()).unwrap(),
            format!("{new_pub}\n")
        );

        fs::write(state.guest_host_key(), "").unwrap();
        let report = ensure(&state).unwrap();
        assert!(report.host);
        assert!(
            report.notices[0].starts_with(&format!(
                "the guest host key {} is not a usable private key (",
                state.guest_host_key().display()
            )),
            "{:?}",
            report.notices
        );
        assert!(report.notices[0].ends_with("made a new pair — known_hosts pins the new one"));
    }

    #[test]
    fn a_linked_public_key_is_replaced_never_followed_nor_echoed() {
        let (tmp, state) = state();
        ensure(&state).unwrap();
        let secret = tmp.path().join("secret");
        fs::write(
            &secret,
            "ssh-ed25519 SECRETSECRETSECRETSECRET do-not-print\n",
        )
        .unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        fs::remove_file(state.guest_host_key_pub()).unwrap();
        std::os::unix::fs::symlink(&secret, state.guest_host_key_pub()).unwrap();

        let err = read_public_key(&state.guest_host_key_pub()).unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
        let report = ensure(&state).unwrap();
        assert!(
            report.notices[0].contains("was not a regular file"),
            "{:?}",
            report.notices
        );
        assert!(!report.notices[0].contains("SECRET"));
        assert_eq!(mode(&secret), 0o600, "the link's target is not chmodded");
        assert!(
            fs::read_to_string(&secret).unwrap().contains("SECRET"),
            "nor written"
        );
        assert!(
            fs::symlink_metadata(state.guest_host_key_pub())
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn a_key_path_that_cannot_be_looked_at_is_an_error_not_a_reason_for_new_keys() {
        // A state directory whose path is so long that keys/guest still fits in
        // PATH_MAX but keys/client_ed25519 does not: looking at the private key fails
        // with ENAMETOOLONG, which must not count as "missing".
        let tmp = tempfile::tempdir().unwrap();
        let path_max = usize::try_from(nix::libc::PATH_MAX).unwrap();
        let mut root = tmp.path().to_path_buf();
        while root.as_os_str().len() + "/keys/client_ed25519".len() < path_max {
            let room = path_max - "/keys/client_ed25519".len() - root.as_os_str().len();
            root.push("d".repeat(room.clamp(1, 200)));
        }
        fs::create_dir_all(&root).unwrap();
        let state = StateDir::new(&root);
        let err = ensure(&state).unwrap_err();
        assert!(
            matches!(
                &err,
                KeyError::File(FileError::Io { path, source })
                    if *path == state.client_key()
                        && source.raw_os_error() == Some(nix::libc::ENAMETOOLONG)
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_linked_private_key_is_refused() {
        let (tmp, state) = state();
        let secret = tmp.path().join("secret");
        fs::write(&secret, "x").unwrap();
        std::os::unix::fs::symlink(&secret, state.client_key()).unwrap();
        let err = ensure(&state).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is a symbolic link, not a key file darwin-vz-nix made; remove it, or run `darwin-vz-nix rotate-keys` to replace it with a new key",
                state.client_key().display()
            )
        );
        replace_all(&state).unwrap();
        assert!(fs::symlink_metadata(state.client_key()).unwrap().is_file());
        assert_eq!(fs::read_to_string(&secret).unwrap(), "x");
    }

    #[test]
    fn a_failed_write_leaves_nothing_in_the_guest_share() {
        let (_tmp, state) = state();
        // authorized_keys cannot be replaced: a non-empty directory stands there.
        fs::create_dir(state.guest_authorized_keys()).unwrap();
        fs::write(state.guest_authorized_keys().join("x"), "").unwrap();
        assert!(ensure(&state).is_err());
        assert_eq!(
            names(&state.guest_keys_dir()),
            [
                "authorized_keys",
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub"
            ],
            "no temporary file in the share"
        );
        assert!(
            !names(&state.keys_dir())
                .iter()
                .any(|n| n.starts_with(".tmp")),
            "nor in keys/"
        );
    }

    #[test]
    fn leftovers_of_older_versions_are_removed_from_the_share() {
        let (_tmp, state) = state();
        fs::write(state.guest_keys_dir().join("authorized_keys.tmp"), "x").unwrap();
        fs::create_dir(state.keys_dir().join(".tmp-1-2-keygen")).unwrap();
        ensure(&state).unwrap();
        assert!(!state.guest_keys_dir().join("authorized_keys.tmp").exists());
        assert!(!state.keys_dir().join(".tmp-1-2-keygen").exists());
    }

    #[test]
    fn a_public_key_file_is_read_up_to_64_kib_and_refused_beyond() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k.pub");
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        // The key line, then a long comment: as large as a key file may be.
        let at_limit = format!("{line} {}\n", "c".repeat(64 * 1024 - line.len() - 2));
        assert_eq!(at_limit.len(), 64 * 1024);
        fs::write(&path, &at_limit).unwrap();
        assert_eq!(read_public_key(&path).unwrap(), line);

        fs::write(&path, format!("{at_limit}x")).unwrap();
        let err = read_public_key(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::File(FileError::TooLarge { limit: 65536, .. })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn only_an_ssh_key_type_with_a_long_base64_key_is_a_public_key() {
        let key = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let fields = |text: &str| public_key_fields(text.as_bytes());
        assert_eq!(
            fields(&format!("ssh-ed25519 {key} comment\nsecond line")),
            Some(format!("ssh-ed25519 {key}")),
            "the first line's type and key, without the comment"
        );
        assert_eq!(fields(&format!("rsa-sha2-256 {key}")), None, "not ssh-…");
        assert_eq!(
            fields("ssh-ed25519 AAAAC3NzaC1lZDI1"),
            None,
            "16 characters"
        );
        assert_eq!(
            fields("ssh-ed25519 AAAAC3NzaC1lZDI1N"),
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1N".into()),
            "17 characters"
        );
        assert_eq!(fields(&format!("ssh-ed25519 {key}$")), None, "not base64");
        assert_eq!(fields("two words"), None);
        assert_eq!(fields(key), None, "one field");
    }

    #[test]
    fn a_corrupt_public_key_is_reported_without_its_content() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k.pub");
        fs::write(&path, "garbage").unwrap();
        let err = read_public_key(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is not a valid public key; run `darwin-vz-nix rotate-keys` to make new keys",
                path.display()
            )
        );
    }
}
