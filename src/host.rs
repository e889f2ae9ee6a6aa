//! Facts about the machine we run on, gathered once and passed around as plain data
//! so that validation and planning can be tested with any host we care to describe.

use serde::Serialize;

/// The host as the configuration validator and the boot planner see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostInfo {
    /// Logical CPUs the host offers.
    pub cpus: u32,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// `Some((major, minor))` on macOS, `None` elsewhere.
    pub macos_version: Option<(u32, u32)>,
    /// `aarch64`, `x86_64`, …
    pub arch: String,
    /// What VZ's `VZGenericPlatformConfiguration.isNestedVirtualizationSupported`
    /// says (asked on macOS 15 or later; `None` where it cannot be asked).
    pub nested_virtualization: Option<bool>,
}

impl HostInfo {
    /// Reads the facts from the running system.
    pub fn detect() -> HostInfo {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        HostInfo {
            cpus,
            memory_bytes: platform::memory_bytes().unwrap_or(0),
            macos_version: platform::macos_version(),
            arch: std::env::consts::ARCH.to_string(),
            nested_virtualization: crate::platform_nested_virtualization(),
        }
    }

    /// Whether this host can boot a guest with nested virtualization.
    pub fn nested_support(&self) -> crate::nested::HostSupport {
        crate::nested::HostSupport::from_facts(self.macos_version, self.nested_virtualization)
    }

    /// Rosetta's binfmt "preserve argv[0]" flag needs a macOS 14 host.
    pub fn rosetta_preserves_argv0(&self) -> bool {
        matches!(self.macos_version, Some((major, _)) if major >= 14)
    }
}

#[cfg(target_os = "macos")]
mod platform {
    use std::ffi::CStr;

    fn sysctl_bytes(name: &CStr) -> Option<Vec<u8>> {
        let mut len: libc::size_t = 0;
        // SAFETY: a null buffer asks sysctlbyname for the length only.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                std::ptr::null_mut(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 || len == 0 {
            return None;
        }
        let mut buf = vec![0u8; len];
        // SAFETY: buf has room for len bytes, as sysctlbyname just told us.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            return None;
        }
        buf.truncate(len);
        Some(buf)
    }

    pub fn memory_bytes() -> Option<u64> {
        let bytes = sysctl_bytes(c"hw.memsize")?;
        Some(u64::from_ne_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    pub fn macos_version() -> Option<(u32, u32)> {
        let bytes = sysctl_bytes(c"kern.osproductversion")?;
        let text = CStr::from_bytes_until_nul(&bytes).ok()?.to_str().ok()?;
        super::parse_version(text)
    }
}

#[cfg(not(target_os = "macos"))]
mod platform {
    pub fn memory_bytes() -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn macos_version() -> Option<(u32, u32)> {
        None
    }
}

/// `"14.5.1"` → `(14, 5)`; `"13"` → `(13, 0)`.
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macos_versions() {
        assert_eq!(parse_version("14.5.1"), Some((14, 5)));
        assert_eq!(parse_version("13"), Some((13, 0)));
        assert_eq!(parse_version("x"), None);
    }

    #[test]
    fn detects_something_plausible() {
        let host = HostInfo::detect();
        assert!(host.cpus >= 1);
        assert!(host.memory_bytes > 64 * 1024 * 1024, "{host:?}");
    }

    #[test]
    fn argv0_preservation_follows_the_macos_version() {
        let mut host = HostInfo::detect();
        host.macos_version = Some((13, 6));
        assert!(!host.rosetta_preserves_argv0());
        host.macos_version = Some((14, 0));
        assert!(host.rosetta_preserves_argv0());
        host.macos_version = None;
        assert!(!host.rosetta_preserves_argv0());
    }
}
