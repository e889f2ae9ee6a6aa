# x86_64-linux builds through Rosetta 2, when the host turned it on.
#
# The host attaches VZ's Rosetta directory share (a read-only virtiofs share)
# only when Rosetta is enabled and installed, and says so on the kernel command
# line: darwin_vz_nix.rosetta=1|0, plus darwin_vz_nix.rosetta_preserve_argv0=1|0
# for binfmt_misc's P flag, which only a macOS 14+ Rosetta supports.
#
# Why not nixpkgs' virtualisation.rosetta: it decides everything when the guest
# is built. It declares the share in fstab without nofail (a host with Rosetta
# off sends the guest to emergency mode), registers binfmt_misc through
# systemd-binfmt from a static binfmt.d file (which fails without the share),
# sets the P flag unconditionally (wrong for a macOS 13 host), and makes Nix
# advertise x86_64-linux even when nothing can run it. One guest image has to
# serve either host choice, so here the choice is read at boot:
#
# * a oneshot unit, conditional on darwin_vz_nix.rosetta=1, mounts the share,
#   registers the Rosetta binary with binfmt_misc, and writes a nix.conf
#   fragment that makes nix-daemon (started after it) offer x86_64-linux;
# * nix.conf includes that fragment with `!include`, which ignores a missing
#   file: with Rosetta off, Nix offers aarch64-linux only.
#
# Flags: F (fix binary) makes the kernel open the interpreter at registration,
# so it works inside the build sandbox and chroots without the share being
# visible there; C (credentials, implies O) is what Apple's instructions
# register; P preserves argv[0] when the host allows it.
{ pkgs, ... }:
let
  contract = builtins.fromJSON (builtins.readFile ../contract.json);

  mountPoint = contract.guest.mounts.rosetta;
  rosettaParam = contract.kernelParams.rosetta;
  preserveArgv0Param = contract.kernelParams.rosettaPreserveArgv0;

  # Read by nix-daemon through `!include`; absent unless Rosetta is registered.
  nixConfFragment = "/run/darwin-vz-nix/nix-rosetta.conf";

  # The ELF header of an x86-64 executable or shared object: 64-bit class,
  # little endian, version 1, type EXEC or DYN (the mask allows both), machine
  # 0x3e. binfmt_misc decodes the \x escapes itself.
  magic = ''\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00'';
  mask = ''\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'';
in
{
  nix.extraOptions = ''
    !include ${nixConfFragment}
  '';

  systemd.services.darwin-vz-nix-rosetta = {
    description = "Run x86_64 Linux binaries with Rosetta";
    wantedBy = [ "multi-user.target" ];
    before = [ "nix-daemon.service" ];
    unitConfig.ConditionKernelCommandLine = "${rosettaParam}=1";
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    };
    path = [
      pkgs.coreutils
      pkgs.util-linux
    ];
    script = ''
      set -euo pipefail
      mkdir -p ${mountPoint}
      if ! mountpoint -q ${mountPoint}; then
        mount -t virtiofs -o ro,nodev,nosuid ${contract.tags.rosetta} ${mountPoint}
      fi
      if [[ ! -x ${mountPoint}/rosetta ]]; then
        echo "the Rosetta share (${contract.tags.rosetta}) has no executable 'rosetta'" >&2
        exit 1
      fi

      binfmt=/proc/sys/fs/binfmt_misc
      mountpoint -q $binfmt || mount -t binfmt_misc binfmt_misc $binfmt

      flags=CF
      if [[ " $(< /proc/cmdline) " == *" ${preserveArgv0Param}=1 "* ]]; then
        flags=P$flags
      fi
      if [[ -e $binfmt/rosetta ]]; then
        echo -1 > $binfmt/rosetta
      fi
      printf ':rosetta:M::%s:%s:%s:%s' '${magic}' '${mask}' ${mountPoint}/rosetta "$flags" \
        > $binfmt/register
      echo "registered ${mountPoint}/rosetta for x86_64 ELF binaries (flags $flags)"

      mkdir -p "$(dirname ${nixConfFragment})"
      cat > ${nixConfFragment} <<EOF
      extra-platforms = x86_64-linux
      extra-sandbox-paths = ${mountPoint}
      EOF
    '';
  };
}
