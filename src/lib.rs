//! darwin-vz-nix: a NixOS VM on Apple Silicon, run through Virtualization.framework,
//! as the Mac's Linux remote builder.
//!
//! The crate is a platform-neutral core — configuration, state directory, keys, boot
//! plan, supervisor, control protocol, proxy — that builds and is tested anywhere,
//! plus one macOS-only module (`vz`) that translates a boot plan into
//! Virtualization.framework objects. Reading order for newcomers: `config` → `plan` →
//! `supervisor` → `control` → `proxy` → `daemon` → `cli`.

pub mod artifacts;
pub mod backend;
pub mod bench;
pub mod bootstrap;
pub mod cacerts;
pub mod cli;
pub mod clock;
pub mod config;
pub mod contract;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod doctor;
pub mod files;
pub mod guest;
pub mod guest_timing;
pub mod host;
pub mod hostcache;
pub mod keys;
pub mod limits;
pub mod logfile;
pub mod mac;
pub mod machines;
pub mod nested;
pub mod plan;
pub mod power;
pub mod proxy;
pub mod size;
pub mod ssh;
pub mod state;
pub mod supervisor;

#[cfg(target_os = "macos")]
pub mod vz;

use std::sync::Arc;

use backend::{Backend, BackendError};

/// The backend that runs VMs on this platform.
pub fn platform_backend() -> Result<Arc<dyn Backend>, BackendError> {
    #[cfg(target_os = "macos")]
    {
        Ok(Arc::new(vz::VzBackend::new()?))
    }
    #[cfg(not(target_os = "macos"))]
    {
        Err(BackendError::Unsupported(format!(
            "darwin-vz-nix runs VMs only on macOS 13+ on Apple Silicon (this is {}); `darwin-vz-nix start --dry-run` shows what would boot",
            std::env::consts::OS
        )))
    }
}

/// True when this build can run VMs here.
pub fn vm_backend_available() -> bool {
    cfg!(target_os = "macos")
}

/// What VZ's `isNestedVirtualizationSupported` says about this Mac: asked on macOS
/// 15 or later only, `None` elsewhere (see `HostInfo::nested_virtualization`).
pub fn platform_nested_virtualization() -> Option<bool> {
    #[cfg(target_os = "macos")]
    {
        vz::nested_virtualization_supported()
    }
    #[cfg(not(target_os = "macos"))]
    {
        None
    }
}

/// What the platform says about virtualization and Rosetta, for `doctor`.
pub fn platform_facts() -> doctor::PlatformFacts {
    #[cfg(target_os = "macos")]
    {
        vz::platform_facts()
    }
    #[cfg(not(target_os = "macos"))]
    {
        doctor::PlatformFacts::default()
    }
}
