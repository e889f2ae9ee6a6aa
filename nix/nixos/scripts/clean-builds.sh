#!/usr/bin/env bash
# Build directories left by a VM that stopped mid-build are never removed by
# Nix. At boot, before nix-daemon starts, they are moved out of the way (one
# rename each, so the boot does not wait for the deletion), and deleted later
# by a background run.
#
#   clean-builds move TRASH BUILDS TMP   moves BUILDS/* (Nix >= 2.30 build
#                                        directories) and TMP/nix-build-*
#                                        (older Nix) into TRASH/<n>
#   clean-builds delete TRASH            deletes everything in TRASH
#
# TRASH must be on the same file system as BUILDS and TMP.
set -euo pipefail

usage() {
  echo "usage: clean-builds move TRASH BUILDS TMP | clean-builds delete TRASH" >&2
  exit 2
}

case ${1:-} in
  move)
    (($# == 4)) || usage
    trash=$2
    shopt -s nullglob dotglob
    leftovers=("$3"/* "$4"/nix-build-*)
    if ((${#leftovers[@]} == 0)); then
      exit 0
    fi
    mkdir -p -- "$trash"
    bin=$(mktemp -d -- "$trash/XXXXXXXX")
    n=0
    for entry in "${leftovers[@]}"; do
      mv -- "$entry" "$bin/$n"
      n=$((n + 1))
    done
    echo "moved $n leftover build director(y/ies) aside for deletion"
    ;;
  delete)
    (($# == 2)) || usage
    trash=$2
    [[ -d $trash ]] || exit 0
    shopt -s nullglob dotglob
    for bin in "$trash"/*; do
      # Builds may leave read-only directories behind.
      chmod -R u+w -- "$bin"
      rm -rf -- "$bin"
    done
    ;;
  *) usage ;;
esac
