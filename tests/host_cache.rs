//! The host store cache against the real Nix (Debian's 2.8): NARs byte for byte as
//! `nix-store --dump` writes them (with and without the macOS case hack), signatures
//! as `nix store sign` makes them with the same key file, and the cache served over
//! streams to a real `nix-store --realise` through the test's forwarder — plus what
//! it answers to everything else. The end-to-end remote builds are in
//! tests/host_cache_builds.rs.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use darwin_vz_nix::backend::GuestStream;
use darwin_vz_nix::hostcache::db::StoreDb;
use darwin_vz_nix::hostcache::nar::{self, DumpOptions, NarError};
use darwin_vz_nix::hostcache::{CacheKey, HostCache, StoreSource};
use support::hoststore::*;

/// A scratch directory with its own nix.conf and HOME.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("dvn-cache-")
            .tempdir()
            .unwrap();
        Scratch { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn conf(&self, name: &str, extra: &str) -> PathBuf {
        nix_conf(&self.path(name), extra)
    }
    fn home(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

fn nix_store_dump(scratch: &Scratch, path: &Path, case_hack: bool) -> Output {
    let conf = scratch.conf("dump-conf", "");
    nix_tool("nix-store", &conf, &scratch.home())
        .args([
            "--option",
            "use-case-hack",
            if case_hack { "true" } else { "false" },
        ])
        .arg("--dump")
        .arg(path)
        .output()
        .expect("nix-store is installed (apt install nix-bin)")
}
use std::process::Output;

fn our_dump(path: &Path, case_hack: bool) -> Result<Vec<u8>, NarError> {
    let mut out = Vec::new();
    nar::dump(path, DumpOptions { case_hack }, &mut out)?;
    Ok(out)
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn the_nar_of_a_tree_is_byte_for_byte_what_nix_store_dump_writes() {
    use std::os::unix::ffi::OsStrExt;
    let scratch = Scratch::new();
    let tree = scratch.path("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    write(&tree.join("b"), b"lower b", 0o644);
    write(&tree.join("B"), b"upper B sorts first", 0o644);
    write(&tree.join("run"), b"#!/bin/sh\nexit 0\n", 0o755);
    write(&tree.join("empty"), b"", 0o444);
    write(&tree.join("nine"), b"123456789", 0o644);
    write(&tree.join("sub/deeper/x"), &[0u8; 70_000], 0o600);
    write(
        &tree.join(std::ffi::OsStr::from_bytes(b"not-\xff-utf8")),
        b"name bytes, not text",
        0o644,
    );
    // Without the case hack, a marker in a name is just part of the name.
    write(&tree.join("kept~nix~case~hack~1"), b"k", 0o644);
    std::os::unix::fs::symlink("../nowhere with space", tree.join("link")).unwrap();
    std::os::unix::fs::symlink("sub", tree.join("sublink")).unwrap();

    for path in [tree.clone(), tree.join("run"), tree.join("link")] {
        let nix = nix_store_dump(&scratch, &path, false);
        assert!(
            nix.status.success(),
            "{}",
            String::from_utf8_lossy(&nix.stderr)
        );
        let ours = our_dump(&path, false).unwrap();
        assert_eq!(ours.len(), nix.stdout.len(), "{}", path.display());
        assert!(ours == nix.stdout, "{}: the bytes differ", path.display());
    }
}

#[test]
fn the_case_hack_is_undone_as_nix_undoes_it_and_collisions_are_refused() {
    let scratch = Scratch::new();
    let tree = scratch.path("hacked");
    std::fs::create_dir_all(tree.join("Dir")).unwrap();
    std::fs::create_dir_all(tree.join("dir~nix~case~hack~1")).unwrap();
    write(&tree.join("Dir/Makefile"), b"upper", 0o644);
    write(&tree.join("dir~nix~case~hack~1/makefile"), b"lower", 0o644);
    write(&tree.join("Readme"), b"R", 0o644);
    write(&tree.join("readme~nix~case~hack~1"), b"r", 0o644);
    // Cut at the first marker, as Nix does.
    write(
        &tree.join("two~nix~case~hack~1~nix~case~hack~2"),
        b"2",
        0o644,
    );

    let nix = nix_store_dump(&scratch, &tree, true);
    assert!(
        nix.status.success(),
        "{}",
        String::from_utf8_lossy(&nix.stderr)
    );
    let ours = our_dump(&tree, true).unwrap();
    assert!(ours == nix.stdout, "the bytes differ from Nix's");
    let text = String::from_utf8_lossy(&ours);
    assert!(
        !text.contains("~nix~case~hack~"),
        "no marker reaches the archive"
    );

    // `readme` and `readme~nix~case~hack~1` are the same name once unhacked.
    write(&tree.join("readme"), b"clash", 0o644);
    let nix = nix_store_dump(&scratch, &tree, true);
    assert!(!nix.status.success());
    assert!(
        String::from_utf8_lossy(&nix.stderr).contains("file name collision"),
        "{}",
        String::from_utf8_lossy(&nix.stderr)
    );
    match our_dump(&tree, true) {
        Err(NarError::Collision { .. }) => {}
        other => panic!("expected a collision, got {:?}", other.map(|b| b.len())),
    }
}

/// A store with a small closure, and its configuration.
struct HostStore {
    scratch: Scratch,
    root: PathBuf,
    conf: PathBuf,
    closure: Closure,
}

fn host_store(count: usize, size: u64) -> HostStore {
    let scratch = Scratch::new();
    let root = scratch.path("host-store");
    let conf = scratch.conf("host-conf", "");
    let closure = build_closure(&root, &conf, &scratch.home(), "input", count, size);
    HostStore {
        scratch,
        root,
        conf,
        closure,
    }
}

#[test]
fn signatures_equal_what_nix_store_sign_makes_with_the_same_key_file() {
    let host = host_store(3, 1000);
    let key = CacheKey::generate().unwrap();
    let key_file = host.scratch.path("secret-key");
    std::fs::write(&key_file, key.secret_text()).unwrap();
    check(
        nix_tool("nix", &host.conf, &host.scratch.home())
            .args(["store", "sign", "--recursive", "--store"])
            .arg(&host.root)
            .arg("--key-file")
            .arg(&key_file)
            .arg(&host.closure.top)
            .output()
            .unwrap(),
        "nix store sign with our key file",
    );
    let db = StoreDb::new(&host.root.join("nix/var/nix/db/db.sqlite"));
    assert_eq!(host.closure.paths.len(), 3);
    for path in &host.closure.paths {
        let hash_part = &path["/nix/store/".len().."/nix/store/".len() + 32];
        let info = db
            .query(hash_part)
            .unwrap()
            .expect("the database has the path");
        assert_eq!(&info.path, path);
        let nix_sigs = signatures(&host.root, &host.conf, &host.scratch.home(), path);
        assert!(
            nix_sigs.contains(&key.sign(&info.fingerprint())),
            "{path}: ours is not among {nix_sigs:?}"
        );
    }
    // Not a prefix match: a hash part the store lacks finds nothing.
    assert_eq!(db.query("00000000000000000000000000000000").unwrap(), None);
}

/// The cache of a store, served on streams from the test's forwarder.
struct Served {
    runtime: tokio::runtime::Runtime,
    cache: Arc<HostCache>,
    key: CacheKey,
    forwarder: Forwarder,
}

fn serve(source: StoreSource, tamper: Tamper) -> Served {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = HostCache::new(source);
    let key = CacheKey::generate().unwrap();
    cache.set_key(key.clone());
    let (connections, streams) = tokio::sync::mpsc::unbounded_channel();
    runtime.spawn(cache.clone().serve(streams));
    let forwarder = Forwarder::start(
        move || {
            let (guest, host) = UnixStream::pair()?;
            connections
                .send(GuestStream::new(host.into(), None))
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::ConnectionRefused))?;
            Ok(guest)
        },
        tamper,
    );
    Served {
        runtime,
        cache,
        key,
        forwarder,
    }
}

/// A store that substitutes from `url`, trusting `key`.
fn client_conf(scratch: &Scratch, name: &str, url: &str, trusted: &str) -> PathBuf {
    scratch.conf(
        name,
        &format!("substituters = {url}\ntrusted-public-keys = {trusted}\n"),
    )
}

#[test]
fn nix_substitutes_a_closure_from_the_cache_and_checks_every_signature() {
    let host = host_store(3, 300_000);
    let served = serve(StoreSource::chroot(&host.root, false), Tamper::None);
    let dest = host.scratch.path("dest-store");
    let conf = client_conf(
        &host.scratch,
        "dest-conf",
        &served.forwarder.url(),
        &served.key.public_text(),
    );
    let out = check(
        nix_tool("nix-store", &conf, &host.scratch.home())
            .arg("--store")
            .arg(&dest)
            .arg("--realise")
            .arg(&host.closure.top)
            .output()
            .unwrap(),
        "substituting from the host cache",
    );
    let log = String::from_utf8_lossy(&out.stderr);
    for path in &host.closure.paths {
        assert!(
            log.contains(&format!(
                "copying path '{path}' from '{}'",
                served.forwarder.url()
            )),
            "{log}"
        );
        let sigs = signatures(&dest, &conf, &host.scratch.home(), path);
        assert!(
            sigs.iter()
                .any(|s| s.starts_with(&format!("{}:", served.key.name()))),
            "{sigs:?}"
        );
    }
    let stats = served.cache.stats();
    assert_eq!(stats.nars_served, 3);
    assert_eq!(stats.nar_bytes, host.closure.nar_bytes);
    assert_eq!(stats.nars_aborted, 0);

    // A guest that trusts another key takes nothing from the cache.
    let other = CacheKey::generate().unwrap();
    let conf = client_conf(
        &host.scratch,
        "untrusting-conf",
        &served.forwarder.url(),
        &other.public_text(),
    );
    let out = nix_tool("nix-store", &conf, &host.scratch.home())
        .arg("--store")
        .arg(host.scratch.path("untrusting-store"))
        .arg("--realise")
        .arg(&host.closure.top)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("is not signed by any of the keys in 'trusted-public-keys'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(served.runtime);
}

/// One HTTP exchange on `stream`: (status line, headers, body as far as it came).
fn exchange(stream: &mut TcpStream, request: &str) -> (String, String, Vec<u8>) {
    stream.write_all(request.as_bytes()).unwrap();
    let mut buffer = Vec::new();
    let mut byte = [0u8; 1];
    while !buffer.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap() == 0 {
            panic!(
                "closed before a response head: {}",
                String::from_utf8_lossy(&buffer)
            );
        }
        buffer.push(byte[0]);
    }
    let head = String::from_utf8(buffer).unwrap();
    let status = head.split("\r\n").next().unwrap().to_string();
    let length: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut body = Vec::new();
    if !request.starts_with("HEAD") {
        let _ = (&*stream).take(length as u64).read_to_end(&mut body);
    }
    (status, head, body)
}

fn connect(served: &Served) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", served.forwarder.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

fn narinfo_path(store_path: &str) -> String {
    format!(
        "/{}.narinfo",
        &store_path["/nix/store/".len().."/nix/store/".len() + 32]
    )
}

fn nar_url(narinfo: &[u8]) -> String {
    let text = String::from_utf8_lossy(narinfo);
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("a URL line");
    format!("/{url}")
}

#[test]
fn every_narinfo_is_a_200_or_a_404_and_the_rest_is_refused_in_words() {
    let host = host_store(1, 1000);
    let served = serve(StoreSource::chroot(&host.root, false), Tamper::None);
    let mut stream = connect(&served);
    // Many requests on one kept-alive connection.
    let (status, _, body) = exchange(&mut stream, &get("/nix-cache-info"));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n"
    );
    let (status, head, body) = exchange(&mut stream, &get(&narinfo_path(&host.closure.top)));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        head.contains("Content-Type: text/x-nix-narinfo\r\n"),
        "{head}"
    );
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.starts_with(&format!("StorePath: {}\n", host.closure.top)),
        "{text}"
    );
    assert!(text.contains("\nCompression: none\n"), "{text}");
    assert!(
        text.contains(&format!("\nSig: {}:", served.key.name())),
        "{text}"
    );
    let (status, _, _) = exchange(
        &mut stream,
        &get("/00000000000000000000000000000000.narinfo"),
    );
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    for path in [
        "/",
        "/nar/x.nar",
        "/../etc/passwd",
        "/nix-cache-info/x",
        "/0000.narinfo",
    ] {
        let (status, _, _) = exchange(&mut stream, &get(path));
        assert_eq!(status, "HTTP/1.1 404 Not Found", "{path}");
    }
    let (status, head, body) = exchange(
        &mut stream,
        &format!("HEAD {} HTTP/1.1\r\n\r\n", narinfo_path(&host.closure.top)),
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.is_empty() && head.contains("Content-Length: "),
        "{head}"
    );

    // What no binary-cache client sends is answered, then the connection closes.
    let (status, head, _) = exchange(&mut stream, "DELETE /nix-cache-info HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(head.contains("Connection: close"), "{head}");
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap(), 0, "closed");
    let mut stream = connect(&served);
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(20_000));
    let (status, _, _) = exchange(&mut stream, &huge);
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");

    // Many streams at once are each answered.
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let port = served.forwarder.port;
            let path = narinfo_path(&host.closure.top);
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                exchange(&mut stream, &get(&path)).0
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap(), "HTTP/1.1 200 OK");
    }
    drop(served.runtime);
}

#[test]
fn an_unreadable_host_database_is_a_404_with_the_reason_in_the_stats() {
    let scratch = Scratch::new();
    let source = StoreSource {
        store_dir: scratch.path("store"),
        db: scratch.path("missing/db.sqlite"),
        case_hack: false,
    };
    let served = serve(source, Tamper::None);
    let mut stream = connect(&served);
    let (status, _, _) = exchange(
        &mut stream,
        &get("/0xhhd6navhszl7igbksjsv5rkf9x4y5s.narinfo"),
    );
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let stats = served.cache.stats();
    assert_eq!((stats.narinfo_hits, stats.narinfo_misses), (0, 1));
    let problem = stats.last_problem.unwrap();
    assert!(
        problem.contains("cannot open the host's Nix database"),
        "{problem}"
    );
    drop(served.runtime);
}

/// Makes a store path's files writable again (Nix makes them read-only).
fn unlock(path: &Path) {
    let walk = walk(path);
    for entry in walk {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        if !entry.is_symlink() {
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
}

fn walk(path: &Path) -> Vec<PathBuf> {
    let mut all = vec![path.to_path_buf()];
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            all.extend(walk(&entry.unwrap().path()));
        }
    }
    all
}

fn host_path(host: &HostStore, store_path: &str) -> PathBuf {
    host.root.join(store_path.trim_start_matches('/'))
}

#[test]
fn a_nar_that_no_longer_matches_the_database_is_cut_short_never_complete() {
    let host = host_store(2, 600_000);
    let served = serve(StoreSource::chroot(&host.root, false), Tamper::None);
    let mut stream = connect(&served);
    let (_, _, narinfo) = exchange(&mut stream, &get(&narinfo_path(&host.closure.top)));
    let url = nar_url(&narinfo);

    // Same size, one byte changed: only the hash at the end can tell.
    let data = host_path(&host, &host.closure.top).join("data");
    unlock(&host_path(&host, &host.closure.top));
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let (status, head, body) = exchange(&mut stream, &get(&url));
    assert_eq!(status, "HTTP/1.1 200 OK");
    let promised: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        body.len() < promised,
        "{} of {promised} bytes: the response must stop short",
        body.len()
    );
    let stats = served.cache.stats();
    assert_eq!((stats.nars_served, stats.nars_aborted), (0, 1));
    assert!(
        stats
            .last_problem
            .as_deref()
            .unwrap_or_default()
            .contains("does not match the host database"),
        "{stats:?}"
    );

    // Grown by a byte: stopped as soon as it is larger than the database says.
    std::fs::write(&data, [bytes.as_slice(), b"x"].concat()).unwrap();
    let mut stream = connect(&served);
    let (status, _, body) = exchange(&mut stream, &get(&url));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.len() < promised);
    assert_eq!(served.cache.stats().nars_aborted, 2);

    // Collected after its narinfo was served: a 404, before any byte.
    let other = host
        .closure
        .paths
        .iter()
        .find(|p| **p != host.closure.top)
        .unwrap();
    let mut stream = connect(&served);
    let (_, _, narinfo) = exchange(&mut stream, &get(&narinfo_path(other)));
    let url = nar_url(&narinfo);
    unlock(&host_path(&host, other));
    std::fs::remove_dir_all(host_path(&host, other)).unwrap();
    let (status, _, _) = exchange(&mut stream, &get(&url));
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    // The connection is still good for the next request.
    let (status, _, _) = exchange(&mut stream, &get("/nix-cache-info"));
    assert_eq!(status, "HTTP/1.1 200 OK");
    drop(served.runtime);
}

/// The kernel command line a dry run prints, with the test guest.
fn dry_run_line(args: &[&str], env: &[(&str, &str)], config_file: Option<&Path>) -> String {
    let fixture = support::Fixture::new();
    let mut command = fixture.cli_command(&[
        "start",
        "--dry-run",
        "--json",
        "--cores",
        "1",
        "--memory",
        "1024",
    ]);
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    if let Some(file) = config_file {
        command.env("DARWIN_VZ_NIX_CONFIG", file);
    }
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", support::stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["commandLine"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn host_store_cache_is_on_by_default_and_off_by_flag_environment_or_file() {
    let on = "darwin_vz_nix.host_cache=1";
    let off = "darwin_vz_nix.host_cache=0";
    assert!(dry_run_line(&[], &[], None).contains(on));
    assert!(dry_run_line(&["--no-host-store-cache"], &[], None).contains(off));
    assert!(dry_run_line(&[], &[("DARWIN_VZ_NIX_HOST_STORE_CACHE", "0")], None).contains(off));
    let scratch = Scratch::new();
    let file = scratch.path("config.json");
    std::fs::write(&file, r#"{"hostStoreCache": false}"#).unwrap();
    assert!(dry_run_line(&[], &[], Some(&file)).contains(off));
    // The flag beats the file.
    assert!(dry_run_line(&["--host-store-cache"], &[], Some(&file)).contains(on));

    let fixture = support::Fixture::new();
    let out = fixture
        .cli_command(&["start", "--dry-run"])
        .env("DARWIN_VZ_NIX_HOST_STORE_CACHE", "maybe")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        support::stderr(&out).contains(
            "DARWIN_VZ_NIX_HOST_STORE_CACHE: `maybe` is not a boolean; use 1/0, true/false or yes/no"
        ),
        "{}",
        support::stderr(&out)
    );
}

/// Runs the guest's host-cache.sh; returns (exit code, stderr).
fn host_cache_script(key_file: &Path, fragment: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new("bash")
        .arg("nix/nixos/scripts/host-cache.sh")
        .arg(key_file)
        .arg("http://127.0.0.1:17026")
        .arg(fragment)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_guest_trusts_only_a_well_formed_host_key_and_writes_nothing_else_into_nix_conf() {
    let scratch = Scratch::new();
    let key_file = scratch.path("host-cache-key.pub");
    let fragment = scratch.path("run/nix-host-cache.conf");
    let key = CacheKey::generate().unwrap();
    std::fs::write(&key_file, key.public_text()).unwrap();
    let (code, err) = host_cache_script(&key_file, &fragment);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read_to_string(&fragment).unwrap(),
        format!(
            "extra-substituters = http://127.0.0.1:17026\nextra-trusted-public-keys = {}\n",
            key.public_text()
        )
    );

    // A key that would smuggle a setting in, a wrong length, nothing at all: no
    // fragment (an earlier one is removed), and the unit fails visibly.
    for bad in [
        format!("{}\nrequire-sigs = false", key.public_text()),
        "name:c2hvcnQ=".to_string(),
        "no colon".to_string(),
        String::new(),
    ] {
        std::fs::write(&key_file, &bad).unwrap();
        let (code, err) = host_cache_script(&key_file, &fragment);
        assert_eq!(code, Some(1), "{bad:?}: {err}");
        assert!(!fragment.exists(), "{bad:?} left a fragment");
    }
    std::fs::remove_file(&key_file).unwrap();
    let (code, err) = host_cache_script(&key_file, &fragment);
    assert_eq!(code, Some(1));
    assert!(err.contains("did not arrive"), "{err}");
}
