//! `darwin-vz-nix doctor`: one line per check, each failing check with its fix.
//! Checks that need a Mac say so on other systems instead of pretending.

use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::config::Config;
use crate::host::HostInfo;
use crate::state::StateDir;
use crate::{artifacts, disk, nested};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
    /// Not checkable here (e.g. a macOS check on Linux).
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Skip,
            detail: detail.into(),
            fix: None,
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        };
        write!(f, "{tag}  {:<14} {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, " — fix: {fix}")?;
        }
        Ok(())
    }
}

/// Platform facts the VZ backend provides on macOS (and nothing elsewhere).
#[derive(Debug, Clone, Default)]
pub struct PlatformFacts {
    /// `VZVirtualMachine.isSupported`.
    pub vz_supported: Option<bool>,
    /// Rosetta availability: `Ok(true)` installed, `Ok(false)` not installed,
    /// `Err` unsupported on this Mac.
    pub rosetta: Option<Result<bool, String>>,
}

/// Runs every check.
pub fn run(config: &Config, host: &HostInfo, facts: &PlatformFacts, exe: &Path) -> Vec<Check> {
    let mut checks = vec![
        check_macos(host),
        check_arch(host),
        check_vz(facts),
        check_rosetta(config, facts),
        check_entitlement(host, exe),
    ];
    checks.push(check_tool(
        "ssh",
        "OpenSSH's ssh (used by Nix and `darwin-vz-nix ssh`)",
    ));
    checks.push(check_tool("ssh-keygen", "ssh-keygen (makes the keys)"));
    let state = StateDir::new(&config.state_dir);
    checks.push(check_state_dir(&state));
    checks.push(check_keys(&state));
    checks.push(check_config(config, host, &state));
    checks.push(check_guest(config));
    checks.push(check_nested(config, host));
    checks
}

fn check_macos(host: &HostInfo) -> Check {
    match host.macos_version {
        Some((major, minor)) if major >= 13 => Check::ok("macOS", format!("{major}.{minor}")),
        Some((major, minor)) => Check::fail(
            "macOS",
            format!("{major}.{minor} is older than 13 (Ventura)"),
            "update macOS to 13 or later",
        ),
        None => Check::skip(
            "macOS",
            format!("not macOS ({}); VM checks need a Mac", std::env::consts::OS),
        ),
    }
}

fn check_arch(host: &HostInfo) -> Check {
    match (host.macos_version.is_some(), host.arch.as_str()) {
        (true, "aarch64") => Check::ok("Apple Silicon", "arm64"),
        (true, arch) => Check::fail(
            "Apple Silicon",
            format!("{arch} Mac"),
            "use an Apple Silicon Mac; Intel Macs cannot boot the aarch64 guest",
        ),
        (false, arch) => Check::skip("Apple Silicon", format!("{arch}, not a Mac")),
    }
}

fn check_vz(facts: &PlatformFacts) -> Check {
    match facts.vz_supported {
        Some(true) => Check::ok("Virtualization", "VZVirtualMachine is supported"),
        Some(false) => Check::fail(
            "Virtualization",
            "VZVirtualMachine.isSupported is false",
            "run on the Mac itself, not inside a VM without nested virtualization",
        ),
        None => Check::skip(
            "Virtualization",
            "Virtualization.framework exists only on macOS",
        ),
    }
}

fn check_rosetta(config: &Config, facts: &PlatformFacts) -> Check {
    if !config.rosetta {
        return Check::ok(
            "Rosetta",
            "off in the configuration (aarch64-linux builds only)",
        );
    }
    match &facts.rosetta {
        Some(Ok(true)) => Check::ok("Rosetta", "installed; x86_64-linux builds run through it"),
        Some(Ok(false)) => Check::fail(
            "Rosetta",
            "not installed",
            "softwareupdate --install-rosetta --agree-to-license",
        ),
        Some(Err(why)) => Check::fail(
            "Rosetta",
            why.clone(),
            "set rosetta = false (no x86_64-linux builds)",
        ),
        None => Check::skip(
            "Rosetta",
            "Rosetta for Linux exists only on Apple Silicon Macs",
        ),
    }
}

fn check_entitlement(host: &HostInfo, exe: &Path) -> Check {
    const ENTITLEMENT: &str = "com.apple.security.virtualization";
    if host.macos_version.is_none() {
        return Check::skip(
            "entitlement",
            format!("code signatures exist only on macOS ({ENTITLEMENT})"),
        );
    }
    let output = Command::new("codesign")
        .args(["-d", "--entitlements", "-", "--xml"])
        .arg(exe)
        .output();
    match output {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains(ENTITLEMENT) => Check::ok(
            "entitlement",
            format!("{} carries {ENTITLEMENT}", exe.display()),
        ),
        Ok(_) => Check::fail(
            "entitlement",
            format!("{} is not signed with {ENTITLEMENT}", exe.display()),
            "use the Nix package (signed), or run scripts/codesign.sh on a cargo build",
        ),
        Err(e) => Check::warn(
            "entitlement",
            format!("cannot run codesign: {e}"),
            "install the Xcode command line tools",
        ),
    }
}

fn check_tool(name: &'static str, what: &str) -> Check {
    match Command::new(name).arg("-V").output() {
        Ok(_) => Check::ok(name, format!("{what} found")),
        Err(_) => Check::fail(
            name,
            format!("{what} not on PATH"),
            "install OpenSSH or fix PATH",
        ),
    }
}

fn check_state_dir(state: &StateDir) -> Check {
    const NAME: &str = "state dir";
    if let Err(e) = state.check_socket_path() {
        return Check::fail(NAME, e.to_string(), "choose a shorter --state-dir");
    }
    let Ok(meta) = std::fs::metadata(state.root()) else {
        return Check::ok(
            NAME,
            format!(
                "{} does not exist yet; the daemon creates it",
                state.root().display()
            ),
        );
    };
    let mode = meta.permissions().mode() & 0o777;
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != me && me != 0 {
        return Check::warn(
            NAME,
            format!(
                "{} belongs to uid {}; this user can only use it through the control socket",
                state.root().display(),
                meta.uid()
            ),
            "run as its owner or with sudo for destroy/rotate-keys",
        );
    }
    if mode & 0o027 != 0 {
        return Check::fail(
            NAME,
            format!(
                "{} has mode {mode:o}; others can read or write it",
                state.root().display()
            ),
            format!("chmod 700 {}", state.root().display()),
        );
    }
    Check::ok(NAME, format!("{} (mode {mode:o})", state.root().display()))
}

fn check_keys(state: &StateDir) -> Check {
    const NAME: &str = "keys";
    let key = state.client_key();
    match std::fs::metadata(&key) {
        Err(_) => Check::ok(NAME, "not made yet; the daemon makes them on first start"),
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Check::fail(
            NAME,
            format!(
                "{} has mode {:o}",
                key.display(),
                meta.permissions().mode() & 0o777
            ),
            format!("chmod 600 {}", key.display()),
        ),
        Ok(_) if !state.known_hosts().exists() => Check::fail(
            NAME,
            "the guest's host key is not pinned (known_hosts is missing)",
            "restart the daemon; it writes known_hosts from the guest host key",
        ),
        Ok(_) => Check::ok(
            NAME,
            "client key 0600, guest host key pinned in known_hosts",
        ),
    }
}

fn check_config(config: &Config, host: &HostInfo, state: &StateDir) -> Check {
    let image = state.disk_image();
    if disk::is_qcow2(&image).unwrap_or(false) {
        return Check::fail(
            "config",
            format!("{} is a qcow2 image", image.display()),
            "move it away or run `darwin-vz-nix destroy`",
        );
    }
    let problems = config.validate_for_boot(host, disk::existing_size(&image));
    match problems.as_slice() {
        [] => Check::ok(
            "config",
            format!(
                "{} CPUs, {} MiB, disk {}, idle timeout {} min",
                config.cores, config.memory_mib, config.disk_size, config.idle_timeout_minutes
            ),
        ),
        [first, ..] => Check::fail(
            "config",
            first.to_string(),
            "see the message; every problem: darwin-vz-nix start --dry-run",
        ),
    }
}

fn check_nested(config: &Config, host: &HostInfo) -> Check {
    const NAME: &str = "nested virt";
    let kernel = || {
        artifacts::resolve(config)
            .ok()
            .and_then(|guest| nested::kernel_release(&guest.kernel))
    };
    match nested::decide(config.nested_virtualization, host.nested_support(), kernel) {
        Ok(decision) if decision.enabled => Check::ok(
            NAME,
            format!("{decision}; the guest offers kvm and nixos-test if it has /dev/kvm"),
        ),
        Ok(decision) if host.nested_support() == nested::HostSupport::NotMac => {
            Check::skip(NAME, decision.to_string())
        }
        Ok(decision) => Check::ok(NAME, format!("{decision}; no kvm for Nix")),
        Err(message) => Check::fail(
            NAME,
            format!("{}: {message}", config.input("nestedVirtualization")),
            "set nestedVirtualization to auto or off",
        ),
    }
}

fn check_guest(config: &Config) -> Check {
    // A guest the daemon builds itself: checked once built; until then, say so.
    if let Some(spec) = config.lazy_guest() {
        if !spec.out.is_dir() {
            return Check::warn(
                "guest",
                format!(
                    "{} is not built yet; the daemon builds it from {} when it starts",
                    spec.out.display(),
                    spec.drv.display()
                ),
                "darwin-vz-nix bootstrap --dry-run shows every step; darwin-vz-nix bootstrap runs them",
            );
        }
        return match artifacts::resolve_from(config, Some((&spec.out, "guestOut"))) {
            Ok(a) => Check::ok("guest", format!("kernel {}", a.kernel.display())),
            Err(problems) => Check::fail("guest", problems[0].to_string(), "see the message"),
        };
    }
    match artifacts::resolve(config) {
        Ok(a) => Check::ok("guest", format!("kernel {}", a.kernel.display())),
        Err(problems) => Check::fail("guest", problems[0].to_string(), "see the message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigLayer, Origin, Source};

    #[test]
    fn a_guest_the_daemon_builds_is_a_warning_until_it_is_built() {
        let config = Config::resolve(
            &[Source {
                origin: Origin::Flag,
                layer: ConfigLayer {
                    guest_drv: Some("/nonexistent/store/a-guest.drv".into()),
                    guest_out: Some("/nonexistent/store/b-guest".into()),
                    ..Default::default()
                },
            }],
            Some("/state".into()),
        )
        .unwrap();
        let check = check_guest(&config);
        assert_eq!(check.verdict, Verdict::Warn);
        assert_eq!(
            check.detail,
            "/nonexistent/store/b-guest is not built yet; the daemon builds it from /nonexistent/store/a-guest.drv when it starts"
        );
    }

    #[test]
    fn linux_reports_mac_checks_as_skipped_and_finds_a_missing_guest() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::resolve(
            &[Source {
                origin: Origin::Flag,
                layer: ConfigLayer {
                    state_dir: Some(tmp.path().join("s")),
                    ..Default::default()
                },
            }],
            None,
        )
        .unwrap();
        let host = HostInfo {
            cpus: 8,
            memory_bytes: 16 << 30,
            macos_version: None,
            arch: "x86_64".into(),
            nested_virtualization: None,
        };
        let checks = run(
            &config,
            &host,
            &PlatformFacts::default(),
            Path::new("/bin/true"),
        );
        let by_name = |n: &str| checks.iter().find(|c| c.name == n).unwrap().clone();
        assert_eq!(by_name("macOS").verdict, Verdict::Skip);
        assert_eq!(by_name("Virtualization").verdict, Verdict::Skip);
        assert_eq!(by_name("Rosetta").verdict, Verdict::Skip);
        assert_eq!(by_name("nested virt").verdict, Verdict::Skip);
        assert_eq!(by_name("guest").verdict, Verdict::Fail);
        assert_eq!(by_name("state dir").verdict, Verdict::Ok);
        assert!(by_name("guest").to_string().starts_with("FAIL  guest"));
    }

    #[test]
    fn nested_virtualization_is_shown_and_on_fails_where_the_mac_has_none() {
        let m2 = HostInfo {
            cpus: 8,
            memory_bytes: 16 << 30,
            macos_version: Some((15, 3)),
            arch: "aarch64".into(),
            nested_virtualization: Some(false),
        };
        let config = |setting: &str| {
            let layer = ConfigLayer {
                nested_virtualization: Some(setting.parse().unwrap()),
                ..Default::default()
            };
            Config::resolve(
                &[Source {
                    origin: Origin::Flag,
                    layer,
                }],
                Some("/s".into()),
            )
            .unwrap()
        };
        let auto = check_nested(&config("auto"), &m2);
        assert_eq!(auto.verdict, Verdict::Ok);
        assert!(
            auto.detail
                .starts_with("off: auto, and this Mac's chip has none"),
            "{auto}"
        );
        let on = check_nested(&config("on"), &m2);
        assert_eq!(on.verdict, Verdict::Fail);
        assert!(
            on.detail
                .starts_with("--nested-virtualization: on needs an Apple M3 or later"),
            "{on}"
        );
        assert_eq!(
            on.fix.as_deref(),
            Some("set nestedVirtualization to auto or off")
        );
        let m3 = HostInfo {
            nested_virtualization: Some(true),
            ..m2
        };
        let on = check_nested(&config("on"), &m3);
        assert_eq!(on.verdict, Verdict::Ok);
        assert!(
            on.detail.starts_with("on: nestedVirtualization = on"),
            "{on}"
        );
    }

    #[test]
    fn an_old_macos_and_missing_rosetta_fail_with_fixes() {
        let host = HostInfo {
            cpus: 8,
            memory_bytes: 16 << 30,
            macos_version: Some((12, 6)),
            arch: "aarch64".into(),
            nested_virtualization: None,
        };
        assert_eq!(check_macos(&host).verdict, Verdict::Fail);
        let config = Config::resolve(&[], Some("/s".into())).unwrap();
        let facts = PlatformFacts {
            vz_supported: Some(true),
            rosetta: Some(Ok(false)),
        };
        let check = check_rosetta(&config, &facts);
        assert_eq!(
            check.fix.as_deref(),
            Some("softwareupdate --install-rosetta --agree-to-license")
        );
    }
}
