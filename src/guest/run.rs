//! Running `nix-store`: bounded in time, its stderr read line by line (each line
//! bounded too), turned into progress and a readable log.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use super::nix::NixStore;
use super::progress::{Parser, Progress};

/// Longest stderr line kept; Nix's JSON lines are far shorter, a build's log line
/// may not be.
const MAX_LINE: usize = 64 * 1024;
/// The build log stops growing here (it says so once).
const MAX_LOG_BYTES: u64 = 16 << 20;
/// What is read of stdout (`nix-store` prints a path per realised output), and of a
/// short command's stderr (a dry run lists every path: thousands when nothing is
/// cached).
const MAX_STDOUT: u64 = 4 << 20;

/// How a run ended.
#[derive(Debug)]
pub struct Finished {
    pub success: bool,
    /// `exit status 1`, `took longer than …`.
    pub status: String,
    pub progress: Progress,
}

/// Runs `nix-store ARGS`, writing a readable log to `log` (replaced) and calling
/// `on_progress` whenever the counts change; kills it after `timeout`. `Err` only
/// when it could not start.
pub async fn logged(
    nix: &NixStore,
    args: &[OsString],
    home: &Path,
    log: (&Path, &str),
    timeout: Duration,
    mut on_progress: impl FnMut(&Progress),
) -> Result<Finished, String> {
    let (log, preamble) = log;
    let mut log = Log::open(log);
    for line in preamble.lines() {
        log.line(line);
    }
    log.line(&format!(
        "$ {}",
        super::nix::shell_line(&nix.program().display().to_string(), args)
    ));
    let mut command = tokio::process::Command::from(nix.command(args, home));
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| nix.not_runnable(&e))?;
    let stderr = child.stderr.take();
    let stdout = child.stdout.take();
    let mut parser = Parser::default();

    let work = async {
        // Drained so that the child never blocks on it; it names the root only.
        let read_stdout = async {
            if let Some(mut stdout) = stdout {
                let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
            }
        };
        let read_stderr = async {
            let Some(stderr) = stderr else { return };
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while read_line_capped(&mut reader, &mut line).await {
                let text = String::from_utf8_lossy(&line);
                let before = parser.progress().clone();
                if let Some(readable) = parser.line(text.trim_end_matches(['\n', '\r'])) {
                    log.line(&readable);
                }
                if *parser.progress() != before {
                    on_progress(parser.progress());
                }
            }
        };
        tokio::join!(read_stdout, read_stderr);
        child.wait().await
    };
    let (success, status) = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(status)) => (status.success(), status.to_string()),
        Ok(Err(e)) => (false, format!("could not wait for it: {e}")),
        Err(_) => {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            (
                false,
                format!(
                    "took longer than {}, so it was stopped",
                    crate::supervisor::seconds(timeout)
                ),
            )
        }
    };
    log.line(&format!("[{status}]"));
    Ok(Finished {
        success,
        status,
        progress: parser.progress().clone(),
    })
}

/// Reads one line into `line` (cleared first), keeping at most [`MAX_LINE`] bytes of
/// it; `false` at the end of input.
async fn read_line_capped(reader: &mut (impl AsyncBufRead + Unpin), line: &mut Vec<u8>) -> bool {
    line.clear();
    let mut any = false;
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => return any,
            Ok(chunk) => chunk,
        };
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (chunk.len(), false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..take.min(room)]);
        reader.consume(take);
        if done {
            return true;
        }
    }
}

/// The build log: replaced at each run, never followed through a link, bounded.
struct Log {
    file: Option<std::fs::File>,
    written: u64,
}

impl Log {
    fn open(path: &Path) -> Log {
        let file = match crate::files::open_state_log(path, 0o640) {
            Ok(file) => match file.set_len(0) {
                Ok(()) => Some(file),
                Err(e) => {
                    tracing::warn!("cannot empty the guest's build log {}: {e}", path.display());
                    None
                }
            },
            Err(e) => {
                tracing::warn!("cannot write the guest's build log: {e}");
                None
            }
        };
        Log { file, written: 0 }
    }

    fn line(&mut self, text: &str) {
        let Some(file) = &mut self.file else { return };
        let bytes = u64::try_from(text.len())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        if self.written.saturating_add(bytes) > MAX_LOG_BYTES {
            let _ = writeln!(
                file,
                "[the log stops here: it reached {MAX_LOG_BYTES} bytes]"
            );
            self.file = None;
            return;
        }
        self.written = self.written.saturating_add(bytes);
        let _ = writeln!(file, "{text}");
    }
}

/// What a short command printed: paths on stdout (`--add`), Nix's words on stderr.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `nix-store ARGS` to the end (at most `timeout`), for short commands: `Ok`
/// with what it printed, or `Err` with its stderr's last line.
pub fn blocking(
    nix: &NixStore,
    args: &[OsString],
    home: &Path,
    timeout: Duration,
) -> Result<Output, String> {
    use std::io::Read;
    let line = super::nix::shell_line("nix-store", args);
    let mut child = nix
        .command(args, home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| nix.not_runnable(&e))?;
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("`{line}`: no pipes"));
    };
    // Read both pipes on their own threads: a full pipe must not stall the child.
    let out = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = (&mut stdout).take(MAX_STDOUT).read_to_end(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = (&mut stderr).take(MAX_STDOUT).read_to_end(&mut text);
        text
    });
    let deadline = std::time::Instant::now().checked_add(timeout);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if deadline.is_some_and(|d| std::time::Instant::now() >= d) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("`{line}`: {e}")),
        }
    };
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    match status {
        Some(status) if status.success() => Ok(Output { stdout, stderr }),
        Some(status) => {
            let last = stderr
                .lines()
                .map(super::progress::strip_ansi)
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or_else(|| status.to_string());
            Err(format!("`{line}` failed: {last}"))
        }
        None => Err(format!(
            "`{line}` took longer than {}, so it was stopped",
            crate::supervisor::seconds(timeout)
        )),
    }
}
