#!/usr/bin/env bash
# Registers Rosetta for x86_64 ELF binaries, when the host attached its share
# (darwin_vz_nix.rosetta=1; the unit is conditional on it), and makes Nix offer
# x86_64-linux.
#
#   rosetta TAG MOUNTPOINT PRESERVE_ARGV0_PARAM NIX_CONF_FRAGMENT
#
# Flags: F (fix binary) opens the interpreter at registration, so it works in
# the build sandbox, where the share is not visible; C (credentials, implies
# O) is what Apple's instructions register; P preserves argv[0] and only a
# macOS 14+ Rosetta accepts it, so the host says whether to set it.
#
# Needs on PATH: darwin-vz-nix-kernel-param, mount, mountpoint.
set -euo pipefail

if (($# != 4)); then
  echo "usage: rosetta TAG MOUNTPOINT PRESERVE_ARGV0_PARAM NIX_CONF_FRAGMENT" >&2
  exit 2
fi
tag=$1
mount_point=$2
preserve_param=$3
fragment=$4

# The ELF header of an x86-64 executable or shared object: 64-bit class,
# little endian, version 1, type EXEC or DYN (the mask allows both), machine
# 0x3e. binfmt_misc decodes the \x escapes itself.
magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00'
mask='\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'

mkdir -p -- "$mount_point"
if ! mountpoint -q -- "$mount_point"; then
  mount -t virtiofs -o ro,nodev,nosuid -- "$tag" "$mount_point"
fi
if [[ ! -x $mount_point/rosetta ]]; then
  echo "the Rosetta share ($tag) has no executable 'rosetta'" >&2
  exit 1
fi

binfmt=/proc/sys/fs/binfmt_misc
mountpoint -q -- "$binfmt" || mount -t binfmt_misc binfmt_misc "$binfmt"

flags=CF
if [[ $(darwin-vz-nix-kernel-param "$preserve_param") == 1 ]]; then
  flags=P$flags
fi
if [[ -e $binfmt/rosetta ]]; then
  echo -1 >"$binfmt/rosetta"
fi
printf ':rosetta:M::%s:%s:%s:%s' "$magic" "$mask" "$mount_point/rosetta" "$flags" >"$binfmt/register"
echo "registered $mount_point/rosetta for x86_64 ELF binaries (flags $flags)"

mkdir -p -- "$(dirname -- "$fragment")"
printf 'extra-platforms = x86_64-linux\nextra-sandbox-paths = %s\n' "$mount_point" >"$fragment"
