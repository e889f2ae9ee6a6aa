#!/usr/bin/env bash
# Makes the guest's Nix use the host's store as its first binary cache, when the
# host serves it (darwin_vz_nix.host_cache=1; the unit is conditional on it).
#
#   host-cache KEY_FILE URL NIX_CONF_FRAGMENT
#
# KEY_FILE           the host cache's public key (name:base64), copied from the
#                    host's one-shot key share by host-handover
# URL                where the guest's forwarder to the host listens
# NIX_CONF_FRAGMENT  nix.conf fragment that nix-daemon includes (`!include`):
#                    the substituter and its key; removed when the key is
#                    missing or malformed, so Nix never trusts anything else
#
# The host cache answers narinfo queries only with 200 or 404, and its priority
# (nix-cache-info) puts it before cache.nixos.org.
set -euo pipefail

if (($# != 3)); then
  echo "usage: host-cache KEY_FILE URL NIX_CONF_FRAGMENT" >&2
  exit 2
fi
key_file=$1
url=$2
fragment=$3

rm -f -- "$fragment"
if [[ ! -s $key_file ]]; then
  echo "the host serves its store, but its key ($key_file) did not arrive; not using it" >&2
  exit 1
fi
# One line, at most 1 KiB: a name Nix reads back unchanged, a colon, and the
# base64 of a 32-byte ed25519 public key. Anything else could put other
# settings into nix.conf.
if (($(stat --format=%s -- "$key_file") > 1024)); then
  echo "the host cache's key file is larger than 1 KiB; not using it" >&2
  exit 1
fi
key=$(<"$key_file")
if [[ ! $key =~ ^[A-Za-z0-9._-]{1,128}:[A-Za-z0-9+/]{43}=$ ]]; then
  echo "the host cache's key is not name:base64 of an ed25519 key; not using it" >&2
  exit 1
fi

mkdir -p -- "$(dirname -- "$fragment")"
printf 'extra-substituters = %s\nextra-trusted-public-keys = %s\n' "$url" "$key" >"$fragment.tmp"
chmod 0644 -- "$fragment.tmp"
mv -- "$fragment.tmp" "$fragment"
echo "Nix substitutes from the host's store first ($url, key ${key%%:*})"
