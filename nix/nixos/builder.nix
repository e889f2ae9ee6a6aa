# The remote builder itself: the user the host's Nix logs in as over ssh-ng,
# and the guest's nix-daemon settings.
#
# Sizes are not fixed here: the VM's CPUs and memory are the host's choice
# (daemon config `cores`, `memory`), so they are read at boot.
#
# * max-jobs and cores fit the memory (scripts/build-limits.sh, which states
#   the rule): with 4 CPUs and 6 GiB, "auto" and 0 would allow 16 compilers at
#   once, and big builds would be OOM-killed. zram swap absorbs the peaks.
# * Build directories left by a stop mid-build (Nix >= 2.30 keeps them in
#   /nix/var/nix/builds, older Nix in /tmp) are moved aside before nix-daemon
#   starts and deleted in the background (scripts/clean-builds.sh).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
  inherit (contract.guest) user;
  cfg = config.darwin-vz-nix.builds;
  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };

  # Read by nix-daemon through `!include`, which ignores a missing file.
  limitsFragment = "/run/darwin-vz-nix/nix-build-limits.conf";
  # On the root file system, like both directories it receives from.
  trash = "/nix/var/nix/darwin-vz-nix-trash";

  # The user's own nix.settings.max-jobs or cores win over the fitted ones.
  userSizedBuilds = config.nix.settings.max-jobs != "auto" || config.nix.settings.cores != 0;
  fitBuilds = cfg.fitToMemory && !userSizedBuilds;
in
{
  options.darwin-vz-nix.builds.fitToMemory = lib.mkOption {
    type = lib.types.bool;
    default = true;
    description = ''
      Whether to size Nix's `max-jobs` and `cores` to the VM's memory and CPUs
      at boot (the rule is in scripts/build-limits.sh). Setting
      nix.settings.max-jobs or nix.settings.cores yourself turns it off too.
    '';
  };

  config = {
    users.users.${user} = {
      isNormalUser = true;
      description = "Nix remote build user (darwin-vz-nix)";
      # So that `ssh darwin-vz-nix journalctl` shows the whole guest journal.
      extraGroups = [ "systemd-journal" ];
    };

    nix.settings = {
      # ssh-ng builds hand the daemon whole derivations, which only trusted users may do.
      trusted-users = [ user ];

      sandbox = lib.mkDefault true;

      # What this machine can honestly do. NixOS adds "kvm" (and "nixos-test",
      # "gccarch-*") by default; a VZ guest has /dev/kvm only when the host gives
      # it nested virtualization, so kvm.nix adds "kvm" and "nixos-test" at boot,
      # exactly when /dev/kvm exists, and a build that requires them is otherwise
      # scheduled elsewhere rather than failing here. Replace with lib.mkForce in
      # extraNixOSConfig, and keep services.darwin-vz.supportedFeatures in step.
      system-features = lib.mkForce [
        "benchmark"
        "big-parallel"
      ];

      experimental-features = [ "nix-command" ];

      # Substituters: NixOS's default, https://cache.nixos.org, reached through
      # the NAT network (network.nix). The host's builders-use-substitutes lets
      # the guest fetch inputs itself instead of receiving them over vsock.
    };

    nix.extraOptions = lib.mkIf fitBuilds ''
      !include ${limitsFragment}
    '';

    systemd.services.darwin-vz-nix-build-limits = lib.mkIf fitBuilds {
      description = "Size Nix builds to the VM's memory and CPUs";
      wantedBy = [ "multi-user.target" ];
      before = [ "nix-daemon.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${lib.getExe scripts.build-limits} ${limitsFragment}";
      };
    };

    # Compressed swap in RAM: a build's peak is paged out to it instead of
    # being OOM-killed, and it costs nothing on the (sparse) disk image.
    zramSwap = {
      enable = lib.mkDefault true;
      memoryPercent = lib.mkDefault 50;
    };

    systemd.services.darwin-vz-nix-clean-builds = {
      description = "Move build directories left by an earlier boot aside";
      wantedBy = [ "multi-user.target" ];
      before = [ "nix-daemon.service" ];
      unitConfig.RequiresMountsFor = [ "/nix/var/nix" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${lib.getExe scripts.clean-builds} move ${trash} /nix/var/nix/builds /tmp";
      };
    };
    systemd.services.darwin-vz-nix-delete-builds = {
      description = "Delete build directories left by an earlier boot";
      wantedBy = [ "multi-user.target" ];
      after = [ "darwin-vz-nix-clean-builds.service" ];
      serviceConfig = {
        Type = "exec";
        Nice = 19;
        IOSchedulingClass = "idle";
        ExecStart = "${lib.getExe scripts.clean-builds} delete ${trash}";
      };
    };
  };
}
