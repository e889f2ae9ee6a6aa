#!/usr/bin/env bash
# Offers Nix the kvm and nixos-test system features when /dev/kvm exists, and
# says on the console whether it does, on one line starting with MARKER; the
# host's supervisor reads the last such line from console.log and tells root's
# `darwin-vz-nix machines`, which takes kvm away from a guest without it.
#
#   kvm DEVICE FRAGMENT MARKER
#
# DEVICE is /dev/kvm (a test passes another path). It exists when the host
# booted the guest with nested virtualization (at EL2) and the kernel's KVM
# came up there. FRAGMENT is the nix.conf fragment nix-daemon includes with
# `!include`, which ignores a missing file: without /dev/kvm there is none, and
# Nix offers the features the guest's nix.conf lists and nothing more.
set -euo pipefail

if (($# != 3)); then
  echo "usage: kvm DEVICE FRAGMENT MARKER" >&2
  exit 2
fi
device=$1
fragment=$2
marker=$3

kernel=$(uname -r)
mkdir -p -- "$(dirname -- "$fragment")"
if [[ -c $device ]]; then
  printf 'extra-system-features = kvm nixos-test\n' >"$fragment.tmp"
  mv -- "$fragment.tmp" "$fragment"
  printf '%s present (Linux %s)\n' "$marker" "$kernel"
else
  rm -f -- "$fragment"
  printf '%s absent (Linux %s)\n' "$marker" "$kernel"
fi
