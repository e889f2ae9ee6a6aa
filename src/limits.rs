//! What a VM runner allows, decided without a Virtualization.framework object: CPU and
//! memory ranges, Rosetta availability, names of VM states.
//!
//! Plain Rust over plain numbers, tested on every platform; the VZ backend calls these
//! with the values it reads from the framework (`minimumAllowedCPUCount`, …).

const MIB: u64 = 1024 * 1024;

/// Rosetta for Linux as `VZLinuxRosettaDirectoryShare.availability` reports it,
/// without the framework type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RosettaAvailability {
    NotSupported,
    NotInstalled,
    Installed,
}

/// Why a plan that asks for Rosetta cannot boot here, or `None` when it can.
pub fn rosetta_problem(availability: RosettaAvailability) -> Option<&'static str> {
    match availability {
        RosettaAvailability::Installed => None,
        RosettaAvailability::NotSupported => {
            Some("Rosetta is not supported on this Mac; set rosetta = false")
        }
        RosettaAvailability::NotInstalled => Some(
            "Rosetta is not installed: run `softwareupdate --install-rosetta --agree-to-license`, or set rosetta = false",
        ),
    }
}

/// Rosetta availability in the form `doctor` reports it: `Ok(true)` installed,
/// `Ok(false)` installable, `Err` never usable on this Mac.
pub fn rosetta_fact(availability: RosettaAvailability) -> Result<bool, String> {
    match availability {
        RosettaAvailability::Installed => Ok(true),
        RosettaAvailability::NotInstalled => Ok(false),
        RosettaAvailability::NotSupported => {
            Err("Rosetta for Linux VMs is not supported on this Mac".to_string())
        }
    }
}

/// The CPU count for VZ, refused (never clamped) when outside what this Mac allows,
/// so the user sees which setting to change.
pub fn cpu_count(cores: u32, min: usize, max: usize) -> Result<usize, String> {
    let count = usize::try_from(cores).unwrap_or(usize::MAX);
    if (min..=max).contains(&count) {
        Ok(count)
    } else {
        Err(format!(
            "cores = {cores} is outside the range this Mac allows for a VM ({min} to {max}); set cores to a value in that range"
        ))
    }
}

/// The memory size in bytes for VZ, refused (never clamped) when outside what this
/// Mac allows. The limits come in bytes; the message speaks MiB, the unit of the
/// `memory` setting.
pub fn memory_bytes(memory_mib: u64, min_bytes: u64, max_bytes: u64) -> Result<u64, String> {
    let bytes = memory_mib.checked_mul(MIB);
    match bytes {
        Some(bytes) if (min_bytes..=max_bytes).contains(&bytes) => Ok(bytes),
        _ => Err(format!(
            "memory = {memory_mib} MiB is outside the range this Mac allows for a VM ({} to {} MiB); set memory (in MiB) to a value in that range",
            min_bytes.div_ceil(MIB),
            max_bytes / MIB
        )),
    }
}

/// A readable name for a `VZVirtualMachineState` raw value, for error messages.
pub fn state_name(raw: isize) -> &'static str {
    // The values of the VZVirtualMachineState enum (VZVirtualMachine.h).
    match raw {
        0 => "stopped",
        1 => "running",
        2 => "paused",
        3 => "in an error state",
        4 => "starting",
        5 => "pausing",
        6 => "resuming",
        7 => "stopping",
        8 => "saving",
        9 => "restoring",
        _ => "in an unknown state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rosetta_messages_say_how_to_fix_it() {
        assert_eq!(rosetta_problem(RosettaAvailability::Installed), None);
        assert_eq!(
            rosetta_problem(RosettaAvailability::NotSupported),
            Some("Rosetta is not supported on this Mac; set rosetta = false")
        );
        let missing = rosetta_problem(RosettaAvailability::NotInstalled).unwrap();
        assert!(missing.contains("softwareupdate --install-rosetta --agree-to-license"));
        assert!(missing.contains("rosetta = false"));
    }

    #[test]
    fn rosetta_facts_match_doctor_semantics() {
        assert_eq!(rosetta_fact(RosettaAvailability::Installed), Ok(true));
        assert_eq!(rosetta_fact(RosettaAvailability::NotInstalled), Ok(false));
        assert!(rosetta_fact(RosettaAvailability::NotSupported).is_err());
    }

    #[test]
    fn cpu_counts_inside_the_range_pass_unchanged() {
        assert_eq!(cpu_count(1, 1, 8), Ok(1));
        assert_eq!(cpu_count(8, 1, 8), Ok(8));
    }

    #[test]
    fn cpu_counts_outside_the_range_are_refused_not_clamped() {
        let err = cpu_count(12, 1, 8).unwrap_err();
        assert_eq!(
            err,
            "cores = 12 is outside the range this Mac allows for a VM (1 to 8); set cores to a value in that range"
        );
        assert!(cpu_count(0, 1, 8).is_err());
    }

    #[test]
    fn memory_is_converted_to_bytes_and_range_checked() {
        let min = 128 * MIB;
        let max = 16 * 1024 * MIB;
        assert_eq!(memory_bytes(6144, min, max), Ok(6144 * MIB));
        assert_eq!(memory_bytes(128, min, max), Ok(128 * MIB));
        let err = memory_bytes(32768, min, max).unwrap_err();
        assert_eq!(
            err,
            "memory = 32768 MiB is outside the range this Mac allows for a VM (128 to 16384 MiB); set memory (in MiB) to a value in that range"
        );
        assert!(memory_bytes(64, min, max).is_err());
    }

    #[test]
    fn memory_that_overflows_bytes_is_refused() {
        assert!(memory_bytes(u64::MAX, 0, u64::MAX).is_err());
    }

    #[test]
    fn limits_that_are_not_whole_mib_are_rounded_inwards() {
        let err = memory_bytes(1, MIB + 1, 3 * MIB - 1).unwrap_err();
        assert!(err.contains("(2 to 2 MiB)"), "{err}");
    }

    #[test]
    fn states_have_names() {
        assert_eq!(state_name(0), "stopped");
        assert_eq!(state_name(7), "stopping");
        assert_eq!(state_name(42), "in an unknown state");
    }
}
