# The daemon configs the nix-darwin module generates, for the Rust tests:
#
#   nix-instantiate --eval --strict --json tests/nix/daemon-config.nix
#
# prints { "<case>": <daemon JSON config>, ... }; each value must load with the
# daemon's config loader (unknown keys are an error there). Builtins only: CI has
# Nix but no nixpkgs.
let
  dvnLib = import ../../nix/lib.nix;

  # What the module passes for its `guest` option: a store path.
  guest = "/nix/store/00000000000000000000000000000000-darwin-vz-nix-guest";

  # The module's option values with nothing set, as nix-darwin hands them over
  # (options that are not daemon settings included: daemonConfig must ignore them).
  defaults =
    dvnLib.optionDefaults
    // dvnLib.builderDefaults
    // {
      enable = true;
      inherit guest;
      logFile = "/var/log/darwin-vz-nix.log";
      user = "_darwin-vz";
      uid = 455;
      gid = 455;
      groupMembers = [ ];
      systems = dvnLib.defaultSystems dvnLib.optionDefaults.rosetta;
    };
in
{
  defaults = dvnLib.daemonConfig defaults;

  # Everything a user may choose for the VM and its machines line.
  chosen = dvnLib.daemonConfig (
    defaults
    // {
      cores = 6;
      memory = 8192;
      maxJobs = 3;
      speedFactor = 2;
      systems = [ "aarch64-linux" ];
      supportedFeatures = [ "big-parallel" ];
      mandatoryFeatures = [ "dvn" ];
      nestedVirtualization = "off";
      hostStoreCache = false;
    }
  );

  no-rosetta-never-idle = dvnLib.daemonConfig (
    defaults
    // {
      rosetta = false;
      idleTimeout = 0;
      systems = dvnLib.defaultSystems false;
    }
  );

  # Builds may let the Mac sleep.
  no-prevent-sleep = dvnLib.daemonConfig (defaults // { preventSleep = false; });

  # The guest as a derivation (what the module passes by default): the daemon gets
  # its .drv and output path and realises it itself.
  lazy = dvnLib.daemonConfig (
    defaults
    // {
      guest = derivation {
        name = "darwin-vz-nix-guest";
        system = "aarch64-linux";
        builder = "/bin/sh";
      };
    }
  );

  # Every optional setting at null: the daemon gets no key and applies its default.
  minimal = dvnLib.daemonConfig {
    inherit guest;
    workingDirectory = "/var/lib/darwin-vz";
    cores = null;
    memory = null;
    diskSize = null;
    rosetta = null;
    idleTimeout = null;
    stopTimeout = null;
    kernelParams = null;
    logLevel = null;
    group = null;
    nestedVirtualization = null;
    preventSleep = null;
    hostStoreCache = null;
  };
}
