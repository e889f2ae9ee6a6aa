# The nix-darwin module's checks that need no nixpkgs, for tests/contract.rs:
#
#   nix-instantiate --eval --strict --json tests/nix/module-checks.nix
#
# Each list holds the inputs and what nix/lib.nix answers; the Rust test holds the
# expected answers. Builtins only.
let
  dvnLib = import ../../nix/lib.nix;
in
{
  # services.darwin-vz.{user,uid,group,gid} -> the assertion messages (none = accepted).
  accounts = map (account: account // { problems = dvnLib.accountProblems account; }) [
    {
      user = "_darwin-vz";
      uid = 455;
      group = "_darwin-vz";
      gid = 455;
    }
    {
      user = "_darwin-vz";
      uid = 455;
      group = "admin";
      gid = 80;
    }
    {
      user = "_darwin-vz";
      uid = 455;
      group = "staff";
      gid = 455;
    }
    {
      user = "_darwin-vz";
      uid = 455;
      group = "everyone";
      gid = 455;
    }
    {
      user = "alice";
      uid = 501;
      group = "_darwin-vz";
      gid = 455;
    }
    {
      user = "_darwin-vz";
      uid = 70;
      group = "_darwin-vz";
      gid = 455;
    }
    {
      user = "_oahd";
      uid = 441;
      group = "com.apple.access_ssh";
      gid = 399;
    }
  ];

  # (services.darwin-vz.workingDirectory, nix.linux-builder.workingDirectory) -> overlap?
  overlaps = map (pair: pair // { overlap = dvnLib.pathsOverlap pair.ours pair.linuxBuilder; }) [
    {
      ours = "/var/lib/darwin-vz";
      linuxBuilder = "/var/lib/linux-builder";
    }
    {
      ours = "/var/lib/linux-builder";
      linuxBuilder = "/var/lib/linux-builder";
    }
    {
      ours = "/var/lib/linux-builder/";
      linuxBuilder = "/var/lib/linux-builder";
    }
    {
      ours = "/var/lib/linux-builder/vz";
      linuxBuilder = "/var/lib/linux-builder";
    }
    {
      ours = "/private/var/lib/Linux-Builder/./vz";
      linuxBuilder = "/var/lib/linux-builder";
    }
    {
      ours = "/var/lib";
      linuxBuilder = "/var/lib/linux-builder";
    }
    {
      ours = "/var/lib/linux-builder-vz";
      linuxBuilder = "/var/lib/linux-builder";
    }
    {
      ours = "/var/lib/darwin-vz/../linux-builder";
      linuxBuilder = "/var/lib/linux-builder";
    }
  ];

  # The root-owned file the builder's line is written to, and the line the module
  # adds to /etc/nix/machines for it.
  inherit (dvnLib) machinesFile;
  machinesInclude = dvnLib.machinesInclude dvnLib.machinesFile;

  defaultSystems = {
    rosetta = dvnLib.defaultSystems true;
    noRosetta = dvnLib.defaultSystems false;
  };

  inherit (dvnLib)
    builderDefaults
    defaultSupportedFeatures
    nestedVirtualizationValues
    x86Alias
    ;

  # Where the daemon records its guest report, for a state directory written with
  # and without a trailing slash.
  guestReportFiles = map dvnLib.guestReportFile [
    "/var/lib/darwin-vz"
    "/var/lib/darwin-vz/"
  ];

  # The launchd job that has root write the builder's line again when the report
  # changes (nix-darwin's launchd.daemons.<name>).
  machinesRefresh = dvnLib.machinesRefreshDaemon {
    program = "/nix/store/00000000000000000000000000000000-darwin-vz-nix/bin/darwin-vz-nix";
    configFile = "/nix/store/00000000000000000000000000000000-darwin-vz-nix.json";
    stateDir = "/var/lib/darwin-vz";
  };

  # (rosetta, nestedVirtualization) -> does the guest take the kernel KVM can use?
  guestKernel =
    map
      (
        case:
        case
        // {
          kvmKernel = dvnLib.guestKernelForNestedVirtualization case;
        }
      )
      (
        builtins.concatMap
          (
            rosetta:
            map (nestedVirtualization: {
              inherit rosetta nestedVirtualization;
            }) dvnLib.nestedVirtualizationValues
          )
          [
            true
            false
          ]
      );
  inherit (dvnLib) guestKernelModule;
}
