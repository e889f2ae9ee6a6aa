//! What the host and the guest must agree on.
//!
//! The same values live in `nix/contract.json`, which the NixOS guest reads with
//! `builtins.fromJSON`. A test (`tests/contract.rs`) fails when the two drift apart,
//! so change both together.

/// The name under which the guest's host key is pinned in `known_hosts`, and the
/// `Host` alias of the builder in `ssh_config` and `nix.buildMachines`.
pub const HOST_KEY_ALIAS: &str = "darwin-vz-nix";

/// Guest vsock port on which a systemd socket starts sshd.
pub const SSH_VSOCK_PORT: u32 = 22;
/// Guest vsock port on which a systemd socket starts the clock setter: the host
/// sends its time at every boot and after every wake (`crate::clock`).
pub const CLOCK_VSOCK_PORT: u32 = 1025;
/// Host vsock port of the host store's binary cache: the guest connects to it (CID 2).
pub const HOST_CACHE_VSOCK_PORT: u32 = 1026;

/// virtiofs tag of the host's `/nix/store` (read-only lower layer of the guest's store).
pub const TAG_HOST_STORE: &str = "nix-store";
/// virtiofs tag of the one-shot share carrying the guest's host key and authorized key.
pub const TAG_KEYS: &str = "dvn-keys";
/// virtiofs tag of the Rosetta runtime share.
pub const TAG_ROSETTA: &str = "rosetta";

/// The user that remote builds log in as.
pub const GUEST_USER: &str = "builder";
/// The guest console device behind the virtio console.
pub const GUEST_CONSOLE: &str = "hvc0";
/// The guest device of the (only) virtio block disk.
pub const GUEST_ROOT_DEVICE: &str = "/dev/vda";

/// Where the guest mounts each share.
pub const MOUNT_HOST_STORE: &str = "/nix/.ro-store";
pub const MOUNT_KEYS: &str = "/run/darwin-vz-nix/keys";
pub const MOUNT_ROSETTA: &str = "/run/rosetta";

/// File names inside the keys share.
pub const KEY_FILE_HOST_KEY: &str = "ssh_host_ed25519_key";
pub const KEY_FILE_HOST_KEY_PUB: &str = "ssh_host_ed25519_key.pub";
pub const KEY_FILE_AUTHORIZED_KEYS: &str = "authorized_keys";
/// The CA bundle the host's Nix uses, copied into the keys share when there is one
/// (`cacerts`); the guest's Nix trusts it besides NixOS's own.
pub const KEY_FILE_CA_BUNDLE: &str = "ca-bundle.crt";
/// The public half of the host cache's signing key (`name:base64`), which the
/// guest's Nix adds to `trusted-public-keys`.
pub const KEY_FILE_HOST_CACHE_KEY: &str = "nix-cache-key.pub";

/// File names inside a guest directory (one Nix derivation per guest).
pub const ARTIFACT_KERNEL: &str = "kernel";
pub const ARTIFACT_INITRD: &str = "initrd";
pub const ARTIFACT_SYSTEM: &str = "system";
pub const ARTIFACT_REGISTRATION: &str = "registration";

/// Kernel parameters the host passes and the guest reads from `/proc/cmdline`.
/// The dot makes the kernel treat them as module parameters, so they never reach
/// init's argv or environment.
pub const PARAM_REGISTRATION: &str = "darwin_vz_nix.registration";
pub const PARAM_ROSETTA: &str = "darwin_vz_nix.rosetta";
pub const PARAM_ROSETTA_PRESERVE_ARGV0: &str = "darwin_vz_nix.rosetta_preserve_argv0";
/// `=1` when the host serves its store as a binary cache on `HOST_CACHE_VSOCK_PORT`.
pub const PARAM_HOST_CACHE: &str = "darwin_vz_nix.host_cache";

/// Starts the console line on which the guest prints systemd's boot timing
/// (`guest_timing` reads the last one from the console log).
pub const CONSOLE_MARKER_BOOT_TIMING: &str = "darwin-vz-nix-boot-timing:";

/// Starts the console line on which the guest says whether it has `/dev/kvm`
/// (nix/nixos/scripts/kvm.sh; `nested::kvm_marker` reads it).
pub const CONSOLE_MARKER_KVM: &str = "darwin-vz-nix-kvm:";

/// The contract as JSON, for the test that compares it with these constants.
pub const CONTRACT_JSON: &str = include_str!("../nix/contract.json");
