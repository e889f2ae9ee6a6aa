//! One function per command.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::CommandFactory;

use super::CliError;
use super::args::{
    self, BenchKind, Cli, Command, GlobalArgs, StartArgs, StopArgs, VmArgs, absolute,
};
use crate::bench::{self, Stats};
use crate::config::{self, Config, ConfigErrors, ConfigLayer, Origin, Problem, Source};
use crate::control::protocol::{
    self, BootTiming, ClockSyncReport, Reply, Request, SleepReport, StatusReport, StopOutcome,
    VmState,
};
use crate::control::{ClientError, ControlClient};
use crate::daemon::{self, DaemonOptions};
use crate::doctor;
use crate::host::HostInfo;
use crate::mac::MacAddress;
use crate::plan::{BootPlan, HOST_STORE, PlanInputs};
use crate::ssh::SshTarget;
use crate::state::{self, Access, Acting, StateDir};

pub(super) type Outcome = Result<u8, CliError>;

pub fn run(cli: Cli) -> Outcome {
    let global = cli.global;
    match cli.command {
        Command::Start(args) => start(&global, &args),
        Command::Bootstrap(args) => super::bootstrap::run(&global, &args),
        Command::Stop(args) => stop(&global, &args),
        Command::Status(json) => status(&global, json.json),
        Command::Ssh(args) => ssh(&global, args.user, &args.command),
        Command::SshConfig(args) => ssh_config(&global, args.proxy_bin, args.user),
        Command::Proxy(args) => proxy(
            &global,
            args.port,
            Duration::from_secs(args.timeout),
            args.fdpass,
            args.alias.as_deref(),
        ),
        Command::Machines(args) => machines(&global, &args),
        Command::Daemon(args) => run_daemon(&global, &args.vm),
        Command::Doctor(args) => run_doctor(&global, &args.vm, args.json),
        Command::Logs(args) => logs(&global, &args),
        Command::Bench(args) => run_bench(&global, args.what, args.force),
        Command::Destroy(args) => reset(&global, false, args.yes),
        Command::RotateKeys => reset(&global, true, true),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "darwin-vz-nix",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
    }
}

/// Layers defaults, `--config`, the environment and `flags`, then fits unset
/// defaults to this host (a 4-CPU default on a 2-CPU machine becomes 2). Every
/// problem is reported together: the environment's, the config file's, and those of
/// the values the layers resolve to — one bad layer does not hide another.
pub(super) fn resolve_config(
    global: &GlobalArgs,
    flags: ConfigLayer,
    host: &HostInfo,
) -> Result<Config, CliError> {
    let layers = read_layers(global, flags);
    resolve_layers(&layers, host).map_err(|problems| ConfigErrors(problems).into())
}

/// `resolve_config` for `start`: when the settings have problems, the guest's
/// problems (a missing guest directory, a compressed kernel) are reported with them,
/// so that fixing a flag does not reveal a second round of errors. (With valid
/// settings, `daemon::check_boot` reports the guest's together with the host's.)
fn resolve_config_for_boot(
    global: &GlobalArgs,
    flags: ConfigLayer,
    host: &HostInfo,
) -> Result<Config, CliError> {
    let layers = read_layers(global, flags);
    resolve_layers(&layers, host).map_err(|mut problems| {
        // A layer that could not be read may be the one that names the guest:
        // judging the guest without it would report one that is not missing.
        if !problems.iter().any(could_name_the_guest) {
            for problem in guest_problems(&layers.sources) {
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
        }
        ConfigErrors(problems).into()
    })
}

/// Every layer that could be read, and a problem for each input that could not.
struct Layers {
    sources: Vec<Source>,
    problems: Vec<Problem>,
}

fn read_layers(global: &GlobalArgs, flags: ConfigLayer) -> Layers {
    let (env, mut problems) = config::read_env_all(std::env::vars_os());
    let mut sources = Vec::new();
    if let Some(path) = global.config.clone().or(env.config_file) {
        let path = absolute(&path);
        match config::load_file(&path) {
            Ok(mut layer) => {
                anchor_paths(&mut layer, path.parent().unwrap_or(Path::new("/")));
                sources.push(Source {
                    origin: Origin::File(path),
                    layer,
                });
            }
            Err(ConfigErrors(mut more)) => problems.append(&mut more),
        }
    }
    sources.push(Source {
        origin: Origin::Env,
        layer: env.layer,
    });
    let mut flags = flags;
    flags.state_dir = global.state_dir.as_deref().map(absolute);
    sources.push(Source {
        origin: Origin::Flag,
        layer: flags,
    });
    Layers { sources, problems }
}

fn resolve_layers(layers: &Layers, host: &HostInfo) -> Result<Config, Vec<Problem>> {
    let mut problems = layers.problems.clone();
    let lookup = |key: &str| std::env::var(key).ok();
    match Config::resolve(&layers.sources, config::default_state_dir(lookup)) {
        Ok(mut config) if problems.is_empty() => {
            config.fit_defaults_to(host);
            Ok(config)
        }
        Ok(_) => Err(problems),
        Err(ConfigErrors(mut more)) => {
            problems.append(&mut more);
            Err(problems)
        }
    }
}

/// The settings that say where the guest is.
const GUEST_KEYS: [&str; 5] = ["guest", "kernel", "initrd", "system", "registration"];

/// Whether `problem` is about an input that may set the guest: the config file, the
/// variable naming it, or a guest variable.
fn could_name_the_guest(problem: &Problem) -> bool {
    problem.input.starts_with("config file ")
        || problem.input == config::CONFIG_FILE_VAR
        || GUEST_KEYS
            .iter()
            .any(|key| problem.input == config::env_var(key))
}

/// What is wrong with the guest the layers name, judged on the guest settings
/// alone (the others may be what is wrong).
fn guest_problems(sources: &[Source]) -> Vec<Problem> {
    let guest_only: Vec<Source> = sources
        .iter()
        .map(|source| Source {
            origin: source.origin.clone(),
            layer: ConfigLayer {
                guest: source.layer.guest.clone(),
                kernel: source.layer.kernel.clone(),
                initrd: source.layer.initrd.clone(),
                system: source.layer.system.clone(),
                registration: source.layer.registration.clone(),
                ..ConfigLayer::default()
            },
        })
        .collect();
    // The state directory does not matter to the guest; its own problems (a path
    // that is not UTF-8) are among those already found.
    match Config::resolve(&guest_only, Some(PathBuf::from("/"))) {
        Ok(config) => crate::artifacts::resolve(&config).err().unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Root acts as the owner of the configured state directory from here on (see
/// `state::act_as_owner`); everyone else acts as themselves.
pub(super) fn act_as_owner(config: &Config) -> Result<Acting, CliError> {
    state::act_as_owner(&config.state_dir).map_err(|e| CliError::Failure(e.to_string()))
}

/// Relative paths in a config file are relative to the file.
fn anchor_paths(layer: &mut ConfigLayer, base: &Path) {
    for path in [
        &mut layer.guest,
        &mut layer.kernel,
        &mut layer.initrd,
        &mut layer.system,
        &mut layer.registration,
        &mut layer.state_dir,
    ]
    .into_iter()
    .flatten()
    {
        if path.is_relative() {
            *path = base.join(&*path);
        }
    }
}

fn start(global: &GlobalArgs, args: &StartArgs) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config_for_boot(global, args.vm.layer(), &host)?;
    // Before anything reads the state, and before a daemon is spawned (it inherits
    // the owner's identity, and so do the files it makes).
    act_as_owner(&config)?;
    let state = StateDir::new(&config.state_dir);
    if args.dry_run {
        return dry_run(&config, &host, &state, args.json);
    }
    ensure_supervisor(global, &args.vm, &config, &host)?;

    let mut client = ControlClient::connect(&config.state_dir)?;
    let timeout = Duration::from_secs(args.timeout);
    if args.no_wait {
        let reply = client.call(
            Request::Start {
                wait: false,
                timeout_ms: None,
            },
            Duration::from_secs(10),
        )?;
        let already = matches!(
            reply,
            Reply::Started {
                already_running: true,
                ..
            }
        );
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "state": if already { "running" } else { "starting" } })
            );
        } else if already {
            println!("already running");
        } else {
            println!("booting; `darwin-vz-nix status` shows when it is ready");
        }
        return Ok(0);
    }
    if !args.json {
        eprintln!(
            "booting (waiting up to {} s for the guest's sshd, and for the guest to be built if it is new)…",
            args.timeout
        );
    }
    let request = Request::Start {
        wait: true,
        timeout_ms: Some(protocol::millis(timeout)),
    };
    // While it waits, say how the guest's build is going (it may take minutes).
    let progress = (!args.json).then(|| GuestProgress::follow(&config.state_dir));
    let reply = client.call(request, timeout.saturating_add(Duration::from_secs(5)));
    drop(progress);
    let Reply::Started {
        already_running,
        boot,
    } = reply?
    else {
        return Err(CliError::Failure("unexpected reply to start".into()));
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "state": "running", "alreadyRunning": already_running, "boot": boot })
        );
    } else if already_running {
        println!("already running");
    } else if let Some(boot) = boot {
        println!("{}", describe_boot(&boot));
    } else {
        println!("ready");
    }
    Ok(0)
}

/// Makes sure a supervisor runs for the state directory: checks the flags against
/// a running one, or checks the configuration and spawns one.
pub(super) fn ensure_supervisor(
    global: &GlobalArgs,
    vm: &VmArgs,
    config: &Config,
    host: &HostInfo,
) -> Result<(), CliError> {
    let state = StateDir::new(&config.state_dir);
    match ControlClient::connect(&config.state_dir) {
        Ok(mut client) => {
            if let Reply::Status(status) = client.call(Request::Status, Duration::from_secs(10))? {
                check_same_settings(vm, config, &status)?;
            }
            Ok(())
        }
        Err(ClientError::NotRunning { .. }) => {
            // A lazy guest is the daemon's to realise and check.
            if config.lazy_guest().is_some() {
                daemon::check_settings(config, host, &state)?;
            } else {
                daemon::check_boot(config, host, &state)?;
            }
            if !crate::vm_backend_available() {
                return Err(CliError::Failure(format!(
                    "darwin-vz-nix runs VMs only on macOS 13+ on Apple Silicon (this is {}); `darwin-vz-nix start --dry-run` shows what would boot",
                    std::env::consts::OS
                )));
            }
            spawn_daemon(global, vm, config)
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints the lazy guest's progress to stderr, from a second control connection,
/// until dropped: a line whenever the phase or the counts change, at most every
/// [`GuestProgress::EVERY`].
pub(super) struct GuestProgress {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GuestProgress {
    const EVERY: Duration = Duration::from_secs(2);

    pub(super) fn follow(state_dir: &Path) -> GuestProgress {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = stop.clone();
        let state_dir = state_dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            let mut last = String::new();
            while !done.load(Ordering::Relaxed) {
                if let Some(text) = guest_progress_line(&state_dir)
                    && text != last
                {
                    eprintln!("{text}");
                    last = text;
                }
                let until = Instant::now() + Self::EVERY;
                while !done.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        GuestProgress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for GuestProgress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `guest: building for …` while the lazy guest is being built, else `None`.
fn guest_progress_line(state_dir: &Path) -> Option<String> {
    let mut client = ControlClient::connect(state_dir).ok()?;
    let Ok(Reply::Status(report)) = client.call(Request::Status, Duration::from_secs(5)) else {
        return None;
    };
    let guest = report.guest?;
    (guest.phase == "building").then(|| {
        guest_lines(&guest)
            .into_iter()
            .map(|(label, value)| format!("{label}: {value}"))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

pub(super) fn describe_boot(boot: &BootTiming) -> String {
    format!(
        "ready in {:.1} s (plan built after {:.2} s, VM started after {:.2} s, guest sshd answered {:.2} s later)",
        boot.ready_secs,
        boot.planned_secs,
        boot.vm_started_secs,
        boot.ready_secs - boot.vm_started_secs
    )
}

/// Flags given to `start` must match what the running supervisor uses.
fn check_same_settings(
    vm: &VmArgs,
    config: &Config,
    status: &StatusReport,
) -> Result<(), CliError> {
    let running = &status.config;
    let mut differences = Vec::new();
    if vm.cores.is_some() && config.cores != running.cores {
        differences.push(format!("cores {} (asked {})", running.cores, config.cores));
    }
    if vm.memory.is_some() && config.memory_mib != running.memory_mib {
        differences.push(format!(
            "memory {} MiB (asked {})",
            running.memory_mib, config.memory_mib
        ));
    }
    if vm.disk_size.is_some() && config.disk_size.to_string() != running.disk_size {
        differences.push(format!(
            "diskSize {} (asked {})",
            running.disk_size, config.disk_size
        ));
    }
    if (vm.rosetta || vm.no_rosetta) && config.rosetta != running.rosetta {
        differences.push(format!(
            "rosetta {} (asked {})",
            running.rosetta, config.rosetta
        ));
    }
    if vm.nested_virtualization.is_some()
        && running
            .nested_virtualization
            .is_some_and(|n| n != config.nested_virtualization)
    {
        differences.push(format!(
            "nestedVirtualization {} (asked {})",
            running.nested_virtualization.unwrap_or_default(),
            config.nested_virtualization
        ));
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "the running supervisor (pid {}) uses {}; to change settings run `darwin-vz-nix stop --daemon`, then start again (or change services.darwin-vz in nix-darwin)",
        status.supervisor_pid,
        differences.join(", ")
    )))
}

fn dry_run(config: &Config, host: &HostInfo, state: &StateDir, json: bool) -> Outcome {
    let artifacts = match config.lazy_guest() {
        // The lazy guest's output, once it is in the store; until then the plan
        // cannot be made, and `bootstrap --dry-run` says how it will be.
        Some(spec) if !spec.out.is_dir() => {
            daemon::check_settings(config, host, state)?;
            return Err(CliError::Failure(format!(
                "the guest {} is not built yet (the daemon builds it from {} when first needed); `darwin-vz-nix bootstrap --dry-run` shows every step",
                spec.out.display(),
                spec.drv.display()
            )));
        }
        Some(spec) => daemon::check_boot_from(config, host, state, Some((&spec.out, "guestOut")))?,
        None => daemon::check_boot(config, host, state)?,
    };
    let (mac, new_mac) = match MacAddress::load(&state.mac_address()) {
        Some(mac) => (mac, false),
        None => (
            MacAddress::random().map_err(|e| CliError::Failure(e.to_string()))?,
            true,
        ),
    };
    let plan = BootPlan::build(&PlanInputs {
        config,
        artifacts: &artifacts,
        state,
        host,
        mac,
        host_store: Path::new(HOST_STORE),
    })
    .map_err(|e| CliError::Failure(e.to_string()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("plans serialise")
        );
    } else {
        println!(
            "Boot plan for {} (dry run: nothing was created or started)",
            state.root().display()
        );
        print!("{plan}");
        if new_mac {
            println!(
                "(the MAC address is new; the first real start keeps one in {})",
                state.mac_address().display()
            );
        }
    }
    Ok(0)
}

/// Starts `darwin-vz-nix daemon` detached (new session, stdio to its log) and waits
/// until its control socket answers.
fn spawn_daemon(global: &GlobalArgs, vm: &VmArgs, config: &Config) -> Result<(), CliError> {
    let state = StateDir::new(&config.state_dir);
    let access = Access::from_group_name(config.control_group.as_deref())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    state
        .create(access)
        .map_err(|e| CliError::Failure(e.to_string()))?;
    let log = state
        .open_daemon_log(0o640)
        .map_err(|e| CliError::Failure(format!("cannot open the daemon's log: {e}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Failure(format!("cannot find this program: {e}")))?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("daemon")
        .arg("--state-dir")
        .arg(&config.state_dir);
    if let Some(path) = &global.config {
        command.arg("--config").arg(absolute(path));
    }
    command
        .args(vm.to_args())
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| CliError::Failure(e.to_string()))?,
        )
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal so
    // that closing it (or Ctrl-C) does not kill the VM.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| CliError::Failure(format!("cannot start the supervisor: {e}")))?;

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if ControlClient::connect(&config.state_dir).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait()
            && !status.success()
            && !state.is_locked()
        {
            return Err(CliError::Failure(format!(
                "the supervisor exited at start ({status}); its log {} ends with:\n{}",
                state.daemon_log().display(),
                tail_of(&state.daemon_log(), 10)
            )));
        }
        if Instant::now() > deadline {
            return Err(CliError::Failure(format!(
                "the supervisor did not answer within 15 s; see {}",
                state.daemon_log().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn not_running_note(state_dir: &Path) -> String {
    format!("not running (no supervisor for {})", state_dir.display())
}

fn stop(global: &GlobalArgs, args: &StopArgs) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config(global, ConfigLayer::default(), &host)?;
    let timeout = args
        .timeout
        .map_or(config.stop_timeout(), Duration::from_secs);
    let mut client = match ControlClient::connect(&config.state_dir) {
        Err(ClientError::NotRunning { .. }) => {
            if args.json.json {
                println!("{}", serde_json::json!({ "outcome": "not-running" }));
            } else {
                println!("{}; nothing to stop", not_running_note(&config.state_dir));
            }
            return Ok(0);
        }
        other => other?,
    };
    let request = Request::Stop {
        force: args.force,
        timeout_ms: Some(protocol::millis(timeout)),
        exit: args.daemon,
        unless_in_use: false,
    };
    // The supervisor waits at most this long for the guest, then for the forced stop.
    let bound = timeout.min(crate::supervisor::MAX_STOP_TIMEOUT);
    let reply = client.call(
        request,
        bound.saturating_add(crate::supervisor::FORCED_STOP_REPLY_BOUND),
    )?;
    let Reply::Stopped { outcome } = reply else {
        return Err(CliError::Failure(format!("unexpected reply {reply:?}")));
    };
    if args.json.json {
        println!(
            "{}",
            serde_json::json!({ "outcome": outcome, "daemonExited": args.daemon })
        );
        return Ok(0);
    }
    let what = match outcome {
        StopOutcome::AlreadyStopped => "the VM was not running".to_string(),
        StopOutcome::Graceful => "stopped (the guest powered off)".to_string(),
        StopOutcome::Forced if args.force => "stopped (forced)".to_string(),
        StopOutcome::Forced => format!(
            "stopped (forced: the guest did not power off within {} s)",
            timeout.as_secs()
        ),
    };
    println!(
        "{what}{}",
        if args.daemon {
            "; the supervisor has exited"
        } else {
            ""
        }
    );
    Ok(0)
}

fn status(global: &GlobalArgs, json: bool) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config(global, ConfigLayer::default(), &host)?;
    let report = match ControlClient::connect(&config.state_dir) {
        Err(ClientError::NotRunning { .. }) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "state": "not-running", "stateDir": config.state_dir })
                );
            } else {
                println!("{}", not_running_note(&config.state_dir));
                println!(
                    "start one with `darwin-vz-nix start`, or let a build start it (nix-darwin's services.darwin-vz)"
                );
            }
            return Err(CliError::NotRunning(String::new()));
        }
        // A supervisor lives but cannot be reached: say that, never "not running".
        Err(e @ ClientError::SocketMissing { .. }) => {
            if let (true, ClientError::SocketMissing { pid, .. }) = (json, &e) {
                println!(
                    "{}",
                    serde_json::json!({ "state": "unreachable", "supervisorPid": pid, "stateDir": config.state_dir })
                );
            }
            return Err(e.into());
        }
        Ok(mut client) => match client.call(Request::Status, Duration::from_secs(10))? {
            Reply::Status(report) => report,
            other => return Err(CliError::Failure(format!("unexpected reply {other:?}"))),
        },
        Err(e) => return Err(e.into()),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialise")
        );
    } else {
        print!("{}", format_status(&report));
    }
    Ok(0)
}

fn duration_text(secs: f64) -> String {
    let secs = Duration::try_from_secs_f64(secs.max(0.0))
        .unwrap_or(Duration::MAX)
        .as_secs();
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
    }
}

/// The human form of `status`.
pub fn format_status(r: &StatusReport) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<14}{value}\n"));
    let state = match (r.state, r.vm_uptime_secs) {
        (VmState::Running, Some(up)) => format!("running (up {})", duration_text(up)),
        (state, _) => state.as_str().to_string(),
    };
    line("state", state);
    if let Some(guest) = &r.guest {
        for (label, value) in guest_lines(guest) {
            line(label, value);
        }
    }
    line("connections", format!("{} open", r.connections));
    let idle = match (
        r.config.idle_timeout_minutes,
        r.idle_remaining_secs,
        r.state,
    ) {
        (0, _, _) => "never (idleTimeout = 0)".to_string(),
        (_, Some(left), _) => format!(
            "power off in {} unless a connection opens",
            duration_text(left)
        ),
        (minutes, None, VmState::Running) => {
            format!("after the last connection closes, plus {minutes} min")
        }
        (minutes, None, _) => format!("{minutes} min after the last connection (VM not running)"),
    };
    line("idle", idle);
    if let Some(boot) = &r.last_boot {
        line("last boot", describe_boot(boot));
    }
    line("boots", r.boots.to_string());
    let c = &r.config;
    line(
        "config",
        format!(
            "{} CPUs, {} MiB, disk {}, Rosetta {}, idle timeout {} min",
            c.cores,
            c.memory_mib,
            c.disk_size,
            if c.rosetta { "on" } else { "off" },
            c.idle_timeout_minutes
        ),
    );
    line("nested virt", nested_status(r));
    line(
        "supervisor",
        format!(
            "pid {}, up {}, {} backend",
            r.supervisor_pid,
            duration_text(r.supervisor_uptime_secs),
            r.backend
        ),
    );
    line("state dir", c.state_dir.display().to_string());
    line(
        "logs",
        format!(
            "{} (console: {})",
            c.daemon_log.display(),
            c.console_log.display()
        ),
    );
    if let Some(sleep) = &r.sleep {
        line("sleep", describe_sleep(sleep));
        if let Some(error) = &sleep.wake_error {
            line(
                "wake-ups",
                format!("not heard ({error}); the guest's clock is set at boot only"),
            );
        }
    }
    if let Some(sync) = &r.clock_sync {
        line("clock", describe_clock_sync(sync));
    }
    if let Some(error) = &r.last_error {
        line("last error", error.clone());
    }
    for notice in &r.notices {
        line(
            "notice",
            format!("{} ago: {}", duration_text(notice.age_secs), notice.message),
        );
    }
    if let Some(cache) = &r.host_cache {
        line(
            "host cache",
            format!(
                "{} NARs sent ({} MiB), {} narinfo hits, {} misses, {} NARs cut short",
                cache.nars_served,
                cache.nar_bytes / (1024 * 1024),
                cache.narinfo_hits,
                cache.narinfo_misses,
                cache.nars_aborted
            ),
        );
        if let Some(problem) = &cache.last_problem {
            line("cache problem", problem.clone());
        }
    }
    out
}

/// The `nested virt` line of `status`: the setting, what the last boot did, and
/// loudly when nested virtualization is on but the guest has no `/dev/kvm`.
fn nested_status(r: &StatusReport) -> String {
    use crate::nested::Kvm;
    let setting = r.config.nested_virtualization.unwrap_or_default();
    let Some(guest) = &r.guest_report else {
        return format!("{setting} (decided at each boot; none yet)");
    };
    let boot = guest.boot;
    if !guest.nested_virtualization {
        return format!("{setting}: off for boot {boot}; kvm and nixos-test are not offered");
    }
    match (guest.kvm, &guest.warning) {
        (_, Some(warning)) => format!("{setting}: WARNING — {warning}"),
        (None, None) => format!(
            "{setting}: on for boot {boot}; waiting for the guest to say whether it has /dev/kvm"
        ),
        (Some(Kvm::Present), None) => format!(
            "{setting}: on for boot {boot}; the guest has /dev/kvm{}: kvm and nixos-test are offered",
            guest
                .kernel
                .as_deref()
                .map(|k| format!(" (Linux {k})"))
                .unwrap_or_default()
        ),
        (Some(kvm), None) => format!("{setting}: on for boot {boot}; /dev/kvm {}", kvm.as_str()),
    }
}

/// The `sleep` line of `status`: whether builds keep the Mac awake, now.
fn describe_sleep(sleep: &SleepReport) -> String {
    match (&sleep.assertion, &sleep.last_error) {
        _ if !sleep.enabled => "the Mac may idle-sleep during builds (preventSleep = false)".into(),
        (Some(held), _) => format!(
            "idle sleep prevented for {}: \"{}\"",
            duration_text(held.held_secs),
            held.reason
        ),
        (None, Some(error)) => format!("not prevented: {error}"),
        (None, None) => "the Mac may idle-sleep (no build connection open)".into(),
    }
}

/// The `clock` line of `status`: the guest's clock, last set from the host's.
fn describe_clock_sync(sync: &ClockSyncReport) -> String {
    let when = match sync.reason.as_str() {
        "wake" => "after the Mac woke",
        _ => "at boot",
    };
    let ago = duration_text(sync.age_secs);
    match (sync.offset_secs, &sync.error) {
        (Some(offset), _) => format!(
            "set from the host's {ago} ago, {when}: {}",
            crate::clock::describe_step(offset)
        ),
        (None, error) => format!(
            "not set {ago} ago, {when}: {}",
            error.as_deref().unwrap_or("unknown error")
        ),
    }
}

/// The lazy guest in `status`: where its realisation stands, and which guest the
/// next boot uses when that is not the wanted one.
pub fn guest_lines(guest: &protocol::GuestLifecycle) -> Vec<(&'static str, String)> {
    let how_long = guest.for_secs.map(duration_text).unwrap_or_default();
    let state = match guest.phase.as_str() {
        "building" => format!(
            "building for {how_long}: {}; log {}",
            guest.progress.as_deref().unwrap_or("starting"),
            guest.log.display()
        ),
        "ready" => format!("ready: {}", guest.out.display()),
        "failed" => format!(
            "failed {how_long} ago: {}",
            guest.error.as_deref().unwrap_or("see the log")
        ),
        _ => format!(
            "not built yet: {} (from {})",
            guest.out.display(),
            guest.drv.display()
        ),
    };
    let mut lines = vec![("guest", state)];
    match &guest.next_boot {
        Some(dir) if *dir != guest.out => lines.push((
            "next boot",
            format!(
                "{}, the guest booted before, until the new one is ready",
                dir.display()
            ),
        )),
        Some(_) => {}
        None if guest.phase != "ready" => {
            lines.push(("next boot", "waits for the guest to be built".to_string()))
        }
        None => {}
    }
    if let Some(bootstrap) = &guest.bootstrap {
        lines.push(("bootstrap", bootstrap_line(bootstrap)));
    }
    lines
}

/// The bootstrap builder in `status`.
fn bootstrap_line(b: &protocol::BootstrapReport) -> String {
    let console = b.console_log.display();
    match b.phase.as_str() {
        "fetching" => format!(
            "fetching nixpkgs' darwin.linux-builder from cache.nixos.org: {}",
            b.progress.as_deref().unwrap_or("starting")
        ),
        "booting" => format!("booting nixpkgs' darwin.linux-builder; console {console}"),
        "running" => format!(
            "running on {} (nixpkgs' darwin.linux-builder), {} session{}; console {console}",
            b.endpoint.as_deref().unwrap_or("127.0.0.1"),
            b.sessions,
            if b.sessions == 1 { "" } else { "s" }
        ),
        "failed" => format!(
            "failed: {}",
            b.error.as_deref().unwrap_or("see its console")
        ),
        other => other.to_string(),
    }
}

/// Where `ssh` and `ssh-config` go. A user given on their command line is checked
/// here with the same rule (and the same message) as the `sshUser` setting;
/// `SshTarget::options` checks everything once more before it reaches ssh.
fn ssh_target(
    config: &Config,
    proxy_bin: Option<PathBuf>,
    user: Option<(&str, String)>,
) -> Result<SshTarget, CliError> {
    if let Some((flag, user)) = &user
        && let Err(message) = crate::ssh::check_user(user)
    {
        return Err(CliError::Usage(format!(
            "invalid configuration: {flag}: {message}"
        )));
    }
    let proxy_bin = match proxy_bin {
        Some(path) => absolute(&path),
        None => std::env::current_exe()
            .map_err(|e| CliError::Failure(format!("cannot find this program: {e}")))?,
    };
    Ok(SshTarget {
        proxy_bin,
        state_dir: config.state_dir.clone(),
        user: user.map_or_else(|| config.ssh_user.clone(), |(_, user)| user),
    })
}

fn ssh(global: &GlobalArgs, user: Option<String>, command: &[std::ffi::OsString]) -> Outcome {
    let config = resolve_config(global, ConfigLayer::default(), &HostInfo::detect())?;
    let target = ssh_target(&config, None, user.map(|u| ("-l/--user", u)))?;
    let args = target
        .ssh_args(command)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    // ssh reads the owner's key and known_hosts: root does that as the owner too.
    act_as_owner(&config)?;
    let error = std::process::Command::new("ssh").args(args).exec();
    Err(CliError::Failure(format!(
        "cannot run ssh: {error}; install OpenSSH or fix PATH"
    )))
}

fn ssh_config(global: &GlobalArgs, proxy_bin: Option<PathBuf>, user: Option<String>) -> Outcome {
    let config = resolve_config(global, ConfigLayer::default(), &HostInfo::detect())?;
    let target = ssh_target(&config, proxy_bin, user.map(|u| ("--user", u)))?;
    print!(
        "{}",
        target
            .config_block()
            .map_err(|e| CliError::Usage(e.to_string()))?
    );
    Ok(0)
}

fn proxy(
    global: &GlobalArgs,
    port: u32,
    timeout: Duration,
    fdpass: bool,
    alias: Option<&str>,
) -> Outcome {
    // The proxy needs only the state directory; a broken config file must not stop
    // ssh from reaching a running builder.
    let state_dir = match &global.state_dir {
        Some(dir) => absolute(dir),
        None => resolve_config(global, ConfigLayer::default(), &HostInfo::detect())?.state_dir,
    };
    crate::proxy::run(&state_dir, port, timeout, fdpass, alias)?;
    Ok(0)
}

/// Prints the builder's machines-file text, or writes it to `--write PATH`. It
/// resolves and fits the configuration as `daemon` does, so the line describes the
/// VM that daemon runs; of the state directory it reads only the guest's report,
/// which can take `kvm` away (`machines::nested_facts`), and `gcroots/guest`, whose
/// absence splits the line per system while the bootstrap builder may answer
/// (`machines::entries`); it writes nothing there.
fn machines(global: &GlobalArgs, args: &args::MachinesArgs) -> Outcome {
    use crate::machines;
    let host = HostInfo::detect();
    let config = resolve_config(global, args.layer(), &host)?;
    let state = StateDir::new(&config.state_dir);
    let (mut facts, warnings) = machines::nested_facts(&config, &host, &state);
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    facts.bootstrap_pending = config.bootstrap().is_some() && !machines::guest_has_booted(&state);
    let entries = machines::entries(&config, &state, &facts);
    let Some(path) = &args.write else {
        print!("{}", machines::render_entries(&entries));
        return Ok(0);
    };
    let path = absolute(path);
    machines::write_entries(&path, &entries).map_err(|e| {
        let message = format!("cannot write the machines file: {e}");
        if e.is_bad_path() {
            CliError::Usage(message)
        } else {
            CliError::Failure(message)
        }
    })?;
    println!("wrote {}:", path.display());
    for entry in &entries {
        println!("{entry}");
    }
    Ok(0)
}

fn run_daemon(global: &GlobalArgs, vm: &VmArgs) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config(global, vm.layer(), &host)?;
    act_as_owner(&config)?;
    // The directory's lock first: a second supervisor is refused before it touches
    // anything, whatever else is wrong.
    let prepared = daemon::prepare(&config).map_err(|e| CliError::Failure(e.to_string()))?;
    daemon::init_logging(&prepared.state, config.log_level)
        .map_err(|e| CliError::Failure(e.to_string()))?;
    let backend = crate::platform_backend().map_err(|e| CliError::Failure(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Failure(format!("cannot start the async runtime: {e}")))?;
    let options = DaemonOptions::from_config(&config);
    runtime
        .block_on(daemon::serve(prepared, config, host, backend, options))
        .map_err(|e| CliError::Failure(e.to_string()))?;
    Ok(0)
}

fn run_doctor(global: &GlobalArgs, vm: &VmArgs, json: bool) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config(global, vm.layer(), &host)?;
    let exe = std::env::current_exe().unwrap_or_default();
    let checks = doctor::run(&config, &host, &crate::platform_facts(), &exe);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&checks).expect("checks serialise")
        );
    } else {
        for check in &checks {
            println!("{check}");
        }
    }
    let failed = checks
        .iter()
        .filter(|c| c.verdict == doctor::Verdict::Fail)
        .count();
    if !json && failed > 0 {
        println!("{failed} check(s) failed");
    }
    Ok(u8::from(failed > 0))
}

fn logs(global: &GlobalArgs, args: &args::LogsArgs) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config(global, ConfigLayer::default(), &host)?;
    act_as_owner(&config)?;
    let state = StateDir::new(&config.state_dir);
    let path = match (args.console, args.previous) {
        (false, _) => state.daemon_log(),
        (true, false) => state.console_log(),
        (true, true) => state.previous_console_log(),
    };
    // Following goes on from where the tail ended, not from the file's size a
    // moment later: a line appended in between would be shown by neither.
    let mut offset = match crate::files::open_state_file(&path) {
        Ok(file) => {
            let (text, end) = tail_and_end(file, args.lines);
            print!("{text}");
            end
        }
        Err(e) if e.is_not_found() => {
            return Err(CliError::Failure(format!(
                "{} does not exist yet (nothing has run)",
                path.display()
            )));
        }
        Err(e) => return Err(CliError::Failure(e.to_string())),
    };
    if !args.follow {
        return Ok(0);
    }
    let size = |path: &Path| std::fs::symlink_metadata(path).map_or(0, |m| m.len());
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let len = size(&path);
        if len < offset {
            offset = 0; // rotated or truncated
        }
        if len > offset
            && let Ok(mut file) = crate::files::open_state_file(&path)
        {
            let mut chunk = Vec::new();
            // At most 1 MiB per poll: a log that grows faster is shown in steps.
            let _ = file
                .seek(SeekFrom::Start(offset))
                .and_then(|_| file.take(1 << 20).read_to_end(&mut chunk));
            offset = offset.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
            let _ = std::io::stdout().write_all(&chunk);
            let _ = std::io::stdout().flush();
        }
    }
}

/// The last `lines` lines of a file (reads at most its last 1 MiB).
fn tail(file: std::fs::File, lines: usize) -> String {
    tail_and_end(file, lines).0
}

/// `tail`, and the offset up to which the file was read.
fn tail_and_end(mut file: std::fs::File, lines: usize) -> (String, u64) {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(1 << 20);
    let _ = file.seek(SeekFrom::Start(start));
    let mut bytes = Vec::new();
    let _ = file.take(len.saturating_sub(start)).read_to_end(&mut bytes);
    let end = start.saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    (out, end)
}

/// The last lines of the daemon's log, for an error message (empty when unreadable).
fn tail_of(path: &Path, lines: usize) -> String {
    crate::files::open_state_file(path)
        .map(|file| tail(file, lines))
        .unwrap_or_default()
}

fn run_bench(global: &GlobalArgs, what: BenchKind, force: bool) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config(global, ConfigLayer::default(), &host)?;
    let dir = &config.state_dir;
    let boot_timeout = Duration::from_secs(180);
    let name = match what {
        BenchKind::Boot { .. } => "bench boot",
        BenchKind::Control { .. } => "bench control",
    };
    // Both benches force the VM off between runs: never under someone's build.
    let sessions = bench::open_sessions(dir)?;
    if sessions > 0 && !force {
        return Err(bench_refusal(
            name,
            &format!("{sessions} session(s) are open"),
        ));
    }
    let in_use = |e: ClientError| match e {
        ClientError::Remote {
            code: protocol::ErrorCode::Busy,
            message,
        } => bench_refusal(name, &message),
        other => other.into(),
    };
    match what {
        BenchKind::Boot { runs } => {
            println!(
                "cold boots against the supervisor of {} ({runs} runs)…",
                dir.display()
            );
            let timings = bench::cold_boots(dir, runs, boot_timeout, force).map_err(in_use)?;
            let column =
                |f: fn(&BootTiming) -> f64| Stats::of(&timings.iter().map(f).collect::<Vec<_>>());
            if let (Some(started), Some(ready)) =
                (column(|t| t.vm_started_secs), column(|t| t.ready_secs))
            {
                println!("VM started        {started}");
                println!("guest sshd ready  {ready}");
            }
        }
        BenchKind::Control { runs } => {
            let trips = bench::control_round_trips(dir, runs)?;
            if let Some(stats) = Stats::of(&trips) {
                println!("control round-trip (status)   {stats}");
            }
            let cold = (runs / 40).clamp(1, 10);
            let first = bench::connect_to_first_byte(
                dir,
                crate::contract::SSH_VSOCK_PORT,
                cold,
                boot_timeout,
                force,
            )
            .map_err(in_use)?;
            if let Some(stats) = Stats::of(&first) {
                println!("connect on a stopped VM to first guest byte   {stats}");
            }
        }
    }
    Ok(0)
}

/// Why a bench did not run: it would have forced the VM off under open sessions.
fn bench_refusal(name: &str, why: &str) -> CliError {
    CliError::Failure(format!(
        "`{name}` forces the VM off between runs, and {why} (a build may be running); nothing was stopped. Wait until `darwin-vz-nix status` shows 0 connections, or pass --force to force the VM off under them"
    ))
}

/// `destroy` and `rotate-keys`. Says which directory it acts on before acting; with
/// a supervisor running, the supervisor does the work (it stops the VM first);
/// without one, this process takes the directory's lock and does it, making the new
/// keys before deleting anything (`daemon::reset_state`).
fn reset(global: &GlobalArgs, keys_only: bool, confirmed: bool) -> Outcome {
    let host = HostInfo::detect();
    let config = resolve_config(global, ConfigLayer::default(), &host)?;
    let state = StateDir::new(&config.state_dir);
    if !confirmed {
        return Err(CliError::Usage(format!(
            "destroy deletes the disk image {} (the guest's store and Nix database) and the SSH keys in {}; re-run with --yes",
            state.disk_image().display(),
            state.keys_dir().display()
        )));
    }
    let acting = act_as_owner(&config)?;
    if std::fs::symlink_metadata(state.root()).is_ok() && !state.root().is_dir() {
        // Say exactly what is there (a file, a link to a file) before anything else.
        let access = Access::from_group_name(config.control_group.as_deref())
            .map_err(|e| CliError::Usage(e.to_string()))?;
        state
            .create(access)
            .map_err(|e| CliError::Failure(e.to_string()))?;
    }
    println!(
        "state directory {}{}",
        state.root().display(),
        match &acting {
            Acting::Myself => String::new(),
            Acting::AsOwner { user } => format!(" (acting as its owner, {user})"),
        }
    );
    let removed = match ControlClient::connect(&config.state_dir) {
        Ok(mut client) => match client.call(
            Request::Reset { keys_only },
            config
                .stop_timeout()
                .saturating_add(crate::supervisor::FORCED_STOP_REPLY_BOUND),
        )? {
            Reply::Reset { removed } => removed,
            other => return Err(CliError::Failure(format!("unexpected reply {other:?}"))),
        },
        Err(ClientError::NotRunning { .. }) => {
            if std::fs::symlink_metadata(state.root()).is_err() {
                if keys_only {
                    return Err(CliError::Failure(format!(
                        "{} does not exist, so there are no keys to rotate; check --state-dir (or DARWIN_VZ_NIX_STATE_DIR) — the daemon makes the directory and its keys on first start",
                        state.root().display()
                    )));
                }
                println!(
                    "nothing to delete: {} does not exist",
                    state.root().display()
                );
                return Ok(0);
            }
            let access = Access::from_group_name(config.control_group.as_deref())
                .map_err(|e| CliError::Usage(e.to_string()))?;
            state
                .create(access)
                .map_err(|e| CliError::Failure(e.to_string()))?;
            let _lock = state.lock().map_err(|e| CliError::Failure(e.to_string()))?;
            daemon::reset_state(&state, keys_only).map_err(|e| CliError::Failure(e.to_string()))?
        }
        Err(e) => return Err(e.into()),
    };
    for path in &removed {
        let verb = if std::fs::symlink_metadata(path).is_ok() {
            "replaced"
        } else {
            "deleted"
        };
        println!("{verb} {}", path.display());
    }
    println!(
        "{}; new SSH keys are in {}",
        if keys_only {
            "keys replaced"
        } else {
            "state reset"
        },
        state.keys_dir().display()
    );
    Ok(0)
}
