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
{ lib, pkgs, ... }:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
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
  ];

  # Rosetta for Linux reads the vDSO's DT_HASH table, which arm64 kernels stopped
  # emitting in 6.11 ("Failed to find vdso DT_HASH", UTM#6771); 6.13 then added an
  # auxv entry older Rosetta versions reject ("unhandled auxillary vector type
  # 29"). 6.6 is a longterm kernel that predates both, and nixpkgs builds and
  # caches it for aarch64-linux. Re-test x86_64 builds on every kernel bump.
  boot.kernelPackages = lib.mkDefault pkgs.linuxPackages_6_6;

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
