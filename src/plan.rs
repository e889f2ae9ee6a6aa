//! The boot plan: everything the VM gets, decided and checked on any platform.
//!
//! The Virtualization.framework backend translates a plan into VZ objects one device
//! at a time and decides nothing itself, so what `start --dry-run` prints here is
//! exactly what boots on a Mac.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::artifacts::GuestArtifacts;
use crate::config::Config;
use crate::contract;
use crate::host::HostInfo;
use crate::mac::MacAddress;
use crate::nested::{self, Decision};
use crate::state::StateDir;

/// Where the host's Nix store lives.
pub const HOST_STORE: &str = "/nix/store";

/// virtiofs tags must be non-empty and shorter than 36 bytes (VZ's `validateTag`).
pub const MAX_TAG_LEN: usize = 35;

/// The longest kernel command line the guest keeps: arm64 Linux's
/// `COMMAND_LINE_SIZE` is 2048 bytes with the final NUL (arch/arm64/include/uapi/
/// asm/setup.h in the LTS kernels the guest uses), and the kernel silently cuts
/// whatever is longer — the user's `kernelParams`, which come last, first.
pub const MAX_COMMAND_LINE: usize = 2047;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BootPlan {
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel parameters, in order; joined with spaces for the boot loader.
    pub command_line: Vec<String>,
    pub devices: Vec<Device>,
    /// Whether the guest boots with nested virtualization (at EL2, with KVM), and why.
    pub nested_virtualization: Decision,
}

/// One device of the VM. Each variant maps to one VZ device configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Device {
    Disk(DiskDevice),
    Network(NetworkDevice),
    Share(ShareDevice),
    Rosetta(RosettaDevice),
    Vsock,
    Entropy,
    Console(ConsoleDevice),
    MemoryBalloon,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskDevice {
    pub path: PathBuf,
    pub read_only: bool,
    pub caching: DiskCaching,
    pub sync: DiskSync,
}

/// Host-side caching of the disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCaching {
    /// Linux guests on sparse APFS files need `cached`: the default (`automatic`,
    /// uncached on local storage) has corrupted ext4 (tart #675, Lima #2026, UTM #5919).
    Cached,
}

/// When guest flushes reach the host's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskSync {
    /// Guest flushes become `fsync`: durable enough for a build cache, and much
    /// faster than `full` (F_FULLFSYNC) on every flush.
    Fsync,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkDevice {
    /// Always NAT: the host never reaches the guest over IP (SSH goes over vsock).
    pub attachment: NetworkAttachment,
    pub mac: MacAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkAttachment {
    Nat,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareDevice {
    pub tag: String,
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RosettaDevice {
    pub tag: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleDevice {
    /// The guest's console output is appended here.
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("virtiofs tag {tag:?} must be 1 to {MAX_TAG_LEN} bytes")]
    BadTag { tag: String },
    #[error("virtiofs tag {tag:?} is used twice")]
    DuplicateTag { tag: String },
    #[error("share {tag:?}: {path} is not an existing directory")]
    MissingShare { tag: String, path: PathBuf },
    #[error(
        "the kernel command line would be {len} bytes, more than the {MAX_COMMAND_LINE} arm64 Linux keeps (it silently cuts the rest); kernelParams add {extra} bytes of it — shorten them"
    )]
    CommandLineTooLong { len: usize, extra: usize },
    #[error("nestedVirtualization: {0}")]
    NestedVirtualization(String),
}

/// Refuses a command line the guest's kernel would cut. `extra` is how many bytes
/// the user's own parameters take, to say what to shorten.
pub fn check_command_line(line: &[String], user_params: &[String]) -> Result<(), PlanError> {
    let joined = |params: &[String]| {
        params
            .iter()
            .map(String::len)
            .fold(params.len().saturating_sub(1), usize::saturating_add)
    };
    let len = joined(line);
    if len > MAX_COMMAND_LINE {
        return Err(PlanError::CommandLineTooLong {
            len,
            // Each user parameter also costs the space before it.
            extra: joined(user_params).saturating_add(usize::from(!user_params.is_empty())),
        });
    }
    Ok(())
}

/// Everything a plan is built from. The MAC is an input so that `--dry-run` can show a
/// plan without creating state.
pub struct PlanInputs<'a> {
    pub config: &'a Config,
    pub artifacts: &'a GuestArtifacts,
    pub state: &'a StateDir,
    pub host: &'a HostInfo,
    pub mac: MacAddress,
    /// Where the host store is; `/nix/store` except in tests.
    pub host_store: &'a Path,
}

impl BootPlan {
    pub fn build(inputs: &PlanInputs<'_>) -> Result<BootPlan, PlanError> {
        let PlanInputs {
            config,
            artifacts,
            state,
            host,
            mac,
            host_store,
        } = inputs;
        let mut devices = vec![
            Device::Disk(DiskDevice {
                path: state.disk_image(),
                read_only: false,
                caching: DiskCaching::Cached,
                sync: DiskSync::Fsync,
            }),
            Device::Network(NetworkDevice {
                attachment: NetworkAttachment::Nat,
                mac: *mac,
            }),
            Device::Share(ShareDevice {
                tag: contract::TAG_HOST_STORE.into(),
                path: host_store.to_path_buf(),
                read_only: true,
            }),
            // Only the guest's own keys: sharing all of keys/ would hand the guest
            // the client's private key.
            Device::Share(ShareDevice {
                tag: contract::TAG_KEYS.into(),
                path: state.guest_keys_dir(),
                read_only: true,
            }),
        ];
        if config.rosetta {
            devices.push(Device::Rosetta(RosettaDevice {
                tag: contract::TAG_ROSETTA.into(),
            }));
        }
        devices.extend([
            Device::Vsock,
            Device::Entropy,
            Device::Console(ConsoleDevice {
                log: state.console_log(),
            }),
            Device::MemoryBalloon,
        ]);

        let nested_virtualization =
            nested::decide(config.nested_virtualization, host.nested_support(), || {
                nested::kernel_release(&artifacts.kernel)
            })
            .map_err(PlanError::NestedVirtualization)?;

        let plan = BootPlan {
            cpus: config.cores,
            memory_mib: config.memory_mib,
            kernel: artifacts.kernel.clone(),
            initrd: artifacts.initrd.clone(),
            command_line: command_line(config, artifacts, host),
            devices,
            nested_virtualization,
        };
        plan.check()?;
        check_command_line(&plan.command_line, &config.kernel_params)?;
        Ok(plan)
    }

    /// Invariants VZ would otherwise reject with an opaque error at start.
    pub fn check(&self) -> Result<(), PlanError> {
        let mut seen: Vec<&str> = Vec::new();
        for device in &self.devices {
            let tag = match device {
                Device::Share(share) => &share.tag,
                Device::Rosetta(rosetta) => &rosetta.tag,
                _ => continue,
            };
            if tag.is_empty() || tag.len() > MAX_TAG_LEN {
                return Err(PlanError::BadTag { tag: tag.clone() });
            }
            if seen.contains(&tag.as_str()) {
                return Err(PlanError::DuplicateTag { tag: tag.clone() });
            }
            seen.push(tag);
        }
        Ok(())
    }

    /// Checks what only exists at boot time (the shared directories).
    pub fn check_shares_exist(&self) -> Result<(), PlanError> {
        for device in &self.devices {
            if let Device::Share(share) = device
                && !share.path.is_dir()
            {
                return Err(PlanError::MissingShare {
                    tag: share.tag.clone(),
                    path: share.path.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn command_line_string(&self) -> String {
        self.command_line.join(" ")
    }

    pub fn console_log(&self) -> Option<&Path> {
        self.devices.iter().find_map(|d| match d {
            Device::Console(c) => Some(c.log.as_path()),
            _ => None,
        })
    }
}

/// The kernel command line. Order matters: later parameters win, so the guest's own
/// `boot.kernelParams` come after ours and the user's extras come last.
pub fn command_line(config: &Config, artifacts: &GuestArtifacts, host: &HostInfo) -> Vec<String> {
    let flag = |on: bool| if on { "1" } else { "0" };
    let mut params = vec![
        format!("console={}", contract::GUEST_CONSOLE),
        // A panicking guest reboots at once; VZ turns a reboot into a stop, and the
        // supervisor boots afresh on the next build instead of hanging forever.
        "panic=-1".to_string(),
        format!("init={}/init", artifacts.system.display()),
    ];
    params.extend(artifacts.system_kernel_params.iter().cloned());
    if let Some(registration) = &artifacts.registration {
        params.push(format!(
            "{}={}",
            contract::PARAM_REGISTRATION,
            registration.display()
        ));
    }
    params.push(format!(
        "{}={}",
        contract::PARAM_ROSETTA,
        flag(config.rosetta)
    ));
    params.push(format!(
        "{}={}",
        contract::PARAM_ROSETTA_PRESERVE_ARGV0,
        flag(config.rosetta && host.rosetta_preserves_argv0())
    ));
    // The guest adds the host's cache to its substituters only when it is served:
    // a substituter that refuses connections fails remote builds on Nix < 2.32.
    params.push(format!(
        "{}={}",
        contract::PARAM_HOST_CACHE,
        flag(config.host_store_cache)
    ));
    params.extend(config.kernel_params.iter().cloned());
    params
}

impl fmt::Display for BootPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cpus          {}", self.cpus)?;
        writeln!(f, "memory        {} MiB", self.memory_mib)?;
        writeln!(f, "kernel        {}", self.kernel.display())?;
        writeln!(f, "initrd        {}", self.initrd.display())?;
        writeln!(f, "command line  {}", self.command_line_string())?;
        writeln!(f, "devices")?;
        for device in &self.devices {
            writeln!(f, "  {device}")?;
        }
        writeln!(f, "nested virt   {}", self.nested_virtualization)?;
        Ok(())
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Disk(d) => write!(
                f,
                "disk          virtio-blk {} ({}, caching {}, sync {})",
                d.path.display(),
                if d.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                json_name(&d.caching),
                json_name(&d.sync)
            ),
            Device::Network(n) => write!(f, "network       virtio-net NAT, MAC {}", n.mac),
            Device::Share(s) => write!(
                f,
                "share         virtiofs tag {} <- {} ({})",
                s.tag,
                s.path.display(),
                if s.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            ),
            Device::Rosetta(r) => {
                write!(f, "rosetta       virtiofs tag {} <- Rosetta runtime", r.tag)
            }
            Device::Vsock => write!(
                f,
                "vsock         virtio-vsock (ssh on guest port {})",
                contract::SSH_VSOCK_PORT
            ),
            Device::Entropy => write!(f, "entropy       virtio-rng"),
            Device::Console(c) => write!(
                f,
                "console       virtio-console hvc0 -> {}",
                c.log.display()
            ),
            Device::MemoryBalloon => write!(f, "balloon       virtio-balloon"),
        }
    }
}

/// The name a unit enum variant has in the JSON plan, for the text form.
fn json_name(value: &impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigLayer, Origin, Source};

    fn host(macos: (u32, u32)) -> HostInfo {
        HostInfo {
            cpus: 8,
            memory_bytes: 16 << 30,
            macos_version: Some(macos),
            arch: "aarch64".into(),
            nested_virtualization: None,
        }
    }

    fn artifacts() -> GuestArtifacts {
        GuestArtifacts {
            kernel: "/g/kernel".into(),
            initrd: "/g/initrd".into(),
            system: "/g/system".into(),
            registration: Some("/g/registration".into()),
            system_kernel_params: vec!["loglevel=4".into()],
        }
    }

    fn plan(layer: ConfigLayer, macos: (u32, u32)) -> BootPlan {
        let config = Config::resolve(
            &[Source {
                origin: Origin::Flag,
                layer,
            }],
            Some("/state".into()),
        )
        .unwrap();
        BootPlan::build(&PlanInputs {
            config: &config,
            artifacts: &artifacts(),
            state: &StateDir::new("/state"),
            host: &host(macos),
            mac: "0a:00:00:00:00:01".parse().unwrap(),
            host_store: Path::new(HOST_STORE),
        })
        .unwrap()
    }

    #[test]
    fn the_command_line_carries_init_registration_and_rosetta_choice() {
        let plan = plan(
            ConfigLayer {
                kernel_params: Some(vec!["systemd.log_level=debug".into()]),
                ..Default::default()
            },
            (14, 0),
        );
        assert_eq!(
            plan.command_line_string(),
            "console=hvc0 panic=-1 init=/g/system/init loglevel=4 \
             darwin_vz_nix.registration=/g/registration darwin_vz_nix.rosetta=1 \
             darwin_vz_nix.rosetta_preserve_argv0=1 darwin_vz_nix.host_cache=1 \
             systemd.log_level=debug"
        );
    }

    #[test]
    fn a_macos_13_host_tells_the_guest_not_to_preserve_argv0() {
        let plan = plan(ConfigLayer::default(), (13, 6));
        assert!(
            plan.command_line
                .contains(&"darwin_vz_nix.rosetta_preserve_argv0=0".to_string())
        );
    }

    #[test]
    fn rosetta_off_removes_the_share_and_tells_the_guest() {
        let plan = plan(
            ConfigLayer {
                rosetta: Some(false),
                ..Default::default()
            },
            (14, 0),
        );
        assert!(!plan.devices.iter().any(|d| matches!(d, Device::Rosetta(_))));
        assert!(
            plan.command_line
                .contains(&"darwin_vz_nix.rosetta=0".to_string())
        );
        assert!(
            plan.command_line
                .contains(&"darwin_vz_nix.rosetta_preserve_argv0=0".to_string())
        );
    }

    #[test]
    fn the_device_list_is_complete_and_only_guest_keys_are_shared() {
        let plan = plan(ConfigLayer::default(), (14, 0));
        let kinds: Vec<String> = plan
            .devices
            .iter()
            .map(|d| {
                serde_json::to_value(d).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "disk",
                "network",
                "share",
                "share",
                "rosetta",
                "vsock",
                "entropy",
                "console",
                "memory-balloon"
            ]
        );
        let shares: Vec<(&str, &Path, bool)> = plan
            .devices
            .iter()
            .filter_map(|d| match d {
                Device::Share(s) => Some((s.tag.as_str(), s.path.as_path(), s.read_only)),
                _ => None,
            })
            .collect();
        assert_eq!(
            shares,
            [
                ("nix-store", Path::new("/nix/store"), true),
                ("dvn-keys", Path::new("/state/keys/guest"), true),
            ]
        );
        assert_eq!(plan.cpus, 4);
        assert_eq!(plan.memory_mib, 6144);
        assert_eq!(
            plan.console_log(),
            Some(Path::new("/state/logs/console.log"))
        );
    }

    #[test]
    fn the_guest_is_told_whether_the_host_serves_its_store_cache() {
        let on = plan(ConfigLayer::default(), (14, 0));
        assert!(
            on.command_line
                .contains(&"darwin_vz_nix.host_cache=1".to_string())
        );
        let off = plan(
            ConfigLayer {
                host_store_cache: Some(false),
                ..Default::default()
            },
            (14, 0),
        );
        assert!(
            off.command_line
                .contains(&"darwin_vz_nix.host_cache=0".to_string())
        );
    }

    #[test]
    fn a_command_line_the_kernel_would_cut_is_refused() {
        let line = |n: usize| vec!["x".repeat(n)];
        assert!(check_command_line(&line(MAX_COMMAND_LINE), &[]).is_ok());
        let user = vec!["a".repeat(100), "b".repeat(99)];
        let mut long = line(MAX_COMMAND_LINE - 200);
        long.extend(user.iter().cloned());
        // 1847 + 1 + 100 + 1 + 99 = 2048 bytes: one too many.
        let err = check_command_line(&long, &user).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel command line would be 2048 bytes, more than the 2047 arm64 Linux keeps (it silently cuts the rest); kernelParams add 201 bytes of it — shorten them"
        );
    }

    #[test]
    fn the_plan_carries_the_nested_virtualization_decision() {
        let plan = plan(ConfigLayer::default(), (14, 0));
        assert!(!plan.nested_virtualization.enabled);
        assert!(
            plan.to_string()
                .ends_with("nested virt   off: auto, and nested virtualization needs macOS 15 or later, and this Mac runs 14.0\n"),
            "{plan}"
        );
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["nestedVirtualization"]["enabled"], false);

        // `on` where the Mac cannot: no plan, the requirement named.
        let config = Config::resolve(
            &[Source {
                origin: Origin::Flag,
                layer: ConfigLayer {
                    nested_virtualization: Some(nested::NestedVirtualization::On),
                    ..Default::default()
                },
            }],
            Some("/state".into()),
        )
        .unwrap();
        let err = BootPlan::build(&PlanInputs {
            config: &config,
            artifacts: &artifacts(),
            state: &StateDir::new("/state"),
            host: &host((15, 1)),
            mac: "0a:00:00:00:00:01".parse().unwrap(),
            host_store: Path::new(HOST_STORE),
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("nestedVirtualization: on needs an Apple M3 or later"),
            "{err}"
        );
        let supported = HostInfo {
            nested_virtualization: Some(true),
            ..host((15, 1))
        };
        let plan = BootPlan::build(&PlanInputs {
            config: &config,
            artifacts: &artifacts(),
            state: &StateDir::new("/state"),
            host: &supported,
            mac: "0a:00:00:00:00:01".parse().unwrap(),
            host_store: Path::new(HOST_STORE),
        })
        .unwrap();
        assert!(plan.nested_virtualization.enabled);
    }

    #[test]
    fn bad_or_duplicate_tags_are_refused() {
        let mut p = plan(ConfigLayer::default(), (14, 0));
        p.devices.push(Device::Share(ShareDevice {
            tag: "x".repeat(36),
            path: "/tmp".into(),
            read_only: true,
        }));
        assert_eq!(
            p.check(),
            Err(PlanError::BadTag {
                tag: "x".repeat(36)
            })
        );
        let mut p = plan(ConfigLayer::default(), (14, 0));
        p.devices.push(Device::Rosetta(RosettaDevice {
            tag: "nix-store".into(),
        }));
        assert_eq!(
            p.check(),
            Err(PlanError::DuplicateTag {
                tag: "nix-store".into()
            })
        );
    }
}
