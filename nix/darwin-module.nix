# nix-darwin module: services.darwin-vz.
#
# Declares what the host needs and leaves the doing to the daemon: one JSON config
# file, a launchd daemon running `darwin-vz-nix daemon` as a hidden service user, the
# builder's line for Nix, and the ssh_config block root's nix-daemon uses to reach it.
#
# Nix's build machines: at every activation root runs `darwin-vz-nix machines` on the
# daemon's own config, which resolves and fits it to this Mac exactly as the daemon
# will (so maxJobs follows the cores the VM really gets), and writes the line to the
# root-owned /etc/nix/darwin-vz-nix.machines. This module adds
# `@/etc/nix/darwin-vz-nix.machines` to /etc/nix/machines, which Nix reads by default
# and in which it follows `@` entries. That file is the one every way of installing
# Nix reads: nix-darwin's (nix.enable), Determinate Nix's (nix.enable = false, with or
# without Determinate's module), and it merges with the user's own nix.buildMachines
# / determinateNix.buildMachines. The daemon, which runs as the service account,
# writes nothing Nix reads: whoever writes a machines line chooses where root's
# nix-daemon connects, with which key, for which systems. It does record what each
# boot's guest said about /dev/kvm (nested virtualization); a root launchd job then
# writes the line again, and that report can only take kvm and nixos-test away.
#
# The guest is not built here either: the switch carries only its derivation (.drv)
# and the output path it builds (nix/lib.nix guestSettings), so it needs no
# aarch64-linux builder. The daemon realises the derivation through the nix-daemon
# when it starts, and boots the result (src/guest).
#
# The VM is not booted here: the daemon starts idle, boots the guest when the first
# build connects through `darwin-vz-nix proxy`, and powers it off after
# idleTimeout minutes without a connection.
#
# The flake's darwinModules.default imports this file and sets `package` and
# `guestNixpkgs` to the flake's own pinned nixpkgs, whose stock packages are on
# cache.nixos.org. Imported on its own, it takes both from the system's nixpkgs.
{
  config,
  options,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;

  cfg = config.services.darwin-vz;
  dvnLib = import ./lib.nix;
  defaults = dvnLib.optionDefaults;

  exe = lib.getExe' cfg.package "darwin-vz-nix";

  configFile = pkgs.writeText "darwin-vz-nix.json" (builtins.toJSON cfg.daemonSettings);

  # The bootstrap builder, for a guest the daemon realises itself: nixpkgs'
  # darwin.linux-builder from the guest's nixpkgs, which has it on cache.nixos.org.
  bootstrapBuilder = import ./bootstrap.nix {
    pkgs = import cfg.guestNixpkgs { inherit (pkgs.stdenv.hostPlatform) system; };
  };
  useBootstrap = cfg.bootstrap.enable && cfg.guest ? drvPath;

  # The guest is the default one unless extraNixOSConfig was set: with the default
  # guest, the evaluation is exactly the flake's packages.aarch64-linux.guest.
  optionDefaultPriority = (lib.mkOptionDefault { }).priority;
  customGuest = options.services.darwin-vz.extraNixOSConfig.highestPrio < optionDefaultPriority;
  # The guest's kernel follows rosetta and nestedVirtualization (nix/nixos/kvm.nix):
  # the kernel KVM can use where nested virtualization is wanted and Rosetta allows
  # it, or was asked for explicitly. That guest is the flake's guest-kvm, cached too.
  kvmKernel = dvnLib.guestKernelForNestedVirtualization {
    inherit (cfg) rosetta nestedVirtualization;
  };
  guestModules =
    lib.optional customGuest cfg.extraNixOSConfig ++ lib.optional kvmKernel dvnLib.guestKernelModule;

  linuxBuilderDir = toString config.nix.linux-builder.workingDirectory;

  # The builder's line for Nix, written by root at activation (never a link into
  # /etc/static: nothing in environment.etc may manage it).
  inherit (dvnLib) machinesFile;
  machinesEtcTarget = lib.removePrefix "/etc/" machinesFile;
  etcClaimsMachinesFile = builtins.any (file: file.enable && file.target == machinesEtcTarget) (
    builtins.attrValues config.environment.etc
  );
  writeMachinesFile = lib.escapeShellArgs [
    exe
    "machines"
    "--config"
    configFile
    "--write"
    machinesFile
  ];

  # Determinate Nix's nix-darwin module (DeterminateSystems/determinate) is imported.
  determinateModule = options ? determinateNix;

  # One field of Nix's machines file: no whitespace, and no `,` `;` `#`, which
  # separate list items and entries and start comments (the daemon checks the same).
  machinesName = types.strMatching "[^[:space:],;#]{1,100}";

  # The service account and group must be new ones (see accountProblems).
  accountAssertions = map (message: {
    assertion = false;
    inherit message;
  }) (dvnLib.accountProblems cfg);
in
{
  options.services.darwin-vz = {
    enable = lib.mkEnableOption "the Linux builder VM on Virtualization.framework";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalMD ''
        the flake's `packages.aarch64-darwin.default`; `pkgs.callPackage ./nix/package.nix { }`
        when this file is imported on its own
      '';
      example = lib.literalExpression "inputs.darwin-vz-nix.packages.aarch64-darwin.default";
      description = ''
        The darwin-vz-nix package; its binary runs the daemon and is the ssh ProxyCommand.
      '';
    };

    cores = mkOption {
      type = types.nullOr types.ints.positive;
      default = defaults.cores;
      example = 8;
      description = ''
        Virtual CPUs of the VM. `null`: fitted to this Mac when the daemon starts,
        4 or the Mac's CPU count if that is lower. A number is taken as given (more
        than the Mac has is an error at boot).
      '';
    };

    memory = mkOption {
      type = types.nullOr types.ints.positive;
      default = defaults.memory;
      example = 12288;
      description = ''
        Memory of the VM in MiB. `null`: fitted to this Mac when the daemon starts,
        6144 or half the Mac's memory if that is lower (at least 1024). It is held
        only while the VM runs: the VM powers off after
        {option}`services.darwin-vz.idleTimeout` and gives it back.
      '';
    };

    diskSize = mkOption {
      type = types.strMatching "[0-9]+[KMGT]";
      default = defaults.diskSize;
      example = "200G";
      description = ''
        Size of the VM's disk (a sparse file: it takes only the space written to it).
        Binary units K, M, G, T. The disk grows when this grows; shrinking is refused.
      '';
    };

    rosetta = mkOption {
      type = types.bool;
      default = defaults.rosetta;
      example = false;
      description = ''
        Run x86_64-linux builds through Rosetta 2. Rosetta must be installed on the
        Mac: `softwareupdate --install-rosetta --agree-to-license`.
      '';
    };

    idleTimeout = mkOption {
      type = types.ints.unsigned;
      default = defaults.idleTimeout;
      example = 0;
      description = ''
        Minutes without an open build connection after which the VM powers off and
        gives its memory back to macOS. 0 keeps it running once booted.
      '';
    };

    stopTimeout = mkOption {
      type = types.ints.positive;
      default = defaults.stopTimeout;
      example = 60;
      description = "Seconds to wait for the guest to power off gracefully before forcing it.";
    };

    kernelParams = mkOption {
      type = types.listOf types.str;
      default = defaults.kernelParams;
      example = [ "systemd.log_level=debug" ];
      description = "Extra kernel command-line parameters for the guest, appended last.";
    };

    extraNixOSConfig = mkOption {
      type = types.deferredModule;
      default = { };
      example = lib.literalExpression ''
        { pkgs, ... }: {
          environment.systemPackages = [ pkgs.htop ];
        }
      '';
      description = ''
        A NixOS module merged into the guest's configuration. Setting it makes the
        guest a new aarch64-linux build: the switch does not build it; the daemon
        does, on the guest that runs now, which keeps serving until the new one is
        ready (see the README, "Customising the guest").
      '';
    };

    guestNixpkgs = mkOption {
      type = types.path;
      default = pkgs.path;
      defaultText = lib.literalMD ''
        the flake's `nixpkgs` input; `pkgs.path` when this file is imported on its own
      '';
      example = lib.literalExpression "inputs.nixpkgs";
      description = ''
        The Nixpkgs source the guest is evaluated from. The flake's own is a
        nixpkgs-unstable revision whose stock packages are on cache.nixos.org, so
        only the guest's own configuration is built; another revision may mean
        building much more.
      '';
    };

    guest = mkOption {
      type = types.package;
      default = import ./guest.nix {
        nixpkgs = cfg.guestNixpkgs;
        modules = guestModules;
      };
      defaultText = lib.literalMD ''
        the default guest, with {option}`services.darwin-vz.extraNixOSConfig` merged in when
        set, and the kernel nested virtualization can use when
        {option}`services.darwin-vz.nestedVirtualization` is `"on"`, or `"auto"` with
        {option}`services.darwin-vz.rosetta` off
      '';
      example = lib.literalExpression ''
        inputs.darwin-vz-nix.lib.mkGuest { modules = [ ./builder.nix ]; }
      '';
      description = ''
        The guest: a derivation building a directory with `kernel`, `initrd`,
        `system` and `registration`, as the flake's `lib.mkGuest` makes. The switch
        does not build it: the daemon gets its .drv and output path, builds it when
        it starts, and boots it once it is ready. A store path (a guest built
        elsewhere) is booted as it is.
      '';
    };

    bootstrap.enable = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = ''
        While no guest exists yet and building the guest needs an aarch64-linux
        build, bring up nixpkgs' `darwin.linux-builder` (QEMU, from
        cache.nixos.org, run by the daemon's account, SSH on 127.0.0.1 only) for
        those builds, and remove it once the guest is built. Turn it off if this Mac
        has another aarch64-linux builder, or to build the first guest yourself.
      '';
    };

    daemonSettings = mkOption {
      type = types.attrs;
      internal = true;
      readOnly = true;
      description = ''
        The daemon's JSON config as the module writes it (for checks and debugging).
      '';
    };

    workingDirectory = mkOption {
      type = types.path;
      default = defaults.workingDirectory;
      example = "/Volumes/Fast/darwin-vz";
      description = ''
        The daemon's state directory: disk image, SSH keys, control socket and logs.
        Keep it short: the control socket's path must fit in 103 bytes.
      '';
    };

    logFile = mkOption {
      type = types.path;
      default = "/var/log/darwin-vz-nix.log";
      example = "/Users/me/Library/Logs/darwin-vz-nix.log";
      description = "Where launchd writes the daemon's standard output and error.";
    };

    logLevel = mkOption {
      type = types.enum [
        "error"
        "warn"
        "info"
        "debug"
        "trace"
      ];
      default = defaults.logLevel;
      example = "debug";
      description = "How much the daemon logs.";
    };

    maxJobs = mkOption {
      type = types.nullOr (types.ints.between 1 1024);
      default = dvnLib.builderDefaults.maxJobs;
      example = 2;
      description = ''
        How many builds Nix runs on the VM at once (the machines file's max-jobs
        field). `null`: the VM's cores, as the daemon fitted them to this Mac.
      '';
    };

    speedFactor = mkOption {
      type = types.ints.between 1 1000000;
      default = dvnLib.builderDefaults.speedFactor;
      example = 2;
      description = "Relative speed of the VM among your build machines.";
    };

    supportedFeatures = mkOption {
      type = types.nullOr (types.listOf machinesName);
      # null: `darwin-vz-nix machines` decides, with kvm and nixos-test only where
      # the guest really has /dev/kvm; a list is advertised as written.
      default = dvnLib.builderDefaults.supportedFeatures;
      example = [
        "benchmark"
        "big-parallel"
        "my-feature"
      ];
      description = ''
        System features of the VM: Nix sends it builds that require only these. `null`:
        `benchmark` and `big-parallel`, plus `kvm` and `nixos-test` exactly where
        {option}`services.darwin-vz.nestedVirtualization` gives the guest a `/dev/kvm`
        (taken away again when a boot shows it has none). A list is advertised as
        written, whatever the guest has.
      '';
    };

    mandatoryFeatures = mkOption {
      type = types.listOf machinesName;
      default = dvnLib.builderDefaults.mandatoryFeatures;
      example = [ "big-parallel" ];
      description = ''
        Features a build must require to be sent to the VM (they count as supported too).
      '';
    };

    nestedVirtualization = mkOption {
      type = types.enum dvnLib.nestedVirtualizationValues;
      default = defaults.nestedVirtualization;
      example = "off";
      description = ''
        Boot the guest with nested virtualization, so that it has `/dev/kvm` and Nix
        can run NixOS VM tests (`nixosTest`, `kvm`, `nixos-test`) on it. It needs an
        Apple M3 or later, macOS 15 or later, and a guest kernel of Linux 6.12 or
        later. `"auto"`: on exactly where all three hold. `"on"`: on, and the daemon
        refuses to boot where the Mac cannot. `"off"`: never. The guest's kernel
        follows this and {option}`services.darwin-vz.rosetta`: with Rosetta on, the
        guest keeps a kernel Rosetta runs on (before 6.11) unless this is `"on"`; see
        the README, "Nested virtualization".
      '';
    };

    systems = mkOption {
      type = types.nonEmptyListOf machinesName;
      default = dvnLib.defaultSystems cfg.rosetta;
      defaultText = lib.literalExpression ''
        [ "aarch64-linux" ] ++ lib.optional config.services.darwin-vz.rosetta "x86_64-linux"
      '';
      example = [ "aarch64-linux" ];
      description = ''
        Systems the VM builds for. Nix sends x86_64-linux builds to it only if listed here.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "_darwin-vz";
      example = "_nixvm";
      description = ''
        Hidden service account the daemon runs as. The module creates and manages it
        (`users.knownUsers`), so it must be a new account: a name starting with `_`,
        not one of macOS's own, with a {option}`services.darwin-vz.uid` from 300 up.
      '';
    };

    uid = mkOption {
      type = types.int;
      default = 455;
      example = 456;
      description = ''
        UID of {option}`services.darwin-vz.user`. Change it if it collides with an existing account.
      '';
    };

    group = mkOption {
      type = types.str;
      default = defaults.group;
      example = "_nixvm";
      description = ''
        Group of the service account, created and managed by the module
        (`users.knownGroups`, members set to
        {option}`services.darwin-vz.groupMembers`), so a new group like
        {option}`services.darwin-vz.user`, never an existing one such as `admin` or
        `staff`. Its members may use the daemon's control socket.
      '';
    };

    gid = mkOption {
      type = types.int;
      default = 455;
      example = 456;
      description = "GID of {option}`services.darwin-vz.group`.";
    };

    groupMembers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "alice" ];
      description = ''
        Existing users to add to {option}`services.darwin-vz.group`: they may use
        the daemon's control socket (`darwin-vz-nix status`, `start`, and builds
        through it; not `stop`, `destroy` or `rotate-keys`) without sudo, from their
        next login. The accounts themselves are not
        managed. `darwin-vz-nix ssh` still needs sudo: the client key is readable by
        the service account only.
      '';
    };

    preventSleep = mkOption {
      type = types.bool;
      default = defaults.preventSleep;
      example = false;
      description = ''
        Keep the Mac from idle sleep while a build connection to the VM is open:
        a power assertion that `pmset -g assertions` shows as
        "darwin-vz-nix: 2 Linux build connections". The display may still sleep,
        and closing the lid or choosing Sleep still sleeps the Mac.
      '';
    };

    hostStoreCache = mkOption {
      type = types.bool;
      default = defaults.hostStoreCache;
      example = false;
      description = ''
        Serve this Mac's /nix/store to the VM as its first binary cache, over vsock
        and signed with a key made on this Mac: build inputs the Mac already has
        reach the VM without crossing the SSH session or the network. Takes effect
        through `builders-use-substitutes`, which this module sets. Off: the VM takes
        inputs from its other caches, then from the Mac over SSH.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = pkgs.stdenv.hostPlatform.system == "aarch64-darwin";
            message = "services.darwin-vz needs an Apple Silicon Mac: the guest is aarch64-linux.";
          }
          {
            assertion = !config.nix.linux-builder.enable;
            message = ''
              services.darwin-vz replaces nix.linux-builder; enable only one of them.
              To migrate: set nix.linux-builder.enable = false and keep
              services.darwin-vz.enable = true, then run darwin-rebuild switch.
              Nothing needs to be copied over: with nix.linux-builder disabled,
              nix-darwin deletes the old VM image in /var/lib/linux-builder itself.
              Settings from nix.linux-builder.config move to
              services.darwin-vz.extraNixOSConfig.
            '';
          }
          {
            # nix-darwin runs `rm -rf` on that directory at every activation while
            # nix.linux-builder is disabled: ours must be neither it, inside it, nor
            # around it.
            assertion = !dvnLib.pathsOverlap cfg.workingDirectory linuxBuilderDir;
            message = ''
              services.darwin-vz.workingDirectory (${toString cfg.workingDirectory}) must be
              outside nix.linux-builder.workingDirectory (${linuxBuilderDir}) and not contain it:
              nix-darwin deletes that directory while nix.linux-builder is disabled.
            '';
          }
          {
            assertion = !etcClaimsMachinesFile;
            message = ''
              environment.etc must not manage ${machinesFile}: services.darwin-vz has root
              write it at every activation, from the daemon's own configuration. Remove that
              environment.etc entry and set the builder through services.darwin-vz
              (maxJobs, speedFactor, systems, supportedFeatures, mandatoryFeatures).
            '';
          }
          {
            assertion = builtins.elem "x86_64-linux" cfg.systems -> cfg.rosetta;
            message = ''
              services.darwin-vz.systems lists x86_64-linux but services.darwin-vz.rosetta is off:
              those builds would fail inside the VM.
            '';
          }
        ]
        ++ accountAssertions;

        warnings =
          lib.optional (cfg.supportedFeatures != null && builtins.elem "kvm" cfg.supportedFeatures) ''
            services.darwin-vz.supportedFeatures lists "kvm": it is advertised whether or not
            the guest has /dev/kvm, and builds that need it fail in a guest without it. Leave
            supportedFeatures unset (null) to offer kvm exactly where the guest has it.
          ''
          ++ lib.optional (cfg.rosetta && cfg.nestedVirtualization == "on") ''
            services.darwin-vz.nestedVirtualization = "on" with rosetta = true: the guest runs
            the kernel nested virtualization needs (Linux 6.12 or later), which Rosetta before
            macOS 26 cannot run (x86_64-linux builds fail: "Failed to find vdso DT_HASH").
            On macOS 15 choose one: nestedVirtualization = "auto" keeps x86_64-linux builds
            (no kvm), rosetta = false keeps kvm (no x86_64-linux).
          ''
          # nix.distributedBuilds throws when read with nix.enable off.
          ++ lib.optional (config.nix.enable && !config.nix.distributedBuilds) ''
            nix.distributedBuilds is false: Nix reads no build machines then, so it never
            uses the darwin-vz builder. Remove that setting (the module defaults it to true).
          '';

        # Only the hidden account and group created here are managed (the
        # assertions above refuse existing ones); existing users join the group
        # through groupMembers, and their own accounts are left alone.
        services.darwin-vz.daemonSettings =
          dvnLib.daemonConfig cfg
          // lib.optionalAttrs useBootstrap (dvnLib.bootstrapSettings bootstrapBuilder);

        users.users.${cfg.user} = {
          inherit (cfg) uid gid;
          description = "darwin-vz-nix builder VM";
          isHidden = true;
        };
        users.knownUsers = [ cfg.user ];
        users.groups.${cfg.group} = {
          inherit (cfg) gid;
          description = "darwin-vz-nix builder VM";
          members = cfg.groupMembers;
        };
        users.knownGroups = [ cfg.group ];

        # The daemon creates everything inside its state directory on first start, but
        # runs unprivileged and cannot create the directory itself under /var/lib, nor
        # the log file launchd opens for it. extraActivation is one of the fixed script
        # names nix-darwin runs (modules/system/activation-scripts.nix); it runs before
        # the `users` script creates the account, hence numeric ids.
        system.activationScripts.extraActivation.text = ''
          mkdir -p ${lib.escapeShellArg cfg.workingDirectory}
          chown ${toString cfg.uid}:${toString cfg.gid} ${lib.escapeShellArg cfg.workingDirectory}
          chmod 0750 ${lib.escapeShellArg cfg.workingDirectory}
          mkdir -p "$(dirname ${lib.escapeShellArg cfg.logFile})"
          touch ${lib.escapeShellArg cfg.logFile}
          chown ${toString cfg.uid}:${toString cfg.gid} ${lib.escapeShellArg cfg.logFile}

          # The builder's line for Nix, written by root from the daemon's config (the
          # daemon's account must not control what root's nix-daemon reads), before
          # the `etc` script links the /etc/nix/machines that includes it. A failure
          # warns and lets the switch go on: Nix keeps the previous line, or has none.
          echo "writing the darwin-vz-nix builder for Nix..." >&2
          mkdir -p ${lib.escapeShellArg (dirOf machinesFile)}
          if ! ${writeMachinesFile}; then
            printf >&2 '\e[1;33mwarning: darwin-vz-nix could not write %s (see the error above);\e[0m\n' ${lib.escapeShellArg machinesFile}
            printf >&2 'Nix keeps the builder line it had, or none. To retry: sudo %s\n' ${lib.escapeShellArg writeMachinesFile}
          fi
        '';

        # Root writes the builder's line again whenever the daemon records what a
        # boot's guest said about /dev/kvm, so kvm and nixos-test leave the line as
        # soon as a guest turns out to have none (the report can only take them
        # away; see nix/lib.nix, machinesRefreshDaemon).
        launchd.daemons.darwin-vz-nix-machines = dvnLib.machinesRefreshDaemon {
          program = exe;
          inherit configFile;
          stateDir = cfg.workingDirectory;
        };

        launchd.daemons.darwin-vz-nix = {
          # `command` (rather than ProgramArguments) makes nix-darwin wrap it in
          # `/bin/wait4path /nix/store`: at boot the Nix volume may mount after launchd
          # loads the daemon.
          command = lib.escapeShellArgs [
            exe
            "daemon"
            "--config"
            configFile
          ];
          serviceConfig = {
            # The daemon itself never exits on idle (only the VM stops), so KeepAlive
            # restarts it only after a crash.
            KeepAlive = true;
            RunAtLoad = true;
            UserName = cfg.user;
            GroupName = cfg.group;
            StandardOutPath = cfg.logFile;
            StandardErrorPath = cfg.logFile;
            # On SIGTERM (darwin-rebuild, shutdown) the daemon powers the guest off
            # gracefully; launchd must not SIGKILL it in the middle.
            ExitTimeOut = dvnLib.launchdExitTimeout cfg.stopTimeout;
            # The VM runs builds someone is waiting for, and only while they run (it is
            # off when idle): no launchd CPU or I/O throttling.
            ProcessType = "Interactive";
            # One proxied connection holds a few descriptors; Nix opens them in bursts.
            SoftResourceLimits.NumberOfFiles = 4096;
          };
        };

        # For `darwin-vz-nix status`, `ssh-config` and `ssh`; the variable makes them
        # talk to this daemon without --state-dir (sudo drops it: pass --state-dir there).
        environment.systemPackages = [ cfg.package ];
        environment.variables.DARWIN_VZ_NIX_STATE_DIR = toString cfg.workingDirectory;

        # Root's nix-daemon reads root's ssh configuration: the Host block must be
        # system-wide. macOS's /etc/ssh/ssh_config includes ssh_config.d/*.
        environment.etc."ssh/ssh_config.d/100-darwin-vz-nix.conf".text = dvnLib.sshConfig {
          bin = exe;
          stateDir = cfg.workingDirectory;
        };

        # `text` is a `lines` option: this line joins whatever nix.buildMachines (or
        # determinateNix.buildMachines) writes there, with no conflicting definition.
        environment.etc."nix/machines".text = lib.mkAfter (dvnLib.machinesInclude machinesFile);
      }

      # nix-darwin manages Nix: its settings, as defaults the user may override.
      (lib.mkIf config.nix.enable {
        nix.distributedBuilds = lib.mkDefault true;
        # The guest fetches what it can from caches itself rather than receiving every
        # input from the Mac.
        nix.settings.builders-use-substitutes = lib.mkDefault true;
      })

      # Determinate Nix with its nix-darwin module: the same setting, through the
      # module's own option (it writes /etc/nix/nix.custom.conf). Without the module,
      # nix.custom.conf is the user's file, left alone (see the README).
      (lib.optionalAttrs determinateModule (
        lib.mkIf config.determinateNix.enable {
          determinateNix.customSettings.builders-use-substitutes = lib.mkDefault true;
        }
      ))
    ]
  );
}
