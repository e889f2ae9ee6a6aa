//! The Virtualization.framework backend (macOS only). Being written.

use crate::backend::BackendError;

pub struct VzBackend;

impl VzBackend {
    pub fn new() -> Result<VzBackend, BackendError> {
        Err(BackendError::Unsupported("not yet".into()))
    }
}

pub fn platform_facts() -> crate::doctor::PlatformFacts {
    crate::doctor::PlatformFacts::default()
}
