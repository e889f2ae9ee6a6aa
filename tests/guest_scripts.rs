//! The guest's shell scripts (`nix/nixos/scripts/*.sh`), run with bash exactly as the
//! NixOS guest packages them, against real overlayfs mounts on a loop-mounted ext4
//! image: the same kernel code the guest runs, with a directory (or a case-insensitive
//! FUSE file system, as virtiofs from APFS is) standing in for the host's store.
//!
//! Tests that mount need root (and loop devices, ext4, overlayfs; the case-insensitive
//! one also /dev/fuse and Debian's python3-fusepy). Without them they print why and
//! pass without checking anything.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const STORE: &str = "/nix/store";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("nix/nixos/scripts/{name}.sh"))
}

/// Runs a guest script with bash; `path` is searched before the system's PATH.
fn run(
    name: &str,
    args: &[&Path],
    stdin: &str,
    env: &[(&str, &Path)],
    path: Option<&Path>,
) -> Output {
    let mut command = Command::new("bash");
    command.arg(script(name)).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    if let Some(dir) = path {
        let system = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{}:{system}", dir.display()));
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            text(&output.stderr).trim()
        ))
    }
}

/// A loop-mounted ext4 image (the guest disk's file system) and whatever the test
/// mounts inside it; everything is unmounted, innermost first, on drop.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    mounts: Vec<PathBuf>,
    fuse: Option<Child>,
}

impl Scratch {
    /// `Err` says why this machine cannot run the test.
    fn new() -> Result<Scratch, String> {
        if !is_root() {
            return Err("needs root to mount".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("disk.img");
        fs::File::create(&image)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| e.to_string())?;
        let image_arg = image.to_str().unwrap();
        sh("mkfs.ext4", &["-q", "-F", image_arg])?;
        let root = dir.path().join("disk");
        fs::create_dir(&root).unwrap();
        sh("mount", &["-o", "loop", image_arg, root.to_str().unwrap()])?;
        Ok(Scratch {
            _dir: dir,
            root: root.clone(),
            mounts: vec![root],
            fuse: None,
        })
    }

    fn dir(&self, relative: &str) -> PathBuf {
        let path = self.root.join(relative);
        fs::create_dir_all(&path).unwrap();
        path
    }

    /// Mounts the overlay the guest mounts on /nix/store.
    fn mount_overlay(
        &mut self,
        lower: &Path,
        upper: &Path,
        work: &Path,
        merged: &Path,
    ) -> Result<(), String> {
        let options = format!(
            "lowerdir={},upperdir={},workdir={},metacopy=off",
            lower.display(),
            upper.display(),
            work.display()
        );
        sh(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &options,
                merged.to_str().unwrap(),
            ],
        )?;
        self.mounts.push(merged.to_path_buf());
        Ok(())
    }

    fn unmount(&mut self, mount_point: &Path) {
        // A process another test thread is spawning may hold the mount for a moment
        // (seen once under load as "target is busy"); a bounded retry rides it out.
        let mut tries = 0;
        while let Err(e) = sh("umount", &[mount_point.to_str().unwrap()]) {
            tries += 1;
            assert!(tries < 50 && e.contains("busy"), "{e}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.mounts.retain(|m| m != mount_point);
    }

    /// Serves `backing` case-insensitively at `mount_point` (tests/support/case_insensitive_fs.py).
    fn mount_case_insensitive(&mut self, backing: &Path, mount_point: &Path) -> Result<(), String> {
        let python = Path::new("/usr/bin/python3");
        if !Path::new("/dev/fuse").exists() || !python.exists() {
            return Err("needs /dev/fuse and /usr/bin/python3".into());
        }
        let probe = Command::new(python)
            .args(["-c", "import fusepy"])
            .output()
            .map_err(|e| e.to_string())?;
        if !probe.status.success() {
            return Err("needs python3-fusepy (apt install python3-fusepy)".into());
        }
        let fs_script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/case_insensitive_fs.py");
        let child = Command::new(python)
            .arg(fs_script)
            .arg(backing)
            .arg(mount_point)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.fuse = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            if mounts
                .lines()
                .any(|l| l.split(' ').nth(1) == mount_point.to_str())
            {
                self.mounts.push(mount_point.to_path_buf());
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("the FUSE file system did not mount within 20 s".into())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for mount_point in self.mounts.iter().rev() {
            let path = mount_point.to_str().unwrap();
            if sh("umount", &[path]).is_err() {
                let _ = sh("umount", &["-l", path]);
            }
        }
        if let Some(mut child) = self.fuse.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Skips the test (printing why) when the machine cannot mount what it needs.
macro_rules! or_skip {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err(reason) => {
                // Straight to stderr: the harness hides a passing test's eprintln!.
                // Its threads carry the test's name.
                let test = std::thread::current().name().unwrap_or("?").to_string();
                let _ = std::io::Write::write_fmt(
                    &mut std::io::stderr().lock(),
                    format_args!("skipped: {test}: {reason}\n"),
                );
                return;
            }
        }
    };
}

fn write(path: &Path, content: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn is_whiteout(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A registration in `nix-store --load-db` format (what closureInfo writes).
fn registration(paths: &[&str]) -> String {
    let mut text = String::new();
    for (i, path) in paths.iter().enumerate() {
        let references: Vec<&str> = paths[i..].to_vec();
        text.push_str(&format!(
            "{STORE}/{path}\nsha256:0000\n1024\n\n{}\n",
            references.len()
        ));
        for reference in references {
            text.push_str(&format!("{STORE}/{reference}\n"));
        }
    }
    text
}

#[test]
fn a_deleted_or_partial_copy_hides_the_system_until_the_repair_before_mounting_removes_it() {
    let mut scratch = or_skip!(Scratch::new());
    let lower = scratch.dir("ro-store");
    let upper = scratch.dir("rw-store/upper");
    let work = scratch.dir("rw-store/work");
    let merged = scratch.dir("store");
    let adopted = scratch.root.join("db/darwin-vz-nix-adopted");

    // The host's store: the system, a library with three files, an adopted path, the
    // registration, and the guest directory linking to it.
    write(&lower.join("aaa-system/init"), "#!init\n");
    for file in ["1", "2", "3"] {
        write(&lower.join(format!("bbb-lib/lib/{file}")), file);
    }
    write(
        &lower.join("ccc-adopted/share/e"),
        "host's case-hacked copy\n",
    );
    let closure = ["aaa-system", "bbb-lib", "ccc-adopted", "ddd-guest-only"];
    write(
        &lower.join("zzz-closure-info/registration"),
        &registration(&closure),
    );
    fs::create_dir_all(lower.join("yyy-guest")).unwrap();
    std::os::unix::fs::symlink(
        "/nix/store/zzz-closure-info/registration",
        lower.join("yyy-guest/registration"),
    )
    .unwrap();

    or_skip!(scratch.mount_overlay(&lower, &upper, &work, &merged));
    // The guest's garbage collector deletes the system (a path the host also holds),
    // a build cut off mid-copy rewrites the library after deleting it, an adoption
    // finished, and the guest built a path the host does not have.
    fs::remove_file(merged.join("aaa-system/init")).unwrap();
    fs::remove_dir(merged.join("aaa-system")).unwrap();
    fs::remove_dir_all(merged.join("bbb-lib")).unwrap();
    write(&merged.join("bbb-lib/lib/1"), "1");
    fs::remove_dir_all(merged.join("ccc-adopted")).unwrap();
    write(
        &merged.join("ccc-adopted/share/e"),
        "guest's adopted copy\n",
    );
    write(&merged.join("ddd-guest-only/out"), "only here\n");
    write(&merged.join("eee-unrelated/out"), "not in the closure\n");
    write(&adopted, "/nix/store/ccc-adopted\n");
    scratch.unmount(&merged);

    assert!(
        is_whiteout(&upper.join("aaa-system")),
        "deleting leaves a whiteout (c 0,0)"
    );
    or_skip!(scratch.mount_overlay(&lower, &upper, &work, &merged));
    assert!(
        !merged.join("aaa-system").exists(),
        "after a remount the system is hidden"
    );
    assert_eq!(
        names(&merged.join("bbb-lib/lib")),
        ["1"],
        "the partial copy hides the rest"
    );
    scratch.unmount(&merged);

    let output = run(
        "store-repair-upper",
        &[
            Path::new("/nix/store/yyy-guest/registration"),
            &lower,
            &upper,
            &adopted,
        ],
        "",
        &[],
        None,
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(
        stdout.contains("removing the whiteout over /nix/store/aaa-system"),
        "{stdout}"
    );
    assert!(
        stdout.contains("removing the guest's copy of /nix/store/bbb-lib"),
        "{stdout}"
    );
    assert!(
        stdout.contains("4 paths checked, 2 entries removed, 1 adopted copies kept"),
        "{stdout}"
    );

    or_skip!(scratch.mount_overlay(&lower, &upper, &work, &merged));
    assert_eq!(
        fs::read_to_string(merged.join("aaa-system/init")).unwrap(),
        "#!init\n"
    );
    assert_eq!(
        names(&merged.join("bbb-lib/lib")),
        ["1", "2", "3"],
        "complete again"
    );
    assert_eq!(
        fs::read_to_string(merged.join("ccc-adopted/share/e")).unwrap(),
        "guest's adopted copy\n",
        "a finished adoption is kept"
    );
    assert_eq!(
        fs::read_to_string(merged.join("ddd-guest-only/out")).unwrap(),
        "only here\n",
        "the only copy of a path is kept"
    );
    assert!(
        merged.join("eee-unrelated/out").exists(),
        "paths outside the closure are untouched"
    );
}

#[test]
fn the_collector_selects_only_dead_paths_the_guest_alone_holds() {
    let mut scratch = or_skip!(Scratch::new());
    let lower = scratch.dir("ro-store");
    let upper = scratch.dir("rw-store/upper");
    let work = scratch.dir("rw-store/work");
    let merged = scratch.dir("store");

    write(&lower.join("aaa-both/out"), "host\n");
    write(&lower.join("ccc-deleted/out"), "host\n");
    write(&lower.join("ddd-host-only/out"), "host\n");
    or_skip!(scratch.mount_overlay(&lower, &upper, &work, &merged));
    write(
        &merged.join("aaa-both/more"),
        "a copy-up makes an upper entry\n",
    );
    write(&merged.join("bbb-guest-only/out"), "built here\n");
    fs::remove_dir_all(merged.join("ccc-deleted")).unwrap();
    assert!(is_whiteout(&upper.join("ccc-deleted")));

    let dead = [
        "aaa-both",
        "bbb-guest-only",
        "ccc-deleted",
        "ddd-host-only",
        "eee-gone",
    ]
    .map(|name| format!("{STORE}/{name}\n"))
    .concat();
    let output = run(
        "gc-select",
        &[&lower, &upper],
        &format!("{dead}not-a-store-path\n"),
        &[],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "/nix/store/bbb-guest-only\0");
}

#[test]
fn adoption_restores_case_hacked_names_on_a_case_insensitive_lower_layer_and_goes_on_after_a_failure()
 {
    let mut scratch = or_skip!(Scratch::new());
    let backing = scratch.dir("host-store");
    let lower = scratch.dir("ro-store");
    let upper = scratch.dir("rw-store/upper");
    let work = scratch.dir("rw-store/work");
    let merged = scratch.dir("store");
    let adopted = scratch.root.join("db/darwin-vz-nix-adopted");

    // ncurses' terminfo and the kernel's xt_DSCP/xt_dscp as a macOS store keeps them,
    // a path without case-hack names, and one whose names cannot be restored.
    write(&backing.join("nnn-ncurses/share/terminfo/E/eterm"), "E\n");
    write(
        &backing.join("nnn-ncurses/share/terminfo/e~nix~case~hack~1/excel"),
        "e\n",
    );
    write(&backing.join("kkk-modules/lib/xt_DSCP.ko"), "DSCP\n");
    write(
        &backing.join("kkk-modules/lib/xt_dscp.ko~nix~case~hack~1"),
        "dscp\n",
    );
    write(&backing.join("ppp-plain/bin/tool"), "tool\n");
    write(&backing.join("qqq-clash/x/a/f"), "a\n");
    write(&backing.join("qqq-clash/x/a~nix~case~hack~1/f"), "clash\n");
    for path in ["nnn-ncurses", "kkk-modules"] {
        fs::set_permissions(backing.join(path), fs::Permissions::from_mode(0o555)).unwrap();
    }

    or_skip!(scratch.mount_case_insensitive(&backing, &lower));
    or_skip!(scratch.mount_overlay(&lower, &upper, &work, &merged));
    // The trap: in the merged view `e` already "exists" (it is E), so renaming
    // e~nix~case~hack~1 to e in place cannot work.
    assert_eq!(
        fs::read_to_string(merged.join("nnn-ncurses/share/terminfo/e/eterm")).unwrap(),
        "E\n",
        "the lower layer is case-insensitive"
    );

    let paths = ["qqq-clash", "nnn-ncurses", "ppp-plain", "kkk-modules"]
        .map(|name| format!("{STORE}/{name}\n"))
        .concat();
    let output = run(
        "store-adopt",
        &[&lower, &merged, &adopted],
        &paths,
        &[],
        None,
    );
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(
        output.status.code(),
        Some(1),
        "one path failed: {stdout}{stderr}"
    );
    assert!(
        stderr.contains("could not adopt /nix/store/qqq-clash"),
        "{stderr}"
    );
    assert!(
        stdout.contains("4 paths checked, 2 adopted, 1 failed"),
        "{stdout}"
    );
    assert_eq!(
        fs::read_to_string(&adopted).unwrap(),
        "/nix/store/nnn-ncurses\n/nix/store/kkk-modules\n",
        "the paths after the failure were adopted"
    );

    let terminfo = merged.join("nnn-ncurses/share/terminfo");
    assert_eq!(names(&terminfo), ["E", "e"]);
    assert_eq!(fs::read_to_string(terminfo.join("e/excel")).unwrap(), "e\n");
    assert_eq!(fs::read_to_string(terminfo.join("E/eterm")).unwrap(), "E\n");
    assert!(
        !terminfo.join("e/eterm").exists(),
        "lookups in the copy are case-sensitive"
    );
    assert_eq!(
        fs::metadata(terminfo.join("e")).unwrap().mtime(),
        1,
        "canonical store time"
    );
    assert_eq!(
        names(&merged.join("kkk-modules/lib")),
        ["xt_DSCP.ko", "xt_dscp.ko"]
    );
    assert_eq!(
        names(&upper),
        ["kkk-modules", "nnn-ncurses"],
        "nothing else was copied, and no staging copy is left"
    );

    // Adopted copies survive the repair at the next boot, with their names.
    scratch.unmount(&merged);
    write(
        &backing.join("zzz-closure-info/registration"),
        &registration(&["nnn-ncurses", "kkk-modules", "ppp-plain"]),
    );
    let output = run(
        "store-repair-upper",
        &[
            Path::new("/nix/store/zzz-closure-info/registration"),
            &lower,
            &upper,
            &adopted,
        ],
        "",
        &[],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    or_skip!(scratch.mount_overlay(&lower, &upper, &work, &merged));
    assert_eq!(
        names(&merged.join("nnn-ncurses/share/terminfo")),
        ["E", "e"]
    );
}

#[test]
fn the_kernel_parameter_reader_takes_the_last_value_and_never_globs() {
    let dir = tempfile::tempdir().unwrap();
    let cmdline = dir.path().join("cmdline");
    fs::write(
        &cmdline,
        "console=hvc0 init=/nix/store/x/init glob=* range=[a] darwin_vz_nix.registration=/r1 \
         darwin_vz_nix.registration=/r2 flag\n",
    )
    .unwrap();
    // Files that an unquoted expansion would substitute for `*` and `[a]`.
    fs::write(dir.path().join("a"), "").unwrap();
    let read = |name: &str| {
        let output = Command::new("bash")
            .arg(script("kernel-param"))
            .arg(name)
            .env("KERNEL_CMDLINE", &cmdline)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout)
    };
    assert_eq!(read("darwin_vz_nix.registration"), "/r2\n");
    assert_eq!(read("glob"), "*\n");
    assert_eq!(read("range"), "[a]\n");
    assert_eq!(read("init"), "/nix/store/x/init\n");
    assert_eq!(read("flag"), "", "a bare word has no value");
    assert_eq!(read("darwin_vz_nix.rosetta"), "");
}

#[test]
fn registration_without_its_kernel_parameter_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let cmdline = dir.path().join("cmdline");
    fs::write(&cmdline, "console=hvc0 init=/nix/store/x/init\n").unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(
        script("kernel-param"),
        bin.join("darwin-vz-nix-kernel-param"),
    )
    .unwrap();
    let upper = dir.path().join("upper");
    fs::create_dir(&upper).unwrap();
    let marker = dir.path().join("marker");

    let output = run(
        "store-register",
        &[Path::new("darwin_vz_nix.registration"), &upper, &marker],
        "",
        &[("KERNEL_CMDLINE", &cmdline)],
        Some(&bin),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no darwin_vz_nix.registration= on the kernel command line")
            && stderr.contains("nix-daemon stays stopped"),
        "{stderr}"
    );
    assert!(!marker.exists());
}

#[test]
fn build_limits_keep_jobs_times_cores_within_one_compiler_per_gib() {
    let dir = tempfile::tempdir().unwrap();
    let meminfo = dir.path().join("meminfo");
    let out = dir.path().join("run/nix-build-limits.conf");
    let limits = |mem_kib: u64, cpus: u32| {
        fs::write(
            &meminfo,
            format!("MemTotal:       {mem_kib} kB\nMemFree:  1 kB\n"),
        )
        .unwrap();
        let output = run(
            "build-limits",
            &[&out, &meminfo, Path::new(&cpus.to_string())],
            "",
            &[],
            None,
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
        fs::read_to_string(&out).unwrap()
    };
    // The default VM (4 CPUs, 6 GiB, of which the kernel keeps some).
    assert_eq!(limits(5_900_000, 4), "max-jobs = 2\ncores = 2\n");
    assert_eq!(limits(16 << 20, 8), "max-jobs = 4\ncores = 4\n");
    assert_eq!(limits(2 << 20, 2), "max-jobs = 1\ncores = 2\n");
    assert_eq!(
        limits(900_000, 4),
        "max-jobs = 1\ncores = 1\n",
        "at least one job"
    );
    assert_eq!(
        limits(64 << 20, 2),
        "max-jobs = 2\ncores = 2\n",
        "never more than the CPUs"
    );

    fs::write(&meminfo, "MemFree: 1 kB\n").unwrap();
    let output = run(
        "build-limits",
        &[&out, &meminfo, Path::new("4")],
        "",
        &[],
        None,
    );
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("no MemTotal in"));
}

#[test]
fn leftover_build_directories_are_moved_aside_then_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let builds = dir.path().join("builds");
    let tmp = dir.path().join("tmp");
    let trash = dir.path().join("trash");
    write(&builds.join("nix-1-0/src/main.c"), "int main;\n");
    write(&tmp.join("nix-build-hello-1.drv-0/x"), "x\n");
    write(&tmp.join("other-file"), "not Nix's\n");
    // A build may leave a read-only directory behind.
    fs::set_permissions(
        builds.join("nix-1-0/src"),
        fs::Permissions::from_mode(0o555),
    )
    .unwrap();

    let output = run(
        "clean-builds",
        &[Path::new("move"), &trash, &builds, &tmp],
        "",
        &[],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(names(&builds).is_empty());
    assert_eq!(names(&tmp), ["other-file"]);
    assert_eq!(names(&trash).len(), 1);

    let output = run(
        "clean-builds",
        &[Path::new("delete"), &trash],
        "",
        &[],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(names(&trash).is_empty());
}

/// nix/nixos/scripts/kvm.sh: the features follow /dev/kvm, and the console line
/// says which in the form the host's supervisor reads (`nested::kvm_marker`).
#[test]
fn kvm_features_follow_the_device_and_the_console_line_tells_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let fragment = dir.path().join("run/darwin-vz-nix/nix-kvm.conf");
    let marker = Path::new(darwin_vz_nix::contract::CONSOLE_MARKER_KVM);
    let release = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    let release = release.trim();

    // /dev/null stands in for /dev/kvm: a character device.
    let output = run(
        "kvm",
        &[Path::new("/dev/null"), &fragment, marker],
        "",
        &[],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        fs::read_to_string(&fragment).unwrap(),
        "extra-system-features = kvm nixos-test\n"
    );
    let said = darwin_vz_nix::nested::kvm_marker(&output.stdout).unwrap();
    assert_eq!(said.kvm, darwin_vz_nix::nested::Kvm::Present);
    assert_eq!(said.kernel.as_deref(), Some(release));

    // No device (a guest booted without nested virtualization), or something that
    // is not a character device: no fragment, and the host is told.
    let regular = dir.path().join("not-a-device");
    fs::write(&regular, "").unwrap();
    for device in [dir.path().join("kvm"), regular] {
        let output = run("kvm", &[&device, &fragment, marker], "", &[], None);
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert!(!fragment.exists(), "{device:?}: the fragment is gone");
        assert_eq!(
            text(&output.stdout),
            format!("darwin-vz-nix-kvm: absent (Linux {release})\n")
        );
        assert!(
            fs::read_dir(fragment.parent().unwrap())
                .unwrap()
                .next()
                .is_none()
        );
    }

    let output = run("kvm", &[Path::new("/dev/null")], "", &[], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).starts_with("usage: kvm DEVICE FRAGMENT MARKER"));
}
