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
# host's current keys. The same share may carry the CA bundle the host's Nix
# uses: the guest's Nix then trusts it as well as NixOS's own bundle, so that
# substitution works behind a TLS-intercepting proxy (scripts/host-handover.sh).
{
  config,
  lib,
  options,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);

  port = contract.vsock.sshPort;
  share = contract.guest.mounts.keys;
  inherit (contract.guest) keyFiles user;

  runtimeDir = "/run/darwin-vz-nix/ssh";
  hostKey = "${runtimeDir}/${keyFiles.hostKey}";
  authorizedKeysDir = "${runtimeDir}/authorized_keys.d";

  # Read by nix-daemon through `!include`; absent unless the host passed a bundle.
  caNixConf = "/run/darwin-vz-nix/nix-ca.conf";

  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };
in
{
  services.openssh = {
    enable = true;
    startWhenNeeded = true;
    ports = [ port ];
    # There is nothing to open: the socket below has no IP address.
    openFirewall = false;

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
  }
  # The host key comes from the host (sshd-keygen would race the copy). The
  # option exists since nixpkgs 26.05 (NixOS/nixpkgs#418136); older NixOS
  # generates missing keys only, after the copy is in place. optionalAttrs,
  # not mkIf: defining an undeclared option is an error even under mkIf false.
  // lib.optionalAttrs (options.services.openssh ? generateHostKeys) {
    generateHostKeys = false;
  };

  # The build user's sessions need no logind session and no user manager
  # (user@.service, started on the first login by pam_systemd): Nix runs
  # `nix-daemon --stdio`, nothing else. sshd.nix sets it to true.
  security.pam.services.sshd.startSession = lib.mkForce false;

  nix.extraOptions = ''
    !include ${caNixConf}
  '';

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
    description = "Install the SSH keys and CA certificates handed over by the host";
    requiredBy = [ "sshd.socket" ];
    before = [
      "sshd.socket"
      "nix-daemon.service"
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
      ExecStart = lib.concatStringsSep " " [
        (lib.getExe scripts.host-handover)
        contract.tags.keys
        share
        runtimeDir
        user
        keyFiles.hostKey
        keyFiles.authorizedKeys
        keyFiles.caBundle
        config.security.pki.caBundle
        caNixConf
        keyFiles.hostCacheKey
        config.darwin-vz-nix.hostCache.keyFile
      ];
    };
  };
}
