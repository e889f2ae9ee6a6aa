# The guest's clock follows the host's.
#
# A VZ guest's clock stands still while the Mac sleeps: after a wake it lags by
# the time slept, TLS to a binary cache fails and make sees files from the
# future. So the host's supervisor sends its time when a boot is ready and
# after every wake of the Mac, to vsock port `clockPort` (contract.json), and
# the guest steps its clock at once (scripts/clock-set.sh defines the line and
# refuses anything else). NTP keeps correcting the drift in between.
#
# One short-lived root process per connection (Accept=yes), from the host only
# (vsock CID 2: systemd passes the peer as $REMOTE_ADDR), with no capability
# but setting the clock.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
  port = toString contract.vsock.clockPort;

  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };

  # VMADDR_CID_HOST, as systemd prints a vsock peer.
  hostPeer = "vsock:2";
  # No time before 2025-01-01T00:00:00Z can be right (stale), nor one after
  # 2100-01-01T00:00:00Z (in the future).
  earliest = "1735689600";
  latest = "4102444800";
  # Seconds the host has to send its line.
  readTimeout = "5";
in
{
  services.timesyncd.enable = lib.mkDefault true;

  systemd.sockets.darwin-vz-nix-clock = {
    description = "The host sets the clock (vsock port ${port})";
    wantedBy = [ "sockets.target" ];
    listenStreams = [ "vsock::${port}" ];
    socketConfig = {
      Accept = true;
      # The host sends one request at a time.
      MaxConnections = 4;
    };
  };

  systemd.services."darwin-vz-nix-clock@" = {
    description = "Set the clock to the host's time";
    # A refused request fails its instance; do not keep each one around.
    unitConfig.CollectMode = "inactive-or-failed";
    serviceConfig = {
      ExecStart = lib.concatStringsSep " " [
        (lib.getExe scripts.clock-set)
        hostPeer
        earliest
        latest
        readTimeout
        "${pkgs.coreutils}/bin/date"
        "-s"
      ];
      StandardInput = "socket";
      StandardOutput = "socket";
      # Not the socket: the log is the journal's, the answer the host's.
      StandardError = "journal";
      RuntimeMaxSec = 30;
      # root, allowed to set the clock and nothing else. (ProtectClock would
      # forbid exactly what this service is for.)
      CapabilityBoundingSet = [ "CAP_SYS_TIME" ];
      NoNewPrivileges = true;
      ProtectSystem = "strict";
      ProtectHome = true;
      PrivateTmp = true;
      PrivateDevices = true;
      ProtectKernelTunables = true;
      ProtectKernelModules = true;
      ProtectKernelLogs = true;
      ProtectControlGroups = true;
      ProtectHostname = true;
      ProtectProc = "invisible";
      ProcSubset = "pid";
      RestrictAddressFamilies = [ "AF_UNIX" ];
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      LockPersonality = true;
      MemoryDenyWriteExecute = true;
      SystemCallArchitectures = "native";
      SystemCallFilter = [
        "@system-service"
        "@clock"
      ];
      UMask = "0077";
    };
  };
}
