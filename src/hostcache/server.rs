//! Serving the cache over guest streams: one task per stream, HTTP/1.1 keep-alive,
//! three kinds of answer.
//!
//! * `GET /nix-cache-info`: always 200.
//! * `GET /<hash>.narinfo`: 200 with a signed narinfo when the host's database has
//!   the path, 404 otherwise — also when the database cannot be read in time. Never
//!   an error status and never a dropped connection: Nix before 2.32 fails the whole
//!   copy (and with it the remote build) on any other answer to a narinfo query.
//! * `GET /nar/<hash>-<nar hash>.nar`: the NAR, made from the host store while it is
//!   sent and checked against the database's NarHash and NarSize as it goes. A path
//!   that is gone (or changed) before the first byte is a 404; a mismatch found later
//!   cuts the response short, so the guest never receives a complete wrong NAR, and
//!   its Nix moves on to its next source. The NAR's last bytes are held back until
//!   the check has passed.
//!
//! Every wait is bounded: the idle time between requests, the time to send a
//! request head, each write, each database query.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use super::db::StoreDb;
use super::http::{self, Method, Refused, Request};
use super::key::CacheKey;
use super::nar::{self, DumpOptions, NarError};
use super::narinfo::{self, PathInfo, Sha256};
use super::nix32;
use crate::backend::GuestStream;

/// How long a kept-alive connection may sit without a request. Longer than curl's
/// own limit for reusing a connection (118 s), so that curl, not we, closes idle
/// ones: a request never meets a connection we are closing.
const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Once a request has begun, its head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Each write must make progress within this (the guest stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// A database answer later than this is a miss.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(2500);
/// Streams served at once; more are closed at once. The guest's forwarding socket
/// accepts as many (hostcache.nix, MaxConnections); Nix opens at most 25 per process,
/// one process per build the host sends.
pub const MAX_CONNECTIONS: usize = 1024;
/// NARs made at once; further NAR requests wait their turn.
const NAR_JOBS: usize = 8;
/// The unit in which a NAR travels from the file system to the stream.
const CHUNK: usize = 256 * 1024;

const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n";

/// Where the cache reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSource {
    /// The directory holding the store's files: `/nix/store`, or a chroot store's
    /// `<root>/nix/store` in tests.
    pub store_dir: PathBuf,
    /// The store's Nix database (`/nix/var/nix/db/db.sqlite`).
    pub db: PathBuf,
    /// Undo Nix's macOS case hack, as the host's Nix does (on by default on macOS).
    pub case_hack: bool,
}

/// What the cache has done since the supervisor started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub narinfo_hits: u64,
    pub narinfo_misses: u64,
    pub nars_served: u64,
    pub nar_bytes: u64,
    /// NARs cut short: the path vanished or changed, or its check failed.
    pub nars_aborted: u64,
    /// Streams closed at once because `MAX_CONNECTIONS` were open.
    pub streams_refused: u64,
    /// The last reason a lookup or a NAR failed, for `status`.
    pub last_problem: Option<String>,
}

#[derive(Default)]
struct Counters {
    narinfo_hits: AtomicU64,
    narinfo_misses: AtomicU64,
    nars_served: AtomicU64,
    nar_bytes: AtomicU64,
    nars_aborted: AtomicU64,
    streams_refused: AtomicU64,
    last_problem: Mutex<Option<String>>,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The host store as a Nix binary cache.
pub struct HostCache {
    source: StoreSource,
    db: StoreDb,
    key: Mutex<Option<CacheKey>>,
    counters: Counters,
    nar_jobs: Semaphore,
    open_streams: AtomicUsize,
}

impl HostCache {
    pub fn new(source: StoreSource) -> Arc<HostCache> {
        Arc::new(HostCache {
            db: StoreDb::new(&source.db),
            source,
            key: Mutex::new(None),
            counters: Counters::default(),
            nar_jobs: Semaphore::new(NAR_JOBS),
            open_streams: AtomicUsize::new(0),
        })
    }

    pub fn source(&self) -> &StoreSource {
        &self.source
    }

    /// The key narinfos are signed with from now on: the one whose public half the
    /// booting guest receives. Until a key is set, every narinfo is a miss.
    pub fn set_key(&self, key: CacheKey) {
        *self.key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }

    fn key(&self) -> Option<CacheKey> {
        self.key.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CacheStats {
            narinfo_hits: get(&c.narinfo_hits),
            narinfo_misses: get(&c.narinfo_misses),
            nars_served: get(&c.nars_served),
            nar_bytes: get(&c.nar_bytes),
            nars_aborted: get(&c.nars_aborted),
            streams_refused: get(&c.streams_refused),
            last_problem: c
                .last_problem
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Notes a problem for `status`, and logs it when it is not the last one again.
    fn problem(&self, message: String) {
        let mut last = self
            .counters
            .last_problem
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.as_deref() != Some(message.as_str()) {
            tracing::warn!("host cache: {message}");
        }
        *last = Some(message);
    }

    /// Serves every stream that arrives on `streams`, each on its own task, until
    /// the sender goes away.
    pub async fn serve(self: Arc<Self>, mut streams: mpsc::UnboundedReceiver<GuestStream>) {
        while let Some(stream) = streams.recv().await {
            if self.open_streams.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                bump(&self.counters.streams_refused, 1);
                tracing::warn!("host cache: {MAX_CONNECTIONS} streams open; closed a new one");
                continue;
            }
            self.open_streams.fetch_add(1, Ordering::Relaxed);
            let cache = self.clone();
            tokio::spawn(async move {
                match stream.into_tokio() {
                    Ok((io, keepalive)) => {
                        cache.serve_connection(io).await;
                        drop(keepalive);
                    }
                    Err(e) => tracing::warn!("host cache: cannot use a guest stream: {e}"),
                }
                cache.open_streams.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// Answers requests on one connection until it closes, idles out, or a response
    /// is cut short.
    pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(self: &Arc<Self>, mut io: S) {
        let mut buffer = Vec::new();
        loop {
            let head = match read_head(&mut io, &mut buffer).await {
                Ok(Some(head)) => head,
                Ok(None) => return,
                Err(refused) => {
                    let _ = write_refusal(&mut io, &refused).await;
                    return;
                }
            };
            let request = match http::parse(&head) {
                Ok(request) => request,
                Err(refused) => {
                    let _ = write_refusal(&mut io, &refused).await;
                    return;
                }
            };
            match self.respond(&mut io, &request).await {
                Ok(()) if request.keep_alive => {}
                _ => return,
            }
        }
    }

    async fn respond<S: AsyncWrite + Unpin>(
        self: &Arc<Self>,
        io: &mut S,
        request: &Request,
    ) -> Result<(), Cut> {
        match route(&request.path) {
            Route::CacheInfo => {
                let body = CACHE_INFO.as_bytes();
                send(io, request, 200, "text/x-nix-cache-info", body).await
            }
            Route::NarInfo(hash_part) => {
                let found = self.lookup(hash_part).await;
                let signed = found
                    .zip(self.key())
                    .map(|(info, key)| info.narinfo(&key.sign(&info.fingerprint())));
                match signed {
                    Some(text) => {
                        bump(&self.counters.narinfo_hits, 1);
                        send(io, request, 200, "text/x-nix-narinfo", text.as_bytes()).await
                    }
                    None => {
                        bump(&self.counters.narinfo_misses, 1);
                        not_found(io, request).await
                    }
                }
            }
            Route::Nar(hash_part, nar_hash) => {
                match self.lookup(hash_part).await {
                    // The URL carries the hash the narinfo promised: a path that was
                    // since replaced by different content is not served.
                    Some(info) if info.nar_hash == nar_hash => {
                        if request.method == Method::Head {
                            return write(io, nar_head(&info, request).as_bytes()).await;
                        }
                        self.send_nar(io, request, info).await
                    }
                    _ => not_found(io, request).await,
                }
            }
            Route::NotFound => not_found(io, request).await,
        }
    }

    /// The host's record of the path with this hash part; `None` when there is none,
    /// or the database cannot say within `LOOKUP_TIMEOUT`.
    async fn lookup(self: &Arc<Self>, hash_part: &str) -> Option<PathInfo> {
        let cache = self.clone();
        let hash = hash_part.to_string();
        let query = tokio::task::spawn_blocking(move || cache.db.query(&hash));
        match tokio::time::timeout(LOOKUP_TIMEOUT, query).await {
            Ok(Ok(Ok(found))) => found,
            Ok(Ok(Err(e))) => {
                self.problem(e.to_string());
                None
            }
            Ok(Err(e)) => {
                self.problem(format!("a database lookup failed: {e}"));
                None
            }
            Err(_) => {
                self.problem(format!(
                    "the host's Nix database {} did not answer within {} ms",
                    self.db.path().display(),
                    LOOKUP_TIMEOUT.as_millis()
                ));
                None
            }
        }
    }

    /// Streams the NAR of `info`, made and checked on a blocking thread.
    async fn send_nar<S: AsyncWrite + Unpin>(
        self: &Arc<Self>,
        io: &mut S,
        request: &Request,
        info: PathInfo,
    ) -> Result<(), Cut> {
        let Ok(_job) = self.nar_jobs.acquire().await else {
            return not_found(io, request).await;
        };
        let Some(base) = narinfo::base_name(&info.path) else {
            return not_found(io, request).await;
        };
        let path = self.source.store_dir.join(base);
        let options = DumpOptions {
            case_hack: self.source.case_hack,
        };
        let expected = (info.nar_hash, info.nar_size);
        let (chunks, mut received) = mpsc::channel(4);
        let producer =
            tokio::task::spawn_blocking(move || produce(&path, options, expected, chunks));

        let Some(first) = received.recv().await else {
            // Nothing was made: gone (collected) or unreadable before the first byte.
            let why = producer_error(producer).await;
            self.problem(format!("{}: {why}", info.path));
            bump(&self.counters.nars_aborted, 1);
            return not_found(io, request).await;
        };
        write(io, nar_head(&info, request).as_bytes()).await?;
        let mut next = Some(first);
        while let Some(chunk) = next.take() {
            match chunk {
                Chunk::Data(bytes) => {
                    write(io, &bytes).await?;
                    next = received.recv().await;
                    if next.is_none() {
                        // The producer stopped before the end: cut the response.
                        let why = producer_error(producer).await;
                        self.problem(format!("{}: {why}; the response was cut short", info.path));
                        bump(&self.counters.nars_aborted, 1);
                        return Err(Cut);
                    }
                }
                Chunk::Last(bytes) => {
                    write(io, &bytes).await?;
                    bump(&self.counters.nars_served, 1);
                    bump(&self.counters.nar_bytes, info.nar_size);
                    return Ok(());
                }
            }
        }
        Err(Cut)
    }
}

/// The response could not be completed: the connection must close.
#[derive(Debug)]
struct Cut;

enum Route<'a> {
    CacheInfo,
    NarInfo(&'a str),
    Nar(&'a str, Sha256),
    NotFound,
}

fn route(path: &str) -> Route<'_> {
    if path == "/nix-cache-info" {
        return Route::CacheInfo;
    }
    if let Some(hash) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix(".narinfo"))
        .filter(|h| nix32::is_hash_part(h))
    {
        return Route::NarInfo(hash);
    }
    let nar = path
        .strip_prefix("/nar/")
        .and_then(|p| p.strip_suffix(".nar"))
        .and_then(|p| p.split_once('-'))
        .filter(|(hash, _)| nix32::is_hash_part(hash))
        .and_then(|(hash, nar_hash)| Some((hash, Sha256(nix32::decode::<32>(nar_hash)?))));
    match nar {
        Some((hash, nar_hash)) => Route::Nar(hash, nar_hash),
        None => Route::NotFound,
    }
}

/// Reads one request head into `buffer` (keeping what follows it there). `None` when
/// the connection closed or idled out between requests.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buffer: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>, Refused> {
    let mut deadline = None;
    let mut scratch = [0u8; 4096];
    loop {
        if let Some(end) = http::head_end(buffer) {
            let rest = buffer.split_off(end);
            return Ok(Some(std::mem::replace(buffer, rest)));
        }
        if buffer.len() >= http::MAX_HEAD {
            return Err(Refused {
                status: 431,
                reason: "Request Header Fields Too Large",
            });
        }
        let read = io.read(&mut scratch);
        let n = match deadline {
            None => tokio::time::timeout(IDLE_TIMEOUT, read).await,
            Some(at) => tokio::time::timeout_at(at, read).await,
        };
        match n {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(None),
            Ok(Ok(n)) => buffer.extend_from_slice(scratch.get(..n).unwrap_or_default()),
        }
        if deadline.is_none() {
            deadline = Some(crate_deadline(HEAD_TIMEOUT));
        }
    }
}

/// `now + after` for `timeout_at`.
fn crate_deadline(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after).unwrap_or(now)
}

async fn write<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> Result<(), Cut> {
    match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Cut),
    }
}

async fn send<S: AsyncWrite + Unpin>(
    io: &mut S,
    request: &Request,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> Result<(), Cut> {
    let length = u64::try_from(body.len()).unwrap_or(u64::MAX);
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let mut response =
        http::response_head(status, reason, content_type, length, request.keep_alive).into_bytes();
    if request.method == Method::Get {
        response.extend_from_slice(body);
    }
    write(io, &response).await
}

/// The head of a NAR response: the same for HEAD and for GET, whose body follows.
fn nar_head(info: &PathInfo, request: &Request) -> String {
    http::response_head(
        200,
        "OK",
        "application/x-nix-nar",
        info.nar_size,
        request.keep_alive,
    )
}

async fn not_found<S: AsyncWrite + Unpin>(io: &mut S, request: &Request) -> Result<(), Cut> {
    send(
        io,
        request,
        404,
        "text/plain",
        b"404 not in the host store\n",
    )
    .await
}

async fn write_refusal<S: AsyncWrite + Unpin>(io: &mut S, refused: &Refused) -> Result<(), Cut> {
    let body = format!("{} {}\n", refused.status, refused.reason);
    let head = http::response_head(
        refused.status,
        refused.reason,
        "text/plain",
        u64::try_from(body.len()).unwrap_or(0),
        false,
    );
    write(io, format!("{head}{body}").as_bytes()).await
}

/// A piece of a NAR on its way to the stream. `Last` is sent only once the whole
/// NAR has been checked, so a NAR that fails its check never arrives complete.
enum Chunk {
    Data(Vec<u8>),
    Last(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
enum ProduceError {
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error(
        "the host store's copy does not match the host database (NAR of {size} bytes with hash {hash}, the database says {expected_size} bytes with hash {expected_hash}); it was modified or is being collected"
    )]
    Mismatch {
        size: u64,
        hash: String,
        expected_size: u64,
        expected_hash: String,
    },
}

async fn producer_error(producer: tokio::task::JoinHandle<Result<(), ProduceError>>) -> String {
    match producer.await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => "the NAR ended early".to_string(),
        Err(e) => format!("making the NAR failed: {e}"),
    }
}

/// Makes the NAR of `path`, hashing it on the way, and sends it in chunks.
fn produce(
    path: &std::path::Path,
    options: DumpOptions,
    (expected_hash, expected_size): (Sha256, u64),
    chunks: mpsc::Sender<Chunk>,
) -> Result<(), ProduceError> {
    let mut out = ChunkWriter {
        chunks,
        buffer: Vec::with_capacity(CHUNK * 2),
        hasher: sha2::Sha256::new(),
        size: 0,
        limit: expected_size,
    };
    nar::dump(path, options, &mut out)?;
    let hash = Sha256(out.hasher.finalize_reset().into());
    if hash != expected_hash || out.size != expected_size {
        return Err(ProduceError::Mismatch {
            size: out.size,
            hash: hash.to_nix32(),
            expected_size,
            expected_hash: expected_hash.to_nix32(),
        });
    }
    let last = std::mem::take(&mut out.buffer);
    out.chunks
        .blocking_send(Chunk::Last(last))
        .map_err(|_| NarError::Output(std::io::ErrorKind::BrokenPipe.into()))?;
    Ok(())
}

/// Collects NAR bytes into chunks, always keeping the latest bytes back (every NAR
/// ends with a 16-byte `)` token, so `Last` is never empty).
struct ChunkWriter {
    chunks: mpsc::Sender<Chunk>,
    buffer: Vec<u8>,
    hasher: sha2::Sha256,
    size: u64,
    limit: u64,
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.size = self.size.saturating_add(len);
        if self.size > self.limit {
            return Err(std::io::Error::other(
                "the NAR is larger than the host database says",
            ));
        }
        self.hasher.update(bytes);
        self.buffer.extend_from_slice(bytes);
        while self.buffer.len() > CHUNK {
            let rest = self.buffer.split_off(CHUNK);
            let full = std::mem::replace(&mut self.buffer, rest);
            self.chunks
                .blocking_send(Chunk::Data(full))
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
