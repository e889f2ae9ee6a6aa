# The ssh_config Host block the nix-darwin module installs, for the Rust test that
# compares it byte for byte with `darwin-vz-nix ssh-config`:
#
#   nix-instantiate --eval --strict --json tests/nix/ssh-config.nix
#
# prints { cases = [ { bin, stateDir, text } ... ]; rejected = [ { stateDir, rejected } ... ] }.
# For each case the CLI, given the same --state-dir and proxy binary, must print
# `text`; for each rejected state directory Nix refuses to write the block (and the
# CLI should refuse too). Builtins only.
let
  inherit ((import ../../nix/lib.nix)) sshConfig;

  bin = "/nix/store/00000000000000000000000000000000-darwin-vz-nix-0.1.0/bin/darwin-vz-nix";

  case = stateDir: {
    inherit bin stateDir;
    text = sshConfig { inherit bin stateDir; };
  };

  refuses =
    stateDir:
    let
      attempt = builtins.tryEval (builtins.deepSeq (sshConfig { inherit bin stateDir; }) true);
    in
    {
      inherit stateDir;
      rejected = !attempt.success;
    };
in
{
  cases = map case [
    "/var/lib/darwin-vz"
    # A space needs the quotes; % must be doubled, or ssh expands it as a token.
    "/Volumes/Build Disk/darwin-vz 100%"
  ];

  rejected = map refuses [
    "/tmp/a\"b"
    "/tmp/a\nb"
    "/tmp/a$b"
    "/tmp/a`b"
    "/tmp/a\\b"
  ];
}
