#!/usr/bin/env bash
# Runs in the initrd, after the root file system and the host's store are
# mounted and before the overlay on /nix/store is: makes sure that no entry in
# the upper layer hides a path of the system about to boot.
#
#   store-repair-upper REGISTRATION LOWER UPPER ADOPTED
#
# REGISTRATION  the closureInfo registration named on the kernel command line
#               (a /nix/store path; read through LOWER)
# LOWER         the host's store as mounted here (/sysroot/nix/.ro-store)
# UPPER         the overlay's upper directory (/sysroot/nix/.rw-store/upper)
# ADOPTED       the list of paths whose guest-side copy is complete
#               (written by store-adopt; one store path a line)
#
# Why: deleting a path that the host's store also holds leaves a whiteout in
# the upper layer, and a copy cut off half way (a build, a copy from the host,
# an adoption) leaves a partial directory there. Either hides the complete copy
# in the lower layer, and the system's own closure disappears: the boot fails on
# every try. Every path of the closure is in the lower layer, complete (the host
# keeps the system it boots), so any upper entry for such a path is removed,
# except a finished adoption (the copy with the macOS case hack undone).
# Nothing else in the upper layer is touched.
#
# Only bash and coreutils: this runs in the initrd.
set -euo pipefail

if (($# != 4)); then
  echo "usage: store-repair-upper REGISTRATION LOWER UPPER ADOPTED" >&2
  exit 2
fi
registration=$1
lower=$2
upper=$3
adopted_list=$4
store=/nix/store

# A path in the host's store, seen through LOWER: symlinks inside the store
# are followed (the guest directory links to the registration), at most 8.
in_lower() {
  local path=$1 hops target
  for ((hops = 0; hops < 8; hops++)); do
    if [[ $path != "$store"/* ]]; then
      echo "$path is not in $store" >&2
      return 1
    fi
    if [[ ! -L $lower/${path#"$store"/} ]]; then
      printf '%s\n' "$lower/${path#"$store"/}"
      return 0
    fi
    target=$(readlink -- "$lower/${path#"$store"/}")
    case $target in
      /*) path=$target ;;
      *) path=$(dirname -- "$path")/$target ;;
    esac
  done
  echo "$1: too many symbolic links" >&2
  return 1
}

# A whiteout is a character device with device number 0:0.
is_whiteout() {
  [[ -c $1 ]] && [[ $(stat --format='%t:%T' -- "$1") == 0:0 ]]
}

registration_file=$(in_lower "$registration")
if [[ ! -f $registration_file ]]; then
  echo "the registration $registration is not in the host's store ($registration_file)" >&2
  exit 1
fi

declare -A adopted=()
if [[ -f $adopted_list ]]; then
  while IFS= read -r path; do
    [[ -n $path ]] && adopted[${path##*/}]=1
  done <"$adopted_list"
fi

# The registration (nix-store --load-db format) names every path of the
# closure, each on a line of its own, and references to them; other lines
# are hashes, sizes and counts.
declare -A closure=()
while IFS= read -r line; do
  case $line in
    "$store"/*/*) ;;
    "$store"/?*) closure[${line#"$store"/}]=1 ;;
  esac
done <"$registration_file"

removed=0
kept=0
for name in "${!closure[@]}"; do
  entry=$upper/$name
  [[ -e $entry || -L $entry ]] || continue
  if [[ ! -e $lower/$name && ! -L $lower/$name ]]; then
    # The upper copy is the only one there is: keep it, whatever it is.
    if is_whiteout "$entry"; then
      echo "$store/$name is in neither layer; the guest system is incomplete" >&2
    fi
    continue
  fi
  if is_whiteout "$entry"; then
    echo "removing the whiteout over $store/$name"
  elif [[ -n ${adopted[$name]:-} ]]; then
    kept=$((kept + 1))
    continue
  else
    echo "removing the guest's copy of $store/$name (the host's copy is complete)"
  fi
  rm -rf -- "$entry"
  removed=$((removed + 1))
done

# Leftovers of an adoption cut off before it could swap its copy in.
for entry in "$upper"/.darwin-vz-nix-adopt.*; do
  if [[ -e $entry || -L $entry ]]; then
    echo "removing the unfinished adoption ${entry##*/}"
    rm -rf -- "$entry"
  fi
done

echo "store upper layer: ${#closure[@]} paths checked, $removed entries removed, $kept adopted copies kept"
