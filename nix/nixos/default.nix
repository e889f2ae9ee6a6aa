# The darwin-vz-nix guest as a single NixOS module: configuration.nix and the
# modules it imports (disk, store, gc, network, ssh, builder, rosetta). This is
# what flake.nix can export as a nixosModule; ../guest.nix evaluates it into
# the artifacts the host boots.
{
  imports = [ ./configuration.nix ];
}
