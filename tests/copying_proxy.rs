//! The copying proxy: `darwin-vz-nix proxy` without `--fdpass`, what a plain
//! `ProxyCommand` (and a `ProxyUseFdpass yes` ssh whose stdout is a pipe) gets. Every
//! byte must cross it in both directions, in order: these tests carry megabytes of
//! pseudo-random data through it, byte for byte, and a real OpenSSH session.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Generous on a loaded 2-core machine: the transfers take a second or two.
const SESSION_LIMIT: Duration = Duration::from_secs(60);

/// `len` bytes of a fixed pseudo-random sequence (xorshift): no pattern a lost or
/// repeated chunk could hide in.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[3]
        })
        .collect()
}

/// Feeds `input` to the child's stdin in irregular chunks, then closes it; reads
/// at most `expect_len` bytes of its stdout (until it closes) and returns them.
/// Panics if that takes longer than `limit`: a proxy that loses bytes hangs ssh.
fn exchange(child: &mut Child, input: Vec<u8>, expect_len: usize, limit: Duration) -> Vec<u8> {
    let mut stdin = child.stdin.take().unwrap();
    // Not joined: a writer blocked on a hung child must not hang the test too.
    std::thread::spawn(move || {
        let mut rest = &input[..];
        let mut size = 1;
        while !rest.is_empty() {
            // 1, 3, 9, … up to 100 000 bytes per write, then round again.
            let n = size.min(rest.len());
            if stdin.write_all(&rest[..n]).is_err() {
                return;
            }
            rest = &rest[n..];
            size = if size > 100_000 { 1 } else { size * 3 };
        }
    });
    let mut stdout = child.stdout.take().unwrap();
    let (done, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout)
            .take(u64::try_from(expect_len).unwrap())
            .read_to_end(&mut out);
        let _ = done.send(out);
    });
    match received.recv_timeout(limit) {
        Ok(out) => out,
        Err(_) => {
            let _ = child.kill();
            panic!("no complete answer within {limit:?}: the proxy lost bytes");
        }
    }
}

/// Waits for a child with a bound; kills it and panics after `limit`.
fn wait_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `Host` block `ssh-config` prints, in a file of its own.
fn host_block(fixture: &Fixture) -> PathBuf {
    let out = fixture.cli(&["ssh-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let path = fixture.dir.path().join("ssh_config");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// OpenSSH with the generated block, but with `proxy` as a plain copying
/// `ProxyCommand` (options on the command line win over the file).
fn ssh_through_the_copying_proxy(fixture: &Fixture, block: &Path, remote: &[&str]) -> Command {
    let mut command = Command::new("ssh");
    command
        .arg("-F")
        .arg(block)
        .arg("-o")
        .arg(format!(
            "ProxyCommand=\"{}\" proxy --state-dir \"{}\"",
            env!("CARGO_BIN_EXE_darwin-vz-nix"),
            fixture.state_dir.display()
        ))
        .args(["-o", "ProxyUseFdpass=no", "-o", "BatchMode=yes"])
        .arg("darwin-vz-nix")
        .arg("--")
        .args(remote)
        .env_remove("DARWIN_VZ_NIX_CONFIG")
        .env("DARWIN_VZ_NIX_GUEST", &fixture.guest_dir);
    command
}

#[test]
fn a_real_ssh_session_through_the_copying_proxy_carries_data_both_ways_byte_for_byte() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let block = host_block(&fixture);

    // `cat` on the guest echoes what ssh sends: 4 MiB go out and come back in the
    // same session, at the same time.
    let data = pseudo_random(4 << 20, 0x5eed);
    let mut ssh = ssh_through_the_copying_proxy(&fixture, &block, &["cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let echoed = exchange(&mut ssh, data.clone(), data.len() + 1, SESSION_LIMIT);
    let ended = wait_within(&mut ssh, SESSION_LIMIT);
    let mut err = String::new();
    let _ = ssh.stderr.take().unwrap().read_to_string(&mut err);
    assert!(ended.success(), "{ended}: {err}");
    assert_eq!(echoed.len(), data.len(), "{err}");
    assert!(echoed == data, "the bytes came back changed");
    assert_eq!(harness.vm.boots(), 1, "the session booted the VM");

    // Upload, then download, in separate sessions; and the remote exit status.
    let file = fixture.dir.path().join("uploaded");
    // The remote shell splits words: the fixture's path has a space.
    let upload_command = format!("cat > '{}'", file.display());
    let download_command = format!("cat '{}'", file.display());
    let data = pseudo_random(3 << 20, 0xfeed);
    let mut upload = ssh_through_the_copying_proxy(&fixture, &block, &[&upload_command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let nothing = exchange(&mut upload, data.clone(), 0, SESSION_LIMIT);
    assert!(nothing.is_empty());
    assert!(wait_within(&mut upload, SESSION_LIMIT).success());
    assert!(
        std::fs::read(&file).unwrap() == data,
        "the upload arrived changed"
    );

    let mut download = ssh_through_the_copying_proxy(&fixture, &block, &[&download_command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let downloaded = exchange(&mut download, Vec::new(), data.len() + 1, SESSION_LIMIT);
    assert!(wait_within(&mut download, SESSION_LIMIT).success());
    assert!(downloaded == data, "the download arrived changed");

    let mut exit = ssh_through_the_copying_proxy(&fixture, &block, &["exit", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(wait_within(&mut exit, SESSION_LIMIT).code(), Some(3));

    // Each session ended with its ssh.
    wait_for(Duration::from_secs(10), "the sessions to end", || {
        status(&fixture).connections == 0
    });
}

#[test]
fn proxy_relays_every_byte_both_ways_in_order() {
    let fixture = Fixture::new();
    let _harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let port = ECHO_PORT.to_string();
    let mut proxy = spawn_proxy_with(&fixture, &["--port", &port]);
    // The guest's echo service sends every byte back; the proxy must pass each one
    // on in both directions, whatever the sizes of the writes.
    let data = pseudo_random(8 << 20, 0xabcdef);
    let mut writer_keeps_stdin = proxy.stdin.take().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        let mut rest = &sent[..];
        let mut size = 1;
        while !rest.is_empty() {
            let n = size.min(rest.len());
            writer_keeps_stdin.write_all(&rest[..n]).unwrap();
            rest = &rest[n..];
            size = if size > 100_000 { 1 } else { size * 3 };
        }
        // Kept open until every byte came back: closing it ends the session.
        writer_keeps_stdin
    });
    let mut stdout = proxy.stdout.take().unwrap();
    let (done, received) = std::sync::mpsc::channel();
    let expected = data.len();
    std::thread::spawn(move || {
        let mut out = vec![0u8; expected];
        let read = stdout.read_exact(&mut out).map(|()| out);
        let _ = done.send(read);
    });
    let echoed = received
        .recv_timeout(SESSION_LIMIT)
        .expect("every byte back within the limit")
        .expect("the proxy's stdout delivered every byte");
    assert!(echoed == data, "the bytes came back changed or reordered");
    assert_eq!(status(&fixture).connections, 1);

    drop(writer.join().unwrap());
    let status_code = wait_within(&mut proxy, SESSION_LIMIT);
    assert!(status_code.success(), "{status_code}");
    wait_for(Duration::from_secs(10), "the session to end", || {
        status(&fixture).connections == 0
    });
}

#[test]
fn the_copying_proxy_ends_when_the_guest_side_ends() {
    let fixture = Fixture::new();
    let harness = Harness::start(&fixture, FakeVmBehaviour::default(), None);
    let mut proxy = spawn_proxy(&fixture);
    assert!(first_line(&mut proxy).starts_with("SSH-2.0-"));
    // The guest powers off: its sshd goes, and with it the stream. The proxy must
    // not wait for ssh (its stdin stays open) to notice.
    harness.vm.guest_poweroff();
    let code = wait_within(&mut proxy, Duration::from_secs(20));
    assert!(code.success(), "{code}");
    drop(proxy.stdin.take());
}
