{
  description = "A NixOS VM on Apple's Virtualization.framework as the Mac's Linux remote builder";

  inputs = {
    # The branch nix-darwin recommends on macOS and tests its master branch with.
    # Unlike nixos-unstable, its channel waits for the Darwin builds too, so the
    # Darwin toolchain the CLI needs is in the binary cache at every pin. The guest
    # (NixOS, aarch64-linux) is built from the same pin.
    nixpkgs.url = "github:NixOS/nixpkgs/nixpkgs-unstable";

    # Only for `checks`: evaluates the module the way a nix-darwin system does.
    # Users of the module bring their own nix-darwin.
    nix-darwin = {
      url = "github:nix-darwin/nix-darwin";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      nix-darwin,
    }:
    let
      inherit (nixpkgs) lib;

      # The host runs VMs on Apple Silicon only; the guest is aarch64-linux.
      hostSystem = "aarch64-darwin";
      guestSystem = "aarch64-linux";
      # Where a developer may work on the project (formatter, dev shell).
      devSystems = [
        "aarch64-darwin"
        "aarch64-linux"
        "x86_64-linux"
      ];
      forDevSystems = lib.genAttrs devSystems;
      pkgsFor = system: nixpkgs.legacyPackages.${system};

      # guest.nix takes the Nixpkgs *source*; the nix-darwin module passes one too
      # (services.darwin-vz.guestNixpkgs), so both evaluate the same guest.
      mkGuest =
        {
          modules ? [ ],
        }:
        import ./nix/guest.nix {
          nixpkgs = nixpkgs.outPath;
          system = guestSystem;
          inherit modules;
        };

      cli = self.packages.${hostSystem}.default;
      defaultGuest = self.packages.${guestSystem}.guest;

      # Evaluates the module inside a real nix-darwin system and returns what it
      # generates (launchd plist, daemon config, /etc/nix/machines, the activation that
      # writes the builder's line, ssh_config), as a file. The check builds neither the guest nor the CLI: it is about the
      # module's evaluation, so string context is dropped.
      evalModule =
        {
          name,
          settings ? { },
          # More of the system's configuration (e.g. nix.enable = false).
          modules ? [ ],
          expect,
        }:
        let
          system = nix-darwin.lib.darwinSystem {
            modules = [
              self.darwinModules.default
              {
                nixpkgs.hostPlatform = hostSystem;
                system.stateVersion = 6;
                services.darwin-vz = settings // {
                  enable = true;
                };
              }
            ]
            ++ modules;
          };
          inherit (system) config;
          daemon = config.launchd.daemons.darwin-vz-nix;
          failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
          generated = {
            plist = config.environment.launchDaemons."${daemon.serviceConfig.Label}.plist".text;
            daemonConfig = config.services.darwin-vz.daemonSettings;
            # What building the daemon config would build: nothing (the guest and
            # the bootstrap builder are named by their .drv, realised by the daemon).
            configOutputDependencies = (import ./nix/lib.nix).outputDependencies config.services.darwin-vz.daemonSettings;
            machines = config.environment.etc."nix/machines".text;
            activation = config.system.activationScripts.extraActivation.text;
            etcFiles = builtins.attrNames config.environment.etc;
            refreshPlist =
              config.environment.launchDaemons."${config.launchd.daemons.darwin-vz-nix-machines.serviceConfig.Label}.plist".text;
            sshConfig = config.environment.etc."ssh/ssh_config.d/100-darwin-vz-nix.conf".text;
          };
          wrong = builtins.filter (e: !e.holds generated) expect;
        in
        if failed != [ ] then
          throw "darwin module (${name}): failed assertions:\n${lib.concatStringsSep "\n" failed}"
        else if wrong != [ ] then
          throw "darwin module (${name}): ${lib.concatMapStringsSep "; " (e: e.what) wrong}"
        else
          (pkgsFor hostSystem).writeText "darwin-module-${name}.json" (
            builtins.unsafeDiscardStringContext (builtins.toJSON generated)
          );

      # The activation line that has root write the builder's line for Nix (a regex:
      # the store paths differ), and whether an activation script runs it.
      writeMachinesFile = "if ! /nix/store/[^ ]+/bin/darwin-vz-nix machines --config /nix/store/[^ ]+-darwin-vz-nix[.]json --write /etc/nix/darwin-vz-nix[.]machines; then";
      runsAtActivation =
        regex: script: builtins.any (line: builtins.match regex line != null) (lib.splitString "\n" script);

      # Every .nix file of the repository is formatted with nixfmt.
      formatting =
        system:
        let
          pkgs = pkgsFor system;
          nixFiles = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.fileFilter (file: file.hasExt "nix") ./.;
          };
        in
        pkgs.runCommand "nixfmt-check" { nativeBuildInputs = [ pkgs.nixfmt ]; } ''
          find ${nixFiles} -name '*.nix' -print0 | xargs -0 nixfmt --check
          touch $out
        '';
      formattingChecks = forDevSystems (system: {
        formatting = formatting system;
      });
    in
    {
      packages = {
        ${hostSystem} = {
          darwin-vz-nix = (pkgsFor hostSystem).callPackage ./nix/package.nix { };
          default = self.packages.${hostSystem}.darwin-vz-nix;
          # The bootstrap builder's VM runner (nix/bootstrap.nix), with its host
          # key as `hostKey`: for the Mac test (tests/macos.rs) and for looking.
          bootstrap-builder =
            let
              bootstrap = import ./nix/bootstrap.nix { pkgs = pkgsFor hostSystem; };
            in
            bootstrap.vm // { inherit (bootstrap) hostKey; };
        };
        # The guest. A Mac gets it without a Linux builder of its own: the daemon
        # realises it when it starts (README, "Bootstrap").
        ${guestSystem} = {
          guest = mkGuest { };
          # The default guest with the kernel nested virtualization can use (Linux
          # 6.12 or later; nix/nixos/kvm.nix), which Rosetta before macOS 26 cannot
          # run. The nix-darwin module picks it for rosetta = false (with
          # nestedVirtualization left at auto) and for nestedVirtualization = "on".
          guest-kvm = mkGuest { modules = [ (import ./nix/lib.nix).guestKernelModule ]; };
          default = self.packages.${guestSystem}.guest;
        };
      };

      # `nix run github:…/darwin-vz-nix -- start` boots the default guest with no
      # flags. The wrapper names the guest by its derivation and output path (as the
      # nix-darwin module does), so running it builds nothing for aarch64-linux: the
      # daemon realises the guest when it starts. A guest directory in
      # DARWIN_VZ_NIX_GUEST, or --guest, still wins.
      apps.${hostSystem}.default =
        let
          dvnLib = import ./nix/lib.nix;
          guest = {
            guestDrv = builtins.unsafeDiscardOutputDependency defaultGuest.drvPath;
            guestOut = builtins.unsafeDiscardStringContext defaultGuest.outPath;
          };
          bootstrap = dvnLib.bootstrapSettings (import ./nix/bootstrap.nix { pkgs = pkgsFor hostSystem; });
          wrapper = (pkgsFor hostSystem).writeShellScriptBin "darwin-vz-nix" ''
            if [ -z "''${DARWIN_VZ_NIX_GUEST:-}" ]; then
              export DARWIN_VZ_NIX_GUEST_DRV="''${DARWIN_VZ_NIX_GUEST_DRV:-${guest.guestDrv}}"
              export DARWIN_VZ_NIX_GUEST_OUT="''${DARWIN_VZ_NIX_GUEST_OUT:-${guest.guestOut}}"
              export DARWIN_VZ_NIX_BOOTSTRAP_DRV="''${DARWIN_VZ_NIX_BOOTSTRAP_DRV:-${bootstrap.bootstrapDrv}}"
              export DARWIN_VZ_NIX_BOOTSTRAP_HOST_KEY="''${DARWIN_VZ_NIX_BOOTSTRAP_HOST_KEY:-${lib.strings.trim bootstrap.bootstrapHostKey}}"
            fi
            exec ${lib.getExe cli} "$@"
          '';
        in
        {
          type = "app";
          program = lib.getExe wrapper;
          meta.description = "darwin-vz-nix with the flake's default guest (built on first start)";
        };

      darwinModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/darwin-module.nix ];
          services.darwin-vz = {
            package =
              let
                inherit (pkgs.stdenv.hostPlatform) system;
              in
              lib.mkDefault (self.packages.${system}.default or (pkgs.callPackage ./nix/package.nix { }));
            # The guest's Nixpkgs is the flake's pin, whatever the system's nixpkgs
            # is: that is the guest the binary cache holds.
            guestNixpkgs = lib.mkDefault nixpkgs.outPath;
          };
        };
      darwinModules.darwin-vz = self.darwinModules.default;

      # The guest's NixOS modules, one per file of nix/nixos/, and `default`, the
      # whole guest configuration.
      nixosModules =
        let
          isModule = file: type: type == "regular" && lib.hasSuffix ".nix" file;
          files = lib.filterAttrs isModule (builtins.readDir ./nix/nixos);
          module = file: _: {
            name = lib.removeSuffix ".nix" file;
            value = ./nix/nixos + "/${file}";
          };
        in
        lib.mapAttrs' module files
        // {
          default = ./nix/nixos/configuration.nix;
          guest = ./nix/nixos/configuration.nix;
        };

      # A customised guest: `darwin-vz-nix.lib.mkGuest { modules = [ ./builder.nix ]; }`
      # is an aarch64-linux derivation like packages.aarch64-linux.guest.
      lib = {
        inherit mkGuest;
      };

      checks = lib.recursiveUpdate formattingChecks {
        ${hostSystem} = {
          package = cli;
          module-defaults = evalModule {
            name = "defaults";
            expect = [
              {
                what = "Nix reads the root-written machines file through /etc/nix/machines";
                holds = g: lib.hasInfix "@/etc/nix/darwin-vz-nix.machines\n" g.machines;
              }
              {
                what = "root writes that file at activation from the daemon's config";
                holds = g: runsAtActivation writeMachinesFile g.activation;
              }
              {
                what = "nothing in environment.etc claims that file, and nothing names the state directory's";
                holds =
                  g:
                  !builtins.elem "nix/darwin-vz-nix.machines" g.etcFiles
                  && !lib.hasInfix "/var/lib/darwin-vz/machines" (builtins.toJSON g);
              }
              {
                what = "x86_64-linux builds go to the VM";
                holds = g: builtins.elem "x86_64-linux" g.daemonConfig.builder.systems;
              }
              {
                what = "cores, memory and maxJobs are left to the daemon";
                holds = g: !(g.daemonConfig ? cores || g.daemonConfig ? memory || g.daemonConfig.builder ? maxJobs);
              }
              {
                what = "the daemon gets rosetta = true";
                holds = g: g.daemonConfig.rosetta;
              }
              {
                what = "nested virtualization is auto, and the features are left to `machines`";
                holds =
                  g: g.daemonConfig.nestedVirtualization == "auto" && !(g.daemonConfig.builder ? supportedFeatures);
              }
              {
                what = "root rewrites the builder's line when the guest report changes";
                holds =
                  g:
                  lib.hasInfix "<string>/var/lib/darwin-vz/guest-report.json</string>" g.refreshPlist
                  && lib.hasInfix "<string>--write</string>" g.refreshPlist
                  && !lib.hasInfix "<key>UserName</key>" g.refreshPlist;
              }
              {
                what = "the daemon config names the guest's .drv and output path, and the bootstrap builder's .drv, and needs no output built";
                holds =
                  g:
                  g.daemonConfig ? guestDrv
                  && g.daemonConfig ? guestOut
                  && !(g.daemonConfig ? guest)
                  && lib.hasSuffix "-nixos-vm.drv" g.daemonConfig.bootstrapDrv
                  && lib.hasPrefix "ssh-ed25519 " g.daemonConfig.bootstrapHostKey
                  && g.configOutputDependencies == [ ];
              }
            ];
          };
          module-no-rosetta-never-idle = evalModule {
            name = "no-rosetta-never-idle";
            settings = {
              rosetta = false;
              idleTimeout = 0;
            };
            expect = [
              {
                what = "no x86_64-linux without Rosetta";
                holds = g: !builtins.elem "x86_64-linux" g.daemonConfig.builder.systems;
              }
              {
                what = "the daemon gets idleTimeout = 0 and rosetta = false";
                holds = g: g.daemonConfig.idleTimeout == 0 && !g.daemonConfig.rosetta;
              }
            ];
          };
          # Determinate Nix without its module: nix-darwin leaves Nix alone.
          module-nix-disabled = evalModule {
            name = "nix-disabled";
            modules = [ { nix.enable = false; } ];
            expect = [
              {
                what = "the builder is still registered through /etc/nix/machines";
                holds = g: lib.hasInfix "@/etc/nix/darwin-vz-nix.machines\n" g.machines;
              }
              {
                what = "and its line still written at activation";
                holds = g: runsAtActivation writeMachinesFile g.activation;
              }
            ];
          };
        };
        ${guestSystem} = {
          guest = defaultGuest;
          guest-kvm = self.packages.${guestSystem}.guest-kvm;
        };
      };

      # `nix fmt` with no arguments formats the whole tree (plain nixfmt would read
      # standard input on newer Nix).
      formatter = forDevSystems (system: (pkgsFor system).nixfmt-tree);

      devShells = forDevSystems (
        system:
        let
          pkgs = pkgsFor system;
        in
        {
          default = pkgs.mkShell {
            packages = [
              pkgs.cargo
              pkgs.rustc
              pkgs.clippy
              pkgs.rustfmt
              pkgs.rust-analyzer
              # The tests drive real ssh, sshd and nix.
              pkgs.openssh
              pkgs.nix
              pkgs.nixfmt
            ];
          };
        }
      );
    };
}
