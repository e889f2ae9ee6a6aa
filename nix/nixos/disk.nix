# The guest disk: a raw, sparse image created and grown by the host, attached as
# the one virtio-blk device. It arrives empty on the first boot.
#
# This module owns the root file system on it. The root holds everything the
# guest writes: the store's upper layer (store.nix), the Nix database, /var,
# /tmp and the build directories. Keeping all of it on one disk means one reset
# for all of it: deleting disk.img on the host gives a fresh guest on the next
# boot, with a store layer and a database that still agree with each other.
{ lib, ... }:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
in
{
  fileSystems."/" = {
    device = contract.guest.rootDevice;
    fsType = "ext4";
    # systemd-makefs formats the device in the initrd when blkid finds no
    # signature on it, i.e. on the first boot only (x-systemd.makefs).
    autoFormat = true;
    # systemd-growfs grows the mounted file system to the size of the device on
    # every boot (x-systemd.growfs), so enlarging diskSize on the host is all it
    # takes. The systemd initrd of current NixOS ships no systemd-growfs, so the
    # growing happens online in stage 2 (systemd-growfs-root.service).
    autoResize = true;
    # No fsck on every boot (systemd-fsck-root in the initrd): the host stops
    # the guest gracefully, ext4's journal covers the rest, and a guest disk
    # that is broken all the same is deleted rather than repaired.
    noCheck = lib.mkDefault true;
    options = [
      # Builds write and stat many small files; access times are of no use here.
      "noatime"
      # ext4 would zero the inode tables of a fresh file system in the
      # background (ext4lazyinit): disk I/O during the first builds, and zeros
      # written into the sparse image on the Mac. Uninitialised tables are
      # safe: the group descriptors say which inodes were never used.
      "noinit_itable"
    ];
  };

  # /tmp stays on the disk rather than in RAM: build directories can be large,
  # and memory is what the VM must give back to macOS. It is not emptied at
  # boot by systemd-tmpfiles (`D! /tmp`, which holds sysinit.target up until
  # it is done): builder.nix moves Nix's leftover build directories aside and
  # deletes them in the background, and systemd-tmpfiles-clean ages out the
  # rest.
  boot.tmp.useTmpfs = lib.mkDefault false;
  boot.tmp.cleanOnBoot = lib.mkDefault false;
}
