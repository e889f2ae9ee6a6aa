# Seconds off the boot, and the boot's timing on the console.
#
# The path to the first build is: initrd, switch to the system, sysinit.target,
# sshd.socket, the first `sshd -i`, nix-daemon. What this module takes off it
# (each a lib.mkDefault that extraNixOSConfig may turn back; other modules
# own the rest: disk.nix no fsck, no `D! /tmp` and no lazy inode-table init,
# network.nix no firewall, ssh.nix no PAM session):
#
# * No Perl activation in stage 2. The systemd initrd runs the system's
#   activation script (users and groups by update-users-groups.pl, /etc by
#   setup-etc.pl) before switching root. Instead, where this nixpkgs has them:
#   services.userborn (users and groups from a static JSON, a small Rust
#   binary, in parallel with sysinit), system.etc.overlay (/etc as an overlay
#   of an EROFS image mounted in the initrd: nothing to copy or link), and
#   system.nixos-init (the initrd prepares the root itself, no activation
#   script at all). nixos-init needs the other two and the systemd initrd.
#   Each is set only where its option is declared, so an older guestNixpkgs
#   still evaluates.
#
# * systemd's own account of the boot (`systemd-analyze time`) is printed to
#   the console after the boot finished, on one line starting with the marker
#   in contract.json (`consoleMarkers.bootTiming`); the host reads the last
#   such line from console.log.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };
in
{
  config = lib.mkMerge [
    (lib.optionalAttrs (options.services ? userborn) {
      services.userborn.enable = lib.mkDefault true;
    })
    (lib.optionalAttrs (options.system ? etc && options.system.etc ? overlay) {
      system.etc.overlay.enable = lib.mkDefault true;
    })
    (lib.optionalAttrs (options.system ? nixos-init) {
      system.nixos-init.enable = lib.mkDefault (
        config.system.etc.overlay.enable
        && (config.services.userborn.enable or false || config.systemd.sysusers.enable or false)
        && config.boot.postBootCommands == ""
      );
    })

    {
      systemd.services.darwin-vz-nix-boot-timing = {
        description = "Print systemd's boot timing to the console";
        wantedBy = [ "multi-user.target" ];
        after = [ "multi-user.target" ];
        serviceConfig = {
          # Its start does not hold the boot up; the script waits for the end.
          Type = "exec";
          StandardOutput = "journal+console";
          ExecStart = "${lib.getExe scripts.boot-timing} ${contract.consoleMarkers.bootTiming}";
        };
      };
    }
  ];
}
