# The darwin-vz-nix guest: a NixOS system booted directly by Apple's
# Virtualization.framework (VZLinuxBootLoader) to serve as the Mac's Linux
# remote builder.
#
# This file owns booting and the base system: kernel, initrd, the kernel
# command line contract, and what is switched off so that a boot takes a
# second or two. Every other concern has its own module, imported below.
#
# ---------------------------------------------------------------------------
# The kernel command line
#
# There is no boot loader. The host (the Rust supervisor) builds the command
# line, in this order:
#
#   console=hvc0                    the virtio console; the host writes it to
#                                   <stateDir>/logs/console.log
#   panic=-1                        a kernel panic reboots at once; VZ turns a
#                                   guest reboot into a stop, so the supervisor
#                                   sees it and boots afresh on the next build
#   init=<system>/init              the NixOS system to boot; the systemd
#                                   initrd finds the closure from it
#   <contents of <system>/kernel-params>
#                                   what `boot.kernelParams` below (and NixOS)
#                                   put there:
#     root=fstab                      systemd initrd: take the root from the
#                                     NixOS fstab (added by NixOS)
#     loglevel=4                      kernel console verbosity (added by NixOS,
#                                     from boot.consoleLogLevel)
#     systemd.gpt_auto=0              no GPT auto-discovery: the disk is a bare
#                                     ext4 image without a partition table
#     boot.panic_on_fail              a failed initrd panics (and so, with the
#                                     host's panic=-1, stops the VM) instead of
#                                     waiting forever in emergency mode
#   darwin_vz_nix.registration=<path>
#                                   closureInfo registration of <system>; loaded
#                                   into the guest's Nix database once per path
#                                   (store.nix)
#   darwin_vz_nix.rosetta=0|1       whether the host attached the Rosetta share
#                                   (rosetta.nix)
#   darwin_vz_nix.rosetta_preserve_argv0=0|1
#                                   register Rosetta with binfmt_misc's P flag;
#                                   only a macOS 14+ host may say 1 (rosetta.nix)
#   <user extra params>             the daemon config's kernelParams, verbatim
#
# The names of the darwin_vz_nix.* parameters come from ../contract.json.
# ---------------------------------------------------------------------------
#
# Priorities, in all guest modules: a plain definition is something the guest
# needs to work with the host (extraNixOSConfig has to lib.mkForce it, and
# should not); lib.mkDefault marks a choice that extraNixOSConfig may simply
# redefine.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);

  # Kernel policy (README, "The kernel"). Rosetta for Linux reads the vDSO's
  # DT_HASH table, which arm64 kernels stopped emitting in 6.11 ("Failed to
  # find vdso DT_HASH", UTM#6771, lima#2891), and Linux 6.13 passes an auxv
  # entry (AT_HWCAP3, type 29) that Rosetta up to at least macOS 15.7 rejects
  # ("unhandled auxillary vector type 29", lima#3592, apple/container#1142).
  # One guest image serves every macOS the host supports (13 and later), so it
  # runs the newest longterm kernel older than 6.11 that this nixpkgs still
  # has — unless darwin-vz-nix.kernel.forNestedVirtualization asks for the one
  # KVM under the host's nested virtualization needs (6.12 or later, kvm.nix).
  # nixpkgs removes longterm kernels ahead of their end of life (then the
  # attribute throws, or is absent without aliases): tryEval tells.
  rosettaSafeKernels = [
    "linuxPackages_6_6"
    "linuxPackages_6_1"
  ];
  present =
    name:
    let
      probe = builtins.tryEval (pkgs ? ${name} && lib.versionOlder pkgs.${name}.kernel.version "6.11");
    in
    probe.success && probe.value;
  pinnedKernel = lib.findFirst present null rosettaSafeKernels;
  userChoseKernel = options.boot.kernelPackages.highestPrio < (lib.mkDefault null).priority;
  # KVM under the host's nested virtualization needs 6.12 or later instead
  # (kvm.nix): then the newest longterm kernel, which pkgs.linuxPackages is.
  kvmKernel = config.darwin-vz-nix.kernel.forNestedVirtualization;
in
{
  imports = [
    ./disk.nix
    ./store.nix
    ./gc.nix
    ./network.nix
    ./ssh.nix
    ./builder.nix
    ./rosetta.nix
    ./hostcache.nix
    ./boot-speed.nix
    ./kvm.nix
    ./clock.nix
  ];

  boot.kernelPackages = lib.mkDefault (
    if pinnedKernel != null && !kvmKernel then pkgs.${pinnedKernel} else pkgs.linuxPackages
  );
  assertions = [
    {
      assertion = pinnedKernel != null || kvmKernel || userChoseKernel;
      message = ''
        darwin-vz-nix: this nixpkgs has none of the kernels the guest pins
        (${lib.concatStringsSep ", " rosettaSafeKernels}): Linux before 6.11, which Rosetta
        runs on every macOS from 13 on. Choose a kernel yourself in extraNixOSConfig,
        e.g. `boot.kernelPackages = pkgs.linuxPackages_6_12;`, and check that an
        x86_64-linux build still runs (reports say Rosetta on macOS 26 copes with newer
        kernels; on older macOS, set rosetta = false or keep an older guestNixpkgs).
      '';
    }
  ];

  # VZLinuxBootLoader loads the kernel and initrd itself (direct kernel boot);
  # the disk holds no boot loader and no partition table.
  boot.loader.grub.enable = false;

  boot.initrd = {
    systemd.enable = true;
    # The lz4 legacy frame is among the fastest formats for the kernel to unpack.
    compressor = lib.mkDefault "lz4";
    # Only VZ's virtio devices exist; none of NixOS's default SATA/USB/HID
    # drivers could ever bind.
    includeDefaultModules = lib.mkDefault false;
    # Loaded at the start of stage 1 rather than on udev's coldplug: the disk,
    # the console and the shares are needed at once, and the vsock transport
    # must be up before sshd's socket is bound in stage 2.
    kernelModules = [
      "virtio_pci"
      "virtio_blk"
      "virtio_console"
      "virtio_net"
      "virtio_rng"
      "virtiofs"
      "overlay"
      "vmw_vsock_virtio_transport"
    ];
    # Present in the initrd, loaded by udev when the device shows up.
    availableKernelModules = [ "virtio_balloon" ];
  };

  boot.kernelParams = [
    "systemd.gpt_auto=0"
    "boot.panic_on_fail"
  ];

  # VZ offers no TPM; skip the TPM2 units and the tpm2-tss libraries in the initrd.
  boot.initrd.systemd.tpm2.enable = lib.mkDefault false;
  systemd.tpm2.enable = lib.mkDefault false;

  # Nobody can type on this console: a failing mount must not start an sulogin
  # shell and stall the boot. The Rosetta share, the only optional mount, is
  # not in fstab at all (rosetta.nix).
  systemd.enableEmergencyMode = lib.mkDefault false;

  # A build machine driven over SSH: no virtual consoles, keymaps or fonts, no
  # manuals, no channels, and no switching in place (a new guest is a new boot).
  console.enable = lib.mkDefault false;
  documentation.enable = lib.mkDefault false;
  nix.channel.enable = lib.mkDefault false;
  system.switch.enable = lib.mkDefault false;

  # The name the host knows the guest by.
  networking.hostName = lib.mkDefault contract.hostKeyAlias;

  # Everything stateful lives on the guest disk, which is disposable: deleting
  # disk.img resets the guest completely. So, like NixOS's own test VMs, the
  # state version follows the nixpkgs release the guest is built from.
  system.stateVersion = lib.mkDefault lib.trivial.release;
}
