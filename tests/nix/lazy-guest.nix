# The daemon config the nix-darwin module generates for a guest that is a
# derivation, for tests/contract.rs:
#
#   nix-instantiate --eval --strict --json tests/nix/lazy-guest.nix
#
# A system that carries this config must build nothing for aarch64-linux: the
# config's strings may depend on the guest's .drv file, never on an output. The
# string context is read here (JSON drops it). Builtins only: the stand-in guest is
# an aarch64-linux derivation that is never built (evaluation does not build).
let
  dvnLib = import ../../nix/lib.nix;

  # The guest and a part of it, both aarch64-linux.
  kernel = derivation {
    name = "linux";
    system = "aarch64-linux";
    builder = "/bin/sh";
  };
  guest = derivation {
    name = "darwin-vz-nix-guest";
    system = "aarch64-linux";
    builder = "/bin/sh";
    args = [
      "-c"
      "ln -s ${kernel} $out"
    ];
  };

  # The bootstrap builder's VM runner (a darwin-side derivation whose output
  # links the aarch64-linux builder system): named the same way, built by nothing.
  builderSystem = derivation {
    name = "nixos-system-nixos";
    system = "aarch64-linux";
    builder = "/bin/sh";
  };
  bootstrapVm = derivation {
    name = "nixos-vm";
    system = "aarch64-darwin";
    builder = "/bin/sh";
    args = [
      "-c"
      "ln -s ${builderSystem} $out"
    ];
  };

  options =
    dvnLib.optionDefaults
    // dvnLib.builderDefaults
    // {
      enable = true;
      inherit guest;
      systems = dvnLib.defaultSystems true;
    };
  # What the module writes: the daemon config and the bootstrap builder.
  config =
    dvnLib.daemonConfig options
    // dvnLib.bootstrapSettings {
      vm = bootstrapVm;
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeBootstrapHostKeyForTheTests000000000 root@nixos\n";
    };
  context = builtins.getContext (builtins.toJSON config);
in
{
  inherit config;
  # Store paths the config needs and how: { "<path>": { path = true; } } only.
  inherit context;
  outputDependencies = dvnLib.outputDependencies config;
  # What the config must name, for comparison (context dropped: plain strings).
  guestDrv = builtins.unsafeDiscardStringContext guest.drvPath;
  guestOut = builtins.unsafeDiscardStringContext guest.outPath;
  bootstrapDrv = builtins.unsafeDiscardStringContext bootstrapVm.drvPath;
  # The same guest named the old way, with its outputs: what the check must catch.
  withOutputs = dvnLib.outputDependencies { guest = "${guest}"; };
  # A built guest given as a path stays a guest directory.
  directory = dvnLib.daemonConfig (
    options // { guest = "/nix/store/00000000000000000000000000000000-darwin-vz-nix-guest"; }
  );
}
