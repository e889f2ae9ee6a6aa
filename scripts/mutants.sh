#!/usr/bin/env bash
# Mutation testing of the platform-neutral core with cargo-mutants
# (`cargo install --locked cargo-mutants`, 27.1.0 here): each mutant is one small
# change to the code (a return value replaced, a `<` made `<=`, a `!` deleted); the
# tests must fail on it. A mutant they let through ("missed") is a behaviour nothing
# checks. docs/mutants.md has the last run's figures and every remaining missed
# mutant with the reason it cannot be caught.
#
#   scripts/mutants.sh                  every group below, in this order (hours: see docs/mutants.md)
#   scripts/mutants.sh proxy ssh        only these groups
#   scripts/mutants.sh --list           the groups, their files and their test targets
#   scripts/mutants.sh keys -- --iterate      extra arguments go to cargo mutants:
#   scripts/mutants.sh state -- -F ensure_dir  here, only the mutants matching a regex
#   scripts/mutants.sh --rerun keys -- -F 'ensure_pair'
#                                       after adding tests: rerun some mutants into
#                                       mutants.out/keys-rerun, keeping the full run
#   scripts/mutants_summary.py          per-file figures and the missed mutants of
#                                       every run under mutants.out (reruns override)
#
# Each group's report lands in mutants.out/GROUP/mutants.out/ (gitignored):
# missed.txt, caught.txt, unviable.txt, timeout.txt, outcomes.json, and a log per mutant.
#
# Not in scripts/test.sh: the whole run takes hours on a 2-core machine. Run it after
# changing the core, at least for the groups whose files changed.
#
# To stay affordable, a group's mutants are tested only by the test targets that run
# that group's code; the other targets never reach it, so they could not catch its
# mutants anyway. The reason for each mapping is beside it. (To check a mapping,
# rerun a group's missed mutants against every target:
# `cargo mutants -f FILE --iterate -o mutants.out/GROUP` — the default of cargo
# mutants is the whole suite — and compare.) cargo test runs the unit tests first
# and stops at the first failing target, so a mutant the unit tests catch costs a
# build and a second or two.
#
# Timeouts (.cargo/mutants.toml): a mutant whose tests run longer than 3 times the
# unmutated baseline of its group (measured by cargo mutants at the start of each
# group, on this machine's load), and at least 60 s, is stopped and counted as a
# timeout: on a 2-core machine shared with a compiler, tests take up to twice their
# quiet time, and a broken wait makes a test run to its own bound (up to 30 s) first.
set -euo pipefail
cd "$(dirname "$0")/.."

# name | files (cargo mutants -f globs, space-separated) | test targets | why these targets
groups=(
  "proxy|src/proxy.rs|--lib --test bootstrap --test copying_proxy --test ssh --test supervisor|\
the proxy runs only as \`darwin-vz-nix proxy\`: copying_proxy relays through it, ssh \
hands the stream over with --fdpass, supervisor covers the fdpass fallback and its \
errors, bootstrap the --alias that may reach the temporary builder"
  "ssh|src/ssh.rs|--lib --test cli --test contract --test lifecycle --test machines --test ssh|\
the ssh_config block and ssh arguments: the unit tests check them exactly; cli the \
user-name checks of \`ssh\`, contract and ssh the block against the module's, \
lifecycle \`ssh -l\`, machines the key path in the machines line, ssh every real login"
  "keys|src/keys.rs|--lib --test cli --test root --test ssh --test state --test state_commands --test supervisor|\
keys are made by \`daemon\` (prepare) and replaced by destroy/rotate-keys/reset: state \
the repairs, state_commands and cli destroy/rotate-keys, root the owner's keys made \
by root, ssh the pinned host key, supervisor reset through the control socket"
  "state|src/state.rs|--lib --test bootstrap --test cli --test configuration --test guest --test root --test state --test state_commands --test supervisor|\
the state directory, its paths, modes, lock and owner: state the lock, state_commands \
controlGroup and logs, root acting as the owner, supervisor the socket and modes, \
cli and configuration the checks before anything is created (dry run, socket length), \
guest and bootstrap the paths of the lazy guest and the temporary builder (gcroots, logs)"
  "control|src/control/*.rs|--lib --test bootstrap --test copying_proxy --test host_cache_builds --test lifecycle --test root --test state_commands --test supervisor|\
the control protocol, server, client and access table: every command that talks to \
the supervisor; supervisor the protocol's edge cases and the access table (as root), \
lifecycle wait-ready/stop/json, bootstrap allowBootstrap, state_commands and root \
controlGroup, copying_proxy the client of proxy, host_cache_builds the cache's \
figures in status"
  "supervisor|src/supervisor/*.rs|--lib --test bootstrap --test guest --test lifecycle --test sleep --test ssh --test supervisor|\
the lifecycle state machine: supervisor and lifecycle drive it through the control \
socket, sleep its sleep assertion and clock syncs, guest and bootstrap the boot that \
waits for a guest build, ssh sessions kept and ended by real ssh"
  "config|src/config.rs|--lib --test bootstrap --test cli --test configuration --test contract --test guest --test machines|\
settings and their layers: the unit tests, cli and configuration through the binary, \
contract the module's daemon config, machines the builder settings, guest and \
bootstrap the derivation settings"
)

list=false
suffix=
worst=0
names=()
passthrough=()
while (($#)); do
  case $1 in
    --list) list=true ;;
    --rerun) suffix=-rerun ;;
    --) shift; passthrough=("$@"); break ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) names+=("$1") ;;
  esac
  shift
done

known=()
for group in "${groups[@]}"; do known+=("${group%%|*}"); done
for name in "${names[@]}"; do
  if [[ " ${known[*]} " != *" $name "* ]]; then
    echo "unknown group '$name': choose from ${known[*]}" >&2
    exit 2
  fi
done
((${#names[@]})) || names=("${known[@]}")

for name in "${names[@]}"; do
  for group in "${groups[@]}"; do
    IFS='|' read -r gname files targets why <<<"$group"
    [[ $gname == "$name" ]] || continue
    if $list; then
      printf '%s: %s\n  tests: %s\n  why: %s\n' "$gname" "$files" "$targets" "$why"
      continue
    fi
    file_args=()
    for f in $files; do file_args+=(-f "$f"); done
    printf '\n==> %s: %s, tested by %s\n' "$gname" "$files" "$targets"
    start=$SECONDS
    status=0
    out="mutants.out/$gname$suffix"
    mkdir -p "$out"
    # shellcheck disable=SC2086 # $targets is a list of words on purpose
    cargo mutants "${file_args[@]}" -o "$out" "${passthrough[@]}" -- $targets || status=$?
    printf '==> %s: %d s, cargo mutants exited %d (2: missed mutants, 3: timeouts)\n' \
      "$gname" $((SECONDS - start)) "$status"
    ((status > worst)) && worst=$status
  done
done
exit "$worst"
