#!/usr/bin/env bash
# Takes what the host hands over on its one-shot share: the guest's SSH host
# key, the client's authorized key, the public key of the host's store cache
# when the host serves one and, when the host has one, the CA bundle its Nix
# uses. Copies them into /run (virtiofs under VZ shows every file as
# owned by whoever reads it, so nothing is used in place) and unmounts the
# share again.
#
#   host-handover TAG SHARE RUNTIME USER HOST_KEY AUTHORIZED_KEYS CA_FILE \
#     NIXOS_CA_BUNDLE CA_NIX_CONF CACHE_KEY CACHE_KEY_COPY
#
# TAG, SHARE        the share's virtiofs tag and where to mount it
# RUNTIME           where the keys go (sshd reads them there)
# USER              the build user; its authorized keys file is named after it
# HOST_KEY          the host key's file name on the share (and HOST_KEY.pub)
# AUTHORIZED_KEYS   the authorized keys' file name on the share
# CA_FILE           the CA bundle's name on the share (absent: no bundle)
# NIXOS_CA_BUNDLE   the guest's own bundle, kept first in the combined one
# CA_NIX_CONF       nix.conf fragment pointing ssl-cert-file at the combined
#                   bundle; removed when the host passed none
# CACHE_KEY         the host store cache's public key's name on the share
# CACHE_KEY_COPY    where it is copied (hostcache.nix reads it there);
#                   removed when the share has none
#
# Needs on PATH: mount, umount, install.
set -euo pipefail

if (($# != 11)); then
  echo "usage: host-handover TAG SHARE RUNTIME USER HOST_KEY AUTHORIZED_KEYS CA_FILE NIXOS_CA_BUNDLE CA_NIX_CONF CACHE_KEY CACHE_KEY_COPY" >&2
  exit 2
fi
tag=$1
share=$2
runtime=$3
user=$4
host_key=$5
authorized_keys=$6
ca_file=$7
nixos_bundle=$8
ca_conf=$9
cache_key=${10}
cache_key_copy=${11}

# The host caps what it copies at 4 MiB (src/cacerts.rs); so does the guest.
max_ca_bytes=$((4 * 1024 * 1024))

mkdir -p -- "$share"
mount -t virtiofs -o ro,nodev,nosuid,noexec -- "$tag" "$share"
trap 'umount -- "$share"' EXIT

for file in "$host_key" "$host_key.pub" "$authorized_keys"; do
  if [[ ! -s $share/$file ]]; then
    echo "the host's key share ($tag) has no $file" >&2
    exit 1
  fi
done

install -D -o root -g root -m 0600 -- "$share/$host_key" "$runtime/$host_key"
install -o root -g root -m 0644 -- "$share/$host_key.pub" "$runtime/$host_key.pub"
install -D -o root -g root -m 0644 -- "$share/$authorized_keys" "$runtime/authorized_keys.d/$user"

# A public key: not secret, but only the host's copy may be trusted, and it is
# checked again where it is used (scripts/host-cache.sh).
if [[ -f $share/$cache_key ]] && (($(stat --format=%s -- "$share/$cache_key") <= 1024)); then
  install -D -o root -g root -m 0644 -- "$share/$cache_key" "$cache_key_copy"
else
  rm -f -- "$cache_key_copy"
fi

bundle=$runtime/ca-bundle.crt
if [[ -f $share/$ca_file ]]; then
  size=$(stat --format=%s -- "$share/$ca_file")
  if ((size > max_ca_bytes)); then
    echo "the host's CA bundle is $size bytes, more than $max_ca_bytes: ignored" >&2
  else
    # The guest's own roots first, then the host's (corporate TLS proxies add
    # their root there); a bad host file cannot take the public roots away.
    cat -- "$nixos_bundle" "$share/$ca_file" >"$bundle.tmp"
    chmod 0644 -- "$bundle.tmp"
    mv -- "$bundle.tmp" "$bundle"
    mkdir -p -- "$(dirname -- "$ca_conf")"
    printf 'ssl-cert-file = %s\n' "$bundle" >"$ca_conf"
    echo "Nix uses the host's CA certificates ($size bytes) besides NixOS's"
    exit 0
  fi
fi
rm -f -- "$ca_conf" "$bundle"
