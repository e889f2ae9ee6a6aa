#!/usr/bin/env bash
# Gives the guest its own copy of the store paths that the host's store holds
# only under macOS case-hack names, so that the guest sees each path as its
# NAR (and hash) says.
#
#   store-adopt LOWER MERGED ADOPTED < store paths, one a line
#
# LOWER    the host's store as mounted in the guest (/nix/.ro-store)
# MERGED   the overlay, i.e. the guest's /nix/store, mounted writable for us
# ADOPTED  the list of paths whose guest-side copy is complete; paths are
#          appended as they are finished, and skipped when already listed
#
# A macOS store (use-case-hack) keeps names that collide case-insensitively as
# <name>~nix~case~hack~<n> (ncurses' terminfo E/ and e/, the kernel's xt_DSCP
# and xt_dscp modules). Every other path the host keeps for the running guest
# (the supervisor holds a GC root for it) is read from the lower layer as it
# is, and is not copied at all.
#
# The copy is made beside the store path under a name the lower layer does not
# have, its names are restored there, and it is then swapped in. Renaming in
# place does not work: the host's store is case-insensitive, so in the merged
# view `e` already "exists" (it is E) and the rename fails with ENOTEMPTY.
#
# Each path is adopted on its own: a failure is logged and the next path is
# tried; the exit status is 1 if any path failed (it is retried at next boot).
set -euo pipefail

if (($# != 3)); then
  echo "usage: store-adopt LOWER MERGED ADOPTED < store paths" >&2
  exit 2
fi
lower=$1
merged=$2
adopted_list=$3
store=/nix/store
hack='~nix~case~hack~'

mkdir -p -- "$(dirname -- "$adopted_list")"
declare -A adopted=()
if [[ -f $adopted_list ]]; then
  while IFS= read -r path; do
    [[ -n $path ]] && adopted[$path]=1
  done <"$adopted_list"
fi

# Prints the case-hacked names under a path of the lower layer, NUL-terminated,
# deepest first (so a directory is renamed after its entries).
hacked_names() {
  find "$1" -depth -name "*${hack}*" -print0
}

# Every step checks its own status: errexit does not apply inside a function
# called as an `if` condition.
adopt() {
  local path=$1 name=${1#"$store"/}
  local source=$lower/$name
  local staging=$merged/.darwin-vz-nix-adopt.$name
  local hacked restored

  rm -rf -- "$staging" || return 1
  cp --archive --no-target-directory -- "$source" "$staging" || return 1
  while IFS= read -r -d '' hacked; do
    hacked=$staging/${hacked#"$source"/}
    restored=${hacked%"$hack"*}
    if [[ -e $restored || -L $restored ]]; then
      echo "$path: both ${restored#"$staging"/} and ${hacked#"$staging"/} exist" >&2
      return 1
    fi
    mv --no-target-directory -- "$hacked" "$restored" || return 1
  done < <(hacked_names "$source")
  # The store's canonical time (1 s after the epoch): renaming changed the
  # directories' times.
  find "$staging" -exec touch --no-dereference --date=@1 -- {} + || return 1

  # Swap: the lower copy is hidden by a whiteout, then the finished copy takes
  # its name (an opaque directory over the whiteout).
  rm -rf -- "${merged:?}/$name" || return 1
  mv --no-target-directory -- "$staging" "$merged/$name"
}

checked=0
copied=0
failed=0
while IFS= read -r path; do
  [[ $path == "$store"/?* && $path != "$store"/*/* ]] || continue
  checked=$((checked + 1))
  [[ -z ${adopted[$path]:-} ]] || continue
  name=${path#"$store"/}
  if [[ ! -e $lower/$name && ! -L $lower/$name ]]; then
    # Not in the host's store: the guest's copy is all there is.
    continue
  fi
  if [[ -z $(find "$lower/$name" -name "*${hack}*" -print -quit) ]]; then
    continue
  fi
  echo "adopting $path (case-hacked names in the host's store)"
  if adopt "$path"; then
    printf '%s\n' "$path" >>"$adopted_list"
    adopted[$path]=1
    copied=$((copied + 1))
  else
    echo "could not adopt $path; trying the others, and this one again at next boot" >&2
    rm -rf -- "$merged/.darwin-vz-nix-adopt.$name" || true
    failed=$((failed + 1))
  fi
done

echo "adoption: $checked paths checked, $copied adopted, $failed failed"
((failed == 0))
