#!/usr/bin/env bash
# Frees the guest disk when it runs low, deleting only dead paths the guest
# owns alone (gc-select), through Nix so that its database stays right.
#
#   gc MOUNT LOWER UPPER MIN_FREE_BYTES MIN_FREE_PERCENT STATE
#
# The threshold is MIN_FREE_BYTES when it is not 0, else MIN_FREE_PERCENT of
# the size of the file system at MOUNT. A collection that leaves the disk
# still below the threshold backs off: the next one waits twice as long as the
# last wait (2 min, 4, 8 … at most 1 h), so a disk full of things the guest
# may not delete is not scanned every two minutes forever. STATE (in /run)
# keeps the back-off; a collection that gets above the threshold resets it.
#
# Needs on PATH: darwin-vz-nix-gc-select, nix-store, df, xargs.
set -euo pipefail

if (($# != 6)); then
  echo "usage: gc MOUNT LOWER UPPER MIN_FREE_BYTES MIN_FREE_PERCENT STATE" >&2
  exit 2
fi
mount=$1
lower=$2
upper=$3
min_free_bytes=$4
min_free_percent=$5
state=$6

first_wait=120
longest_wait=3600

read -r size free < <(df --output=size,avail --block-size=1 -- "$mount" | tail -n 1)
if ((min_free_bytes > 0)); then
  threshold=$min_free_bytes
else
  threshold=$((size * min_free_percent / 100))
fi
if ((free >= threshold)); then
  rm -f -- "$state"
  exit 0
fi

now=$(date +%s)
not_before=0
wait=0
if [[ -f $state ]]; then
  read -r not_before wait <"$state" || true
fi
# Arithmetic evaluates what it reads: only plain numbers get that far.
[[ $not_before =~ ^[0-9]{1,12}$ ]] || not_before=0
[[ $wait =~ ^[0-9]{1,6}$ ]] || wait=0
if ((now < not_before)); then
  exit 0
fi

echo "$free bytes free on the guest disk, below $threshold: collecting the guest's dead paths"
nix-store --gc --print-dead \
  | darwin-vz-nix-gc-select "$lower" "$upper" \
  | xargs --null --no-run-if-empty nix-store --delete \
  || echo "some paths came alive while collecting; the next run picks up the rest" >&2

read -r free < <(df --output=avail --block-size=1 -- "$mount" | tail -n 1)
if ((free >= threshold)); then
  echo "$free bytes free now"
  rm -f -- "$state"
else
  wait=$((wait > 0 ? wait * 2 : first_wait))
  wait=$((wait < longest_wait ? wait : longest_wait))
  echo "$free bytes free, still below $threshold: what fills the disk is not the guest's to delete;" \
    "next collection in $wait s at the earliest"
  mkdir -p -- "$(dirname -- "$state")"
  printf '%s %s\n' "$((now + wait))" "$wait" >"$state"
fi
