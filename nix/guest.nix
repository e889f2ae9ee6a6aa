# The guest the host boots, as one store path:
#
#   $out/kernel        uncompressed arm64 Image (VZLinuxBootLoader takes nothing else)
#   $out/initrd        the systemd initrd (lz4)
#   $out/system        the NixOS system (config.system.build.toplevel)
#   $out/registration  closureInfo registration of the system, for nix-store --load-db
#
# (names from contract.json's `artifacts`). `modules` are extra NixOS modules
# merged into the guest: the nix-darwin module's extraNixOSConfig.
#
# Everything here is an aarch64-linux build. The default guest must come from a
# binary cache, or from an aarch64-linux builder the Mac already has; a
# customised guest is built by the running default guest. The host boots the
# new one on its next start.
#
# passthru.config and passthru.nixos expose the evaluated configuration for
# debugging, e.g. `nix eval .#guest.config.nix.settings`.
{
  nixpkgs,
  system ? "aarch64-linux",
  modules ? [ ],
}:
let
  contract = builtins.fromJSON (builtins.readFile ./contract.json);
  inherit (contract) artifacts;

  nixos = import "${nixpkgs}/nixos/lib/eval-config.nix" {
    # The platform is set as nixpkgs.hostPlatform below; a null `system` keeps
    # evaluation pure (eval-config would fall back to builtins.currentSystem).
    system = null;
    modules = [
      ./nixos
      ({ lib, ... }: { nixpkgs.hostPlatform = lib.mkDefault system; })
    ]
    ++ modules;
  };
  inherit (nixos) config pkgs;
  inherit (pkgs) lib;

  toplevel = config.system.build.toplevel;
  closure = pkgs.closureInfo { rootPaths = [ toplevel ]; };

  # Symlinks into the system's closure: the store path references all of it.
  buildCommand = ''
    mkdir $out
    ln -s ${toplevel} $out/${artifacts.system}
    ln -s ${toplevel}/kernel $out/${artifacts.kernel}
    ln -s ${toplevel}/initrd $out/${artifacts.initrd}
    ln -s ${closure}/registration $out/${artifacts.registration}
  ''
  + lib.optionalString pkgs.stdenv.hostPlatform.isAarch64 ''
    # An arm64 Image carries the magic "ARM\x64" at offset 0x38; a compressed
    # kernel does not, and VZ fails on it without saying why. Fail here instead.
    magic=$(od --address-radix=n --format=x1 --skip-bytes=56 --read-bytes=4 \
      $out/${artifacts.kernel} | tr -d ' \n')
    if [ "$magic" != 41524d64 ]; then
      echo "$(readlink -f $out/${artifacts.kernel}) is not an uncompressed arm64 Image" \
        "(no ARM\\x64 magic at offset 0x38): VZLinuxBootLoader cannot boot it." \
        "Check boot.kernelPackages and system.boot.loader.kernelFile." >&2
      exit 1
    fi
  '';
in
pkgs.runCommand "darwin-vz-nix-guest" {
  passthru = {
    inherit nixos config toplevel;
  };
} buildCommand
