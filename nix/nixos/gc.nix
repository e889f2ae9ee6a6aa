# Garbage collection that frees the guest disk and leaves the host's store alone.
#
# Nix's own collector (nix-collect-garbage, nix.gc.automatic, and the automatic
# collection that the min-free/max-free settings trigger during builds) deletes
# every store entry it finds that is not valid in its database. In this guest
# that is almost the whole lower layer, the host's store (store.nix). Deleting
# there frees nothing on the guest disk; the overlay writes a whiteout for every
# such path, after walking each of them file by file.
#
# So the guest collects differently (scripts/gc.sh, scripts/gc-select.sh): when
# free space on its disk falls below the threshold, it asks Nix for the dead
# paths and deletes, through Nix so the database stays right, only those that
# the upper layer holds and the host's store does not. A path both layers hold
# is left alone: deleting it would free little and leave a whiteout that hides
# the host's copy from every later guest. When a collection cannot get above
# the threshold, the next one waits twice as long (up to an hour), so a small
# disk is not rescanned every two minutes forever.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
  cfg = config.darwin-vz-nix.gc;
  inherit (config.fileSystems."/nix/store".overlay) upperdir;
  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };
in
{
  options.darwin-vz-nix.gc = {
    enable =
      lib.mkEnableOption "collecting the guest's own dead store paths when its disk runs low"
      // {
        default = true;
      };

    minFree = lib.mkOption {
      type = lib.types.nullOr lib.types.ints.positive;
      default = null;
      example = 20 * 1024 * 1024 * 1024;
      description = ''
        Free bytes on the guest disk below which the guest deletes the dead
        store paths only it holds. `null` uses
        {option}`darwin-vz-nix.gc.minFreePercent` of the disk's size instead.
      '';
    };

    minFreePercent = lib.mkOption {
      type = lib.types.ints.between 1 90;
      default = 10;
      description = ''
        The threshold as a share of the guest disk's size, when
        {option}`darwin-vz-nix.gc.minFree` is `null`: with the default 10,
        about 10 GiB of a 100 GiB disk, 51 MiB of the smallest (512 MiB).
      '';
    };
  };

  config = lib.mkMerge [
    {
      warnings =
        lib.optional (config.nix.settings ? min-free) ''
          nix.settings.min-free makes the guest's nix-daemon collect garbage on its own,
          which writes whiteouts over the host's whole store instead of freeing guest disk.
          Use darwin-vz-nix.gc.minFree instead.
        ''
        ++ lib.optional config.nix.gc.automatic ''
          nix.gc.automatic runs nix-collect-garbage in the guest, which writes whiteouts
          over the host's whole store instead of freeing guest disk. Use darwin-vz-nix.gc instead.
        '';
    }

    (lib.mkIf cfg.enable {
      systemd.services.darwin-vz-nix-gc = {
        description = "Delete dead store paths from the guest disk when it runs low";
        after = [ "darwin-vz-nix-store.service" ];
        serviceConfig = {
          Type = "oneshot";
          Nice = 19;
          IOSchedulingClass = "idle";
          ExecStart = lib.concatStringsSep " " [
            (lib.getExe scripts.gc)
            "/"
            contract.guest.mounts.hostStore
            upperdir
            (toString (if cfg.minFree == null then 0 else cfg.minFree))
            (toString cfg.minFreePercent)
            "/run/darwin-vz-nix/gc-backoff"
          ];
        };
      };

      systemd.timers.darwin-vz-nix-gc = {
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnBootSec = "2min";
          OnUnitInactiveSec = "2min";
        };
      };
    })
  ];
}
