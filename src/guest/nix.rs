//! The one Nix program the daemon runs, `nix-store`, and the exact commands it runs
//! with it. `bootstrap --dry-run` prints these same commands, so what it shows is
//! what runs.
//!
//! Every command goes through the nix-daemon (`NIX_REMOTE=daemon`) as the account
//! that runs darwin-vz-nix, an ordinary, untrusted Nix user: realising a derivation
//! that is already in the store, substituting, building through the daemon's build
//! hook and adding an indirect GC root are all allowed to untrusted users.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// Where Nix installs `nix-store` when it is not on `PATH` (launchd starts daemons
/// with `/usr/bin:/bin:/usr/sbin:/sbin`): the Nix installer's and Determinate Nix's
/// default profile, and nix-darwin's system profile.
pub const FALLBACK_DIRS: [&str; 2] = [
    "/nix/var/nix/profiles/default/bin",
    "/run/current-system/sw/bin",
];

/// `nix-store`, found once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixStore {
    program: PathBuf,
}

impl NixStore {
    /// `nix-store` from `path` (a `PATH` value), else from [`FALLBACK_DIRS`]; when
    /// none is found, the bare name, so that running it fails with a message
    /// saying where it was looked for.
    pub fn find(path: Option<&OsStr>) -> NixStore {
        let dirs = path
            .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
            .unwrap_or_default();
        let found = dirs
            .into_iter()
            .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
            .map(|dir| dir.join("nix-store"))
            .find(|candidate| is_executable(candidate));
        NixStore {
            program: found.unwrap_or_else(|| PathBuf::from("nix-store")),
        }
    }

    /// A given program (tests pass a fake one).
    pub fn at(program: impl Into<PathBuf>) -> NixStore {
        NixStore {
            program: program.into(),
        }
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Why running it failed, in words that say where to look.
    pub fn not_runnable(&self, error: &std::io::Error) -> String {
        format!(
            "cannot run {}: {error}; install Nix, or put nix-store on PATH (looked in PATH, {})",
            self.program.display(),
            FALLBACK_DIRS.join(", ")
        )
    }

    /// The command with the environment every call gets: through the nix-daemon,
    /// and a `HOME` this account owns (launchd gives daemons none, and Nix warns
    /// about a `HOME` that is not the user's).
    pub fn command(&self, args: &[OsString], home: &Path) -> std::process::Command {
        let mut command = std::process::Command::new(&self.program);
        command
            .args(args)
            .env("NIX_REMOTE", "daemon")
            .env("HOME", home)
            .stdin(std::process::Stdio::null());
        command
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// `--realise DRV --add-root ROOT --indirect --log-format internal-json`: builds (or
/// substitutes) the derivation's outputs, keeps them with an indirect GC root, and
/// reports progress as JSON lines on stderr.
pub fn realise_args(drv: &Path, root: &Path) -> Vec<OsString> {
    vec![
        "--realise".into(),
        drv.into(),
        "--add-root".into(),
        root.into(),
        "--indirect".into(),
        "--log-format".into(),
        "internal-json".into(),
    ]
}

/// `--realise --dry-run DRV`: what realising it would build and fetch, changing
/// nothing.
pub fn dry_run_args(drv: &Path) -> Vec<OsString> {
    vec!["--realise".into(), "--dry-run".into(), drv.into()]
}

/// `--realise PATH --add-root ROOT --indirect` on a path already in the store:
/// builds nothing, points ROOT at PATH (replacing ROOT's old target).
pub fn root_args(path: &Path, root: &Path) -> Vec<OsString> {
    vec![
        "--realise".into(),
        path.into(),
        "--add-root".into(),
        root.into(),
        "--indirect".into(),
    ]
}

/// A command as a user would type it, for messages and `bootstrap --dry-run`.
pub fn shell_line(program: &str, args: &[OsString]) -> String {
    std::iter::once(program.to_string())
        .chain(args.iter().map(|arg| shell_quote(&arg.to_string_lossy())))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@%,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What `nix-store --realise --dry-run` said it would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRun {
    /// Derivations it would build.
    pub to_build: Vec<PathBuf>,
    /// Paths it would fetch from a binary cache.
    pub to_fetch: Vec<PathBuf>,
    /// Paths it does not know how to make.
    pub unknown: Vec<PathBuf>,
}

impl DryRun {
    /// Reads Nix's text: a header ("these 3 derivations will be built:", "this path
    /// will be fetched (…):", "don't know how to build these paths:") followed by
    /// indented store paths. Other lines (warnings) are skipped.
    pub fn parse(text: &str) -> DryRun {
        enum Section {
            None,
            Build,
            Fetch,
            Unknown,
        }
        let mut dry = DryRun::default();
        let mut section = Section::None;
        for line in text.lines() {
            let trimmed = line.trim();
            if line.starts_with(char::is_whitespace) && trimmed.starts_with('/') {
                let path = PathBuf::from(trimmed);
                match section {
                    Section::Build => dry.to_build.push(path),
                    Section::Fetch => dry.to_fetch.push(path),
                    Section::Unknown => dry.unknown.push(path),
                    Section::None => {}
                }
            } else if trimmed.contains("will be built") {
                section = Section::Build;
            } else if trimmed.contains("will be fetched") {
                section = Section::Fetch;
            } else if trimmed.contains("don't know how to build") {
                section = Section::Unknown;
            } else {
                section = Section::None;
            }
        }
        dry
    }

    /// The derivations it would build for aarch64-linux: the builds that need a
    /// Linux builder (the guest, or the bootstrap builder while none exists).
    pub fn aarch64_linux_builds(&self) -> Vec<&Path> {
        self.to_build
            .iter()
            .map(PathBuf::as_path)
            .filter(|drv| derivation_system(drv).is_ok_and(|system| system == "aarch64-linux"))
            .collect()
    }
}

/// The system a derivation builds for (`aarch64-linux`, …), read from its `.drv`
/// file: `Derive([outputs],[input drvs],[input sources],"SYSTEM",…)`.
pub fn derivation_system(drv: &Path) -> Result<String, String> {
    // The largest derivations (with big inline environments) are a few MiB.
    const LIMIT: u64 = 64 << 20;
    let bytes = crate::files::open_input(drv)
        .and_then(|file| crate::files::read_capped(file, drv, LIMIT))
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&bytes);
    system_of_aterm(&text).ok_or_else(|| format!("{} is not a derivation Nix wrote", drv.display()))
}

/// The fourth field of `Derive(…)`, skipping the three lists before it.
fn system_of_aterm(text: &str) -> Option<String> {
    let rest = text.strip_prefix("Derive(")?;
    let mut depth = 0usize;
    let mut fields = 0usize;
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' if depth == 0 && fields == 3 => return read_string(&rest[i + 1..]),
            '"' => {
                // Skip a string inside a list, with its escapes.
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '[' | '(' => depth += 1,
            ']' | ')' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => fields += 1,
            _ => {}
        }
    }
    None
}

/// A string's content up to its closing quote (system names carry no escapes).
fn read_string(text: &str) -> Option<String> {
    let end = text.find('"')?;
    let value = &text[..end];
    (!value.contains('\\')).then(|| value.to_string())
}

/// `/nix/store/<hash>-name.drv` → `name`: how a derivation is shown in progress.
pub fn short_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = name.strip_suffix(".drv").unwrap_or(&name);
    match name.split_once('-') {
        Some((hash, rest)) if hash.len() == 32 => rest.to_string(),
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_system_of_a_derivation_past_escaped_strings() {
        let drv = r#"Derive([("out","/nix/store/aaa-x","","")],[("/nix/store/bbb-y.drv",["out"])],["/nix/store/ccc-s \"q\", [x]"],"aarch64-linux","/bin/sh",["-c","echo"],[("a","b")])"#;
        assert_eq!(system_of_aterm(drv).as_deref(), Some("aarch64-linux"));
        assert_eq!(system_of_aterm("Derive([],[],[]"), None);
        assert_eq!(system_of_aterm("not a drv"), None);
    }

    #[test]
    fn reads_a_derivation_nix_wrote() {
        // What Nix 2.8 writes for `derivation { name = "linux-only"; system =
        // "aarch64-linux"; builder = "/bin/sh"; args = [ "-c" "exit 0" ]; }`.
        let text = r#"Derive([("out","/nix/store/n8sqgjjnis5vpipgrzj2p6d4hdjgr3n5-linux-only","","")],[],[],"aarch64-linux","/bin/sh",["-c","exit 0"],[("builder","/bin/sh"),("name","linux-only"),("out","/nix/store/n8sqgjjnis5vpipgrzj2p6d4hdjgr3n5-linux-only"),("system","aarch64-linux")])"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join("iw13j3xxa5d125yy8c4dapr26za3swnl-linux-only.drv");
        std::fs::write(&path, text).unwrap();
        assert_eq!(derivation_system(&path).unwrap(), "aarch64-linux");
        assert_eq!(short_name(&path), "linux-only");
    }

    #[test]
    fn parses_what_a_dry_run_prints() {
        let text = "\
warning: unable to download 'https://cache.nixos.org/nix-cache-info': Couldn't resolve host name (6)
these 2 derivations will be built:
  /nix/store/awsikf9h6si2396zcf8x4ndbf9d99bl5-dep-a.drv
  /nix/store/jr6f07qjrk5ixswmyy03hl6iy4ky1sgg-top.drv
these 3 paths will be fetched (1.20 MiB download, 5.00 MiB unpacked):
  /nix/store/11111111111111111111111111111111-a
  /nix/store/22222222222222222222222222222222-b
  /nix/store/33333333333333333333333333333333-c
";
        let dry = DryRun::parse(text);
        assert_eq!(dry.to_build.len(), 2);
        assert_eq!(dry.to_fetch.len(), 3);
        assert!(dry.unknown.is_empty());
        assert_eq!(short_name(&dry.to_build[1]), "top");
        assert_eq!(DryRun::parse(""), DryRun::default());
    }

    #[test]
    fn commands_are_printed_as_a_shell_reads_them() {
        let args = realise_args(
            Path::new("/nix/store/x-guest.drv"),
            Path::new("/var/lib/darwin vz/gcroots/guest-pending"),
        );
        assert_eq!(
            shell_line("nix-store", &args),
            "nix-store --realise /nix/store/x-guest.drv --add-root '/var/lib/darwin vz/gcroots/guest-pending' --indirect --log-format internal-json"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn finds_nix_store_on_the_given_path_first() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nix-store");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([dir.path()]).unwrap();
        assert_eq!(NixStore::find(Some(&path)).program(), fake);
        let empty = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([empty.path()]).unwrap();
        let found = NixStore::find(Some(&path));
        assert_ne!(found.program(), fake);
    }
}
