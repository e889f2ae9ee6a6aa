# The guest's shell scripts as packages. The scripts themselves are plain files
# in ./scripts, so that they can be run and tested outside a VM
# (tests/guest_scripts.rs runs them against real overlay mounts, and
# scripts/test.sh runs shellcheck on them). writeShellApplication runs
# shellcheck on each again when the guest is built, and puts `runtimeInputs`
# (and the scripts they call, under their darwin-vz-nix-* names) on PATH.
{
  pkgs,
  nix,
  systemd,
}:
let
  app =
    name: file: runtimeInputs:
    pkgs.writeShellApplication {
      name = "darwin-vz-nix-${name}";
      inherit runtimeInputs;
      text = builtins.readFile file;
    };
in
rec {
  kernel-param = app "kernel-param" ./scripts/kernel-param.sh [ ];
  with-writable-store = app "with-writable-store" ./scripts/with-writable-store.sh [
    pkgs.util-linux
  ];

  # Runs in the initrd: no runtimeInputs (their store paths would not be in
  # the initrd); it uses the initrd's bash and coreutils only.
  store-repair-upper = app "store-repair-upper" ./scripts/store-repair-upper.sh [ ];

  store-register = app "store-register" ./scripts/store-register.sh [
    kernel-param
    with-writable-store
    nix
    pkgs.coreutils
    pkgs.findutils
  ];
  store-adopt = app "store-adopt" ./scripts/store-adopt.sh [
    pkgs.coreutils
    pkgs.findutils
  ];
  store-adopt-system = app "store-adopt-system" ./scripts/store-adopt-system.sh [
    kernel-param
    with-writable-store
    store-adopt
    nix
    pkgs.coreutils
  ];

  gc-select = app "gc-select" ./scripts/gc-select.sh [ pkgs.coreutils ];
  gc = app "gc" ./scripts/gc.sh [
    gc-select
    nix
    pkgs.coreutils
    pkgs.findutils
  ];

  build-limits = app "build-limits" ./scripts/build-limits.sh [ pkgs.coreutils ];
  clean-builds = app "clean-builds" ./scripts/clean-builds.sh [ pkgs.coreutils ];
  boot-timing = app "boot-timing" ./scripts/boot-timing.sh [
    systemd
    pkgs.coreutils
  ];
  rosetta = app "rosetta" ./scripts/rosetta.sh [
    kernel-param
    pkgs.coreutils
    pkgs.util-linux
  ];
  kvm = app "kvm" ./scripts/kvm.sh [ pkgs.coreutils ];
  host-handover = app "host-handover" ./scripts/host-handover.sh [
    pkgs.coreutils
    pkgs.util-linux
  ];
  clock-set = app "clock-set" ./scripts/clock-set.sh [ pkgs.coreutils ];
  host-cache = app "host-cache" ./scripts/host-cache.sh [ pkgs.coreutils ];
}
