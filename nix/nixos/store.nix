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
# What this module does about that (the scripts are in ./scripts):
#
# * Repair before mounting (store-repair-upper.sh, in the initrd): a whiteout
#   or a partial copy in the upper layer would hide a path of the system about
#   to boot, and the boot would fail every time. Before the overlay is
#   mounted, every upper entry for a path of the registration's closure is
#   removed (the lower layer holds it complete), except finished adoptions.
#
# * Registration (store-register.sh): the host passes the guest system's
#   closureInfo registration on the kernel command line. It is loaded into the
#   database once per registration path (a marker in the database directory
#   remembers which). nix-daemon requires this unit: a daemon that does not
#   know the running system would, when the host sends one of its paths,
#   delete it from under the running programs before writing it again. A
#   missing parameter fails the unit, loudly on the console.
#
# * Adoption (store-adopt.sh, in the background): the host keeps a GC root for
#   the guest it boots, so the running system's closure stays in the lower
#   layer. Only the paths the macOS store keeps under case-hack names
#   (<name>~nix~case~hack~<n>) are copied into the upper layer with their real
#   names, so that the guest sees them as their hashes say. Registered paths
#   that have since vanished from both layers (an older system the host
#   collected) are dropped from the database.
#
# * Stale locks: Nix treats a non-empty `<path>.lock` as stale and retries the
#   lock, forever if the file stays. The host's lock files are visible in the
#   lower layer; a guest that opens one gets its own copy in the upper layer
#   (locks never cross the VM boundary). No lock survives a reboot, so
#   non-empty ones left in the upper layer are removed before nix-daemon
#   starts.
{
  config,
  lib,
  pkgs,
  ...
}:
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
  adoptedList = "/nix/var/nix/db/darwin-vz-nix-adopted";

  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };
  inherit (lib) getExe;
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

  boot.initrd.systemd.storePaths = [
    (getExe scripts.store-repair-upper)
    (getExe scripts.kernel-param)
  ];
  boot.initrd.systemd.services.darwin-vz-nix-store-repair = {
    description = "Remove whiteouts and partial copies that would hide the booted system";
    # The overlay module's rw-sysroot-nix-store.service makes the upper
    # directory; this runs between it and the overlay mount. Wanted, not
    # required: if the repair itself fails, the mount is still tried, and the
    # console shows why.
    wantedBy = [ "sysroot-nix-store.mount" ];
    before = [ "sysroot-nix-store.mount" ];
    after = [ "rw-sysroot-nix-store.service" ];
    unitConfig = {
      DefaultDependencies = false;
      RequiresMountsFor = [
        "/sysroot${upperdir}"
        "/sysroot${hostStore}"
      ];
      ConditionKernelCommandLine = registrationParam;
    };
    serviceConfig = {
      Type = "oneshot";
      StandardOutput = "journal+console";
      StandardError = "journal+console";
    };
    script = ''
      exec ${getExe scripts.store-repair-upper} \
        "$(${getExe scripts.kernel-param} ${registrationParam})" \
        /sysroot${hostStore} /sysroot${upperdir} /sysroot${adoptedList}
    '';
  };

  systemd.services.darwin-vz-nix-store = {
    description = "Register the guest system in the guest's Nix database";
    wantedBy = [ "multi-user.target" ];
    before = [ "nix-daemon.service" ];
    unitConfig.RequiresMountsFor = [
      "/nix/store"
      "/nix/var/nix"
    ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      StandardError = "journal+console";
      ExecStart = lib.concatStringsSep " " [
        (getExe scripts.store-register)
        registrationParam
        upperdir
        registeredMarker
      ];
    };
  };

  # The daemon never serves a system it has not registered.
  systemd.services.nix-daemon = {
    requires = [ "darwin-vz-nix-store.service" ];
    after = [ "darwin-vz-nix-store.service" ];
  };

  systemd.services.darwin-vz-nix-adopt-system = {
    description = "Copy the booted system's case-hacked store paths into the guest's own layer";
    wantedBy = [ "multi-user.target" ];
    after = [ "darwin-vz-nix-store.service" ];
    requires = [ "darwin-vz-nix-store.service" ];
    unitConfig.ConditionKernelCommandLine = registrationParam;
    serviceConfig = {
      # Runs in the background: nothing waits for it.
      Type = "exec";
      Nice = 19;
      IOSchedulingClass = "idle";
      ExecStart = "${getExe scripts.store-adopt-system} ${hostStore} ${adoptedList}";
    };
  };
}
