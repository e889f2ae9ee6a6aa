//! What a VM runner allows, decided without a Virtualization.framework object: CPU and
//! memory ranges, Rosetta availability, names of VM states, how long VZ may take to
//! answer, what to do with a VM an earlier boot left behind, and which VZ error means
//! "this binary is not signed".
//!
//! Plain Rust over plain numbers, tested on every platform; the VZ backend calls these
//! with the values it reads from the framework (`minimumAllowedCPUCount`, …).

use std::time::Duration;

const MIB: u64 = 1024 * 1024;

/// How long the VZ backend waits for `startWithCompletionHandler:` or a forced stop
/// to call back. Lima waits 30 s for a stop ("vz timeout while waiting for stop
/// status", pkg/driver/vz/vz_driver_darwin.go); a healthy start or forced stop takes
/// well under a second. When VZ has not answered by then, the backend reports the
/// failure and keeps the VM in its slot (see [`leftover_vm`]).
pub const VZ_CALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The error for a VZ call that did not call back within [`VZ_CALLBACK_TIMEOUT`].
pub fn vz_timeout(what: &str) -> String {
    format!(
        "Virtualization.framework did not finish the {what} within {} s (vz timeout while waiting for the {what}); the VM is kept and stopped before the next boot — if this repeats, restart the daemon (`darwin-vz-nix stop --daemon`): a VM never outlives its process",
        VZ_CALLBACK_TIMEOUT.as_secs()
    )
}

/// What to do with a VM of an earlier boot that is still held when a new one starts
/// (its start or stop timed out, or its stop failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftoverVm {
    /// It has stopped (or failed): release it and boot.
    Release,
    /// It may still run: it holds the disk image open, and a second VM on the same
    /// `disk.img` would corrupt the guest's file system. Stop it first.
    StopFirst,
}

/// [`LeftoverVm`] for a `VZVirtualMachineState` raw value. Only "stopped" and
/// "error" are known to hold nothing; every other state, including ones a later
/// macOS may add, may still run.
pub fn leftover_vm(raw_state: isize) -> LeftoverVm {
    match raw_state {
        STATE_STOPPED | STATE_ERROR => LeftoverVm::Release,
        _ => LeftoverVm::StopFirst,
    }
}

/// Why a boot is refused when the VM an earlier boot left behind would not stop.
pub fn leftover_refused(boot: u64, state: &str, why: &str) -> String {
    format!(
        "the VM of boot {boot} is still {state} and did not stop ({why}); not starting a second VM on the same disk image — restart the daemon (`darwin-vz-nix stop --daemon`; under launchd it comes back), which ends every VM it ran"
    )
}

/// The entitlement every process that runs VMs must be signed with.
pub const VIRTUALIZATION_ENTITLEMENT: &str = "com.apple.security.virtualization";

/// `VZErrorDomain`, and `VZErrorInvalidVirtualMachineConfiguration` in it
/// (VZError.h), the error `validateWithError:` gives a process without
/// [`VIRTUALIZATION_ENTITLEMENT`]: "Invalid virtual machine configuration. The process
/// doesn't have the "com.apple.security.virtualization" entitlement." (as reported in
/// crc-org/vfkit#91 and ronaldoussoren/pyobjc#434).
pub const VZ_ERROR_DOMAIN: &str = "VZErrorDomain";
pub const VZ_ERROR_INVALID_CONFIGURATION: isize = 2;

/// Whether a VZ error is the missing-entitlement one: an invalid-configuration error
/// whose text names the entitlement. `texts` are the error's description and reason.
pub fn is_missing_entitlement(domain: &str, code: isize, texts: &[&str]) -> bool {
    domain == VZ_ERROR_DOMAIN
        && code == VZ_ERROR_INVALID_CONFIGURATION
        && texts
            .iter()
            .any(|text| text.contains(VIRTUALIZATION_ENTITLEMENT))
}

/// The message for a binary that lacks [`VIRTUALIZATION_ENTITLEMENT`], with the fix.
pub fn unsigned_binary(exe: &str) -> String {
    format!(
        "{exe} is not signed with the {VIRTUALIZATION_ENTITLEMENT} entitlement, so macOS refuses to run VMs; sign it: `codesign --force --sign - --entitlements resources/entitlements.plist {exe}` (scripts/codesign.sh does this after a cargo build), or use the Nix package, which is signed"
    )
}

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

// The values of the VZVirtualMachineState enum (VZVirtualMachine.h) that decisions
// here depend on.
const STATE_STOPPED: isize = 0;
const STATE_ERROR: isize = 3;

/// A readable name for a `VZVirtualMachineState` raw value, for error messages.
pub fn state_name(raw: isize) -> &'static str {
    // The values of the VZVirtualMachineState enum (VZVirtualMachine.h).
    match raw {
        STATE_STOPPED => "stopped",
        1 => "running",
        2 => "paused",
        STATE_ERROR => "in an error state",
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
    fn only_a_stopped_or_failed_leftover_vm_is_released_without_a_stop() {
        assert_eq!(leftover_vm(STATE_STOPPED), LeftoverVm::Release);
        assert_eq!(leftover_vm(STATE_ERROR), LeftoverVm::Release);
        // running, paused, starting, pausing, resuming, stopping, saving, restoring,
        // and a state a later macOS may add: each may still hold disk.img open.
        for raw in [1, 2, 4, 5, 6, 7, 8, 9, 42, -1] {
            assert_eq!(leftover_vm(raw), LeftoverVm::StopFirst, "state {raw}");
        }
    }

    #[test]
    fn a_refused_boot_names_the_leftover_and_the_way_out() {
        let text = leftover_refused(3, state_name(7), "no answer within 30 s");
        assert_eq!(
            text,
            "the VM of boot 3 is still stopping and did not stop (no answer within 30 s); not starting a second VM on the same disk image — restart the daemon (`darwin-vz-nix stop --daemon`; under launchd it comes back), which ends every VM it ran"
        );
    }

    #[test]
    fn vz_waits_are_bounded_like_limas_and_say_what_timed_out() {
        assert_eq!(VZ_CALLBACK_TIMEOUT, Duration::from_secs(30));
        let text = vz_timeout("forced stop");
        assert!(
            text.starts_with("Virtualization.framework did not finish the forced stop within 30 s"),
            "{text}"
        );
        assert!(text.contains("darwin-vz-nix stop --daemon"), "{text}");
    }

    #[test]
    fn the_missing_entitlement_error_is_told_apart_from_other_invalid_configurations() {
        // As VZ reports it (crc-org/vfkit#91): localizedDescription and the reason.
        let description = "Invalid virtual machine configuration. The process doesn\u{2019}t have the \u{201c}com.apple.security.virtualization\u{201d} entitlement.";
        let reason = "The process doesn\u{2019}t have the \u{201c}com.apple.security.virtualization\u{201d} entitlement.";
        assert!(is_missing_entitlement(
            "VZErrorDomain",
            2,
            &[description, reason]
        ));
        assert!(is_missing_entitlement("VZErrorDomain", 2, &["", reason]));
        // Another invalid configuration, another code, another domain: not it.
        assert!(!is_missing_entitlement(
            "VZErrorDomain",
            2,
            &["Virtualization is not available on this hardware."]
        ));
        assert!(!is_missing_entitlement("VZErrorDomain", 1, &[reason]));
        assert!(!is_missing_entitlement("NSCocoaErrorDomain", 2, &[reason]));
    }

    #[test]
    fn the_unsigned_binary_message_gives_the_codesign_command() {
        let text = unsigned_binary("/tmp/darwin-vz-nix");
        assert!(
            text.contains("codesign --force --sign - --entitlements resources/entitlements.plist /tmp/darwin-vz-nix"),
            "{text}"
        );
        assert!(text.contains("com.apple.security.virtualization"), "{text}");
    }

    #[test]
    fn states_have_names() {
        assert_eq!(state_name(0), "stopped");
        assert_eq!(state_name(7), "stopping");
        assert_eq!(state_name(42), "in an unknown state");
    }
}
