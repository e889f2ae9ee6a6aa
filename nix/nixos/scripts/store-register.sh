#!/usr/bin/env bash
# Registers the guest system's closure in the guest's Nix database, once per
# registration, before nix-daemon may answer anyone. nix-daemon requires this
# unit: without a registration the daemon would treat the running system as
# invalid and, when the host sends one of its paths, delete it from under the
# running programs before writing it again.
#
#   store-register PARAM UPPER MARKER
#
# PARAM   the kernel parameter naming the registration
# UPPER   the overlay's upper directory (stale lock files are removed there)
# MARKER  remembers the last registration loaded
#
# Needs on PATH: darwin-vz-nix-kernel-param, darwin-vz-nix-with-writable-store,
# nix-store, find.
set -euo pipefail

if (($# != 3)); then
  echo "usage: store-register PARAM UPPER MARKER" >&2
  exit 2
fi
param=$1
upper=$2
marker=$3

# Nix retries a non-empty <path>.lock forever, taking it for another process's
# lock. No lock survives a reboot, so those left in the upper layer are stale.
mapfile -d '' stale_locks < <(
  find "$upper" -mindepth 1 -maxdepth 1 -type f -name '*.lock' -size +0 \
    -printf '/nix/store/%f\0'
)
if ((${#stale_locks[@]})); then
  echo "removing ${#stale_locks[@]} stale store lock file(s)"
  darwin-vz-nix-with-writable-store rm -f -- "${stale_locks[@]}"
fi

registration=$(darwin-vz-nix-kernel-param "$param")
if [[ -z $registration ]]; then
  echo "darwin-vz-nix: no $param= on the kernel command line, so the guest system cannot be registered" \
    "and nix-daemon stays stopped; boot this guest with darwin-vz-nix, which passes it" >&2
  exit 1
fi
if [[ -f $marker && $(<"$marker") == "$registration" ]]; then
  echo "the guest system from $registration is registered"
  exit 0
fi
if [[ ! -r $registration ]]; then
  echo "darwin-vz-nix: $registration is missing from the host's store;" \
    "the guest artifacts the host boots must stay in its store" >&2
  exit 1
fi
echo "registering the guest system from $registration"
nix-store --load-db <"$registration"
printf '%s\n' "$registration" >"$marker.tmp"
mv -- "$marker.tmp" "$marker"
