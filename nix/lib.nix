# The host side's pure data mapping: nix-darwin option values in, the daemon's JSON
# config, the ssh_config block and the nix.buildMachines entry out.
#
# Builtins only, no nixpkgs: CI evaluates this file with a bare `nix-instantiate`
# (tests/nix/*.nix), and the Rust tests load what it produces, so the two sides of
# each interface are checked against each other without a Mac.
let
  contract = builtins.fromJSON (builtins.readFile ./contract.json);

  # Where the daemon keeps what ssh needs. The Rust side (src/state.rs) owns the
  # state directory's layout; a test compares the ssh_config text both sides print,
  # so a rename that reaches only one side fails CI.
  statePaths = stateDir: {
    clientKey = "${stateDir}/keys/client_ed25519";
    knownHosts = "${stateDir}/keys/known_hosts";
  };

  # An omitted key means "the daemon's built-in default"; null never reaches the JSON.
  withoutNulls =
    attrs:
    let
      nulls = builtins.filter (name: attrs.${name} == null) (builtins.attrNames attrs);
    in
    builtins.removeAttrs attrs nulls;

  # ssh expands %-tokens (%h, %d, ...) in ProxyCommand, IdentityFile and
  # UserKnownHostsFile; "%%" is a literal per cent sign.
  escapePercent = builtins.replaceStrings [ "%" ] [ "%%" ];

  # Characters a path in the Host block cannot carry. A double quote or a newline
  # ends the quoted ssh_config argument. `$`, backquote and backslash keep their
  # meaning inside the double quotes of ProxyCommand, which ssh hands to `sh -c`, so
  # they would be expanded instead of passed on.
  sshConfigForbidden = [
    "\""
    "\n"
    "$"
    "`"
    "\\"
  ];

  quotePath =
    what: path:
    let
      text = toString path;
      contains = c: builtins.length (builtins.split (escapeRegex c) text) > 1;
      bad = builtins.filter contains sshConfigForbidden;
      found = builtins.toJSON (builtins.head bad);
    in
    if bad != [ ] then
      throw ''
        darwin-vz-nix: the ${what} ${builtins.toJSON text} contains ${found},
        which cannot be written into ssh_config; choose a path without ", newline, $, ` or \.
      ''
    else
      "\"${escapePercent text}\"";

  # builtins.split takes a POSIX extended regex; escape the metacharacters among them.
  escapeRegex = c: if c == "$" || c == "\\" then "\\${c}" else c;

  optionalValue = cfg: name: if cfg ? ${name} then cfg.${name} else null;
  stringOrNull = value: if value == null then null else toString value;
in
{
  inherit contract statePaths sshConfigForbidden;

  # Defaults of the services.darwin-vz options that become daemon settings. The
  # module declares its options with these; tests/nix/daemon-config.nix feeds them
  # to daemonConfig, and the Rust tests load the result and compare it with the
  # daemon's own defaults (src/config.rs), so the two cannot drift apart unseen.
  optionDefaults = {
    cores = 4;
    memory = 6144;
    diskSize = "100G";
    rosetta = true;
    idleTimeout = 180;
    stopTimeout = 15;
    kernelParams = [ ];
    workingDirectory = "/var/lib/darwin-vz";
    logLevel = "info";
    group = "_darwin-vz";
  };

  # Systems the builder advertises: aarch64-linux natively, x86_64-linux only when
  # Rosetta runs it. Listing x86_64-linux is what makes Nix send those builds at all
  # (NixOS/nix#10451); listing it without Rosetta makes them fail inside the VM.
  defaultSystems = rosetta: [ "aarch64-linux" ] ++ (if rosetta then [ "x86_64-linux" ] else [ ]);

  # services.darwin-vz option values -> the daemon's JSON config (the shape of
  # `ConfigLayer` in src/config.rs: camelCase keys, unknown keys rejected). Takes the module's whole `cfg`; options that are not
  # daemon settings (enable, package, maxJobs, ...) are ignored, and so are
  # settings left at null, so the daemon applies its own default for them.
  daemonConfig =
    cfg:
    withoutNulls {
      cores = optionalValue cfg "cores";
      memory = optionalValue cfg "memory";
      diskSize = optionalValue cfg "diskSize";
      rosetta = optionalValue cfg "rosetta";
      idleTimeout = optionalValue cfg "idleTimeout";
      stopTimeout = optionalValue cfg "stopTimeout";
      # A derivation becomes its store path here (toString keeps the string
      # context, so the guest is part of the system closure that refers to it).
      guest = stringOrNull (optionalValue cfg "guest");
      kernelParams = optionalValue cfg "kernelParams";
      stateDir = stringOrNull (optionalValue cfg "workingDirectory");
      logLevel = optionalValue cfg "logLevel";
      # The service's group may use the control socket (darwin-vz-nix status, stop).
      controlGroup = optionalValue cfg "group";
      sshUser = optionalValue cfg "sshUser";
    };

  # The Host block that lets root's nix-daemon (and `sudo ssh darwin-vz-nix`) reach
  # the guest with no prompt. `darwin-vz-nix ssh-config` prints the same text; a
  # Rust test compares the two byte for byte.
  sshConfig =
    {
      bin,
      stateDir,
      user ? contract.guest.user,
    }:
    let
      paths = statePaths (toString stateDir);
      proxyBin = quotePath "proxy binary" bin;
      quotedStateDir = quotePath "state directory" stateDir;
    in
    ''
      Host ${contract.hostKeyAlias}
        User ${user}
        HostKeyAlias ${contract.hostKeyAlias}
        ProxyCommand ${proxyBin} proxy --fdpass --state-dir ${quotedStateDir}
        ProxyUseFdpass yes
        UserKnownHostsFile ${quotePath "known_hosts file" paths.knownHosts}
        IdentityFile ${quotePath "client key" paths.clientKey}
        IdentitiesOnly yes
        StrictHostKeyChecking yes
        ControlMaster no
        ControlPath none
    '';

  # The nix.buildMachines entry for the guest. publicHostKey stays unset: the host
  # key is generated on the Mac at first start and pinned by the ssh_config block's
  # UserKnownHostsFile instead.
  buildMachine = cfg: {
    hostName = contract.hostKeyAlias;
    protocol = "ssh-ng";
    sshUser = contract.guest.user;
    sshKey = (statePaths (toString cfg.workingDirectory)).clientKey;
    inherit (cfg)
      systems
      maxJobs
      speedFactor
      supportedFeatures
      ;
    mandatoryFeatures = [ ];
  };

  # launchd sends SIGKILL this many seconds after SIGTERM. The daemon answers
  # SIGTERM with a graceful guest poweroff that may take stopTimeout seconds, then
  # forces it; the margin covers the forced stop and the exit.
  launchdExitTimeout = stopTimeout: stopTimeout + 15;
}
