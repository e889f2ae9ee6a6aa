#!/usr/bin/env bash
# The background unit around store-adopt: the closure of the booted system,
# then store-adopt on it with /nix/store writable, then the database is told
# about paths that vanished (systems registered at earlier boots whose paths
# the host has since collected).
#
#   store-adopt-system LOWER ADOPTED
#
# Needs on PATH: darwin-vz-nix-kernel-param, darwin-vz-nix-with-writable-store,
# darwin-vz-nix-store-adopt, nix-store.
set -euo pipefail

if (($# != 2)); then
  echo "usage: store-adopt-system LOWER ADOPTED" >&2
  exit 2
fi
lower=$1
adopted=$2

# The system is the directory holding init, as the initrd reasons too.
init=$(darwin-vz-nix-kernel-param init)
if [[ -z $init ]]; then
  echo "no init= on the kernel command line" >&2
  exit 1
fi
system=$(dirname -- "$init")

status=0
nix-store --query --requisites -- "$system" \
  | darwin-vz-nix-with-writable-store darwin-vz-nix-store-adopt "$lower" /nix/store "$adopted" \
  || status=$?

# A registered path that is in neither layer any more is dropped from the
# database ("path ... disappeared, removing from database"); otherwise Nix
# would take it for present and never ask the host for it.
nix-store --verify || status=$?
exit "$status"
