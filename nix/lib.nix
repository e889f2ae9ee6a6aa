# The host side's pure data mapping: nix-darwin option values in, the daemon's JSON
# config, the ssh_config block and the line that points Nix at the root-written
# machines file out; and the module's checks that need no nixpkgs (accounts, paths).
#
# Builtins only, no nixpkgs: CI evaluates this file with a bare `nix-instantiate`
# (tests/nix/*.nix), and the Rust tests load what it produces, so the two sides of
# each interface are checked against each other without a Mac.
let
  contract = builtins.fromJSON (builtins.readFile ./contract.json);

  # Where the daemon keeps what ssh needs. The Rust side (src/state.rs) owns the
  # state directory's layout; a test compares the ssh_config text both sides print,
  # so a rename that reaches only one side fails CI.
  statePaths =
    stateDir:
    let
      # "/var/lib/darwin-vz/" names the same directory; join as Rust's Path::join does.
      dir = withoutTrailingSlash (toString stateDir);
    in
    {
      clientKey = "${dir}/keys/client_ed25519";
      knownHosts = "${dir}/keys/known_hosts";
    };

  withoutTrailingSlash =
    path:
    let
      length = builtins.stringLength path;
    in
    if length > 1 && builtins.substring (length - 1) 1 path == "/" then
      withoutTrailingSlash (builtins.substring 0 (length - 1) path)
    else
      path;

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

  # "/private/var/lib/./x//" -> "/var/lib/x", lower case. Lexical only (no symlinks
  # are read at evaluation), with macOS's own symlinks /var, /etc and /tmp (to
  # /private/...) folded, and lower case because macOS volumes are case-insensitive
  # by default: /var/lib/Linux-Builder is /var/lib/linux-builder there.
  normalisePath =
    path:
    let
      parts = builtins.filter (p: builtins.isString p && p != "" && p != ".") (
        builtins.split "/" (toString path)
      );
      resolve =
        done: part:
        if part == ".." then
          (if done == [ ] then [ ] else builtins.genList (builtins.elemAt done) (builtins.length done - 1))
        else
          done ++ [ part ];
      resolved = builtins.foldl' resolve [ ] parts;
      unprivate =
        if
          builtins.length resolved >= 2
          && builtins.head resolved == "private"
          && builtins.elem (builtins.elemAt resolved 1) [
            "var"
            "etc"
            "tmp"
          ]
        then
          builtins.tail resolved
        else
          resolved;
      upper = builtins.genList (i: builtins.substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26;
      lower = builtins.genList (i: builtins.substring i 1 "abcdefghijklmnopqrstuvwxyz") 26;
    in
    builtins.replaceStrings upper lower ("/" + builtins.concatStringsSep "/" unprivate);

  # Names of macOS's own accounts and groups that a configuration is likely to
  # reach for ("its members may use the socket"). With any of them in
  # users.knownGroups/knownUsers nix-darwin would rewrite the account (a group's
  # members are reset to the listed ones: every admin loses sudo).
  macosAccounts = [
    "root"
    "daemon"
    "nobody"
    "wheel"
    "admin"
    "staff"
    "everyone"
    "localaccounts"
    "netaccounts"
    "authedusers"
    "interactusers"
    "network"
    "operator"
    "kmem"
    "sys"
    "tty"
    "bin"
    "mail"
    "certusers"
    "_developer"
    "_lpadmin"
    "_lpoperator"
    "_analyticsusers"
    "_oahd"
    "_nixbld"
    "nixbld"
  ];
in
{
  inherit
    contract
    statePaths
    sshConfigForbidden
    normalisePath
    ;

  # The file root writes the builder's machines-file line to, at every activation
  # (`darwin-vz-nix machines --write`); src/machines.rs names the same path
  # (NIX_MACHINES_FILE), compared by tests/contract.rs. Root-owned in a root-owned
  # directory: the daemon's account cannot change what root's nix-daemon reads.
  machinesFile = "/etc/nix/darwin-vz-nix.machines";

  # Defaults of the services.darwin-vz options that become daemon settings. The
  # module declares its options with these; tests/nix/daemon-config.nix feeds them
  # to daemonConfig, and the Rust tests load the result and compare it with the
  # daemon's own defaults (src/config.rs), so the two cannot drift apart unseen.
  # cores and memory are null: the daemon fits them to the Mac it runs on.
  optionDefaults = {
    cores = null;
    memory = null;
    diskSize = "100G";
    rosetta = true;
    idleTimeout = 180;
    stopTimeout = 15;
    kernelParams = [ ];
    workingDirectory = "/var/lib/darwin-vz";
    logLevel = "info";
    group = "_darwin-vz";
    hostStoreCache = true;
  };

  # Defaults of the options that shape the builder's machines line; the CLI has
  # the same ones (src/machines.rs), compared by tests/contract.rs. maxJobs is null:
  # `darwin-vz-nix machines` writes the cores the daemon really gives the VM.
  builderDefaults = {
    maxJobs = null;
    speedFactor = 1;
    supportedFeatures = [
      "benchmark"
      "big-parallel"
    ];
    mandatoryFeatures = [ ];
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
      builder =
        let
          settings = withoutNulls {
            maxJobs = optionalValue cfg "maxJobs";
            speedFactor = optionalValue cfg "speedFactor";
            systems = optionalValue cfg "systems";
            supportedFeatures = optionalValue cfg "supportedFeatures";
            mandatoryFeatures = optionalValue cfg "mandatoryFeatures";
          };
        in
        if settings == { } then null else settings;
      hostStoreCache = optionalValue cfg "hostStoreCache";
    };

  # The line the module adds to /etc/nix/machines for the machines file at `file`
  # (the module's is machinesFile). Nix reads that file in its place (an `@` entry is
  # followed inside a machines file too, and a missing file is skipped), so the
  # builder Nix sees is the line root wrote there. It starts the line: Nix before
  # 2.29 did not trim an entry before looking for the `@`.
  machinesInclude = file: "@${toString file}\n";

  # Why these cannot be the service account and group the module creates and
  # manages (empty when they can). Only a new, hidden account is safe to manage:
  # nix-darwin rewrites what it manages (a group's members, a user's primary group).
  accountProblems =
    {
      user,
      uid,
      group,
      gid,
      ...
    }:
    let
      check =
        kind: option: name: id:
        let
          idName = if kind == "user" then "uid" else "gid";
          why =
            if builtins.elem name macosAccounts || builtins.substring 0 10 name == "com.apple." then
              "is one of macOS's own"
            else if builtins.substring 0 1 name != "_" then
              "does not start with `_` (hidden service accounts do; a name without one may be a person's)"
            else if id < 300 || id == 441 then
              "has ${idName} ${toString id}, in the range macOS keeps for its own accounts (below 300, and 441)"
            else
              null;
        in
        if why == null then
          [ ]
        else
          [
            "services.darwin-vz.${option} = ${builtins.toJSON name} ${why}. The module creates and manages this ${kind} (nix-darwin rewrites managed ${kind}s), so it must be a new one: keep the default \"_darwin-vz\" (id 455) or choose another name starting with `_` and an unused id from 300 to 500. To let existing users use the control socket, list them in services.darwin-vz.groupMembers."
          ];
    in
    check "user" "user" user uid ++ check "group" "group" group gid;

  # Whether two directories are the same or one contains the other, after
  # normalisePath. nix-darwin deletes nix.linux-builder.workingDirectory while that
  # builder is disabled: the state directory must be neither it, inside it, nor
  # around it.
  pathsOverlap =
    a: b:
    let
      na = normalisePath a;
      nb = normalisePath b;
      within =
        inner: outer:
        outer == "/" || builtins.substring 0 (builtins.stringLength outer + 1) inner == outer + "/";
    in
    na == nb || within na nb || within nb na;

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

  # launchd sends SIGKILL this many seconds after SIGTERM. The daemon answers
  # SIGTERM with a graceful guest poweroff that may take stopTimeout seconds, then
  # forces it; the margin covers the forced stop and the exit.
  launchdExitTimeout = stopTimeout: stopTimeout + 15;
}
