#!/usr/bin/env bash
# Writes the nix.conf fragment that sizes builds to the VM the host gave:
#
#   P         = MemTotal / 1 GiB, at least 1: how many compilers may run at
#               once (a large C++ unit takes about 1 GiB; zram swap absorbs
#               the peaks above that)
#   max-jobs  = floor(sqrt(P)), at most the CPU count, at least 1
#   cores     = floor(P / max-jobs), at most the CPU count, at least 1
#
# so that max-jobs × cores, the most compilers Nix may start, never exceeds P.
# With the default VM (4 CPUs, 6 GiB: P = 5) that is 2 jobs of 2 cores; with
# 8 CPUs and 16 GiB (P = 15), 3 jobs of 5 cores.
#
#   build-limits OUT [MEMINFO [CPUS]]
#
# MEMINFO defaults to /proc/meminfo, CPUS to what nproc says.
set -euo pipefail

if (($# < 1 || $# > 3)); then
  echo "usage: build-limits OUT [MEMINFO [CPUS]]" >&2
  exit 2
fi
out=$1
meminfo=${2:-/proc/meminfo}
cpus=${3:-$(nproc)}

mem_kib=
while read -r key value _; do
  if [[ $key == MemTotal: ]]; then
    mem_kib=$value
    break
  fi
done <"$meminfo"
if [[ ! $mem_kib =~ ^[0-9]{1,15}$ ]]; then
  echo "no MemTotal in $meminfo" >&2
  exit 1
fi
if [[ ! $cpus =~ ^[0-9]{1,5}$ ]] || ((cpus < 1)); then
  echo "not a CPU count: $cpus" >&2
  exit 1
fi

compilers=$((mem_kib / (1024 * 1024)))
((compilers >= 1)) || compilers=1

jobs=1
while (((jobs + 1) * (jobs + 1) <= compilers)); do
  jobs=$((jobs + 1))
done
((jobs <= cpus)) || jobs=$cpus

cores=$((compilers / jobs))
((cores <= cpus)) || cores=$cpus
((cores >= 1)) || cores=1

mkdir -p -- "$(dirname -- "$out")"
printf 'max-jobs = %s\ncores = %s\n' "$jobs" "$cores" >"$out.tmp"
mv -- "$out.tmp" "$out"
echo "builds sized to $((mem_kib / 1024)) MiB and $cpus CPUs: max-jobs = $jobs, cores = $cores"
