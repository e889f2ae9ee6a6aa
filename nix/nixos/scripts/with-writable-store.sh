#!/usr/bin/env bash
# Runs a command with /nix/store writable, in a mount namespace of its own.
#
#   with-writable-store COMMAND [ARG...]
#
# NixOS bind-mounts /nix/store read-only (boot.nixStoreMountOpts) and Nix
# remounts it writable privately; the guest's own store writers do the same.
set -euo pipefail

if (($# == 0)); then
  echo "usage: with-writable-store COMMAND [ARG...]" >&2
  exit 2
fi
if [[ ${1:-} != --in-namespace ]]; then
  exec unshare --mount --propagation private "$0" --in-namespace "$@"
fi
shift
mount -o remount,bind,rw /nix/store
exec "$@"
