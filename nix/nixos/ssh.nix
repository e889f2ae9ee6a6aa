# SSH, reachable over vsock only: the host's `darwin-vz-nix proxy` connects to
# guest vsock port 22, and no IP address has an SSH listener.
#
# sshd is socket-activated, one `sshd -i` per connection, from a systemd socket
# bound to vsock. NixOS's own sshd module is reused for its configuration file,
# PAM and privilege separation user; only the socket's address is replaced.
#
# Keys are made on the host and pinned from the first connection. They arrive
# on a read-only virtiofs share that a oneshot unit mounts, copies from, and
# unmounts again before the socket starts listening. Under VZ, virtiofs shows
# every file as owned by whoever reads it, so nothing on the share is used in
# place: the copies get their owner and mode here. They live in /run, so
# nothing key-related is ever written to the guest disk and each boot takes the
# host's current keys.
{ lib, pkgs, ... }:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);

  port = contract.vsock.sshPort;
  share = contract.guest.mounts.keys;
  inherit (contract.guest) keyFiles user;

  runtimeDir = "/run/darwin-vz-nix/ssh";
  hostKey = "${runtimeDir}/${keyFiles.hostKey}";
  authorizedKeysDir = "${runtimeDir}/authorized_keys.d";
in
{
  services.openssh = {
    enable = true;
    startWhenNeeded = true;
    ports = [ port ];
    # There is nothing to open: the socket below has no IP address.
    openFirewall = false;

    # The host key comes from the host (sshd-keygen would race the copy).
    generateHostKeys = false;
    hostKeys = [
      {
        type = "ed25519";
        path = hostKey;
      }
    ];

    # The client key the host made; keys users declare through
    # users.users.<name>.openssh.authorizedKeys still work alongside
    # (/etc/ssh/authorized_keys.d/%u, added by NixOS).
    authorizedKeysInHomedir = false;
    authorizedKeysFiles = [ "${authorizedKeysDir}/%u" ];

    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "no";
      # A vsock peer that vanishes sends no RST: without probes a dead client's
      # sshd would linger forever. 15 s x 4 unanswered probes = gone after 1 min.
      ClientAliveInterval = 15;
      ClientAliveCountMax = 4;
    };
  };

  systemd.sockets.sshd.socketConfig = {
    # Replaces the module's IP listener (ports = [ 22 ] means every address).
    ListenStream = lib.mkForce "vsock::${toString port}";
    # Nix opens SSH connections in bursts; past systemd's default of 64 the
    # extra ones hang without a banner. The listen backlog is systemd's default,
    # SOMAXCONN.
    MaxConnections = 1024;
  };

  # systemd >= 256 ships a generator that binds its own sshd to vsock port 22 in
  # a VM (sshd-vsock.socket, with the default connection limit) as soon as it
  # finds sshd. It would fight the socket above for the port.
  systemd.generators.systemd-ssh-generator = "/dev/null";

  systemd.services.darwin-vz-nix-ssh-keys = {
    description = "Install the SSH keys handed over by the host";
    requiredBy = [ "sshd.socket" ];
    before = [
      "sshd.socket"
      "shutdown.target"
    ];
    after = [ "local-fs.target" ];
    conflicts = [ "shutdown.target" ];
    # Runs in early boot, so that the socket (ordered before sockets.target)
    # can wait for it without an ordering cycle.
    unitConfig.DefaultDependencies = false;
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    };
    path = [
      pkgs.coreutils
      pkgs.util-linux
    ];
    script = ''
      set -euo pipefail
      mkdir -p ${share}
      mount -t virtiofs -o ro,nodev,nosuid,noexec ${contract.tags.keys} ${share}
      trap 'umount ${share}' EXIT

      for file in ${keyFiles.hostKey} ${keyFiles.hostKeyPub} ${keyFiles.authorizedKeys}; do
        if [[ ! -s ${share}/$file ]]; then
          echo "the host's key share (${contract.tags.keys}) has no $file" >&2
          exit 1
        fi
      done

      install -D -o root -g root -m 0600 ${share}/${keyFiles.hostKey} ${hostKey}
      install -o root -g root -m 0644 ${share}/${keyFiles.hostKeyPub} ${runtimeDir}/${keyFiles.hostKeyPub}
      install -D -o root -g root -m 0644 ${share}/${keyFiles.authorizedKeys} ${authorizedKeysDir}/${user}
    '';
  };
}
