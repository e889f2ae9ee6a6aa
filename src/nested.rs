//! Nested virtualization: whether the guest boots with it, whether it then has a
//! `/dev/kvm`, and what Nix is told (`kvm` and `nixos-test`).
//!
//! Virtualization.framework can boot a Linux guest at EL2 on an Apple M3 or later
//! with macOS 15 or later (`VZGenericPlatformConfiguration`:
//! `isNestedVirtualizationSupported`, `nestedVirtualizationEnabled`); the guest's
//! kernel then runs KVM and offers `/dev/kvm`, which NixOS VM tests need. Three
//! inputs decide whether a boot asks for it ([`decide`]):
//!
//! - the setting `nestedVirtualization`: `auto` (the default), `on`, `off`;
//! - the host: macOS 15 or later, and VZ saying this chip has it;
//! - the guest's kernel. Apple silicon is "VHE-only" (`HCR_EL2.E2H` is RES1), and a
//!   kernel booted at EL2 there needs the VHE-only boot fixes that Linux has from
//!   6.12 on; kernel maintainers report 6.6 guests hanging at boot under nested
//!   virtualization without them (the 2026 stable backport thread "Backport ARM64
//!   VHE boot fixes to 6.6.y"). Rosetta, on the other hand, needs a kernel before
//!   6.11 on macOS before 26 (`nix/nixos/configuration.nix`). So `auto` turns it on
//!   only for a guest kernel of 6.12 or later; `on` turns it on whatever the kernel,
//!   with a warning.
//!
//! After a boot the guest says on its console whether `/dev/kvm` exists
//! (`nix/nixos/kvm.nix`); the supervisor records that as a [`GuestReport`] in the
//! state directory. Root's `darwin-vz-nix machines` offers `kvm` and `nixos-test`
//! exactly where [`decide`] turns nested virtualization on, and the report may only
//! take them away ([`offer`]): the report is written by the service account, which
//! must never be able to add a feature root's nix-daemon trusts.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::contract::CONSOLE_MARKER_KVM;
use crate::files;

/// The system features a guest with a working `/dev/kvm` offers Nix.
pub const KVM_FEATURES: [&str; 2] = ["kvm", "nixos-test"];

/// The oldest guest kernel that `auto` boots at EL2 (see the module comment).
pub const MIN_KERNEL: (u32, u32) = (6, 12);

/// The oldest macOS with nested virtualization.
pub const MIN_MACOS: u32 = 15;

/// The `nestedVirtualization` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NestedVirtualization {
    /// On exactly where it works: an M3 or later, macOS 15 or later, and a guest
    /// kernel of 6.12 or later.
    #[default]
    Auto,
    /// On; refused where the Mac cannot do it.
    On,
    /// Off.
    Off,
}

impl NestedVirtualization {
    pub fn as_str(self) -> &'static str {
        match self {
            NestedVirtualization::Auto => "auto",
            NestedVirtualization::On => "on",
            NestedVirtualization::Off => "off",
        }
    }
}

impl fmt::Display for NestedVirtualization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NestedVirtualization {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        <NestedVirtualization as clap::ValueEnum>::from_str(text, true).map_err(|_| {
            format!("`{text}` is not a nestedVirtualization value; use auto, on or off")
        })
    }
}

/// What this host offers, from the facts `HostInfo` gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostSupport {
    /// macOS 15 or later, and VZ says this chip has it (an M3 or later).
    Supported,
    /// macOS 15 or later, but VZ says this chip has none (an M1 or M2).
    NoChipSupport,
    /// macOS before 15 has no nested virtualization.
    MacOsTooOld { version: (u32, u32) },
    /// Not macOS: there is no Virtualization.framework to ask.
    NotMac,
}

impl HostSupport {
    /// From the macOS version and what VZ's `isNestedVirtualizationSupported` said
    /// (asked on macOS 15 or later only; `None` where it was not asked).
    pub fn from_facts(macos: Option<(u32, u32)>, vz_says: Option<bool>) -> HostSupport {
        match (macos, vz_says) {
            (None, _) => HostSupport::NotMac,
            (Some(version), _) if version.0 < MIN_MACOS => HostSupport::MacOsTooOld { version },
            (Some(_), Some(true)) => HostSupport::Supported,
            (Some(_), Some(false)) => HostSupport::NoChipSupport,
            // macOS 15 or later, but VZ was not asked: this build cannot ask it.
            (Some(_), None) => HostSupport::NotMac,
        }
    }

    /// Why this host cannot, in words; `None` when it can.
    fn missing(self) -> Option<String> {
        match self {
            HostSupport::Supported => None,
            HostSupport::NoChipSupport => Some(
                "this Mac's chip has none (nested virtualization needs an Apple M3 or later)"
                    .into(),
            ),
            HostSupport::MacOsTooOld {
                version: (major, minor),
            } => Some(format!(
                "nested virtualization needs macOS {MIN_MACOS} or later, and this Mac runs {major}.{minor}"
            )),
            HostSupport::NotMac => Some(format!(
                "there is no Virtualization.framework on this system ({})",
                std::env::consts::OS
            )),
        }
    }
}

/// A kernel release as `uname -r` and the kernel's banner give it: `6.6.58`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRelease {
    pub major: u32,
    pub minor: u32,
    /// The release as written, e.g. `6.12.5` (at most [`MAX_RELEASE_LEN`] bytes).
    pub text: String,
}

/// Longest kernel release read; NixOS's are like `6.12.5`.
const MAX_RELEASE_LEN: usize = 64;

impl KernelRelease {
    /// `6.6.58`, `6.12.0-rc1`: the version's first two numbers, and the release
    /// itself when it is made of printable characters without spaces.
    pub fn parse(text: &str) -> Option<KernelRelease> {
        let plain = !text.is_empty()
            && text.len() <= MAX_RELEASE_LEN
            && text.bytes().all(|b| b.is_ascii_graphic());
        if !plain {
            return None;
        }
        let mut numbers = text.split(|c: char| !c.is_ascii_digit());
        let major = numbers.next()?.parse().ok()?;
        let minor = numbers.next()?.parse().ok()?;
        Some(KernelRelease {
            major,
            minor,
            text: text.to_string(),
        })
    }

    fn at_least(&self, (major, minor): (u32, u32)) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for KernelRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Longest kernel image searched for its banner.
const MAX_KERNEL_BYTES: u64 = 512 << 20;

/// The release in a kernel image's banner ("Linux version 6.6.58 (…"). An arm64
/// `Image` is uncompressed, so the banner is there in plain text; `None` when it is
/// not found (another kind of file, or unreadable).
pub fn kernel_release(image: &Path) -> Option<KernelRelease> {
    let file = files::open_input(image).ok()?;
    let mut reader = std::io::BufReader::new(file.take(MAX_KERNEL_BYTES));
    banner_release(&mut reader)
}

/// Streams `reader` looking for the first "Linux version X" whose X parses.
fn banner_release(reader: &mut impl Read) -> Option<KernelRelease> {
    const BANNER: &[u8] = b"Linux version ";
    const CHUNK: usize = 1 << 20;
    let keep = BANNER.len() + MAX_RELEASE_LEN;
    let mut window: Vec<u8> = Vec::with_capacity(CHUNK + keep);
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let read = reader.read(&mut chunk).ok()?;
        let ended = read == 0;
        window.extend_from_slice(chunk.get(..read)?);
        let mut from = 0;
        while let Some(at) = find(window.get(from..)?, BANNER) {
            let start = from + at + BANNER.len();
            let rest = window.get(start..)?;
            let end = rest.iter().position(|b| !b.is_ascii_graphic());
            match end {
                Some(end) => {
                    let release = std::str::from_utf8(rest.get(..end)?)
                        .ok()
                        .and_then(KernelRelease::parse);
                    if release.is_some() {
                        return release;
                    }
                }
                // The release may continue in the next chunk.
                None if !ended && rest.len() <= MAX_RELEASE_LEN => break,
                None => {}
            }
            from = start;
        }
        if ended {
            return None;
        }
        // Keep the tail, where a banner may begin.
        let drop_until = window.len().saturating_sub(keep);
        window.drain(..drop_until);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether a boot asks for nested virtualization, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// The guest boots at EL2 with nested virtualization.
    pub enabled: bool,
    /// Why, in words (for `start --dry-run`, `doctor`, `status`).
    pub reason: String,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.enabled { "on" } else { "off" };
        write!(f, "{state}: {}", self.reason)
    }
}

/// Decides a boot's nested virtualization. `kernel` reads the guest kernel's
/// release; it is called only where the answer depends on it. `Err` only for `on`
/// on a host without it: the message names the requirement (the caller adds the
/// input that set it).
pub fn decide(
    setting: NestedVirtualization,
    host: HostSupport,
    kernel: impl FnOnce() -> Option<KernelRelease>,
) -> Result<Decision, String> {
    let (min_major, min_minor) = MIN_KERNEL;
    let decision = |enabled: bool, reason: String| Ok(Decision { enabled, reason });
    match (setting, host.missing()) {
        (NestedVirtualization::Off, _) => decision(false, "nestedVirtualization = off".into()),
        (NestedVirtualization::On, Some(missing)) => Err(format!(
            "on needs an Apple M3 or later with macOS {MIN_MACOS} or later, but {missing}; set it to auto (on wherever it works) or off"
        )),
        (NestedVirtualization::Auto, Some(missing)) => {
            decision(false, format!("auto, and {missing}"))
        }
        (NestedVirtualization::On, None) => match kernel() {
            Some(release) if release.at_least(MIN_KERNEL) => decision(
                true,
                format!("nestedVirtualization = on; guest kernel {release}"),
            ),
            Some(release) => decision(
                true,
                format!(
                    "nestedVirtualization = on, although the guest's kernel {release} predates {min_major}.{min_minor} and may hang booting at EL2 — if the VM does not come up, set it to auto"
                ),
            ),
            None => decision(
                true,
                "nestedVirtualization = on; the guest kernel's version is unknown".into(),
            ),
        },
        (NestedVirtualization::Auto, None) => match kernel() {
            Some(release) if release.at_least(MIN_KERNEL) => decision(
                true,
                format!("auto: an M3 or later with macOS {MIN_MACOS}+, and guest kernel {release}"),
            ),
            Some(release) => decision(
                false,
                format!(
                    "auto, and the guest's kernel {release} predates {min_major}.{min_minor}, which booting at EL2 needs (the default guest keeps a kernel Rosetta runs on; see the README, \"Nested virtualization\")"
                ),
            ),
            None => decision(
                false,
                "auto, and the guest kernel's version cannot be read (set it to on to use it anyway)".into(),
            ),
        },
    }
}

/// Whether the guest had `/dev/kvm`, as it said on its console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kvm {
    Present,
    Absent,
    /// The guest said nothing in time (a guest built without `kvm.nix`, or a
    /// boot that never got that far).
    Unknown,
}

impl Kvm {
    pub fn as_str(self) -> &'static str {
        match self {
            Kvm::Present => "present",
            Kvm::Absent => "absent",
            Kvm::Unknown => "unknown",
        }
    }
}

/// What the guest's console said: `darwin-vz-nix-kvm: present (Linux 6.12.5)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmMarker {
    pub kvm: Kvm,
    pub kernel: Option<String>,
}

/// The last kvm marker line in (the tail of) a console log, if any.
pub fn kvm_marker(console: &[u8]) -> Option<KvmMarker> {
    let marker = CONSOLE_MARKER_KVM.as_bytes();
    console.split(|&b| b == b'\n').rev().find_map(|line| {
        let at = find(line, marker)?;
        parse_marker(&String::from_utf8_lossy(line.get(at + marker.len()..)?))
    })
}

fn parse_marker(text: &str) -> Option<KvmMarker> {
    let mut words = text.split_whitespace();
    let kvm = match words.next()? {
        "present" => Kvm::Present,
        "absent" => Kvm::Absent,
        _ => return None,
    };
    // "(Linux 6.12.5)"
    let kernel = match (words.next(), words.next()) {
        (Some("(Linux"), Some(release)) => release
            .strip_suffix(')')
            .and_then(KernelRelease::parse)
            .map(|r| r.text),
        _ => None,
    };
    Some(KvmMarker { kvm, kernel })
}

/// Reads the last `limit` bytes of a console log (a state file: never through a
/// symbolic link, never blocking).
pub fn console_tail(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let mut file = files::open_state_file(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(limit))).ok()?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The version of the report format.
pub const REPORT_VERSION: u32 = 1;

/// Largest report read; a real one is about a hundred bytes.
const MAX_REPORT_BYTES: u64 = 4096;

/// What the supervisor learnt about the guest of one boot, kept in the state
/// directory (`StateDir::guest_report`) for root's `darwin-vz-nix machines`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestReport {
    pub version: u32,
    /// The supervisor's boot number.
    pub boot: u64,
    /// The boot asked for nested virtualization.
    pub nested_virtualization: bool,
    pub kvm: Kvm,
    /// The guest's `uname -r`, when it said.
    pub kernel: Option<String>,
}

impl GuestReport {
    pub fn to_json(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec(self).expect("a report serialises");
        text.push(b'\n');
        text
    }
}

/// Reads the report at `path`: `Ok(None)` when there is none. The directory belongs
/// to the service account and root reads it, so it is a state file (no symbolic
/// link, no FIFO, at most 4 KiB), and an error never shows its content.
pub fn read_report(path: &Path) -> Result<Option<GuestReport>, String> {
    let bytes = files::read_state_file(path, MAX_REPORT_BYTES).map_err(|e| e.to_string())?;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    match serde_json::from_slice::<GuestReport>(&bytes) {
        Ok(report) if report.version == REPORT_VERSION => Ok(Some(report)),
        Ok(report) => Err(format!(
            "{} has report version {}, not {REPORT_VERSION}; it is ignored until the daemon writes it again",
            path.display(),
            report.version
        )),
        Err(_) => Err(format!(
            "{} is not a guest report; it is ignored until the daemon writes it again",
            path.display()
        )),
    }
}

/// What to tell Nix beyond the default features, and why not more.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Offer {
    pub features: Vec<&'static str>,
    /// Said loudly when nested virtualization is on but the guest had no `/dev/kvm`.
    pub warning: Option<String>,
}

/// The features to offer for a `decision`, narrowed by the guest's last `report`.
/// A report can only take `kvm` and `nixos-test` away, and only when it comes from
/// a boot that had nested virtualization: a report from a boot without it says
/// nothing about the next one.
pub fn offer(decision: &Decision, report: Option<&GuestReport>) -> Offer {
    if !decision.enabled {
        return Offer::default();
    }
    match report {
        Some(report) if report.nested_virtualization && report.kvm != Kvm::Present => Offer {
            features: Vec::new(),
            warning: Some(missing_kvm(report)),
        },
        _ => Offer {
            features: KVM_FEATURES.to_vec(),
            warning: None,
        },
    }
}

/// The loud message for a guest that booted with nested virtualization and had no
/// `/dev/kvm` (or did not say).
pub fn missing_kvm(report: &GuestReport) -> String {
    let kernel = report
        .kernel
        .as_deref()
        .map(|k| format!(" (Linux {k})"))
        .unwrap_or_default();
    let what = match report.kvm {
        Kvm::Unknown => {
            "did not say whether it has /dev/kvm (a guest built without nix/nixos/kvm.nix?)"
        }
        _ => "has no /dev/kvm",
    };
    format!(
        "nested virtualization is on, but the guest of boot {}{kernel} {what}: kvm and nixos-test are not offered to Nix; see the README, \"Nested virtualization\"",
        report.boot
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(text: &str) -> Option<KernelRelease> {
        KernelRelease::parse(text)
    }

    fn report(nested: bool, kvm: Kvm) -> GuestReport {
        GuestReport {
            version: REPORT_VERSION,
            boot: 2,
            nested_virtualization: nested,
            kvm,
            kernel: Some("6.12.5".into()),
        }
    }

    #[test]
    fn the_setting_reads_auto_on_off_and_nothing_else() {
        assert_eq!("auto".parse(), Ok(NestedVirtualization::Auto));
        assert_eq!("ON".parse(), Ok(NestedVirtualization::On));
        assert_eq!("off".parse(), Ok(NestedVirtualization::Off));
        assert_eq!(
            "yes".parse::<NestedVirtualization>(),
            Err("`yes` is not a nestedVirtualization value; use auto, on or off".into())
        );
        assert_eq!(NestedVirtualization::default(), NestedVirtualization::Auto);
    }

    #[test]
    fn host_support_needs_macos_15_and_vz_saying_yes() {
        use HostSupport::*;
        assert_eq!(HostSupport::from_facts(None, None), NotMac);
        assert_eq!(
            HostSupport::from_facts(Some((14, 6)), None),
            MacOsTooOld { version: (14, 6) }
        );
        assert_eq!(
            HostSupport::from_facts(Some((15, 0)), Some(true)),
            Supported
        );
        assert_eq!(
            HostSupport::from_facts(Some((26, 1)), Some(false)),
            NoChipSupport
        );
    }

    #[test]
    fn kernel_releases_parse_and_compare() {
        let r = release("6.6.58").unwrap();
        assert_eq!((r.major, r.minor, r.text.as_str()), (6, 6, "6.6.58"));
        assert!(!r.at_least(MIN_KERNEL));
        assert!(release("6.12.0-rc1").unwrap().at_least(MIN_KERNEL));
        assert!(release("7.0.1").unwrap().at_least(MIN_KERNEL));
        for bad in ["", "six", "6", "6.x", "6.12 5", &"6.1".repeat(30)] {
            assert_eq!(release(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_kernel_banner_is_found_anywhere_in_the_image_even_across_chunks() {
        let banner = b"Linux version 6.12.5 (nixbld@localhost) (gcc 14.2.1) #1-NixOS SMP";
        for offset in [0usize, 100, (1 << 20) - 10, (1 << 20) - 2, (3 << 20) + 7] {
            let mut image = vec![0u8; offset];
            // A decoy that does not parse comes first.
            image.extend_from_slice(b"Linux version %s\0");
            image.extend_from_slice(banner);
            image.extend_from_slice(&[0u8; 64]);
            let found = banner_release(&mut image.as_slice());
            assert_eq!(
                found.map(|r| r.text),
                Some("6.12.5".into()),
                "offset {offset}"
            );
        }
        assert_eq!(banner_release(&mut &[0u8; 4096][..]), None);
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("kernel");
        std::fs::write(&kernel, [&b"ARM\x64"[..], banner].concat()).unwrap();
        assert_eq!(
            kernel_release(&kernel).map(|r| r.text),
            Some("6.12.5".into())
        );
        assert_eq!(kernel_release(&tmp.path().join("missing")), None);
    }

    /// Every setting on every kind of host, with an old, a new and an unknown
    /// guest kernel.
    #[test]
    fn the_decision_follows_setting_host_and_guest_kernel() {
        use HostSupport::*;
        use NestedVirtualization::*;
        let hosts = [
            Supported,
            NoChipSupport,
            MacOsTooOld { version: (14, 5) },
            NotMac,
        ];
        let kernels = [Some("6.12.5"), Some("6.6.58"), None];
        for host in hosts {
            for kernel in kernels {
                let read = || kernel.and_then(release);
                let off = decide(Off, host, read).unwrap();
                assert!(!off.enabled);
                assert_eq!(off.reason, "nestedVirtualization = off");

                let auto = decide(Auto, host, read).unwrap();
                let expected = host == Supported && kernel == Some("6.12.5");
                assert_eq!(
                    auto.enabled, expected,
                    "auto on {host:?} with {kernel:?}: {auto}"
                );

                let on = decide(On, host, read);
                if host == Supported {
                    assert!(on.unwrap().enabled, "on with {kernel:?}");
                } else {
                    let err = on.unwrap_err();
                    assert!(
                        err.starts_with(
                            "on needs an Apple M3 or later with macOS 15 or later, but "
                        ),
                        "{err}"
                    );
                    assert!(
                        err.ends_with("; set it to auto (on wherever it works) or off"),
                        "{err}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_reasons_name_what_is_missing() {
        use NestedVirtualization::*;
        let old_mac = decide(Auto, HostSupport::MacOsTooOld { version: (14, 5) }, || None).unwrap();
        assert_eq!(
            old_mac.to_string(),
            "off: auto, and nested virtualization needs macOS 15 or later, and this Mac runs 14.5"
        );
        let m2 = decide(On, HostSupport::NoChipSupport, || None).unwrap_err();
        assert_eq!(
            m2,
            "on needs an Apple M3 or later with macOS 15 or later, but this Mac's chip has none (nested virtualization needs an Apple M3 or later); set it to auto (on wherever it works) or off"
        );
        let old_kernel = decide(Auto, HostSupport::Supported, || release("6.6.58")).unwrap();
        assert!(
            old_kernel
                .reason
                .contains("the guest's kernel 6.6.58 predates 6.12"),
            "{old_kernel}"
        );
        let forced = decide(On, HostSupport::Supported, || release("6.6.58")).unwrap();
        assert!(forced.enabled);
        assert!(
            forced.reason.contains("may hang booting at EL2"),
            "{forced}"
        );
    }

    #[test]
    fn the_kernel_is_read_only_when_the_answer_depends_on_it() {
        use NestedVirtualization::*;
        let never = || -> Option<KernelRelease> { panic!("the kernel was read") };
        decide(Off, HostSupport::Supported, never).unwrap();
        decide(Auto, HostSupport::NoChipSupport, never).unwrap();
        decide(On, HostSupport::NotMac, never).unwrap_err();
    }

    /// host support × setting × guest report → the features Nix is told.
    #[test]
    fn features_follow_the_decision_and_a_report_can_only_take_them_away() {
        let on = Decision {
            enabled: true,
            reason: String::new(),
        };
        let off = Decision {
            enabled: false,
            reason: String::new(),
        };
        assert_eq!(offer(&on, None).features, KVM_FEATURES);
        assert_eq!(
            offer(&on, Some(&report(true, Kvm::Present))).features,
            KVM_FEATURES
        );
        for kvm in [Kvm::Absent, Kvm::Unknown] {
            let offered = offer(&on, Some(&report(true, kvm)));
            assert!(offered.features.is_empty(), "{kvm:?}");
            let warning = offered.warning.unwrap();
            assert!(
                warning.starts_with(
                    "nested virtualization is on, but the guest of boot 2 (Linux 6.12.5) "
                ),
                "{warning}"
            );
        }
        // A report from a boot without nested virtualization says nothing now.
        assert_eq!(
            offer(&on, Some(&report(false, Kvm::Absent))).features,
            KVM_FEATURES
        );
        // And no report adds what the decision does not give.
        for report in [None, Some(report(true, Kvm::Present))] {
            assert_eq!(offer(&off, report.as_ref()), Offer::default());
        }
    }

    #[test]
    fn the_console_marker_is_read_from_the_last_line_that_has_it() {
        let console = b"[    0.000000] Booting Linux\r\n\
            darwin-vz-nix-kvm: absent (Linux 6.6.58)\r\n\
            darwin-vz-nix-kvm: present (Linux 6.12.5)\r\n\
            [  OK  ] Started sshd.\r\n";
        assert_eq!(
            kvm_marker(console),
            Some(KvmMarker {
                kvm: Kvm::Present,
                kernel: Some("6.12.5".into())
            })
        );
        assert_eq!(
            kvm_marker(b"darwin-vz-nix-kvm: absent\n"),
            Some(KvmMarker {
                kvm: Kvm::Absent,
                kernel: None
            })
        );
        assert_eq!(kvm_marker(b"darwin-vz-nix-kvm: maybe\n"), None);
        assert_eq!(kvm_marker(b"nothing here\n"), None);
        // A garbled kernel is dropped, the answer kept.
        assert_eq!(
            kvm_marker(b"darwin-vz-nix-kvm: absent (Linux \xff)\n").map(|m| m.kernel),
            Some(None)
        );
    }

    #[test]
    fn reports_round_trip_and_anything_else_is_refused_without_echoing_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("guest-report.json");
        assert_eq!(read_report(&path), Ok(None));
        let written = report(true, Kvm::Absent);
        std::fs::write(&path, written.to_json()).unwrap();
        assert_eq!(read_report(&path), Ok(Some(written)));

        std::fs::write(&path, b"{\"secret\": \"root's eyes only\"}").unwrap();
        let err = read_report(&path).unwrap_err();
        assert!(
            err.ends_with("is not a guest report; it is ignored until the daemon writes it again"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");

        std::fs::write(&path, vec![b' '; 5000]).unwrap();
        assert!(
            read_report(&path)
                .unwrap_err()
                .contains("larger than 4096 bytes")
        );

        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        assert!(read_report(&path).unwrap_err().contains("a symbolic link"));
    }
}
