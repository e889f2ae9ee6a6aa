# The host's store as the guest's first binary cache.
#
# When the host's Nix sends a build here, the guest's Nix first asks its
# substituters for every input it lacks (the host sets builders-use-substitutes)
# and only then receives the rest over the SSH session. The host's supervisor
# serves its /nix/store as an ordinary binary cache on host vsock port
# hostCachePort (contract.json): signed narinfos, uncompressed NARs. This module
# reaches it as http://127.0.0.1:<localPort> and puts it first:
#
# * a socket unit on 127.0.0.1 hands each connection to socat, which connects
#   to the host (vsock CID 2): Nix has no vsock transport of its own. systemd
#   binds the socket before the substituter is configured, so Nix never meets
#   a refused connection (Nix before 2.32 fails the whole build on one);
# * a oneshot unit writes a nix.conf fragment (scripts/host-cache.sh) with the
#   substituter and the host's public key, which the host delivers through its
#   one-shot key share (copied by host-handover, ssh.nix). nix.conf includes the
#   fragment with `!include`, which ignores a missing file.
#
# All of it only when the host says it serves the cache
# (darwin_vz_nix.host_cache=1): a guest booted by a host with hostStoreCache =
# false has neither socket nor substituter. The cache's nix-cache-info says
# Priority 10, before cache.nixos.org's 40. Every NAR is checked against the
# narinfo's hash, and every narinfo against the host's key, like any
# substitution; whatever the host cannot serve comes from the next substituter,
# then from the host's push, as without this module.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);
  cfg = config.darwin-vz-nix.hostCache;

  servedByHost = "${contract.kernelParams.hostCache}=1";
  url = "http://127.0.0.1:${toString cfg.localPort}";
  # Read by nix-daemon through `!include`; absent unless the host serves the cache.
  nixConfFragment = "/run/darwin-vz-nix/nix-host-cache.conf";

  scripts = import ./scripts.nix {
    inherit pkgs;
    nix = config.nix.package;
    systemd = config.systemd.package;
  };
in
{
  options.darwin-vz-nix.hostCache = {
    localPort = lib.mkOption {
      type = lib.types.port;
      default = 17026;
      description = ''
        The loopback TCP port on which the guest reaches the host's store cache
        (forwarded to host vsock port ${toString contract.vsock.hostCachePort}).
        Change it only if something else in the guest needs this port.
      '';
    };
    keyFile = lib.mkOption {
      type = lib.types.str;
      default = "/run/darwin-vz-nix/host-cache-key.pub";
      internal = true;
      readOnly = true;
      description = "Where host-handover puts the host cache's public key.";
    };
  };

  config = {
    nix.extraOptions = ''
      !include ${nixConfFragment}
    '';

    systemd.sockets.darwin-vz-nix-host-cache = {
      description = "The host's store cache on ${url}";
      wantedBy = [ "sockets.target" ];
      unitConfig.ConditionKernelCommandLine = servedByHost;
      socketConfig = {
        ListenStream = "127.0.0.1:${toString cfg.localPort}";
        Accept = true;
        # Nix keeps up to 25 connections per process (http-connections), one
        # process per build the host sends; past the limit systemd refuses.
        MaxConnections = 1024;
      };
    };

    systemd.services."darwin-vz-nix-host-cache@" = {
      description = "One connection to the host's store cache";
      serviceConfig = {
        # -b: NARs are large; socat's default 8 KiB buffer means many more syscalls.
        ExecStart = "${pkgs.socat}/bin/socat -b 262144 STDIO VSOCK-CONNECT:2:${toString contract.vsock.hostCachePort}";
        StandardInput = "socket";
        StandardError = "journal";
        DynamicUser = true;
        PrivateTmp = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        NoNewPrivileges = true;
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_VSOCK"
        ];
      };
    };

    systemd.services.darwin-vz-nix-host-cache = {
      description = "Substitute from the host's store first";
      wantedBy = [ "multi-user.target" ];
      before = [ "nix-daemon.service" ];
      after = [
        "darwin-vz-nix-ssh-keys.service"
        "darwin-vz-nix-host-cache.socket"
      ];
      requires = [ "darwin-vz-nix-host-cache.socket" ];
      unitConfig.ConditionKernelCommandLine = servedByHost;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = lib.concatStringsSep " " [
          (lib.getExe scripts.host-cache)
          cfg.keyFile
          url
          nixConfFragment
        ];
      };
    };
  };
}
