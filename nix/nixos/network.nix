# The guest's IP network: VZ's NAT attachment, used for outgoing traffic only
# (substituters, fetchers). Nothing listens on an IP address: the host reaches
# the guest over vsock (ssh.nix), so there is no address to discover and no
# inbound port to open.
{ lib, ... }:
{
  # systemd-networkd runs DHCP on every Ethernet link, i.e. on the one virtio
  # NIC (NixOS's 99-ethernet-default-dhcp network), and systemd-resolved uses
  # the DNS server the lease names.
  networking.useNetworkd = true;
  networking.useDHCP = true;
  services.resolved.enable = lib.mkDefault true;

  # Nothing in the guest needs to wait for the network to be up: builds that
  # fetch retry, and the boot must not wait for a lease.
  systemd.network.wait-online.enable = false;

  # Nothing listens on an IP address (sshd is on vsock only), so a firewall
  # would guard nothing, and loading its rules holds up sysinit.target at every
  # boot. A module that listens on IP through extraNixOSConfig can turn it on.
  networking.firewall.enable = lib.mkDefault false;
}
