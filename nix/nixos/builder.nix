# The remote builder itself: the user the host's Nix logs in as over ssh-ng,
# and the guest's nix-daemon settings.
#
# Sizes are not fixed here: the VM's CPU count is the host's choice (daemon
# config `cores`), so Nix reads it at runtime.
{ lib, ... }:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
  inherit (contract.guest) user;
in
{
  users.users.${user} = {
    isNormalUser = true;
    description = "Nix remote build user (darwin-vz-nix)";
    # So that `ssh darwin-vz-nix journalctl` shows the whole guest journal.
    extraGroups = [ "systemd-journal" ];
  };

  nix.settings = {
    # ssh-ng builds hand the daemon whole derivations, which only trusted users may do.
    trusted-users = [ user ];

    # As many jobs as the VM has CPUs, each allowed to use all of them.
    max-jobs = lib.mkDefault "auto";
    cores = lib.mkDefault 0;

    sandbox = lib.mkDefault true;

    # What this machine can honestly do. NixOS adds "kvm" (and "nixos-test",
    # "gccarch-*") by default; a VZ guest has no /dev/kvm, and a build that
    # requires it must be scheduled elsewhere rather than fail here. NixOS tests
    # need kvm as well. Replace with lib.mkForce in extraNixOSConfig, and keep
    # the host's nix.buildMachines supportedFeatures in step.
    system-features = lib.mkForce [
      "benchmark"
      "big-parallel"
    ];

    experimental-features = [ "nix-command" ];

    # Substituters: NixOS's default, https://cache.nixos.org, reached through
    # the NAT network (network.nix). The host's builders-use-substitutes lets
    # the guest fetch inputs itself instead of receiving them over vsock.
  };
}
