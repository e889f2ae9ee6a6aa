//! For the host store cache tests: Nix stores made by the test (chroot stores, each
//! with its own nix.conf), a synthetic closure of input-addressed paths, and the
//! test's stand-in for the guest's forwarder — a loopback TCP listener whose every
//! connection becomes a guest→host vsock stream — that can also tamper with what
//! passes through it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// [`super::own_nix_conf`] for a chroot store: builds in Nix's sandbox, with the
/// host's `/bin/sh` and its libraries in it.
pub fn nix_conf(dir: &Path, extra: &str) -> PathBuf {
    super::own_nix_conf(
        dir,
        &format!("sandbox = true\nextra-sandbox-paths = /usr /bin /lib /lib64\n{extra}"),
    )
}

/// The environment that makes Debian's Nix use `conf_dir` and nothing else.
pub fn nix_env(command: &mut Command, conf_dir: &Path, home: &Path) {
    command
        .env("HOME", home)
        .env("NIX_CONF_DIR", conf_dir)
        .env("NIX_USER_CONF_FILES", conf_dir.join("nix.conf"))
        .env_remove("NIX_CONFIG")
        .env_remove("NIX_REMOTE")
        .env_remove("NIX_PATH");
}

/// `program` (nix, nix-store, …) with its own configuration.
pub fn nix_tool(program: &str, conf_dir: &Path, home: &Path) -> Command {
    let mut command = Command::new(program);
    nix_env(&mut command, conf_dir, home);
    if program == "nix" {
        command.args(["--extra-experimental-features", "nix-command"]);
    }
    command
}

pub fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Input-addressed paths built in a store: `count - 1` independent ones and a last
/// one that refers to all of them, so that its closure is all of them (and Nix may
/// fetch the independent ones at once). Each holds `size` random bytes, an
/// executable file, a symbolic link and a reference.
#[derive(Debug, Clone)]
pub struct Closure {
    /// The last path, whose closure is all of them.
    pub top: String,
    /// Every path of the closure.
    pub paths: Vec<String>,
    /// The sum of their NAR sizes.
    pub nar_bytes: u64,
    /// The expression that builds them (its value is the last path).
    pub expression: PathBuf,
}

/// The Nix expression of `count` paths of `size` bytes, named `tag-…`.
pub fn closure_expression(tag: &str, count: usize, size: u64) -> String {
    format!(
        r#"let
  path = n: refers: derivation {{
    name = "{tag}-${{toString n}}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "PATH=/usr/bin:/bin; mkdir $out; echo ${{toString refers}} > $out/refers; head -c {size} /dev/urandom > $out/data; chmod +x $out/data; ln -s refers $out/link" ];
  }};
  leaves = builtins.genList (n: path (n + 1) [ ]) ({count} - 1);
in
path {count} leaves
"#
    )
}

/// Builds the paths in the store at `root`.
pub fn build_closure(
    root: &Path,
    conf_dir: &Path,
    home: &Path,
    tag: &str,
    count: usize,
    size: u64,
) -> Closure {
    let expression = home.join(format!("{tag}-closure.nix"));
    std::fs::write(&expression, closure_expression(tag, count, size)).unwrap();
    let out = check(
        nix_tool("nix", conf_dir, home)
            .args(["build", "--no-link", "--json", "--store"])
            .arg(root)
            .arg("-f")
            .arg(&expression)
            .output()
            .unwrap(),
        "building the input closure",
    );
    let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let top = built[0]["outputs"]["out"].as_str().unwrap().to_string();
    let out = check(
        nix_tool("nix", conf_dir, home)
            .args(["path-info", "--recursive", "--json", "--store"])
            .arg(root)
            .arg(&top)
            .output()
            .unwrap(),
        "listing the closure",
    );
    let infos: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let infos = infos.as_array().unwrap();
    Closure {
        top,
        paths: infos
            .iter()
            .map(|i| i["path"].as_str().unwrap().to_string())
            .collect(),
        nar_bytes: infos.iter().map(|i| i["narSize"].as_u64().unwrap()).sum(),
        expression,
    }
}

/// The signatures a store holds for `path`.
pub fn signatures(root: &Path, conf_dir: &Path, home: &Path, path: &str) -> Vec<String> {
    let out = check(
        nix_tool("nix", conf_dir, home)
            .args(["path-info", "--json", "--sigs", "--store"])
            .arg(root)
            .arg(path)
            .output()
            .unwrap(),
        "nix path-info --sigs",
    );
    let infos: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    infos[0]["signatures"]
        .as_array()
        .map(|sigs| {
            sigs.iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// What the forwarder does to the traffic it carries.
pub enum Tamper {
    /// Nothing: an honest forwarder, like the guest's socat.
    None,
    /// Flips one byte in the middle of every NAR body.
    FlipNarByte,
    /// Removes the `Sig:` lines of every narinfo (and fixes its length).
    StripSignatures,
    /// Calls the function with the NAR's URL path before forwarding a NAR request.
    BeforeNar(Box<dyn Fn(&str) + Send + Sync>),
}

/// The test's forwarder: `127.0.0.1:<port>` → a new guest→host stream per connection.
pub struct Forwarder {
    pub port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Forwarder {
    pub fn start(
        connect: impl Fn() -> std::io::Result<UnixStream> + Send + Sync + 'static,
        tamper: Tamper,
    ) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let connect = Arc::new(connect);
        let tamper = Arc::new(tamper);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (connect, tamper, log) = (connect.clone(), tamper.clone(), log.clone());
                std::thread::spawn(move || {
                    let Ok(upstream) = connect() else {
                        // As socat does when the vsock connection is refused.
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        return;
                    };
                    let _ = relay_http(&client, &upstream, &tamper, &log);
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = upstream.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Forwarder { port, requests }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request line seen so far ("GET /nix-cache-info", …).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads until `\r\n\r\n`; returns the head and keeps what follows in `buffer`.
fn read_head(from: &mut impl Read, buffer: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut scratch = [0u8; 8192];
    loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffer.split_off(at + 4);
            return Some(std::mem::replace(buffer, rest));
        }
        let n = from.read(&mut scratch).ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&scratch[..n]);
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// Carries requests and responses one by one (curl does not pipeline), tampering
/// with them as told. Ends when either side does, or a response is cut short.
fn relay_http(
    client: &TcpStream,
    upstream: &UnixStream,
    tamper: &Tamper,
    log: &Mutex<Vec<String>>,
) -> Option<()> {
    let (mut client_r, mut client_w) = (client, client);
    let (mut up_r, mut up_w) = (upstream, upstream);
    let (mut from_client, mut from_upstream) = (Vec::new(), Vec::new());
    loop {
        let request = read_head(&mut client_r, &mut from_client)?;
        let request_text = String::from_utf8_lossy(&request).into_owned();
        let line = request_text
            .split("\r\n")
            .next()
            .unwrap_or_default()
            .to_string();
        let mut parts = line.split(' ');
        let (method, path) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        log.lock().unwrap().push(format!("{method} {path}"));
        if let Tamper::BeforeNar(hook) = tamper
            && path.starts_with("/nar/")
        {
            hook(&path);
        }
        up_w.write_all(&request).ok()?;

        let head = read_head(&mut up_r, &mut from_upstream)?;
        let head_text = String::from_utf8_lossy(&head).into_owned();
        let length: u64 = header(&head_text, "content-length")?.parse().ok()?;
        let ok = head_text.starts_with("HTTP/1.1 200");
        let body_length = if method == "HEAD" { 0 } else { length };
        let strip = matches!(tamper, Tamper::StripSignatures) && ok && path.ends_with(".narinfo");
        let flip_at = (matches!(tamper, Tamper::FlipNarByte) && ok && path.starts_with("/nar/"))
            .then_some(body_length / 2);
        if strip {
            let body = read_body(&mut up_r, &mut from_upstream, body_length)?;
            let text = String::from_utf8_lossy(&body);
            let kept: String = text
                .lines()
                .filter(|l| !l.starts_with("Sig: "))
                .map(|l| format!("{l}\n"))
                .collect();
            let head_text = head_text.replace(
                &format!("Content-Length: {length}\r\n"),
                &format!("Content-Length: {}\r\n", kept.len()),
            );
            client_w.write_all(head_text.as_bytes()).ok()?;
            client_w.write_all(kept.as_bytes()).ok()?;
        } else {
            client_w.write_all(&head).ok()?;
            copy_body(
                &mut up_r,
                &mut from_upstream,
                &mut client_w,
                body_length,
                flip_at,
            )?;
        }
        if header(&head_text, "connection").as_deref() == Some("close") {
            return Some(());
        }
    }
}

fn read_body(from: &mut impl Read, buffer: &mut Vec<u8>, length: u64) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    copy_body(from, buffer, &mut body, length, None)?;
    Some(body)
}

/// Copies `length` body bytes (first from `buffer`), flipping the byte at `flip_at`.
fn copy_body(
    from: &mut impl Read,
    buffer: &mut Vec<u8>,
    to: &mut impl Write,
    length: u64,
    flip_at: Option<u64>,
) -> Option<()> {
    let mut done: u64 = 0;
    let mut scratch = vec![0u8; 256 * 1024];
    let wanted = |done: u64| usize::try_from(length - done).unwrap_or(usize::MAX);
    // What was read with the head first, then straight from the stream.
    if !buffer.is_empty() {
        let mut chunk = std::mem::take(buffer);
        if chunk.len() > wanted(done) {
            *buffer = chunk.split_off(wanted(done));
        }
        flip(&mut chunk, done, flip_at);
        to.write_all(&chunk).ok()?;
        done += chunk.len() as u64;
    }
    while done < length {
        let limit = scratch.len().min(wanted(done));
        let n = from.read(&mut scratch[..limit]).ok()?;
        if n == 0 {
            return None; // cut short upstream: cut it short here too
        }
        flip(&mut scratch[..n], done, flip_at);
        to.write_all(&scratch[..n]).ok()?;
        done += n as u64;
    }
    Some(())
}

/// Flips the byte at stream offset `at`, if `chunk` (starting at `offset`) holds it.
fn flip(chunk: &mut [u8], offset: u64, at: Option<u64>) {
    if let Some(at) = at
        && at >= offset
        && at < offset + chunk.len() as u64
    {
        chunk[usize::try_from(at - offset).unwrap()] ^= 0x01;
    }
}

/// The client ("host") side of a remote build: a store holding the input closure,
/// with its own nix.conf (`builders-use-substitutes`, as the nix-darwin module sets
/// it), in a directory without spaces (sshd's SetEnv and NIX_SSHOPTS split on them).
pub struct Client {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub conf: PathBuf,
    pub closure: Closure,
}

impl Client {
    /// Builds a chain of `count` paths of `size` bytes in a new client store.
    pub fn new(count: usize, size: u64) -> Client {
        let dir = tempfile::Builder::new()
            .prefix("dvn-client-")
            .tempdir()
            .unwrap();
        let home = dir.path().to_path_buf();
        let store = home.join("store");
        let conf = nix_conf(&home.join("conf"), "builders-use-substitutes = true\n");
        let closure = build_closure(&store, &conf, &home, "input", count, size);
        Client {
            dir,
            store,
            conf,
            closure,
        }
    }

    pub fn home(&self) -> &Path {
        self.dir.path()
    }

    /// A second store holding a copy of the closure.
    pub fn copy_of_the_closure(&self, name: &str) -> PathBuf {
        let copy = self.home().join(name);
        check(
            nix_tool("nix", &self.conf, self.home())
                .args(["copy", "--no-check-sigs", "--from"])
                .arg(&self.store)
                .arg("--to")
                .arg(&copy)
                .arg(&self.closure.top)
                .output()
                .unwrap(),
            "copying the closure into another store",
        );
        copy
    }
}

/// How the builder side is set up.
pub struct RemoteOptions {
    /// The supervisor serves the host store cache (`hostStoreCache`), and the
    /// guest's Nix uses it.
    pub cache: bool,
    /// The store the cache serves: the client's own when `None`.
    pub served: Option<PathBuf>,
    /// What the guest's forwarder does to the traffic.
    pub tamper: Tamper,
    /// Relay the SSH streams through counting threads (`FakeVm::ssh_bytes`); off
    /// for measurements, where the copy would slow the SSH path down.
    pub count_ssh_bytes: bool,
    /// More lines for the builder's nix.conf.
    pub guest_nix_conf: String,
}

impl RemoteOptions {
    /// The cache on or off, served honestly, SSH bytes counted.
    pub fn honest(cache: bool) -> RemoteOptions {
        RemoteOptions {
            cache,
            served: None,
            tamper: Tamper::None,
            count_ssh_bytes: true,
            guest_nix_conf: String::new(),
        }
    }
}

/// The builder ("guest") side: the supervisor with the fake VM, whose `sshd -i`
/// runs the builder's Nix on a fresh chroot store of its own, and the test's
/// stand-in for the guest's forwarder to the host cache.
pub struct Remote {
    // Dropped first: the supervisor stops while its state directory still exists.
    pub harness: super::Harness,
    pub forwarder: Forwarder,
    pub fixture: super::Fixture,
    pub dir: tempfile::TempDir,
    pub guest_store: PathBuf,
    pub guest_conf: PathBuf,
    ssh_config: PathBuf,
    client_store: PathBuf,
    client_conf: PathBuf,
    client_home: PathBuf,
    closure_expression: PathBuf,
}

impl Remote {
    pub fn new(client: &Client, options: RemoteOptions) -> Remote {
        use darwin_vz_nix::contract;
        let fixture = super::Fixture::new();
        let dir = tempfile::Builder::new()
            .prefix("dvn-guest-")
            .tempdir()
            .unwrap();
        let home = dir.path().to_path_buf();
        let guest_store = home.join("store");
        let fragment = home.join("run/nix-host-cache.conf");
        let guest_conf = nix_conf(
            &home.join("conf"),
            &format!(
                "{}\n!include {}\n",
                options.guest_nix_conf,
                fragment.display()
            ),
        );
        let behaviour = super::FakeVmBehaviour {
            sshd_extra: vec![format!(
                "SetEnv NIX_REMOTE={} NIX_CONF_DIR={} NIX_USER_CONF_FILES={} XDG_CACHE_HOME={}",
                guest_store.display(),
                guest_conf.display(),
                guest_conf.join("nix.conf").display(),
                home.join("cache").display(),
            )],
            count_ssh_bytes: options.count_ssh_bytes,
            listen_delay: std::time::Duration::ZERO,
            ..Default::default()
        };
        let served = options.served.unwrap_or_else(|| client.store.clone());
        let mut daemon_options = fixture.options(None);
        daemon_options.host_store = served.join("nix/store");
        daemon_options.host_store_db = served.join("nix/var/nix/db/db.sqlite");
        let config = fixture.config(darwin_vz_nix::config::ConfigLayer {
            host_store_cache: Some(options.cache),
            ..Default::default()
        });
        let harness = super::Harness::start_with(&fixture, config, behaviour, daemon_options);
        let vm = harness.vm.clone();
        let forwarder = Forwarder::start(
            move || vm.connect_to_host(contract::HOST_CACHE_VSOCK_PORT),
            options.tamper,
        );

        // Boot, so that the supervisor makes the cache's key and puts its public
        // half in the guest's share; then the guest's own script configures Nix.
        let out = fixture.cli(&["start"]);
        assert_eq!(out.status.code(), Some(0), "{}", super::stderr(&out));
        if options.cache {
            let key_file = fixture
                .state_dir
                .join("keys/guest")
                .join(contract::KEY_FILE_HOST_CACHE_KEY);
            check(
                Command::new("bash")
                    .arg(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/nix/nixos/scripts/host-cache.sh"
                    ))
                    .arg(&key_file)
                    .arg(forwarder.url())
                    .arg(&fragment)
                    .output()
                    .unwrap(),
                "the guest's host-cache.sh",
            );
        }
        let out = fixture.cli(&["ssh-config"]);
        assert_eq!(out.status.code(), Some(0), "{}", super::stderr(&out));
        let ssh_config = home.join("ssh_config");
        std::fs::write(&ssh_config, &out.stdout).unwrap();
        Remote {
            harness,
            forwarder,
            fixture,
            dir,
            guest_store,
            guest_conf,
            ssh_config,
            client_store: client.store.clone(),
            client_conf: client.conf.clone(),
            client_home: client.home().to_path_buf(),
            closure_expression: client.closure.expression.clone(),
        }
    }

    /// Builds, on the builder only, a derivation named `uses-the-inputs-<tag>`
    /// whose inputs are the closure. Its output's first line is the builder's clock
    /// when the build began (every input present), its second the input's size.
    pub fn build(&self, tag: &str) -> Output {
        let expression = self.dir.path().join(format!("remote-{tag}.nix"));
        std::fs::write(
            &expression,
            format!(
                r#"let inputs = import {}; in
derivation {{
  name = "uses-the-inputs-{tag}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "PATH=/usr/bin:/bin; date +%s.%N > $out; wc -c < ${{inputs}}/data >> $out" ];
}}
"#,
                self.closure_expression.display()
            ),
        )
        .unwrap();
        nix_tool("nix", &self.client_conf, &self.client_home)
            .env("NIX_SSHOPTS", format!("-F {}", self.ssh_config.display()))
            .args(["build", "--print-build-logs", "--no-link", "--json"])
            .args(["--max-jobs", "0", "--store"])
            .arg(&self.client_store)
            .args([
                "--builders",
                "ssh-ng://darwin-vz-nix x86_64-linux - 1 1",
                "-f",
            ])
            .arg(&expression)
            .output()
            .unwrap()
    }

    /// The output a successful `build` printed, read from the client's store.
    pub fn output_text(&self, out: &Output) -> String {
        let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let path = built[0]["outputs"]["out"].as_str().unwrap();
        std::fs::read_to_string(self.client_store.join(path.trim_start_matches('/'))).unwrap()
    }

    /// Whether the builder's copy of `path` was signed by the host cache's key.
    pub fn came_from_the_host_cache(&self, path: &str) -> bool {
        let key = std::fs::read_to_string(
            self.fixture
                .state_dir
                .join("keys/guest")
                .join(darwin_vz_nix::contract::KEY_FILE_HOST_CACHE_KEY),
        )
        .unwrap();
        let name = key.split(':').next().unwrap();
        signatures(&self.guest_store, &self.guest_conf, self.dir.path(), path)
            .iter()
            .any(|sig| sig.starts_with(&format!("{name}:")))
    }

    /// What `status` says about the cache; `None` when it is not served.
    pub fn cache_report(&self) -> Option<darwin_vz_nix::control::protocol::HostCacheReport> {
        use darwin_vz_nix::control::protocol::{Reply, Request};
        match darwin_vz_nix::control::ControlClient::connect(&self.fixture.state_dir)
            .unwrap()
            .call(Request::Status, std::time::Duration::from_secs(5))
            .unwrap()
        {
            Reply::Status(report) => report.host_cache,
            other => panic!("{other:?}"),
        }
    }
}
