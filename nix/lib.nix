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
      bootstrapKnownHosts = "${dir}/keys/bootstrap_known_hosts";
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

  # The daemon settings for the guest. A derivation (the default guest, or one
  # made with extraNixOSConfig) is named by its .drv and its output path, so that
  # the system that carries the config builds nothing for aarch64-linux: the .drv
  # keeps only the context of the .drv file itself
  # (unsafeDiscardOutputDependency), which makes the .drv and the .drv files it
  # refers to part of the closure without building any output, and the output path
  # keeps no context at all. The daemon realises the derivation when it first needs
  # the guest (src/guest). A path (a guest built elsewhere) stays `guest`.
  guestSettings =
    guest:
    if guest == null then
      { }
    else if builtins.isAttrs guest && guest ? drvPath then
      {
        guestDrv = builtins.unsafeDiscardOutputDependency guest.drvPath;
        guestOut = builtins.unsafeDiscardStringContext guest.outPath;
      }
    else
      { guest = toString guest; };

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

  # The file root writes the builder's machines-file line to, at every activation
  # (`darwin-vz-nix machines --write`); src/machines.rs names the same path
  # (NIX_MACHINES_FILE), compared by tests/contract.rs. Root-owned in a root-owned
  # directory: the daemon's account cannot change what root's nix-daemon reads.
  machinesFile = "/etc/nix/darwin-vz-nix.machines";

  # Where the daemon records what the guest of its last boot said about /dev/kvm
  # (src/state.rs StateDir::guest_report names the same file; a test compares them).
  guestReportFile = stateDir: "${withoutTrailingSlash (toString stateDir)}/guest-report.json";

  # Root's log of the machines refresh (machinesRefreshDaemon): root-owned, unlike
  # the daemon's log file, which belongs to the service account (a root job
  # appending to that would write wherever the account points it).
  machinesRefreshLog = "/var/log/darwin-vz-nix-machines.log";

  # The second name of the builder's Host block, for every system but
  # aarch64-linux: only the guest answers it (src/ssh.rs X86_ALIAS, compared by
  # tests/contract.rs).
  x86Alias = "darwin-vz-nix-x86";
in
{
  inherit
    contract
    statePaths
    sshConfigForbidden
    normalisePath
    machinesFile
    guestReportFile
    machinesRefreshLog
    x86Alias
    ;

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
    nestedVirtualization = "auto";
    preventSleep = true;
    hostStoreCache = true;
  };

  # Defaults of the options that shape the builder's machines line; the CLI has
  # the same ones (src/machines.rs), compared by tests/contract.rs. maxJobs is null:
  # `darwin-vz-nix machines` writes the cores the daemon really gives the VM.
  builderDefaults = {
    maxJobs = null;
    speedFactor = 1;
    # null: the features follow the VM — defaultSupportedFeatures, plus kvm and
    # nixos-test where nested virtualization gives the guest a /dev/kvm.
    supportedFeatures = null;
    mandatoryFeatures = [ ];
  };

  # What supportedFeatures = null offers besides kvm and nixos-test; the CLI's
  # DEFAULT_SUPPORTED_FEATURES (src/machines.rs), compared by tests/contract.rs.
  defaultSupportedFeatures = [
    "benchmark"
    "big-parallel"
  ];

  # The values of the nestedVirtualization option, as the daemon accepts them.
  nestedVirtualizationValues = [
    "auto"
    "on"
    "off"
  ];

  # Whether the guest takes the kernel that nested virtualization can use (Linux
  # 6.12 or later) instead of the one Rosetta before macOS 26 needs (before 6.11);
  # see nix/nixos/kvm.nix. `on` asks for KVM whatever Rosetta then does; `auto`
  # only when Rosetta is off anyway; `off` never.
  guestKernelForNestedVirtualization =
    { rosetta, nestedVirtualization }:
    nestedVirtualization == "on" || (nestedVirtualization == "auto" && !rosetta);

  # The guest module that makes that choice. The flake's
  # packages.aarch64-linux.guest-kvm is the default guest with it, so a module guest
  # with it comes from the binary cache too.
  guestKernelModule = {
    darwin-vz-nix.kernel.forNestedVirtualization = true;
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
    guestSettings (optionalValue cfg "guest")
    // withoutNulls {
      cores = optionalValue cfg "cores";
      memory = optionalValue cfg "memory";
      diskSize = optionalValue cfg "diskSize";
      rosetta = optionalValue cfg "rosetta";
      idleTimeout = optionalValue cfg "idleTimeout";
      stopTimeout = optionalValue cfg "stopTimeout";
      kernelParams = optionalValue cfg "kernelParams";
      stateDir = stringOrNull (optionalValue cfg "workingDirectory");
      logLevel = optionalValue cfg "logLevel";
      # The service's group may use the control socket (darwin-vz-nix status, stop).
      controlGroup = optionalValue cfg "group";
      sshUser = optionalValue cfg "sshUser";
      nestedVirtualization = optionalValue cfg "nestedVirtualization";
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
      preventSleep = optionalValue cfg "preventSleep";
      hostStoreCache = optionalValue cfg "hostStoreCache";
    };

  # The daemon settings for the bootstrap builder (src/bootstrap): its VM runner
  # named by its .drv only, like the guest, so the switch builds neither; and the
  # host key its sshd presents.
  bootstrapSettings =
    { vm, hostKey }:
    {
      bootstrapDrv = builtins.unsafeDiscardOutputDependency vm.drvPath;
      bootstrapHostKey = builtins.unsafeDiscardStringContext hostKey;
    };

  # The derivations whose outputs a value's strings need built: what a system that
  # carries the value (e.g. the daemon config in the launchd plist) would have to
  # build. For the daemon config it must be empty (tests/nix/lazy-guest.nix).
  outputDependencies =
    value:
    let
      context = builtins.getContext (builtins.toJSON value);
    in
    builtins.filter (path: context.${path} ? outputs || context.${path} ? allOutputs) (
      builtins.attrNames context
    );

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
  # Rust test compares the two byte for byte. ssh passes the name it was asked for
  # (%n) to the proxy: while the first guest is built, the bootstrap builder may
  # answer the aarch64-linux alias (src/bootstrap); the known_hosts file for it
  # exists only then.
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
      Host ${contract.hostKeyAlias} ${x86Alias}
        User ${user}
        HostKeyAlias ${contract.hostKeyAlias}
        ProxyCommand ${proxyBin} proxy --fdpass --state-dir ${quotedStateDir} --alias %n
        ProxyUseFdpass yes
        UserKnownHostsFile ${quotePath "known_hosts file" paths.knownHosts} ${quotePath "known_hosts file" paths.bootstrapKnownHosts}
        IdentityFile ${quotePath "client key" paths.clientKey}
        IdentitiesOnly yes
        StrictHostKeyChecking yes
        ControlMaster no
        ControlPath none
    '';

  # The launchd job (nix-darwin's launchd.daemons.<name>) that keeps the builder's
  # line honest between switches: when the daemon records a new guest report, root
  # writes the line again from the daemon's config. The report can only take kvm and
  # nixos-test away (src/nested.rs), so the service account that writes it can never
  # make root's nix-daemon trust more. No UserName: it runs as root. ProgramArguments
  # rather than `command`: launchd starts it only when the report changes, which only
  # a daemon running from /nix/store does, so the store is there.
  machinesRefreshDaemon =
    {
      program,
      configFile,
      stateDir,
    }:
    {
      serviceConfig = {
        ProgramArguments = [
          (toString program)
          "machines"
          "--config"
          (toString configFile)
          "--write"
          machinesFile
        ];
        WatchPaths = [ (guestReportFile stateDir) ];
        StandardOutPath = machinesRefreshLog;
        StandardErrorPath = machinesRefreshLog;
      };
    };

  # launchd sends SIGKILL this many seconds after SIGTERM. The daemon answers
  # SIGTERM with a graceful guest poweroff that may take stopTimeout seconds, then
  # forces it; the margin covers the forced stop and the exit.
  launchdExitTimeout = stopTimeout: stopTimeout + 15;
}
