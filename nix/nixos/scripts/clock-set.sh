#!/usr/bin/env bash
# Sets the guest's clock to the host's time: one connection to the clock socket
# (vsock port `clockPort` of contract.json, Accept=yes), whose standard input
# and output are the connection; standard error goes to the journal. The host's
# supervisor connects when a boot is ready and after every wake of the Mac: a VZ
# guest's clock stands still while the Mac sleeps.
#
#   clock-set PEER EARLIEST LATEST TIMEOUT SET_COMMAND [ARG...]
#
# It takes one line from the peer PEER only (systemd's $REMOTE_ADDR for the
# connection: "vsock:2" is the host), read within TIMEOUT seconds:
#
#   DVN-TIME 1 <seconds>.<nanoseconds>
#
# Unix time in UTC, 1 to 12 digits, a dot and exactly 9 digits; at most 64 bytes
# with its newline; EARLIEST <= seconds <= LATEST. Anything else is refused and
# the clock is not touched; bytes after the newline are never read. A good line
# runs `SET_COMMAND [ARG...] @<seconds>.<nanoseconds>` (`date -s`), logs the
# step and answers with it (new time minus old; exit status 0):
#
#   OK <+|-><seconds>.<nanoseconds>
#
# or, refused (exit status 1):
#
#   ERR <reason>
set -euo pipefail

usage() {
  echo "usage: clock-set PEER EARLIEST LATEST TIMEOUT SET_COMMAND [ARG...]" >&2
  exit 2
}
(($# >= 5)) || usage
peer=$1
earliest=$2
latest=$3
timeout=$4
shift 4
[[ $earliest =~ ^[0-9]{1,10}$ && $latest =~ ^[0-9]{1,10}$ && $timeout =~ ^[0-9]{1,3}$ ]] || usage
# The latest time must fit in nanoseconds in bash's 64-bit arithmetic.
((10#$earliest <= 10#$latest && 10#$latest <= 9223372035 && 10#$timeout >= 1)) || usage

# The request's bound, newline included (a valid one is at most 34 bytes).
limit=64

refuse() {
  echo "refused to set the clock: $1" >&2
  printf 'ERR %s\n' "$1"
  exit 1
}

if [[ ${REMOTE_ADDR-} != "$peer" ]]; then
  refuse "only $peer may set the clock, not ${REMOTE_ADDR:-an unknown peer}"
fi

# One line, byte by byte: at most $limit bytes, all within $timeout seconds.
# A byte that cannot be part of a request (a NUL among them) is kept as `?`, so
# what follows sees the input as it came, never with bytes dropped.
export LC_ALL=C
deadline=$((EPOCHSECONDS + timeout))
raw=
ended=
while ((${#raw} < limit)) && [[ $raw != *$'\n' ]]; do
  left=$((deadline - EPOCHSECONDS))
  if ((left <= 0)); then
    break
  fi
  if IFS= read -r -n 1 -d '' -t "$left" byte; then
    case $byte in
    [A-Z0-9.\ -] | $'\n') raw+=$byte ;;
    *) raw+='?' ;; # an empty byte is a NUL, read as the delimiter
    esac
  else
    # 1: the connection ended; above 128: the time is up.
    (($? > 128)) || ended=yes
    break
  fi
done
if [[ $raw != *$'\n' ]]; then
  if ((${#raw} >= limit)); then
    refuse "request longer than $limit bytes"
  elif [[ -n $ended ]]; then
    refuse "incomplete request: the connection ended before its newline"
  fi
  refuse "no complete request within $timeout s"
fi
line=${raw%$'\n'}

request='^DVN-TIME 1 ([0-9]{1,12})\.([0-9]{9})$'
other_version='^DVN-TIME ([0-9]+) '
if [[ ! $line =~ $request ]]; then
  if [[ $line =~ $other_version && ${BASH_REMATCH[1]} != 1 ]]; then
    refuse "protocol version ${BASH_REMATCH[1]} is not supported; this guest speaks version 1"
  fi
  refuse "malformed request: $line"
fi
seconds=$((10#${BASH_REMATCH[1]}))
nanoseconds=${BASH_REMATCH[2]}
if ((seconds < 10#$earliest)); then
  refuse "stale: $seconds is before $earliest"
fi
if ((seconds > 10#$latest)); then
  refuse "in the future: $seconds is after $latest"
fi

old=$(date +%s%N)
[[ $old =~ ^[0-9]{10,19}$ ]] || refuse "cannot read the guest's clock"
new=$((seconds * 1000000000 + 10#$nanoseconds))
if ! "$@" "@$seconds.$nanoseconds" >&2; then
  refuse "setting the clock failed"
fi

step=$((new - 10#$old))
sign=+
if ((step < 0)); then
  sign=-
  step=$((-step))
fi
offset=$(printf '%s%d.%09d' "$sign" $((step / 1000000000)) $((step % 1000000000)))
utc() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%S.%NZ; }
was=$(printf '%d.%09d' $((10#$old / 1000000000)) $((10#$old % 1000000000)))
echo "set the clock from $(utc "$was") to $(utc "$seconds.$nanoseconds") (a step of $offset s)" >&2
printf 'OK %s\n' "$offset"
