#!/usr/bin/env bash
# Signs a cargo-built darwin-vz-nix with the com.apple.security.virtualization
# entitlement, without which every Virtualization.framework call fails. macOS only;
# the Nix package signs itself (nix/package.nix).
#
#   cargo build && scripts/codesign.sh                      # target/debug/darwin-vz-nix
#   cargo build --release && scripts/codesign.sh target/release/darwin-vz-nix
#
# Re-run after every build that relinks the binary: linking replaces the signature.
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:-target/debug/darwin-vz-nix}
codesign --force --sign - --entitlements resources/entitlements.plist "$binary"
codesign --display --entitlements - "$binary"
