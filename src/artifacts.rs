//! The guest's boot artifacts: kernel, initrd, NixOS system and store registration.
//!
//! A guest is one Nix derivation holding all four (`nix/guest.nix`); single files can
//! be overridden. Everything is checked before boot because Virtualization.framework
//! reports a bad kernel only as an opaque start failure.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, Problem};
use crate::contract;

/// Checked paths of everything the guest boots from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub system: PathBuf,
    pub registration: Option<PathBuf>,
    /// The guest's own kernel parameters (`<system>/kernel-params`, NixOS'
    /// `boot.kernelParams`), so customised guests can change them.
    pub system_kernel_params: Vec<String>,
}

/// What the first bytes of a kernel file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed arm64 `Image`: what `VZLinuxBootLoader` boots.
    Arm64Image,
    Gzip,
    /// An EFI zboot image (`vmlinuz.efi`), compressed.
    EfiZboot,
    /// An x86 bzImage.
    X86BzImage,
    Unknown,
}

const ARM64_MAGIC_OFFSET: usize = 0x38;
const ARM64_MAGIC: &[u8; 4] = b"ARM\x64";

impl KernelFormat {
    /// Classifies a kernel by its first 1 KiB (or less).
    pub fn detect(head: &[u8]) -> KernelFormat {
        if head.get(ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + 4) == Some(ARM64_MAGIC) {
            KernelFormat::Arm64Image
        } else if head.starts_with(&[0x1f, 0x8b]) {
            KernelFormat::Gzip
        } else if head.starts_with(b"MZ") && head.get(4..8) == Some(b"zimg") {
            KernelFormat::EfiZboot
        } else if head.get(0x202..0x206) == Some(b"HdrS") {
            KernelFormat::X86BzImage
        } else {
            KernelFormat::Unknown
        }
    }

    /// Why this format cannot boot, or `None` when it can.
    pub fn problem(self) -> Option<&'static str> {
        match self {
            KernelFormat::Arm64Image => None,
            KernelFormat::Gzip => Some(
                "is gzip-compressed; Virtualization.framework boots only an uncompressed arm64 `Image` — use the kernel of a guest built by nix/guest.nix, or gunzip it",
            ),
            KernelFormat::EfiZboot => Some(
                "is a compressed EFI zboot image; Virtualization.framework boots only an uncompressed arm64 `Image` — build the kernel with `Image` as its target",
            ),
            KernelFormat::X86BzImage => {
                Some("is an x86 kernel; the guest must be aarch64-linux (an arm64 `Image`)")
            }
            KernelFormat::Unknown => Some(
                "is not an arm64 Linux `Image` (no `ARM\\x64` magic at offset 0x38); point it at the `kernel` of a guest built by nix/guest.nix",
            ),
        }
    }
}

/// Finds and checks the artifacts named by the configuration; every problem is
/// returned, each naming the setting that points at the artifact.
pub fn resolve(config: &Config) -> Result<GuestArtifacts, Vec<Problem>> {
    resolve_from(
        config,
        config.guest.dir.as_deref().map(|dir| (dir, "guest")),
    )
}

/// Like `resolve`, with the guest directory given: `(dir, the setting that named
/// it)` — the daemon passes the lazy guest it chose to boot (`guestOut`, or the
/// guest booted before). Single files set in the configuration still win.
pub fn resolve_from(
    config: &Config,
    guest_dir: Option<(&Path, &'static str)>,
) -> Result<GuestArtifacts, Vec<Problem>> {
    let source = &config.guest;
    let dir_key = guest_dir.map_or("guest", |(_, key)| key);
    let guest_dir = guest_dir.map(|(dir, _)| dir);
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            input: config.input(key),
            message,
        });
    };

    if let Some(dir) = guest_dir
        && !dir.is_dir()
    {
        problem(
            dir_key,
            format!(
                "{} is not a directory; point it at a guest built by `nix build .#guest` (it holds kernel, initrd, system and registration)",
                dir.display()
            ),
        );
    }
    let dir = guest_dir.filter(|d| d.is_dir());

    // An explicit file wins over the guest directory's.
    let pick = |key: &'static str,
                explicit: &Option<PathBuf>,
                name: &str|
     -> Option<(PathBuf, &'static str)> {
        match (explicit, dir) {
            (Some(path), _) => Some((path.clone(), key)),
            (None, Some(dir)) => Some((dir.join(name), dir_key)),
            (None, None) => None,
        }
    };

    if guest_dir.is_none()
        && (source.kernel.is_none() || source.initrd.is_none() || source.system.is_none())
    {
        problem(
            "guest",
            "no guest configured; pass --guest DIR (a guest built by `nix build .#guest`) or --guest-drv DRV --guest-out PATH (its derivation, which the daemon builds), set DARWIN_VZ_NIX_GUEST, or set `guest` in the config file — `nix run` and the nix-darwin module set one for you".into(),
        );
    }

    let kernel = pick("kernel", &source.kernel, contract::ARTIFACT_KERNEL);
    let initrd = pick("initrd", &source.initrd, contract::ARTIFACT_INITRD);
    let system = pick("system", &source.system, contract::ARTIFACT_SYSTEM);
    let registration = pick(
        "registration",
        &source.registration,
        contract::ARTIFACT_REGISTRATION,
    );

    if let Some((path, key)) = &kernel {
        match read_head(path) {
            Ok(head) => {
                if let Some(why) = KernelFormat::detect(&head).problem() {
                    problem(key, format!("kernel {} {why}", path.display()));
                }
            }
            Err(e) => problem(key, unreadable("kernel", path, e)),
        }
    }
    if let Some((path, key)) = &initrd
        && let Err(e) = crate::files::open_input(path)
    {
        problem(key, unreadable("initrd", path, e));
    }
    let mut system_kernel_params = Vec::new();
    if let Some((path, key)) = &system {
        if !path.join("init").exists() {
            problem(
                key,
                format!(
                    "{} is not a NixOS system (it has no `init`); point it at a system's toplevel",
                    path.display()
                ),
            );
        } else {
            // NixOS writes `boot.kernelParams` here: one line, far below the cap.
            let params = path.join("kernel-params");
            match crate::files::open_input(&params)
                .and_then(|file| crate::files::read_capped(file, &params, 64 * 1024))
            {
                Ok(bytes) => {
                    system_kernel_params = String::from_utf8_lossy(&bytes)
                        .split_whitespace()
                        .map(String::from)
                        .collect();
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => problem(key, unreadable("the system's", &params, e)),
            }
        }
    }
    // Only a guest directory promises a registration; single files may go without.
    let registration = match registration {
        Some((path, _)) if path.is_file() => Some(path),
        Some((path, key)) if key == "registration" || guest_dir.is_some() => {
            problem(
                key,
                format!(
                    "store registration {} does not exist; rebuild the guest with nix/guest.nix",
                    path.display()
                ),
            );
            None
        }
        _ => None,
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    let (Some((kernel, _)), Some((initrd, _)), Some((system, _))) = (kernel, initrd, system) else {
        unreachable!("a missing artifact is reported as a problem above");
    };
    // A guest directory holds symlinks into the store; the guest must see the real
    // store paths (init= is resolved inside the guest, where only /nix/store exists).
    Ok(GuestArtifacts {
        kernel: canonical(kernel),
        initrd: canonical(initrd),
        system: canonical(system),
        registration: registration.map(canonical),
        system_kernel_params,
    })
}

fn canonical(path: PathBuf) -> PathBuf {
    std::fs::canonicalize(&path).unwrap_or(path)
}

/// Why an artifact cannot be read, phrased for a configuration problem.
fn unreadable(what: &str, path: &Path, error: crate::files::FileError) -> String {
    match error {
        crate::files::FileError::Io { source, .. } => {
            format!("cannot read {what} {}: {source}", path.display())
        }
        other => other.to_string(),
    }
}

/// The first KiB of the kernel (a FIFO or device is refused, never waited on).
fn read_head(path: &Path) -> Result<Vec<u8>, crate::files::FileError> {
    let mut head = Vec::with_capacity(1024);
    crate::files::open_input(path)?
        .take(1024)
        .read_to_end(&mut head)
        .map_err(|source| crate::files::FileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(head)
}

/// Writes a fake guest directory, for tests and `--dry-run` examples: an arm64 Image
/// header, an empty initrd, a system with `init` and `kernel-params`, a registration.
pub fn write_fake_guest(dir: &Path, kernel_params: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("system"))?;
    let mut image = vec![0u8; 4096];
    image[ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + 4].copy_from_slice(ARM64_MAGIC);
    std::fs::write(dir.join("kernel"), image)?;
    std::fs::write(dir.join("initrd"), b"")?;
    std::fs::write(dir.join("system/init"), b"#!/bin/sh\n")?;
    std::fs::write(dir.join("system/kernel-params"), kernel_params)?;
    std::fs::write(dir.join("registration"), b"")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigLayer, Origin, Source};

    fn config(layer: ConfigLayer) -> Config {
        Config::resolve(
            &[Source {
                origin: Origin::Flag,
                layer,
            }],
            Some("/state".into()),
        )
        .unwrap()
    }

    #[test]
    fn detects_kernel_formats() {
        let mut image = vec![0u8; 1024];
        image[0x38..0x3c].copy_from_slice(b"ARM\x64");
        assert_eq!(KernelFormat::detect(&image), KernelFormat::Arm64Image);
        assert_eq!(
            KernelFormat::detect(&[0x1f, 0x8b, 8, 0]),
            KernelFormat::Gzip
        );
        assert_eq!(
            KernelFormat::detect(b"MZ\0\0zimg...."),
            KernelFormat::EfiZboot
        );
        let mut bz = vec![0u8; 1024];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(KernelFormat::detect(&bz), KernelFormat::X86BzImage);
        assert_eq!(KernelFormat::detect(b"hello"), KernelFormat::Unknown);
        assert!(KernelFormat::Arm64Image.problem().is_none());
    }

    #[test]
    fn resolves_a_guest_directory_and_reads_its_kernel_params() {
        let tmp = tempfile::tempdir().unwrap();
        write_fake_guest(tmp.path(), "loglevel=4 systemd.show_status=false\n").unwrap();
        let artifacts = resolve(&config(ConfigLayer {
            guest: Some(tmp.path().into()),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(artifacts.kernel, tmp.path().join("kernel"));
        assert_eq!(
            artifacts.registration,
            Some(tmp.path().join("registration"))
        );
        assert_eq!(
            artifacts.system_kernel_params,
            ["loglevel=4", "systemd.show_status=false"]
        );
    }

    #[test]
    fn symlinks_in_a_guest_directory_resolve_to_the_store_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        write_fake_guest(&store.join("toplevel-ish"), "").unwrap();
        let guest = tmp.path().join("guest");
        std::fs::create_dir(&guest).unwrap();
        for name in ["kernel", "initrd", "system", "registration"] {
            std::os::unix::fs::symlink(store.join("toplevel-ish").join(name), guest.join(name))
                .unwrap();
        }
        let artifacts = resolve(&config(ConfigLayer {
            guest: Some(guest),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(
            artifacts.system,
            store.join("toplevel-ish/system").canonicalize().unwrap()
        );
        assert_eq!(
            artifacts.kernel,
            store.join("toplevel-ish/kernel").canonicalize().unwrap()
        );
    }

    #[test]
    fn an_explicit_kernel_overrides_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        write_fake_guest(tmp.path(), "").unwrap();
        let other = tmp.path().join("other-kernel");
        std::fs::copy(tmp.path().join("kernel"), &other).unwrap();
        let artifacts = resolve(&config(ConfigLayer {
            guest: Some(tmp.path().into()),
            kernel: Some(other.clone()),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(artifacts.kernel, other);
    }

    #[test]
    fn reports_every_broken_artifact_with_its_setting() {
        let tmp = tempfile::tempdir().unwrap();
        write_fake_guest(tmp.path(), "").unwrap();
        std::fs::write(tmp.path().join("kernel"), [0x1f, 0x8b, 8, 0]).unwrap();
        std::fs::remove_file(tmp.path().join("initrd")).unwrap();
        std::fs::remove_file(tmp.path().join("system/init")).unwrap();
        let problems = resolve(&config(ConfigLayer {
            guest: Some(tmp.path().into()),
            ..Default::default()
        }))
        .unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let dir = tmp.path().display();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(
            text[0].starts_with(&format!("--guest: kernel {dir}/kernel is gzip-compressed")),
            "{}",
            text[0]
        );
        assert!(
            text[1].starts_with(&format!(
                "--guest: cannot read initrd {dir}/initrd: No such file"
            )),
            "{}",
            text[1]
        );
        assert_eq!(
            text[2],
            format!(
                "--guest: {dir}/system is not a NixOS system (it has no `init`); point it at a system's toplevel"
            )
        );
    }

    #[test]
    fn says_how_to_get_a_guest_when_none_is_configured() {
        let problems = resolve(&config(ConfigLayer::default())).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .to_string()
                .starts_with("`guest` (built-in default): no guest configured; pass --guest DIR")
        );
    }
}
