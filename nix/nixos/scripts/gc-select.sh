#!/usr/bin/env bash
# Picks, from dead store paths, the ones the guest may delete: those it holds
# a copy of in the upper layer and the host's store does not have.
#
#   gc-select LOWER UPPER < dead store paths, one a line > paths, NUL-terminated
#
# Deleting a path the lower layer also holds frees nothing worth having and
# leaves a whiteout that hides the host's copy from then on; the next guest
# that needs the path would find it gone (store-repair-upper clears such
# whiteouts for the booted system, but not for anything else). A whiteout
# (character device 0:0) is not a copy: that path is already gone.
set -euo pipefail

if (($# != 2)); then
  echo "usage: gc-select LOWER UPPER < dead store paths" >&2
  exit 2
fi
lower=$1
upper=$2
store=/nix/store

while IFS= read -r path; do
  [[ $path == "$store"/?* && $path != "$store"/*/* ]] || continue
  name=${path#"$store"/}
  entry=$upper/$name
  [[ -e $entry || -L $entry ]] || continue
  if [[ -c $entry && $(stat --format='%t:%T' -- "$entry") == 0:0 ]]; then
    continue
  fi
  [[ -e $lower/$name || -L $lower/$name ]] && continue
  printf '%s\0' "$path"
done
