# KVM in the guest, when the host gives it nested virtualization.
#
# On an Apple M3 or later with macOS 15 or later, the host may boot the guest at
# EL2 (services.darwin-vz.nestedVirtualization, `auto` by default); the kernel's
# KVM then comes up and /dev/kvm exists, and Nix can run NixOS VM tests here.
# Whether it does is known only at boot, so, like the Rosetta settings
# (rosetta.nix), it is read at runtime, never baked in:
#
# * a oneshot unit (scripts/kvm.sh), before nix-daemon, writes a nix.conf
#   fragment with `extra-system-features = kvm nixos-test` when /dev/kvm is a
#   character device, and removes it otherwise; nix.conf includes it with
#   `!include`, which ignores a missing file. Nix's sandbox then gives builds
#   that ask for kvm the device itself.
# * the same unit prints one line on the console saying which
#   (contract.json's `consoleMarkers.kvm`); the host's supervisor reads it, shows
#   it in `darwin-vz-nix status` and records it for root, whose machines line
#   then stops offering kvm to a guest that has none.
#
# The kernel. A kernel booted at EL2 on Apple silicon (VHE-only: HCR_EL2.E2H is
# RES1) needs the VHE-only boot fixes Linux has from 6.12 on; Rosetta on macOS
# before 26 needs a kernel before 6.11 (configuration.nix). One image cannot
# serve both, so `darwin-vz-nix.kernel.forNestedVirtualization` chooses: false
# (the default) keeps the Rosetta kernel, and the host's `auto` leaves nested
# virtualization off for it; true takes the newest longterm kernel this nixpkgs
# has, which nested virtualization can use and Rosetta before macOS 26 cannot.
# The nix-darwin module sets it from services.darwin-vz.rosetta and
# nestedVirtualization (nix/lib.nix, guestKernelForNestedVirtualization).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
  cfg = config.darwin-vz-nix.kernel;

  # Read by nix-daemon through `!include`; absent unless /dev/kvm exists.
  nixConfFragment = "/run/darwin-vz-nix/nix-kvm.conf";

  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };
in
{
  options.darwin-vz-nix.kernel.forNestedVirtualization = lib.mkOption {
    type = lib.types.bool;
    default = false;
    description = ''
      Boot the newest longterm kernel of this nixpkgs (Linux 6.12 or later), which
      KVM under Apple's nested virtualization needs, instead of the newest one
      before 6.11, which Rosetta before macOS 26 needs. With it, x86_64-linux
      builds through Rosetta fail on macOS 15 ("Failed to find vdso DT_HASH").
      The nix-darwin module sets it from its rosetta and nestedVirtualization
      options; a boot.kernelPackages of your own wins over both.
    '';
  };

  config = {
    nix.extraOptions = ''
      !include ${nixConfFragment}
    '';

    systemd.services.darwin-vz-nix-kvm = {
      description = "Offer kvm and nixos-test to Nix when /dev/kvm exists";
      wantedBy = [ "multi-user.target" ];
      before = [ "nix-daemon.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        # The line for the host goes to the console (hvc0, the host's console.log).
        StandardOutput = "journal+console";
        ExecStart = lib.concatStringsSep " " [
          (lib.getExe scripts.kvm)
          "/dev/kvm"
          nixConfFragment
          contract.consoleMarkers.kvm
        ];
      };
    };

    warnings =
      lib.optional
        (cfg.forNestedVirtualization && lib.versionOlder config.boot.kernelPackages.kernel.version "6.12")
        ''
          darwin-vz-nix.kernel.forNestedVirtualization is set, but the guest's kernel is
          ${config.boot.kernelPackages.kernel.version}: booting it at EL2 on Apple silicon
          needs Linux 6.12 or later, so the host's `auto` leaves nested virtualization off.
        '';
  };
}
