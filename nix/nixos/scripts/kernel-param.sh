#!/usr/bin/env bash
# Prints the value of a kernel parameter (NAME=value on the kernel command
# line), or nothing when it is absent. The last occurrence wins, as in the
# kernel's own parsing.
#
#   kernel-param NAME
#
# KERNEL_CMDLINE names the file to read instead of /proc/cmdline (tests).
set -euo pipefail

if (($# != 1)) || [[ -z $1 ]]; then
  echo "usage: kernel-param NAME" >&2
  exit 2
fi
name=$1

# read -a splits on whitespace without globbing: an argument such as `*` or
# `[a]` stays what it is.
read -r -a words <"${KERNEL_CMDLINE:-/proc/cmdline}" || true
value=
found=0
for word in "${words[@]}"; do
  if [[ $word == "$name="* ]]; then
    value=${word#*=}
    found=1
  fi
done
if ((found)); then
  printf '%s\n' "$value"
fi
