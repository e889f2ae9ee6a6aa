# The darwin-vz-nix CLI, signed with the Virtualization entitlement.
{
  lib,
  stdenv,
  rustPlatform,
  darwin,
  openssh,
  pkg-config,
  sqlite,
}:

let
  manifest = (lib.importTOML ../Cargo.toml).package;
in
rustPlatform.buildRustPackage {
  pname = manifest.name;
  inherit (manifest) version;

  # Only what cargo reads, so editing nix/ or docs does not rebuild the binary.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      # src/contract.rs embeds it with include_str!.
      ../nix/contract.json
      # Cargo.toml names [[bench]] targets, and cargo rejects a manifest whose
      # targets are missing, even for `cargo build`.
      ../benches
      (lib.fileset.maybeMissing ../tests)
      ../resources
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  # No SDK input: the Darwin stdenv brings Apple's SDK (Virtualization.framework
  # included), and the crate links the framework itself.
  nativeBuildInputs = [
    # libsqlite3-sys finds sqlite through it.
    pkg-config
  ]
  ++ lib.optionals stdenv.hostPlatform.isDarwin [
    # `codesign` that works in the build sandbox (/usr/bin/codesign is not there);
    # ad-hoc signatures only, which is all an entitlement for a local binary needs.
    darwin.sigtool
  ];

  # The host store cache reads Nix's database (read-only) through SQLite; linked,
  # not compiled into the crate (rusqlite without `bundled`).
  buildInputs = [ sqlite ];

  # The unit tests only. The integration tests drive real sshd, ssh and nix
  # processes, sockets and a test backend; they run in the project's CI, not in the
  # build sandbox.
  cargoTestFlags = [
    "--lib"
    "--bins"
  ];
  # The core makes its SSH keys with ssh-keygen; unit tests that do so need it.
  nativeCheckInputs = [ openssh ];

  # Sign after fixup, never before: fixup strips the binary, and strip rewrites the
  # Mach-O, which drops (or invalidates) any signature made earlier, entitlements
  # included. On Apple Silicon every binary must carry at least an ad-hoc signature
  # to run; this one replaces the linker's plain ad-hoc signature (-f) with one that
  # also carries com.apple.security.virtualization, without which every VZ call
  # fails. The relative path is the unpacked source, where fixup runs.
  postFixup = lib.optionalString stdenv.hostPlatform.isDarwin ''
    codesign -f -s - --entitlements resources/entitlements.plist $out/bin/darwin-vz-nix
  '';

  # Runs after postFixup: proves the signed binary still starts (the kernel kills
  # an arm64 binary whose signature does not match its contents).
  doInstallCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    $out/bin/darwin-vz-nix --help > /dev/null
    runHook postInstallCheck
  '';

  meta = {
    description = manifest.description;
    homepage = manifest.repository;
    license = lib.licenses.mit;
    mainProgram = "darwin-vz-nix";
    # Runs VMs on Apple Silicon only; Linux builds the platform-neutral core, which
    # is what the tests exercise.
    platforms = [ "aarch64-darwin" ] ++ lib.platforms.linux;
  };
}
