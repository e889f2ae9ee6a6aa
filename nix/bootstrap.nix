# The bootstrap builder: nixpkgs' darwin.linux-builder, as the daemon runs it while
# the first guest is built (src/bootstrap, docs/bootstrap.md).
#
# `pkgs` is an aarch64-darwin package set of a nixpkgs-unstable revision (the
# guest's own, by default): Hydra builds darwin.linux-builder for every such
# revision, so its aarch64-linux system comes from cache.nixos.org. Only the
# VM runner is changed: its stock port forward (0.0.0.0:31022) is dropped, since
# the daemon adds 127.0.0.1:PORT at run time (QEMU_NET_OPTS). forwardPorts feeds
# only the runner (a darwin-side derivation), not the aarch64-linux system.
#
# Returns the runner (system.build.vm) and the host key the builder's sshd
# presents, read from the builder's own configuration (public in nixpkgs).
{ pkgs }:
let
  builder = pkgs.darwin.linux-builder.override {
    modules = [
      (
        { lib, ... }:
        {
          virtualisation.forwardPorts = lib.mkForce [ ];
        }
      )
    ];
  };
  inherit (builder) nixosConfig;
  hostKeyFile = nixosConfig.environment.etc."ssh/ssh_host_ed25519_key.pub";
in
{
  vm = nixosConfig.system.build.vm;
  hostKey =
    if hostKeyFile.text != null then hostKeyFile.text else builtins.readFile hostKeyFile.source;
}
