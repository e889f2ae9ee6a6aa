//! Root on a state directory that another account owns — the README's
//! `sudo darwin-vz-nix … --state-dir /var/lib/darwin-vz`. That account can fill the
//! directory with anything; root must neither follow what it planted nor leave it
//! files it cannot use. These tests need root (CI runs as root) and make a second
//! account with `useradd`, deleted when the test ends; without root they say so
//! and pass.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use darwin_vz_nix::control::ControlClient;
use support::*;

/// True when the test can run; prints why not otherwise.
fn running_as_root(test: &str, why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skipped(test, &format!("it needs root ({why})"));
    false
}

const SECOND_ACCOUNT: &str = "to make a second account and act for it";
const MOUNT: &str = "to mount a tiny filesystem on keys/";

/// An account made for one test (`useradd`), deleted on drop (`userdel`).
struct Account {
    name: String,
    uid: u32,
    gid: u32,
}

/// useradd and userdel lock /etc/passwd: one at a time in this process.
static ACCOUNTS: Mutex<()> = Mutex::new(());

/// Runs useradd, groupadd or usermod (package passwd). Other processes (other test
/// suites) may hold the passwd lock for a moment: the tool then exits 10; try again.
fn account_tool(program: &str, args: &[&str]) {
    for attempt in 0.. {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} (package passwd): {e}"));
        if out.status.success() {
            return;
        }
        assert!(
            out.status.code() == Some(10) && attempt < 50,
            "{program} {args:?}: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Account {
    fn create(tag: &str) -> Account {
        let _one_at_a_time = ACCOUNTS.lock().unwrap();
        let name = format!("dvn-{tag}-{}", std::process::id());
        account_tool(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ],
        );
        let user = nix::unistd::User::from_name(&name).unwrap().unwrap();
        Account {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }

    /// Gives `path` (and what is under it) to this account, links included.
    fn give(&self, path: &Path) {
        let out = Command::new("chown")
            .args(["-R", "-h", &format!("{}:{}", self.uid, self.gid)])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let _one_at_a_time = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..50 {
            let out = Command::new("userdel").arg(&self.name).output().unwrap();
            if out.status.code() != Some(10) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// A fixture the second account can read (its guest) and a state directory it owns.
fn fixture_for(account: &Account) -> Fixture {
    let fixture = Fixture::new();
    std::fs::set_permissions(fixture.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(&fixture.state_dir).unwrap();
    account.give(&fixture.state_dir);
    fixture
}

/// The binary, run by root, on the fixture's state directory.
fn as_root(fixture: &Fixture, args: &[&str]) -> Output {
    fixture.cli(args)
}

/// Everything under `dir` (the directory included) whose owner is not `uid`.
fn not_owned_by(dir: &Path, uid: u32) -> Vec<(PathBuf, u32)> {
    let mut wrong = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.uid() != uid {
            wrong.push((path.clone(), meta.uid()));
        }
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    wrong
}

/// A root-owned file outside the state directory, mode 0600: what a planted link
/// points at (a stand-in for /etc/…).
fn victim(fixture: &Fixture, name: &str, content: &str) -> PathBuf {
    let root_only = fixture.dir.path().join("root-only");
    let _ = std::fs::create_dir(&root_only);
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o700)).unwrap();
    let path = root_only.join(name);
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn plant_link(account: &Account, target: &Path, link: &Path) {
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, link).unwrap();
    account.give(link);
}

#[test]
fn links_planted_in_the_state_directory_hurt_nobody_when_root_runs_a_command() {
    if !running_as_root(
        "links_planted_in_the_state_directory_hurt_nobody_when_root_runs_a_command",
        SECOND_ACCOUNT,
    ) {
        return;
    }
    let account = Account::create("links");
    let fixture = fixture_for(&account);
    let state = &fixture.state_dir;
    let secret = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISECRETSECRET root@victim\n";
    let truncatable = victim(&fixture, "x", "victim's data\n");
    let key_victim = victim(&fixture, "secret", secret);
    let log_victim = fixture.dir.path().join("root-only/y");
    plant_link(&account, &truncatable, &state.join("lock"));
    plant_link(&account, &truncatable, &state.join("supervisor.pid"));
    plant_link(&account, &log_victim, &state.join("logs/daemon.log"));
    plant_link(
        &account,
        &key_victim,
        &state.join("keys/guest/ssh_host_ed25519_key.pub"),
    );
    account.give(state);

    // The supervisor: it takes the directory and opens its log.
    let out = as_root(&fixture, &["daemon"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "darwin-vz-nix: cannot open the log file: {} is a symbolic link, not a regular file; remove it (darwin-vz-nix makes its state files itself)\n",
            state.join("logs/daemon.log").display()
        )
    );
    assert!(
        !log_victim.exists(),
        "the log's link target was not created"
    );

    // Keys: the linked public key is replaced, its target neither changed nor shown.
    let out = as_root(&fixture, &["rotate-keys"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).lines().next().unwrap(),
        format!(
            "state directory {} (acting as its owner, {})",
            state.display(),
            account.name
        )
    );
    for text in [stdout(&out), stderr(&out)] {
        assert!(!text.contains("SECRET"), "{text}");
    }
    let pub_key = state.join("keys/guest/ssh_host_ed25519_key.pub");
    assert!(std::fs::symlink_metadata(&pub_key).unwrap().is_file());

    for (path, content) in [(&truncatable, "victim's data\n"), (&key_victim, secret)] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), content, "{path:?}");
        assert_eq!(meta.mode() & 0o7777, 0o600, "{path:?} not chmodded");
        assert_eq!(meta.uid(), 0, "{path:?} not chowned");
    }
    assert_eq!(not_owned_by(state, account.uid), Vec::new());
}

/// Runs only when re-executed as the second account by
/// `root_rotate_keys_and_destroy_leave_the_owner_able_to_start`: the owner's
/// supervisor, with the fake VM, until told to stop.
#[test]
#[ignore = "helper process for other tests"]
fn owner_supervisor() {
    let Ok(state_dir) = std::env::var("DVN_ROOT_TEST_STATE_DIR") else {
        return;
    };
    let fixture_dir = PathBuf::from(std::env::var("DVN_ROOT_TEST_FIXTURE").unwrap());
    let fixture = Fixture {
        dir: tempfile::tempdir().unwrap(),
        state_dir: state_dir.into(),
        guest_dir: fixture_dir.join("guest"),
    };
    let config = fixture.config(Default::default());
    let prepared = match darwin_vz_nix::daemon::prepare(&config) {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("owner supervisor: {e}");
            std::process::exit(4);
        }
    };
    let vm = FakeVm::new(&fixture.state_dir, FakeVmBehaviour::default());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let served = runtime.block_on(darwin_vz_nix::daemon::serve(
        prepared,
        config,
        darwin_vz_nix::host::HostInfo::detect(),
        vm,
        fixture.options(None),
    ));
    if let Err(e) = served {
        eprintln!("owner supervisor: {e}");
        std::process::exit(5);
    }
    std::process::exit(0);
}

#[test]
fn root_rotate_keys_and_destroy_leave_the_owner_able_to_start() {
    use std::os::unix::process::CommandExt;
    if !running_as_root(
        "root_rotate_keys_and_destroy_leave_the_owner_able_to_start",
        SECOND_ACCOUNT,
    ) {
        return;
    }
    let account = Account::create("owner");
    let fixture = fixture_for(&account);
    let state = &fixture.state_dir;
    std::fs::write(state.join("disk.img"), "guest data").unwrap();
    account.give(state);

    for args in [
        &["rotate-keys"][..],
        &["destroy", "--yes"],
        &["rotate-keys"],
    ] {
        let out = as_root(&fixture, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
    // A supervisor started by root acts as the owner too (on Linux it stops at the
    // missing VM backend, after taking the directory and opening its log).
    let out = as_root(&fixture, &["daemon"]);
    if !darwin_vz_nix::vm_backend_available() {
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("runs VMs only on macOS"),
            "{}",
            stderr(&out)
        );
        assert!(state.join("logs/daemon.log").is_file());
    }
    assert_eq!(
        not_owned_by(state, account.uid),
        Vec::new(),
        "everything root made belongs to the owner"
    );
    let key_mode = std::fs::metadata(state.join("keys/client_ed25519"))
        .unwrap()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    // The owner's supervisor starts on what root left: this very test binary, run
    // as the account from a copy it can read.
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().join("root-tests");
    std::fs::copy(std::env::current_exe().unwrap(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Command::new(&bin)
        .args([
            "--exact",
            "owner_supervisor",
            "--ignored",
            "--test-threads=1",
        ])
        .env("DVN_ROOT_TEST_STATE_DIR", state)
        .env("DVN_ROOT_TEST_FIXTURE", fixture.dir.path())
        .current_dir("/")
        .uid(account.uid)
        .gid(account.gid)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let answered = (0..400).any(|_| {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
        ControlClient::connect(state).is_ok()
    });
    if !answered {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("the owner's supervisor did not start: {}", stderr(&out));
    }
    let out = fixture.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut client = ControlClient::connect(state).unwrap();
    client.call(forced_exit(), Duration::from_secs(10)).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// A copy of the binary that any account can run (the build directory may not be).
fn shared_binary() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("darwin-vz-nix");
    std::fs::copy(env!("CARGO_BIN_EXE_darwin-vz-nix"), &bin).unwrap();
    (dir, bin)
}

/// `darwin-vz-nix --state-dir STATE_DIR ARGS` run by `account` (its uid and gid, from
/// `/`), with the fixture's guest.
fn run_as(
    account: &Account,
    bin: &Path,
    fixture: &Fixture,
    state_dir: &Path,
    args: &[&str],
) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new(bin)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env("DARWIN_VZ_NIX_GUEST", &fixture.guest_dir)
        .current_dir("/")
        .uid(account.uid)
        .gid(account.gid)
        .output()
        .unwrap()
}

#[test]
fn an_account_is_refused_a_state_directory_it_does_not_own() {
    if !running_as_root(
        "an_account_is_refused_a_state_directory_it_does_not_own",
        SECOND_ACCOUNT,
    ) {
        return;
    }
    let account = Account::create("other");
    let fixture = Fixture::new();
    std::fs::set_permissions(fixture.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Root's directory, which the account may enter and read (mode 0755).
    std::fs::create_dir(&fixture.state_dir).unwrap();
    std::fs::set_permissions(&fixture.state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_dir, bin) = shared_binary();
    for args in [&["rotate-keys"][..], &["destroy", "--yes"], &["daemon"]] {
        let out = run_as(&account, &bin, &fixture, &fixture.state_dir, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!(
                "darwin-vz-nix: {} belongs to uid 0, not to this user (uid {}); run as its owner (or as root, which acts as the owner) or choose another --state-dir\n",
                fixture.state_dir.display(),
                account.uid
            ),
            "{args:?}"
        );
    }
    assert_eq!(std::fs::read_dir(&fixture.state_dir).unwrap().count(), 0);
}

#[test]
fn a_state_dir_link_is_followed_only_when_it_is_the_users_or_roots() {
    if !running_as_root(
        "a_state_dir_link_is_followed_only_when_it_is_the_users_or_roots",
        SECOND_ACCOUNT,
    ) {
        return;
    }
    let account = Account::create("link");
    let fixture = fixture_for(&account);
    let (_dir, bin) = shared_binary();
    // `daemon` as the account through a link to its own state directory. Here
    // (not macOS) it gets as far as the VM, so that message means the link was
    // accepted and the state directory made.
    let daemon_through = |link: &Path| {
        let out = run_as(&account, &bin, &fixture, link, &["daemon"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        stderr(&out)
    };
    let link_owned_by = |name: &str, uid: u32| {
        let link = fixture.dir.path().join(name);
        std::os::unix::fs::symlink(&fixture.state_dir, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(uid), None).unwrap();
        link
    };

    for (name, uid) in [("the-accounts-link", account.uid), ("roots-link", 0)] {
        let err = daemon_through(&link_owned_by(name, uid));
        assert!(err.contains("runs VMs only on macOS"), "{name}: {err}");
    }
    assert!(fixture.state_dir.join("keys").is_dir());

    let strangers = link_owned_by("a-strangers-link", 54321);
    assert_eq!(
        daemon_through(&strangers),
        format!(
            "darwin-vz-nix: {} is a symbolic link to {}, which is a directory, but the link belongs to uid 54321 (neither this user nor root), who could point it elsewhere; point --state-dir at an existing directory\n",
            strangers.display(),
            fixture.state_dir.display()
        )
    );
}

/// A tmpfs mounted on `keys/`, unmounted on drop.
struct TinyFilesystem {
    path: PathBuf,
}

impl TinyFilesystem {
    /// `None` (with the reason printed) where this machine does not allow mounts.
    fn mount(path: &Path, bytes: u64) -> Option<TinyFilesystem> {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .ok()?;
        if !out.status.success() {
            skipped(
                "a_full_disk_during_key_generation_leaves_no_half_pair",
                &format!(
                    "the full-disk part: cannot mount a tmpfs here ({})",
                    stderr(&out).trim()
                ),
            );
            return None;
        }
        Some(TinyFilesystem {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TinyFilesystem {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(&self.path).output();
        if !out.is_ok_and(|o| o.status.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        }
    }
}

/// Fills the filesystem of `dir`, then frees `free` bytes: returns the filler.
fn fill_leaving(dir: &Path, free: u64) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = [0u8; 4096];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += u64::try_from(n).unwrap(),
            Err(_) => break,
        }
    }
    let _ = file.sync_all();
    file.set_len(written.saturating_sub(free)).unwrap();
    filler
}

#[test]
fn a_full_disk_during_key_generation_leaves_no_half_pair() {
    if !running_as_root(
        "a_full_disk_during_key_generation_leaves_no_half_pair",
        MOUNT,
    ) {
        return;
    }
    let fixture = Fixture::new();
    let state = darwin_vz_nix::state::StateDir::new(&fixture.state_dir);
    state
        .create(darwin_vz_nix::state::Access::OwnerOnly)
        .unwrap();
    let Some(_mounted) = TinyFilesystem::mount(&state.keys_dir(), 64 * 1024) else {
        return;
    };
    state.create_key_dirs().unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .and_then(|size| u64::try_from(size).ok())
        .unwrap();
    // Room for the private key's page, not for its public half's.
    let filler = fill_leaving(&state.keys_dir(), page);
    let keys_entries = || {
        let mut names: Vec<String> = std::fs::read_dir(state.keys_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };

    let out = fixture.cli(&["rotate-keys"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).ends_with("; nothing was deleted or replaced\n"),
        "{}",
        stderr(&out)
    );
    // The daemon's own path to new keys, on the same full disk.
    assert!(darwin_vz_nix::keys::ensure(&state).is_err());
    assert_eq!(
        keys_entries(),
        ["filler", "guest"],
        "no half pair, no leftovers"
    );
    assert_eq!(
        std::fs::read_dir(state.guest_keys_dir()).unwrap().count(),
        0
    );

    std::fs::remove_file(&filler).unwrap();
    let out = fixture.cli(&["rotate-keys"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = darwin_vz_nix::keys::ensure(&state).unwrap();
    assert_eq!(
        report.notices,
        Vec::<String>::new(),
        "a whole pair was made"
    );
}

/// A group made for one test (`groupadd`), deleted on drop.
struct Group {
    name: String,
    gid: u32,
}

impl Group {
    /// A new group with `member` in it as a supplementary (not primary) member.
    fn with_member(tag: &str, member: &Account) -> Group {
        let _one_at_a_time = ACCOUNTS.lock().unwrap();
        let name = format!("dvn-{tag}-{}", std::process::id());
        account_tool("groupadd", &["--system", &name]);
        account_tool("usermod", &["--append", "--groups", &name, &member.name]);
        let gid = nix::unistd::Group::from_name(&name)
            .unwrap()
            .unwrap()
            .gid
            .as_raw();
        Group { name, gid }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _one_at_a_time = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

#[test]
fn root_acting_as_the_owner_has_the_owners_supplementary_groups() {
    // The owner may give the state directory to a control group it is a member of;
    // root acting as the owner must be able to do the same, so it must carry the
    // owner's supplementary groups (initgroups), not its own.
    if !running_as_root(
        "root_acting_as_the_owner_has_the_owners_supplementary_groups",
        SECOND_ACCOUNT,
    ) {
        return;
    }
    let account = Account::create("grp");
    let group = Group::with_member("ctl", &account);
    let fixture = fixture_for(&account);
    let state = &fixture.state_dir;

    let out = fixture
        .cli_command(&["rotate-keys"])
        .env("DARWIN_VZ_NIX_CONTROL_GROUP", &group.name)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let meta = std::fs::metadata(state).unwrap();
    assert_eq!(meta.gid(), group.gid, "the state directory is the group's");
    assert_eq!(meta.uid(), account.uid, "and still the owner's");
    assert_eq!(meta.mode() & 0o777, 0o750);
}
