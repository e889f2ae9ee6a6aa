# /nix/store in the guest, and the guest Nix database that describes it.
#
# The host's /nix/store arrives read-only over virtiofs and becomes the lower
# layer of an overlay mounted on /nix/store; the upper layer is on the guest
# disk (disk.nix). Both are mounted in the initrd, because init= points into
# the store. The guest thus boots straight from the host's copy of its system,
# and everything the guest itself writes (paths copied in by the host's Nix,
# build outputs) lands on its own disk.
#
# Why not Nix's local-overlay store: it requires a lower store that does not
# change while mounted, and the host's store never stops changing. Here the
# guest's Nix sees one ordinary local store and trusts only its own database:
# a path in the lower layer is valid to the guest only if the guest registered
# it. Everything else the host holds is, to the guest, an invalid leftover.
#
# What this module does about that:
#
# * Registration: the host passes the guest system's closureInfo registration
#   on the kernel command line. It is loaded into the database once per
#   registration path (a marker in the database directory remembers which), so
#   a new guest system registers again and an old one does not pay for it on
#   every boot. Registration must happen before nix-daemon answers anyone:
#   otherwise the daemon would treat the running system as invalid and, when
#   the host sends one of its paths, delete it (writing whiteouts over the host
#   copy) before re-adding it.
#
# * Adoption: the host keeps only the current guest system alive. Once it is
#   registered, its closure is copied into the upper layer in the background.
#   An older guest system the guest once registered stays valid in the guest's
#   database, and would otherwise vanish from under it when the host collects
#   it. Adopted paths are ordinary guest-owned paths: gc.nix reclaims them once
#   nothing uses them. The copy also undoes the macOS store's case hack (names
#   that collide case-insensitively are stored as <name>~nix~case~hack~<n>), so
#   the guest's copy matches the hash it was registered with.
#
# * Stale locks: Nix treats a non-empty `<path>.lock` as stale and retries the
#   lock, forever if the file stays. The host's lock files are visible in the
#   lower layer; a guest that opens one gets its own copy in the upper layer
#   (locks never cross the VM boundary: host and guest each lock their own
#   file). No lock survives a reboot, so non-empty ones left in the upper layer
#   are removed before nix-daemon starts.
{ config, pkgs, ... }:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);

  hostStore = contract.guest.mounts.hostStore;
  registrationParam = contract.kernelParams.registration;

  # The writable layer sits on the root file system, next to /nix/var/nix, so
  # that one disk holds both the store's contents and the database about them.
  rwStore = "/nix/.rw-store";
  upperdir = "${rwStore}/upper";

  # Markers live in the database directory: whatever resets the database resets them.
  registeredMarker = "/nix/var/nix/db/darwin-vz-nix-registered";
  adoptedMarker = "/nix/var/nix/db/darwin-vz-nix-adopted";

  # Prints the value of a kernel parameter, or nothing.
  kernelParam = pkgs.writeShellScript "kernel-param" ''
    for arg in $(< /proc/cmdline); do
      case "$arg" in
        "$1"=*) printf '%s\n' "''${arg#*=}" ;;
      esac
    done
  '';

  # NixOS bind-mounts /nix/store read-only (boot.nixStoreMountOpts) and lets
  # Nix remount it writable privately. Our own writers do the same: run under
  # `unshare --mount`, remount writable, exec the command.
  withWritableStore = pkgs.writeShellScript "with-writable-store" ''
    set -eu
    ${pkgs.util-linux}/bin/mount -o remount,bind,rw /nix/store
    exec "$@"
  '';

  # Touching a lower-layer file copies it up. The store's canonical times
  # (1 s after the epoch) are kept; -depth touches a directory after its
  # entries, whose copy-up would otherwise bump its time. Reads store paths on
  # stdin.
  #
  # A macOS store (use-case-hack) keeps names that collide case-insensitively
  # as <name>~nix~case~hack~<n>; the path's NAR, which the registration's hash
  # describes, has <name>. The adopted copy gets the real names back.
  copyUp = pkgs.writeShellScript "copy-up" ''
    set -euo pipefail
    mapfile -t paths
    (( ''${#paths[@]} )) || exit 0
    ${pkgs.findutils}/bin/find "''${paths[@]}" -depth \
      -exec ${pkgs.coreutils}/bin/touch --no-dereference --date=@1 -- {} +
    while IFS= read -r -d "" hacked; do
      ${pkgs.coreutils}/bin/mv --no-target-directory -- "$hacked" "''${hacked%~nix~case~hack~*}"
    done < <(${pkgs.findutils}/bin/find "''${paths[@]}" -depth -name '*~nix~case~hack~*' -print0)
  '';
in
{
  fileSystems.${hostStore} = {
    device = contract.tags.hostStore;
    fsType = "virtiofs";
    options = [ "ro" ];
    neededForBoot = true;
  };

  fileSystems."/nix/store" = {
    overlay = {
      lowerdir = [ hostStore ];
      inherit upperdir;
      workdir = "${rwStore}/work";
    };
    # Adoption relies on a copy-up copying the data, not just the metadata.
    options = [ "metacopy=off" ];
    # Implied for /nix/store (utils.pathsNeededForBoot); stated because init= lives here.
    neededForBoot = true;
  };

  systemd.services.darwin-vz-nix-store = {
    description = "Prepare the guest's Nix database for the host-shared store";
    wantedBy = [ "multi-user.target" ];
    before = [ "nix-daemon.service" ];
    unitConfig.RequiresMountsFor = [
      "/nix/store"
      "/nix/var/nix"
    ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    };
    path = [
      config.nix.package
      pkgs.coreutils
      pkgs.findutils
      pkgs.util-linux
    ];
    script = ''
      set -euo pipefail

      mapfile -d "" staleLocks < <(
        find ${upperdir} -mindepth 1 -maxdepth 1 -type f -name '*.lock' -size +0 \
          -printf '/nix/store/%f\0'
      )
      if (( ''${#staleLocks[@]} )); then
        echo "removing ''${#staleLocks[@]} stale store lock file(s)"
        unshare --mount --propagation private ${withWritableStore} rm -f -- "''${staleLocks[@]}"
      fi

      registration=$(${kernelParam} ${registrationParam})
      if [[ -z $registration ]]; then
        echo "no ${registrationParam}= on the kernel command line: the guest system stays unregistered" >&2
        exit 0
      fi
      if [[ $(cat ${registeredMarker} 2>/dev/null || true) == "$registration" ]]; then
        exit 0
      fi
      if [[ ! -r $registration ]]; then
        echo "$registration is missing from the host's store; the guest artifacts the host boots must stay in its store" >&2
        exit 1
      fi
      echo "registering the guest system from $registration"
      nix-store --load-db < "$registration"
      printf '%s\n' "$registration" > ${registeredMarker}
    '';
  };

  systemd.services.darwin-vz-nix-adopt-system = {
    description = "Copy the registered guest system into the guest's own store layer";
    wantedBy = [ "multi-user.target" ];
    after = [ "darwin-vz-nix-store.service" ];
    requires = [ "darwin-vz-nix-store.service" ];
    unitConfig.ConditionKernelCommandLine = registrationParam;
    serviceConfig = {
      # Runs in the background: nothing waits for it.
      Type = "exec";
      Nice = 19;
      IOSchedulingClass = "idle";
    };
    path = [
      config.nix.package
      pkgs.coreutils
      pkgs.util-linux
    ];
    script = ''
      set -euo pipefail
      registration=$(${kernelParam} ${registrationParam})
      if [[ $(cat ${adoptedMarker} 2>/dev/null || true) == "$registration" ]]; then
        exit 0
      fi
      # The system is the directory holding init, as the initrd reasons too.
      system=$(dirname "$(${kernelParam} init)")
      echo "copying the closure of $system into the guest disk"
      nix-store --query --requisites "$system" \
        | unshare --mount --propagation private ${withWritableStore} ${copyUp}
      printf '%s\n' "$registration" > ${adoptedMarker}
    '';
  };
}
