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

    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// A guest derivation named `name` (an `aarch64-linux` `.drv` in the fake store)
    /// whose realisation produces a fake guest directory with `kernel_params`. Its
    /// dry run says it builds its `.drv` and fetches nothing.
    pub fn guest(&self, name: &str, kernel_params: &str) -> FakeGuest {
        let hash = fake_hash(name);
        let drv = self.store().join(format!("{hash}-{name}.drv"));
        let out = self
            .store()
            .join(format!("{}-{name}", fake_hash(&format!("{name}-out"))));
        std::fs::write(
            &drv,
            format!(
                r#"Derive([("out","{}","","")],[],[],"aarch64-linux","/bin/sh",[],[("name","{name}")])"#,
                out.display()
            ),
        )
        .unwrap();
        let conf = self.root.join("drv").join(drv.file_name().unwrap());
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("out"), out.to_str().unwrap()).unwrap();
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
