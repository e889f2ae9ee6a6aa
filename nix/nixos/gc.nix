# Garbage collection that frees the guest disk and leaves the host's store alone.
#
# Nix's own collector (nix-collect-garbage, nix.gc.automatic, and the automatic
# collection that the min-free/max-free settings trigger during builds) deletes
# every store entry it finds that is not valid in its database. In this guest
# that is almost the whole lower layer, the host's store (store.nix). Deleting
# there frees nothing on the guest disk; the overlay writes a whiteout for every
# such path, after walking each of them file by file. The automatic collection
# would go on doing so until it had freed max-free bytes, which whiteouts never
# free.
#
# So the guest collects differently: when free space on its disk falls below
# `darwin-vz-nix.gc.minFree`, it asks Nix for the dead paths, keeps those that
# exist in the upper layer (the guest's own copies: paths the host sent, build
# outputs, adopted systems) and deletes only those, through Nix, so the database
# stays right. Paths that live only in the lower layer are never touched. The
# check runs every few minutes while the VM is up; it costs one statfs.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.darwin-vz-nix.gc;
  inherit (config.fileSystems."/nix/store".overlay) upperdir;
in
{
  options.darwin-vz-nix.gc = {
    enable =
      lib.mkEnableOption "collecting the guest's own dead store paths when its disk runs low"
      // {
        default = true;
      };

    minFree = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 5 * 1024 * 1024 * 1024;
      defaultText = lib.literalExpression "5 * 1024 * 1024 * 1024";
      description = ''
        Free bytes on the guest disk below which the guest deletes every dead
        store path it owns. Dead paths that only the host's store holds are
        never deleted.
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
        };
        path = [
          config.nix.package
          pkgs.coreutils
          pkgs.findutils
        ];
        script = ''
          set -euo pipefail
          free=$(df --output=avail --block-size=1 / | tail -n 1)
          if (( free >= ${toString cfg.minFree} )); then
            exit 0
          fi
          echo "$free bytes free on the guest disk, below ${toString cfg.minFree}: collecting the guest's dead paths"

          # A path is the guest's own if the upper layer holds a real entry for
          # it; a character device there is a whiteout, i.e. already gone.
          nix-store --gc --print-dead \
            | while IFS= read -r path; do
                entry=${upperdir}/''${path#/nix/store/}
                if [[ ( -e $entry || -L $entry ) && ! -c $entry ]]; then
                  printf '%s\0' "$path"
                fi
              done \
            | xargs --null --no-run-if-empty nix-store --delete \
            || echo "some paths came alive while collecting; the next run picks up the rest" >&2
          df --human-readable /
        '';
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
