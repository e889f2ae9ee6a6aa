#!/usr/bin/env bash
# Prints systemd's boot timing to the console once the boot has finished, as
# one line that starts with MARKER; the host's supervisor reads the last such
# line from console.log.
#
#   boot-timing MARKER
#
# It waits (at most 2 minutes) for the boot to finish: systemd-analyze refuses
# to answer before that. Runs as a simple service, so that its own start does
# not hold the boot up.
set -euo pipefail

if (($# != 1)); then
  echo "usage: boot-timing MARKER" >&2
  exit 2
fi
marker=$1

state=$(timeout 120 systemctl is-system-running --wait || true)
timing=$(systemd-analyze time 2>&1 | head -n 1) || true
printf '%s %s (system %s)\n' "$marker" "$timing" "${state:-unknown}"
