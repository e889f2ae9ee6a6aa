//! Boot plan → `VZVirtualMachineConfiguration`.
//!
//! A literal translation: one small function per `Device`, no defaults and no choices
//! of its own. Anything VZ refuses comes back as `BackendError::Invalid` with VZ's
//! own words and, where we know it, the setting to change.

use std::path::Path;

use objc2::rc::Retained;
use objc2::{AnyThread, ClassType, available};
use objc2_foundation::{NSArray, NSError, NSString, NSURL};
use objc2_virtualization::{
    VZDirectorySharingDeviceConfiguration, VZDiskImageCachingMode,
    VZDiskImageStorageDeviceAttachment, VZDiskImageSynchronizationMode,
    VZEntropyDeviceConfiguration, VZFileSerialPortAttachment, VZGenericPlatformConfiguration,
    VZLinuxBootLoader, VZLinuxRosettaAvailability, VZLinuxRosettaDirectoryShare, VZMACAddress,
    VZMemoryBalloonDeviceConfiguration, VZNATNetworkDeviceAttachment, VZNetworkDeviceConfiguration,
    VZSerialPortConfiguration, VZSharedDirectory, VZSingleDirectoryShare,
    VZSocketDeviceConfiguration, VZStorageDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration,
    VZVirtioFileSystemDeviceConfiguration, VZVirtioNetworkDeviceConfiguration,
    VZVirtioSocketDeviceConfiguration, VZVirtioTraditionalMemoryBalloonDeviceConfiguration,
    VZVirtualMachineConfiguration,
};

use crate::backend::BackendError;
use crate::limits::{self, RosettaAvailability};
use crate::plan::{
    BootPlan, ConsoleDevice, Device, DiskCaching, DiskDevice, DiskSync, NetworkAttachment,
    NetworkDevice, RosettaDevice, ShareDevice,
};

/// Builds and validates the configuration for `plan`.
pub fn build(plan: &BootPlan) -> Result<Retained<VZVirtualMachineConfiguration>, BackendError> {
    // SAFETY: a plain allocation and init of a configuration object we own.
    let config = unsafe { VZVirtualMachineConfiguration::new() };
    let boot_loader = boot_loader(plan)?;
    let platform = generic_platform(plan.nested_virtualization.enabled)?;
    let cpus = cpu_count(plan.cpus)?;
    let memory = memory_size(plan.memory_mib)?;
    // SAFETY: setters on a configuration that is not shared with anything yet.
    unsafe {
        config.setBootLoader(Some(&boot_loader.into_super()));
        config.setPlatform(&platform.into_super());
        config.setCPUCount(cpus);
        config.setMemorySize(memory);
    }
    let mut devices = Devices::default();
    for device in &plan.devices {
        devices.add(device)?;
    }
    devices.install(&config);
    validate(&config)?;
    Ok(config)
}

/// Text of an `NSError` for our messages: VZ puts the useful part in
/// `localizedDescription`.
pub fn describe(error: &NSError) -> String {
    error.localizedDescription().to_string()
}

/// Whether VZ refused because this process lacks the virtualization entitlement
/// (an invalid-configuration error naming it; `limits::is_missing_entitlement`).
fn missing_entitlement(error: &NSError) -> bool {
    let reason = error
        .localizedFailureReason()
        .map(|reason| reason.to_string())
        .unwrap_or_default();
    limits::is_missing_entitlement(
        &error.domain().to_string(),
        error.code(),
        &[&describe(error), &reason],
    )
}

/// A VZ error as ours: the missing entitlement becomes `Unsupported`, with the
/// codesign command for this very binary; anything else goes to `otherwise`.
fn vz_error(error: &NSError, otherwise: impl FnOnce(String) -> BackendError) -> BackendError {
    if missing_entitlement(error) {
        let exe = std::env::current_exe()
            .map(|path| path.display().to_string())
            .unwrap_or_else(|_| "darwin-vz-nix".into());
        BackendError::Unsupported(limits::unsigned_binary(&exe))
    } else {
        otherwise(describe(error))
    }
}

/// The error of a start that VZ refused (`startWithCompletionHandler:`).
pub fn start_error(error: &NSError) -> BackendError {
    vz_error(error, BackendError::Start)
}

fn invalid(message: impl Into<String>) -> BackendError {
    BackendError::Invalid(message.into())
}

fn file_url(path: &Path) -> Result<Retained<NSURL>, BackendError> {
    NSURL::from_file_path(path)
        .ok_or_else(|| invalid(format!("{} is not a usable file path", path.display())))
}

fn directory_url(path: &Path) -> Result<Retained<NSURL>, BackendError> {
    NSURL::from_directory_path(path)
        .ok_or_else(|| invalid(format!("{} is not a usable directory path", path.display())))
}

fn boot_loader(plan: &BootPlan) -> Result<Retained<VZLinuxBootLoader>, BackendError> {
    let kernel = file_url(&plan.kernel)?;
    let initrd = file_url(&plan.initrd)?;
    let command_line = NSString::from_str(&plan.command_line_string());
    // SAFETY: init and setters of a boot loader we own; the URLs are file URLs.
    unsafe {
        let loader = VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &kernel);
        loader.setInitialRamdiskURL(Some(&initrd));
        loader.setCommandLine(&command_line);
        Ok(loader)
    }
}

/// `VZLinuxBootLoader` is only valid with the generic platform (macOS 12+). With
/// `nested`, the guest boots at EL2 with nested virtualization (macOS 15+, M3 or
/// later); the plan asks for it only where `nested::decide` found the Mac able, and
/// this checks again with VZ itself.
fn generic_platform(
    nested: bool,
) -> Result<Retained<VZGenericPlatformConfiguration>, BackendError> {
    // SAFETY: plain init of a platform configuration we own.
    let platform = unsafe { VZGenericPlatformConfiguration::new() };
    if nested {
        if !available!(macos = 15.0) {
            return Err(invalid(
                "nested virtualization needs macOS 15 or later; set nestedVirtualization = auto or off",
            ));
        }
        // SAFETY: a class property without preconditions (macOS 15+, checked above).
        if !unsafe { VZGenericPlatformConfiguration::isNestedVirtualizationSupported() } {
            return Err(invalid(
                "this Mac has no nested virtualization (it needs an Apple M3 or later); set nestedVirtualization = auto or off",
            ));
        }
        // SAFETY: a setter on a platform configuration we own (macOS 15+).
        unsafe { platform.setNestedVirtualizationEnabled(true) };
    }
    Ok(platform)
}

/// What VZ says about nested virtualization on this Mac; `None` before macOS 15,
/// where the question does not exist.
pub fn nested_virtualization_supported() -> Option<bool> {
    if available!(macos = 15.0) {
        // SAFETY: a class property without preconditions, callable on any thread
        // (macOS 15+, checked above).
        Some(unsafe { VZGenericPlatformConfiguration::isNestedVirtualizationSupported() })
    } else {
        None
    }
}

fn cpu_count(cores: u32) -> Result<usize, BackendError> {
    // SAFETY: class properties without preconditions.
    let (min, max) = unsafe {
        (
            VZVirtualMachineConfiguration::minimumAllowedCPUCount(),
            VZVirtualMachineConfiguration::maximumAllowedCPUCount(),
        )
    };
    limits::cpu_count(cores, min, max).map_err(invalid)
}

fn memory_size(memory_mib: u64) -> Result<u64, BackendError> {
    // SAFETY: class properties without preconditions.
    let (min, max) = unsafe {
        (
            VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
        )
    };
    limits::memory_bytes(memory_mib, min, max).map_err(invalid)
}

fn validate(config: &VZVirtualMachineConfiguration) -> Result<(), BackendError> {
    // SAFETY: validation only reads the configuration we built.
    unsafe { config.validateWithError() }.map_err(|error| {
        vz_error(&error, |text| {
            invalid(format!("the VM configuration is invalid: {text}"))
        })
    })
}

/// The configured devices, grouped the way `VZVirtualMachineConfiguration` wants them.
#[derive(Default)]
struct Devices {
    storage: Vec<Retained<VZStorageDeviceConfiguration>>,
    network: Vec<Retained<VZNetworkDeviceConfiguration>>,
    shares: Vec<Retained<VZDirectorySharingDeviceConfiguration>>,
    sockets: Vec<Retained<VZSocketDeviceConfiguration>>,
    entropy: Vec<Retained<VZEntropyDeviceConfiguration>>,
    serial: Vec<Retained<VZSerialPortConfiguration>>,
    balloons: Vec<Retained<VZMemoryBalloonDeviceConfiguration>>,
}

impl Devices {
    fn add(&mut self, device: &Device) -> Result<(), BackendError> {
        match device {
            Device::Disk(disk) => self.storage.push(disk_device(disk)?.into_super()),
            Device::Network(net) => self.network.push(network_device(net)?.into_super()),
            Device::Share(share) => self.shares.push(share_device(share)?.into_super()),
            Device::Rosetta(rosetta) => self.shares.push(rosetta_device(rosetta)?.into_super()),
            Device::Vsock => self.sockets.push(vsock_device().into_super()),
            Device::Entropy => self.entropy.push(entropy_device().into_super()),
            Device::Console(console) => self.serial.push(console_device(console)?.into_super()),
            Device::MemoryBalloon => self.balloons.push(balloon_device().into_super()),
        }
        Ok(())
    }

    fn install(&self, config: &VZVirtualMachineConfiguration) {
        // SAFETY: setters on a configuration that is not shared with anything yet;
        // each array holds objects of the class the setter expects.
        unsafe {
            config.setStorageDevices(&NSArray::from_retained_slice(&self.storage));
            config.setNetworkDevices(&NSArray::from_retained_slice(&self.network));
            config.setDirectorySharingDevices(&NSArray::from_retained_slice(&self.shares));
            config.setSocketDevices(&NSArray::from_retained_slice(&self.sockets));
            config.setEntropyDevices(&NSArray::from_retained_slice(&self.entropy));
            config.setSerialPorts(&NSArray::from_retained_slice(&self.serial));
            config.setMemoryBalloonDevices(&NSArray::from_retained_slice(&self.balloons));
        }
    }
}

fn caching_mode(caching: DiskCaching) -> VZDiskImageCachingMode {
    match caching {
        DiskCaching::Cached => VZDiskImageCachingMode::Cached,
    }
}

fn sync_mode(sync: DiskSync) -> VZDiskImageSynchronizationMode {
    match sync {
        DiskSync::Fsync => VZDiskImageSynchronizationMode::Fsync,
    }
}

fn disk_device(
    disk: &DiskDevice,
) -> Result<Retained<VZVirtioBlockDeviceConfiguration>, BackendError> {
    let url = file_url(&disk.path)?;
    let refused = |error: Retained<NSError>| {
        invalid(format!(
            "disk image {}: {}",
            disk.path.display(),
            describe(&error)
        ))
    };
    // SAFETY: init of an attachment we own from a file URL; errors come back as NSError.
    let attachment = unsafe {
        VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_cachingMode_synchronizationMode_error(
            VZDiskImageStorageDeviceAttachment::alloc(),
            &url,
            disk.read_only,
            caching_mode(disk.caching),
            sync_mode(disk.sync),
        )
    }
    .map_err(refused)?;
    // SAFETY: init of a block device with the attachment we just made.
    Ok(unsafe {
        VZVirtioBlockDeviceConfiguration::initWithAttachment(
            VZVirtioBlockDeviceConfiguration::alloc(),
            attachment.as_super(),
        )
    })
}

fn network_device(
    net: &NetworkDevice,
) -> Result<Retained<VZVirtioNetworkDeviceConfiguration>, BackendError> {
    let text = net.mac.to_string();
    let string = NSString::from_str(&text);
    // SAFETY: init from a string; returns nil (None) when the string is not a MAC.
    let mac = unsafe { VZMACAddress::initWithString(VZMACAddress::alloc(), &string) }
        .ok_or_else(|| {
            invalid(format!(
                "Virtualization.framework refused the MAC address {text}; it must look like 0a:1b:2c:3d:4e:5f"
            ))
        })?;
    let attachment = match net.attachment {
        // SAFETY: plain init of a NAT attachment we own.
        NetworkAttachment::Nat => unsafe { VZNATNetworkDeviceAttachment::new() },
    };
    // SAFETY: init and setters of a device configuration we own.
    unsafe {
        let device = VZVirtioNetworkDeviceConfiguration::new();
        device.setAttachment(Some(attachment.as_super()));
        device.setMACAddress(&mac);
        Ok(device)
    }
}

/// A virtiofs device carrying `tag`, after VZ's own tag check.
fn file_system_device(
    tag: &str,
) -> Result<Retained<VZVirtioFileSystemDeviceConfiguration>, BackendError> {
    let tag_string = NSString::from_str(tag);
    // SAFETY: a class method that only reads the string.
    unsafe { VZVirtioFileSystemDeviceConfiguration::validateTag_error(&tag_string) }
        .map_err(|error| invalid(format!("virtiofs tag {tag:?}: {}", describe(&error))))?;
    // SAFETY: init with a tag VZ just accepted.
    Ok(unsafe {
        VZVirtioFileSystemDeviceConfiguration::initWithTag(
            VZVirtioFileSystemDeviceConfiguration::alloc(),
            &tag_string,
        )
    })
}

fn share_device(
    share: &ShareDevice,
) -> Result<Retained<VZVirtioFileSystemDeviceConfiguration>, BackendError> {
    let device = file_system_device(&share.tag)?;
    let url = directory_url(&share.path)?;
    // SAFETY: inits and a setter on objects we own.
    unsafe {
        let directory = VZSharedDirectory::initWithURL_readOnly(
            VZSharedDirectory::alloc(),
            &url,
            share.read_only,
        );
        let single =
            VZSingleDirectoryShare::initWithDirectory(VZSingleDirectoryShare::alloc(), &directory);
        device.setShare(Some(single.as_super()));
    }
    Ok(device)
}

/// What `VZLinuxRosettaDirectoryShare.availability` says, as a plain enum.
/// Needs macOS 13: callers check the version first.
pub fn rosetta_availability() -> RosettaAvailability {
    // SAFETY: a class property without preconditions (macOS 13+, the floor that
    // `VzBackend::new` checks).
    match unsafe { VZLinuxRosettaDirectoryShare::availability() } {
        VZLinuxRosettaAvailability::Installed => RosettaAvailability::Installed,
        VZLinuxRosettaAvailability::NotInstalled => RosettaAvailability::NotInstalled,
        _ => RosettaAvailability::NotSupported,
    }
}

fn rosetta_device(
    rosetta: &RosettaDevice,
) -> Result<Retained<VZVirtioFileSystemDeviceConfiguration>, BackendError> {
    if let Some(problem) = limits::rosetta_problem(rosetta_availability()) {
        return Err(invalid(problem));
    }
    // Translation caching (VZLinuxRosettaAbstractSocketCachingOptions /
    // VZLinuxRosettaUnixSocketCachingOptions, macOS 14+) is not set: it needs a
    // rosettad running in the guest, which the guest does not run yet, and the plan
    // does not ask for it. When it does, guard it with `available!(macos = 14.0)`.
    // SAFETY: init of the Rosetta share; failures come back as NSError.
    let share = unsafe {
        VZLinuxRosettaDirectoryShare::initWithError(VZLinuxRosettaDirectoryShare::alloc())
    }
    .map_err(|error| {
        invalid(format!(
            "Rosetta could not be shared with the guest: {}; set rosetta = false to boot without it",
            describe(&error)
        ))
    })?;
    let device = file_system_device(&rosetta.tag)?;
    // SAFETY: a setter on a device configuration we own.
    unsafe { device.setShare(Some(share.as_super())) };
    Ok(device)
}

fn vsock_device() -> Retained<VZVirtioSocketDeviceConfiguration> {
    // SAFETY: plain init of a device configuration we own.
    unsafe { VZVirtioSocketDeviceConfiguration::new() }
}

fn entropy_device() -> Retained<VZVirtioEntropyDeviceConfiguration> {
    // SAFETY: plain init of a device configuration we own.
    unsafe { VZVirtioEntropyDeviceConfiguration::new() }
}

fn console_device(
    console: &ConsoleDevice,
) -> Result<Retained<VZVirtioConsoleDeviceSerialPortConfiguration>, BackendError> {
    let url = file_url(&console.log)?;
    // SAFETY: init of a file attachment we own; errors come back as NSError.
    let attachment = unsafe {
        VZFileSerialPortAttachment::initWithURL_append_error(
            VZFileSerialPortAttachment::alloc(),
            &url,
            true,
        )
    }
    .map_err(|error| {
        invalid(format!(
            "console log {}: {}",
            console.log.display(),
            describe(&error)
        ))
    })?;
    // SAFETY: init and a setter on a serial port configuration we own.
    unsafe {
        let port = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        port.setAttachment(Some(attachment.as_super()));
        Ok(port)
    }
}

fn balloon_device() -> Retained<VZVirtioTraditionalMemoryBalloonDeviceConfiguration> {
    // SAFETY: plain init of a device configuration we own.
    unsafe { VZVirtioTraditionalMemoryBalloonDeviceConfiguration::new() }
}
