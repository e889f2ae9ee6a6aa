//! A fake `nix-store` for the tests: a shell script that records every call and
//! "realises" fake guests — derivations whose output is a guest directory the test
//! prepared — with the progress, delays and failures a test asks for.
//!
//! Layout, under the fixture's directory:
//!
//! ```text
//! bin/nix-store               the script (DaemonOptions::nix_store points here;
//!                             CLI tests put bin/ first on PATH)
//! fake-nix/calls.log          one line per call: its arguments
//! fake-nix/store/             the fake store: <hash>-<name>.drv files, outputs
//! fake-nix/drv/<drv name>/    how realising that derivation behaves:
//!   out                         its output path
//!   src/                        the guest directory it "builds"
//!   dry-run.txt                 what `--realise --dry-run` prints (stderr)
//!   progress.jsonl              `@nix` lines printed while it realises (stderr)
//!   hold                        while this file exists, the realisation waits (≤ 60 s)
//!   dry-run.hold                while this file exists, the dry run waits (≤ 60 s)
//!   fail                        when present: printed to stderr, then exit 1
//! ```
//!
//! Like Nix, `--realise PATH --add-root ROOT` on a path already there only points
//! ROOT at it, and `--add-root` replaces ROOT. The script refuses to run without
//! `NIX_REMOTE=daemon` (exit 90): the daemon must go through the nix-daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Fixture;

const SCRIPT: &str = r#"#!/usr/bin/env bash
# Fake nix-store for darwin-vz-nix's tests (tests/support/fake_nix.rs).
set -u
here=$(cd "$(dirname "$0")/../fake-nix" && pwd)
printf '%s\n' "$*" >>"$here/calls.log"
if [ "${NIX_REMOTE:-}" != daemon ]; then
  echo "error: the fake nix-store wants NIX_REMOTE=daemon" >&2
  exit 90
fi
op=
dry=0
root=
paths=()
while (($#)); do
  case $1 in
  --realise | -r) op=realise ;;
  --add) op=add ;;
  --dry-run) dry=1 ;;
  --add-root)
    root=$2
    shift
    ;;
  --indirect) ;;
  --log-format) shift ;;
  *) paths+=("$1") ;;
  esac
  shift
done
case $op in
realise)
  p=${paths[0]}
  conf="$here/drv/$(basename "$p")"
  if [[ $p == *.drv ]]; then
    if [ ! -d "$conf" ]; then
      echo "error: don't know how to build $p" >&2
      exit 1
    fi
    if ((dry)); then
      for _ in $(seq 1 600); do
        [ -e "$conf/dry-run.hold" ] || break
        sleep 0.1
      done
      cat "$conf/dry-run.txt" >&2 2>/dev/null
      exit 0
    fi
    out=$(cat "$conf/out")
    if [ -f "$conf/progress.jsonl" ]; then cat "$conf/progress.jsonl" >&2; fi
    for _ in $(seq 1 600); do
      [ -e "$conf/hold" ] || break
      sleep 0.1
    done
    if [ -f "$conf/fail" ]; then
      cat "$conf/fail" >&2
      exit 1
    fi
    if [ ! -e "$out" ]; then
      cp -R "$conf/src" "$out.tmp" && mv "$out.tmp" "$out"
    fi
    if [ -n "$root" ]; then ln -sfn "$out" "$root"; fi
    echo "${root:-$out}"
  else
    if [ ! -e "$p" ]; then
      echo "error: path '$p' is not valid" >&2
      exit 1
    fi
    if [ -n "$root" ]; then ln -sfn "$p" "$root"; fi
    echo "${root:-$p}"
  fi
  ;;
add)
  src=${paths[0]}
  dest="$here/store/$(printf '%032d' 0)-$(basename "$src")"
  rm -rf "$dest"
  cp -R "$src" "$dest"
  echo "$dest"
  ;;
*)
  echo "fake nix-store: unsupported call" >&2
  exit 2
  ;;
esac
"#;

/// The fake `nix-store`, installed in a fixture.
pub struct FakeNix {
    root: PathBuf,
    bin: PathBuf,
}

/// A guest derivation the fake knows how to realise.
#[derive(Debug, Clone)]
pub struct FakeGuest {
    pub drv: PathBuf,
    pub out: PathBuf,
    conf: PathBuf,
}

impl FakeNix {
    pub fn install(fixture: &Fixture) -> FakeNix {
        let root = fixture.dir.path().join("fake-nix");
        let bin = fixture.dir.path().join("bin");
        for dir in [root.join("store"), root.join("drv"), bin.clone()] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let program = bin.join("nix-store");
        std::fs::write(&program, SCRIPT).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeNix { root, bin }
    }

    pub fn program(&self) -> PathBuf {
        self.bin.join("nix-store")
    }

    /// `PATH` with the fake first, for the binary's own `nix-store` calls.
    pub fn path_env(&self) -> std::ffi::OsString {
        let mut dirs = vec![self.bin.clone()];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::join_paths(dirs).unwrap()
    }

    /// A derivation `name` for `system` in the fake store: its `.drv`, the output
    /// path it names, and the directory of what the fake `nix-store` does with it
    /// (`out` there holds the output path).
    fn derivation(&self, name: &str, system: &str) -> (PathBuf, PathBuf, PathBuf) {
        let drv = self.store().join(format!("{}-{name}.drv", fake_hash(name)));
        let out = self
            .store()
            .join(format!("{}-{name}", fake_hash(&format!("{name}-out"))));
        std::fs::write(
            &drv,
            format!(
                r#"Derive([("out","{}","","")],[],[],"{system}","/bin/sh",[],[("name","{name}")])"#,
                out.display()
            ),
        )
        .unwrap();
        let conf = self.root.join("drv").join(drv.file_name().unwrap());
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("out"), out.to_str().unwrap()).unwrap();
        (drv, out, conf)
    }

    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// A guest derivation named `name` (an `aarch64-linux` `.drv` in the fake store)
    /// whose realisation produces a fake guest directory with `kernel_params`. Its
    /// dry run says it builds its `.drv` and fetches nothing.
    pub fn guest(&self, name: &str, kernel_params: &str) -> FakeGuest {
        let (drv, out, conf) = self.derivation(name, "aarch64-linux");
        darwin_vz_nix::artifacts::write_fake_guest(&conf.join("src"), kernel_params).unwrap();
        std::fs::write(
            conf.join("dry-run.txt"),
            format!("this derivation will be built:\n  {}\n", drv.display()),
        )
        .unwrap();
        FakeGuest { drv, out, conf }
    }

    /// Every call so far, one line of arguments each.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl FakeGuest {
    /// Its realisation waits until `release`.
    pub fn hold(&self) {
        std::fs::write(self.conf.join("hold"), "").unwrap();
    }

    pub fn release(&self) {
        let _ = std::fs::remove_file(self.conf.join("hold"));
    }

    /// Its dry run (the supervisor's planning step) waits until `release_dry_run`.
    pub fn hold_dry_run(&self) {
        std::fs::write(self.conf.join("dry-run.hold"), "").unwrap();
    }

    pub fn release_dry_run(&self) {
        let _ = std::fs::remove_file(self.conf.join("dry-run.hold"));
    }

    /// Its realisation prints `lines` (Nix's `@nix` JSON) and fails.
    pub fn fail_with(&self, lines: &str) {
        std::fs::write(self.conf.join("fail"), lines).unwrap();
    }

    /// Its realisation succeeds again.
    pub fn succeed(&self) {
        let _ = std::fs::remove_file(self.conf.join("fail"));
    }

    /// Its realisation prints `lines` (Nix's `@nix` JSON) before it waits or ends.
    pub fn progress(&self, lines: &str) {
        std::fs::write(self.conf.join("progress.jsonl"), lines).unwrap();
    }

    /// What its dry run prints.
    pub fn dry_run_says(&self, text: &str) {
        std::fs::write(self.conf.join("dry-run.txt"), text).unwrap();
    }

    /// The kernel a VM booted from this guest gets (the realised output's).
    pub fn kernel(&self) -> PathBuf {
        self.out.join("kernel")
    }
}

/// A stand-in for nixpkgs' `run-nixos-vm` of `darwin.linux-builder`: it records
/// its environment (and the public key it was given to accept) in
/// `fake-nix/bootstrap-vm.json`, makes the files QEMU would (the disk image, a
/// temporary file), then listens where `QEMU_NET_OPTS` forwards SSH to — refusing
/// anything but 127.0.0.1 — greeting each connection with `SSH-2.0-fake-bootstrap`
/// and echoing what it gets. SIGTERM ends it, recorded as `"stopped": true`.
/// With `fake-nix/bootstrap-vm.crash` present it exits at once instead.
const FAKE_VM: &str = r#"#!/usr/bin/env python3
import json, os, re, signal, socket, sys, threading

here = os.path.realpath(__file__)
while os.path.basename(here) != "fake-nix":
    here = os.path.dirname(here)
record_path = os.path.join(here, "bootstrap-vm.json")
names = ["NIX_DISK_IMAGE", "TMPDIR", "USE_TMPDIR", "KEYS", "QEMU_NET_OPTS", "QEMU_OPTS"]
record = {name: os.environ.get(name) for name in names}
record["cwd"] = os.getcwd()
record["pid"] = os.getpid()
record["own_process_group"] = os.getpgid(0) == os.getpid()
record["stopped"] = False
with open(os.path.join(os.environ["KEYS"], "builder_ed25519.pub")) as f:
    record["authorized"] = f.read()

def save():
    with open(record_path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(record_path + ".tmp", record_path)

save()
if os.path.exists(os.path.join(here, "bootstrap-vm.crash")):
    print("qemu-system-aarch64: could not set up host forwarding rule", file=sys.stderr)
    sys.exit(1)
match = re.fullmatch(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22", os.environ.get("QEMU_NET_OPTS", ""))
if not match:
    print("refusing QEMU_NET_OPTS that is not 127.0.0.1 only", file=sys.stderr)
    sys.exit(2)
open(os.environ["NIX_DISK_IMAGE"], "w").close()
open(os.path.join(os.environ["TMPDIR"], "store.img"), "w").close()

def stop(signum, frame):
    record["stopped"] = True
    save()
    os._exit(0)

signal.signal(signal.SIGTERM, stop)
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("127.0.0.1", int(match.group(1))))
server.listen(64)
print("fake bootstrap builder listening", flush=True)

def serve(conn):
    try:
        conn.sendall(b"SSH-2.0-fake-bootstrap\r\n")
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// The stand-in bootstrap builder's VM runner derivation.
#[derive(Debug, Clone)]
pub struct FakeBootstrap {
    pub drv: PathBuf,
    pub out: PathBuf,
    conf: PathBuf,
    root: PathBuf,
}

/// A host key of the right shape for `bootstrapHostKey`.
pub const FAKE_BOOTSTRAP_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeBootstrapHostKeyForTheTests000000000";

impl FakeNix {
    /// A derivation named as nixpkgs' `system.build.vm` is (`nixos-vm`) whose output
    /// holds `bin/run-nixos-vm` (the stand-in above); its dry run says it is
    /// fetched, nothing built.
    pub fn bootstrap_vm(&self) -> FakeBootstrap {
        let name = "nixos-vm";
        let (drv, out, conf) = self.derivation(name, "aarch64-darwin");
        std::fs::create_dir_all(conf.join("src/bin")).unwrap();
        let runner = conf.join("src/bin/run-nixos-vm");
        std::fs::write(&runner, FAKE_VM).unwrap();
        std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            conf.join("dry-run.txt"),
            format!(
                "these 2 paths will be fetched (1000.00 MiB download, 3000.00 MiB unpacked):
  {}
  /nix/store/44444444444444444444444444444444-qemu
",
                self.store()
                    .join("33333333333333333333333333333333-nixos-system")
                    .display()
            ),
        )
        .unwrap();
        FakeBootstrap {
            drv,
            out,
            conf,
            root: self.root.clone(),
        }
    }
}

impl FakeBootstrap {
    /// The config layer that names it as the bootstrap builder (whose user is
    /// `builder`, as nixpkgs' is).
    pub fn layer(&self) -> darwin_vz_nix::config::ConfigLayer {
        darwin_vz_nix::config::ConfigLayer {
            bootstrap_drv: Some(self.drv.clone()),
            bootstrap_host_key: Some(FAKE_BOOTSTRAP_HOST_KEY.into()),
            ssh_user: Some(darwin_vz_nix::bootstrap::BUILDER_USER.into()),
            ..Default::default()
        }
    }

    /// What the stand-in VM recorded, once it ran.
    pub fn record(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.root.join("bootstrap-vm.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Its dry run says it would build an aarch64-linux derivation: not cached.
    pub fn not_cached(&self, linux_drv: &Path) {
        std::fs::write(
            linux_drv,
            r#"Derive([("out","/nix/store/x","","")],[],[],"aarch64-linux","/bin/sh",[],[])"#,
        )
        .unwrap();
        std::fs::write(
            self.conf.join("dry-run.txt"),
            format!(
                "this derivation will be built:
  {}
",
                linux_drv.display()
            ),
        )
        .unwrap();
    }

    /// Fetching it waits until `release`.
    pub fn hold(&self) {
        std::fs::write(self.conf.join("hold"), "").unwrap();
    }

    pub fn release(&self) {
        let _ = std::fs::remove_file(self.conf.join("hold"));
    }

    /// The stand-in VM exits at once when started.
    pub fn crash_on_start(&self) {
        std::fs::write(self.root.join("bootstrap-vm.crash"), "").unwrap();
    }
}

/// 32 characters from Nix's base-32 alphabet, different for different names.
fn fake_hash(name: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    (0..32)
        .map(|i| {
            for byte in name.bytes().chain([i]) {
                state = (state ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
            char::from(ALPHABET[usize::try_from(state % 32).unwrap()])
        })
        .collect()
}

/// `Path` helper: the target of a symbolic link, if it is one.
pub fn link_target(path: &Path) -> Option<PathBuf> {
    std::fs::read_link(path).ok()
}
