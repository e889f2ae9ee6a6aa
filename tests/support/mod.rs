//! What the integration tests share: a fake VM backend whose guest port 22 is a real
//! `sshd -i`, and a harness that runs the real supervisor (`daemon::serve`) with it —
//! in this process, or in a child process when a test must kill it.
//!
//! This backend lives with the tests and never ships in the binary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use darwin_vz_nix::backend::{Backend, BackendError, BackendEvent, BoxFuture, GuestStream};
use darwin_vz_nix::config::{Config, ConfigLayer, Origin, Source};
use darwin_vz_nix::daemon::{self, DaemonOptions};
use darwin_vz_nix::host::HostInfo;
use darwin_vz_nix::plan::BootPlan;
use tokio::sync::mpsc::UnboundedSender;

/// Guest port whose "service" echoes bytes back (for throughput measurements).
pub const ECHO_PORT: u32 = 7;
/// Like `ECHO_PORT`, with one more copying hop in between: what relaying the bytes
/// through the supervisor (instead of handing the proxy the descriptor) would add.
pub const ECHO_RELAYED_PORT: u32 = 8;

/// How the fake VM behaves.
#[derive(Debug, Clone)]
pub struct FakeVmBehaviour {
    /// How long `start` takes.
    pub boot_delay: Duration,
    /// How long after start guest port 22 keeps refusing connections.
    pub listen_delay: Duration,
    /// `start` fails with this message.
    pub fail_boot: Option<String>,
    /// The guest ignores the ACPI power button.
    pub ignore_graceful_stop: bool,
    /// Extra lines for the guest's sshd_config.
    pub sshd_extra: Vec<String>,
}

impl Default for FakeVmBehaviour {
    fn default() -> Self {
        FakeVmBehaviour {
            boot_delay: Duration::from_millis(50),
            listen_delay: Duration::from_millis(100),
            fail_boot: None,
            ignore_graceful_stop: false,
            sshd_extra: Vec::new(),
        }
    }
}

#[derive(Default)]
struct FakeVmState {
    running_since: Option<Instant>,
    events: Option<UnboundedSender<BackendEvent>>,
    boots: u32,
}

/// A VM played by the test process: "boot" is a delay, guest port 22 is `sshd -i`
/// started per connection with the keys from the state directory.
pub struct FakeVm {
    behaviour: Mutex<FakeVmBehaviour>,
    state: Mutex<FakeVmState>,
    state_dir: PathBuf,
    sshd_log: PathBuf,
}

impl FakeVm {
    pub fn new(state_dir: &Path, behaviour: FakeVmBehaviour) -> Arc<FakeVm> {
        Arc::new(FakeVm {
            behaviour: Mutex::new(behaviour),
            state: Mutex::new(FakeVmState::default()),
            state_dir: state_dir.to_path_buf(),
            sshd_log: state_dir.join("logs/fake-sshd.log"),
        })
    }

    pub fn boots(&self) -> u32 {
        self.state.lock().unwrap().boots
    }

    /// The VM dies with an error, as if the hypervisor failed.
    pub fn crash(&self, message: &str) {
        let mut state = self.state.lock().unwrap();
        state.running_since = None;
        if let Some(events) = &state.events {
            let _ = events.send(BackendEvent::Crashed(message.to_string()));
        }
    }

    /// The guest powers itself off.
    pub fn guest_poweroff(&self) {
        let mut state = self.state.lock().unwrap();
        state.running_since = None;
        if let Some(events) = &state.events {
            let _ = events.send(BackendEvent::StoppedByGuest);
        }
    }

    /// Writes the guest's sshd_config and returns its path.
    pub fn sshd_config(&self) -> PathBuf {
        let keys = self.state_dir.join("keys/guest");
        let path = self.state_dir.join("fake-sshd_config");
        let mut lines = vec![
            format!(
                "HostKey \"{}\"",
                keys.join("ssh_host_ed25519_key").display()
            ),
            format!(
                "AuthorizedKeysFile \"{}\"",
                keys.join("authorized_keys").display()
            ),
            "StrictModes no".into(),
            "UsePAM no".into(),
            "PermitRootLogin prohibit-password".into(),
            "PasswordAuthentication no".into(),
            "KbdInteractiveAuthentication no".into(),
            "PidFile none".into(),
            "LogLevel VERBOSE".into(),
        ];
        lines.extend(self.behaviour.lock().unwrap().sshd_extra.iter().cloned());
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    }

    fn spawn_sshd(&self) -> Result<GuestStream, BackendError> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| connect_error(22, e))?;
        let stdout: OwnedFd = theirs.try_clone().map_err(|e| connect_error(22, e))?.into();
        let stdin: OwnedFd = theirs.into();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-i", "-f"])
            .arg(self.sshd_config())
            .arg("-E")
            .arg(&self.sshd_log)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| connect_error(22, e))?;
        Ok(GuestStream::new(ours.into(), Some(Box::new(Reaper(child)))))
    }

    fn spawn_echo(&self) -> Result<GuestStream, BackendError> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| connect_error(ECHO_PORT, e))?;
        std::thread::spawn(move || {
            let mut reader = theirs.try_clone().unwrap();
            let mut writer = theirs;
            let _ = std::io::copy(&mut reader, &mut writer);
        });
        Ok(GuestStream::new(ours.into(), None))
    }
}

impl FakeVm {
    fn spawn_relayed_echo(&self) -> Result<GuestStream, BackendError> {
        let (ours, relay_in) =
            UnixStream::pair().map_err(|e| connect_error(ECHO_RELAYED_PORT, e))?;
        let (relay_out, echo) =
            UnixStream::pair().map_err(|e| connect_error(ECHO_RELAYED_PORT, e))?;
        let copy = |mut from: UnixStream, mut to: UnixStream| {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        };
        copy(
            relay_in.try_clone().unwrap(),
            relay_out.try_clone().unwrap(),
        );
        copy(relay_out, relay_in);
        std::thread::spawn(move || {
            let mut reader = echo.try_clone().unwrap();
            let mut writer = echo;
            let _ = std::io::copy(&mut reader, &mut writer);
        });
        Ok(GuestStream::new(ours.into(), None))
    }
}

fn connect_error(port: u32, e: std::io::Error) -> BackendError {
    BackendError::Connect {
        port,
        reason: e.to_string(),
    }
}

/// Ends a per-connection sshd with its stream.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Backend for FakeVm {
    fn name(&self) -> &'static str {
        "fake (tests)"
    }

    fn start(
        &self,
        _plan: BootPlan,
        events: UnboundedSender<BackendEvent>,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let behaviour = self.behaviour.lock().unwrap().clone();
            tokio::time::sleep(behaviour.boot_delay).await;
            if let Some(message) = behaviour.fail_boot {
                return Err(BackendError::Start(message));
            }
            let mut state = self.state.lock().unwrap();
            state.running_since = Some(Instant::now());
            state.events = Some(events);
            state.boots += 1;
            Ok(())
        })
    }

    fn request_stop(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            if self.state.lock().unwrap().running_since.is_none() {
                return Err(BackendError::NotRunning);
            }
            if self.behaviour.lock().unwrap().ignore_graceful_stop {
                return Ok(());
            }
            // The guest takes a moment to shut down, then reports it stopped.
            tokio::time::sleep(Duration::from_millis(30)).await;
            self.guest_poweroff();
            Ok(())
        })
    }

    fn force_stop(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.state.lock().unwrap().running_since = None;
            Ok(())
        })
    }

    fn connect(&self, port: u32) -> BoxFuture<'_, Result<GuestStream, BackendError>> {
        Box::pin(async move {
            let since = self
                .state
                .lock()
                .unwrap()
                .running_since
                .ok_or(BackendError::NotRunning)?;
            if since.elapsed() < self.behaviour.lock().unwrap().listen_delay {
                return Err(BackendError::Connect {
                    port,
                    reason: "Connection reset by peer".into(),
                });
            }
            match port {
                22 => self.spawn_sshd(),
                ECHO_PORT => self.spawn_echo(),
                ECHO_RELAYED_PORT => self.spawn_relayed_echo(),
                _ => Err(BackendError::Connect {
                    port,
                    reason: "Connection refused".into(),
                }),
            }
        })
    }
}

/// A state directory with a fake guest, and the configuration that points at it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub guest_dir: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("dvn test ")
            .tempdir()
            .unwrap();
        // A space in the path proves quoting all the way through ssh.
        let state_dir = dir.path().join("state dir");
        let guest_dir = dir.path().join("guest");
        darwin_vz_nix::artifacts::write_fake_guest(&guest_dir, "loglevel=4\n").unwrap();
        Fixture {
            dir,
            state_dir,
            guest_dir,
        }
    }

    pub fn config(&self, extra: ConfigLayer) -> Config {
        let base = ConfigLayer {
            guest: Some(self.guest_dir.clone()),
            state_dir: Some(self.state_dir.clone()),
            cores: Some(1),
            memory: Some(1024),
            disk_size: Some("1G".parse().unwrap()),
            ssh_user: Some(current_user()),
            ..Default::default()
        };
        Config::resolve(
            &[
                Source {
                    origin: Origin::File("test".into()),
                    layer: base,
                },
                Source {
                    origin: Origin::Flag,
                    layer: extra,
                },
            ],
            None,
        )
        .unwrap()
    }

    /// Options that make tests fast: idle and stop in milliseconds.
    pub fn options(&self, idle: Option<Duration>) -> DaemonOptions {
        DaemonOptions {
            host_store: self.dir.path().to_path_buf(),
            boot_timeout: Duration::from_secs(20),
            idle_timeout: idle,
            stop_timeout: Duration::from_secs(2),
            handle_signals: false,
        }
    }

    /// Runs the binary with this fixture's state directory and guest.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().unwrap()
    }

    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_darwin-vz-nix"));
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .env_remove("DARWIN_VZ_NIX_CONFIG")
            .env("DARWIN_VZ_NIX_GUEST", &self.guest_dir)
            .env("DARWIN_VZ_NIX_SSH_USER", current_user());
        command
    }
}

pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name
}

/// The real supervisor with a fake VM, served from a thread of this process.
pub struct Harness {
    pub vm: Arc<FakeVm>,
    thread: Option<std::thread::JoinHandle<()>>,
    state_dir: PathBuf,
}

impl Harness {
    pub fn start(fixture: &Fixture, behaviour: FakeVmBehaviour, idle: Option<Duration>) -> Harness {
        Self::start_with(
            fixture,
            fixture.config(ConfigLayer::default()),
            behaviour,
            fixture.options(idle),
        )
    }

    pub fn start_with(
        fixture: &Fixture,
        config: Config,
        behaviour: FakeVmBehaviour,
        options: DaemonOptions,
    ) -> Harness {
        prepare_sshd_privsep_dir();
        let vm = FakeVm::new(&fixture.state_dir, behaviour);
        let prepared = daemon::prepare(&config).expect("prepare the state directory");
        let backend: Arc<dyn Backend> = vm.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime
                .block_on(daemon::serve(
                    prepared,
                    config,
                    HostInfo::detect(),
                    backend,
                    options,
                ))
                .unwrap();
        });
        let harness = Harness {
            vm,
            thread: Some(thread),
            state_dir: fixture.state_dir.clone(),
        };
        wait_for(Duration::from_secs(10), "the control socket", || {
            darwin_vz_nix::control::ControlClient::connect(&harness.state_dir).is_ok()
        });
        harness
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        use darwin_vz_nix::control::protocol::Request;
        if let Ok(mut client) = darwin_vz_nix::control::ControlClient::connect(&self.state_dir) {
            let _ = client.call(
                Request::Stop {
                    force: true,
                    timeout_ms: None,
                    exit: true,
                },
                Duration::from_secs(10),
            );
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// sshd run as root wants its privilege separation directory.
pub fn prepare_sshd_privsep_dir() {
    if nix::unistd::getuid().is_root() {
        let _ = std::fs::create_dir_all("/run/sshd");
    }
}

/// Polls `condition` until it holds, or panics naming `what`.
pub fn wait_for(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Reads the first line a child process prints (e.g. the SSH banner through `proxy`).
pub fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

/// Evaluates a builtins-only Nix file to JSON with Debian's `nix-instantiate`.
pub fn nix_eval_json(file: &Path) -> serde_json::Value {
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(file)
        .output()
        .expect("nix-instantiate is installed (apt install nix-bin)");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}
