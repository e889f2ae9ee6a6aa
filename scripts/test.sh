#!/usr/bin/env bash
# Every test this repository has that runs without a Mac, in the order a failure is
# cheapest to find. `.ci/run` calls this after installing what it needs; on a fresh
# Debian 12 machine: apt install nix-bin openssh-server openssh-client rustc-web
# cargo-web rust-web-src shellcheck python3 python3-fusepy libsqlite3-dev, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "every .nix file parses"
find . -name '*.nix' -not -path './target*' -print0 | xargs -0 -n1 nix-instantiate --parse >/dev/null

step "shellcheck: the guest's scripts and this repository's"
# The guest's scripts are checked again (by writeShellApplication) when the guest
# is built; here they are checked without Nix.
shellcheck nix/nixos/scripts/*.sh scripts/*.sh .ci/run

# The flake's checks.*.formatting runs nixpkgs' nixfmt (Haskell); Debian 12 has none,
# so this runs nixfmt_rs, a byte-compatible reimplementation that .ci/run installs
# (pinned) into .ci/tools. A nixfmt on PATH (nix develop) is used otherwise.
nixfmt=$PWD/.ci/tools/bin/nixfmt
[ -x "$nixfmt" ] || nixfmt=$(command -v nixfmt || true)
if [ -z "$nixfmt" ]; then
  echo "no nixfmt: run .ci/run once (it installs nixfmt_rs into .ci/tools), or use nix develop" >&2
  exit 1
fi
step "every .nix file is nixfmt-formatted ($("$nixfmt" --version | head -n1))"
find . -name '*.nix' -not -path './target*' -not -path './.ci/tools/*' -print0 | xargs -0 "$nixfmt" --check

step "every test docs/claims.md cites exists"
python3 scripts/check_claims.py

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test (unit, CLI, supervisor, ssh/nix end to end, contract)"
# --no-fail-fast: a failing test binary must not hide the failures of the others.
# A test that cannot run here (no root, no tmpfs, not a Mac) passes and prints
# `skipped: <test>: <why>` to stderr, which the harness does not hide.
cargo test --locked --no-fail-fast

step "the daemon links no AppKit: objc2-virtualization without its default features"
apple_tree=$(cargo tree --locked --target aarch64-apple-darwin --edges normal --prefix none)
grep -q '^objc2-virtualization ' <<<"$apple_tree"
if grep -q '^objc2-app-kit ' <<<"$apple_tree"; then
  cargo tree --locked -i objc2-app-kit --target aarch64-apple-darwin >&2
  echo "objc2-app-kit is a dependency again: enable only the Virtualization classes used (Cargo.toml)" >&2
  exit 1
fi

step "the macOS code type-checks for aarch64-apple-darwin (Virtualization bindings from Apple's SDK headers)"
# Debian's rustc-web ships the standard library's source, so the Apple target's std
# is built here; linking is impossible without Apple's SDK, so this is `check`.
# Warnings are errors here too (clippy has no Apple-target std on this machine).
RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS="-D warnings" \
  /usr/bin/cargo check --locked --all-targets --target aarch64-apple-darwin -Zbuild-std \
  --target-dir target-apple

# Clippy for the Apple target needs the rustup toolchain's own std sources (rust-src);
# run it where they are installed, say so where not.
if [ -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
  step "cargo clippy for aarch64-apple-darwin"
  RUSTC_BOOTSTRAP=1 cargo clippy --locked --all-targets --target aarch64-apple-darwin -Zbuild-std \
    --target-dir target-apple-clippy -- -D warnings
else
  step "skipped: clippy for aarch64-apple-darwin (rustup component add rust-src to run it)"
fi

step "all checks passed"
