# x86_64-linux builds through Rosetta 2, when the host turned it on.
#
# The host attaches VZ's Rosetta directory share (a read-only virtiofs share)
# only when Rosetta is enabled and installed, and says so on the kernel command
# line: darwin_vz_nix.rosetta=1|0, plus darwin_vz_nix.rosetta_preserve_argv0=1|0
# for binfmt_misc's P flag, which only a macOS 14+ Rosetta supports.
#
# Why not nixpkgs' virtualisation.rosetta: it decides everything when the guest
# is built. It declares the share in fstab without nofail (a host with Rosetta
# off sends the guest to emergency mode), registers binfmt_misc through
# systemd-binfmt from a static binfmt.d file (which fails without the share),
# sets the P flag unconditionally (wrong for a macOS 13 host), and makes Nix
# advertise x86_64-linux even when nothing can run it. One guest image has to
# serve either host choice, so here the choice is read at boot:
#
# * a oneshot unit (scripts/rosetta.sh), conditional on darwin_vz_nix.rosetta=1,
#   mounts the share, registers the Rosetta binary with binfmt_misc, and writes
#   a nix.conf fragment that makes nix-daemon (started after it) offer
#   x86_64-linux;
# * nix.conf includes that fragment with `!include`, which ignores a missing
#   file: with Rosetta off, Nix offers aarch64-linux only.
#
# Flags: F (fix binary) makes the kernel open the interpreter at registration,
# so it works inside the build sandbox and chroots without the share being
# visible there; C (credentials, implies O) is what Apple's instructions
# register; P preserves argv[0] when the host allows it.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);

  # Read by nix-daemon through `!include`; absent unless Rosetta is registered.
  nixConfFragment = "/run/darwin-vz-nix/nix-rosetta.conf";

  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };
in
{
  nix.extraOptions = ''
    !include ${nixConfFragment}
  '';

  systemd.services.darwin-vz-nix-rosetta = {
    description = "Run x86_64 Linux binaries with Rosetta";
    wantedBy = [ "multi-user.target" ];
    before = [ "nix-daemon.service" ];
    unitConfig.ConditionKernelCommandLine = "${contract.kernelParams.rosetta}=1";
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      ExecStart = lib.concatStringsSep " " [
        (lib.getExe scripts.rosetta)
        contract.tags.rosetta
        contract.guest.mounts.rosetta
        contract.kernelParams.rosettaPreserveArgv0
        nixConfFragment
      ];
    };
  };
}
