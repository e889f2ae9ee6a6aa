//! How fast bytes cross the proxy path, next to a baseline measured in the same run:
//!
//!   baseline  the same bytes through a plain socketpair to an echo thread
//!   proxy     darwin-vz-nix proxy (stdin/stdout) → descriptor handed over by the
//!             supervisor → the fake guest's echo port: the path `nix copy` takes
//!   relayed   the proxy path plus one more copying hop: what relaying the bytes
//!             through the supervisor, instead of passing the descriptor, would add
//!
//! and, for an SSH session as Nix uses it (`ssh … 'cat > /dev/null'`, 1 GiB in):
//!
//!   ssh direct   ProxyCommand is the guest's `sshd -i` itself: no proxy at all
//!   ssh relay    ProxyCommand is `darwin-vz-nix proxy` copying stdin/stdout
//!   ssh fdpass   `proxy --fdpass` with ProxyUseFdpass: ssh gets the guest stream's
//!                descriptor and the proxy copies nothing (the default ssh_config)
//!
//! Run: `cargo bench --bench throughput` (DVN_BENCH_MIB sets the size, default 1024).
//! Figures, not assertions: compare the ratios, not absolute numbers across machines.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use darwin_vz_nix::bench::Stats;
use support::*;

const CHUNK: usize = 256 * 1024;

/// Writes `total` bytes into `writer` on a thread while reading them back from
/// `reader`; returns MiB/s of the round trip.
fn pump(mut writer: impl Write + Send + 'static, mut reader: impl Read, total: usize) -> f64 {
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || {
        let chunk = vec![0x5au8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            writer.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        writer.flush().unwrap();
        writer
    });
    let mut buffer = vec![0u8; CHUNK];
    let mut got = 0;
    while got < total {
        let n = reader.read(&mut buffer).unwrap();
        assert!(n > 0, "stream ended after {got} of {total} bytes");
        got += n;
    }
    let elapsed = t0.elapsed();
    drop(sender.join().unwrap());
    total as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

fn baseline(total: usize) -> f64 {
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut reader = theirs.try_clone().unwrap();
        let mut writer = theirs;
        let _ = std::io::copy(&mut reader, &mut writer);
    });
    pump(ours.try_clone().unwrap(), ours, total)
}

fn through_proxy(fixture: &Fixture, port: u32, total: usize) -> f64 {
    let mut proxy = fixture
        .cli_command(&["proxy", "--port", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = proxy.stdin.take().unwrap();
    let stdout = proxy.stdout.take().unwrap();
    let rate = pump(stdin, stdout, total);
    let _ = proxy.wait();
    rate
}

/// Pushes `total` bytes into `ssh … 'cat > /dev/null'`; returns MiB/s.
fn ssh_sink(config: &std::path::Path, options: &[String], total: usize) -> f64 {
    let mut command = std::process::Command::new("ssh");
    command.arg("-F").arg(config);
    for option in options {
        command.arg("-o").arg(option);
    }
    let mut ssh = command
        .args(["darwin-vz-nix", "cat > /dev/null"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = ssh.stdin.take().unwrap();
    let t0 = Instant::now();
    let chunk = vec![0x5au8; CHUNK];
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK);
        stdin.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    drop(stdin);
    assert!(ssh.wait().unwrap().success());
    total as f64 / (1024.0 * 1024.0) / t0.elapsed().as_secs_f64()
}

/// One line of figures with its ratio to the reference measured in the same run.
fn row(name: &str, stats: &Stats, reference: &Stats, reference_name: &str) {
    println!(
        "  {name:<11} {:>8.0} {:>8.0} {:>8.0}   ratio to {reference_name} {:.2}",
        stats.min,
        stats.median,
        stats.max,
        stats.median / reference.median
    );
}

fn main() {
    let mib: usize = std::env::var("DVN_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let runs: usize = std::env::var("DVN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let total = mib * 1024 * 1024;
    let fixture = Fixture::new();
    let harness = Harness::start(
        &fixture,
        FakeVmBehaviour {
            listen_delay: Duration::ZERO,
            ..Default::default()
        },
        None,
    );

    println!("throughput: {mib} MiB echoed per run, {runs} runs, MiB/s (min/median/max)");
    let measure =
        |f: &dyn Fn() -> f64| Stats::of(&(0..runs).map(|_| f()).collect::<Vec<_>>()).unwrap();
    let base = measure(&|| baseline(total));
    let proxy = measure(&|| through_proxy(&fixture, ECHO_PORT, total));
    let relayed = measure(&|| through_proxy(&fixture, ECHO_RELAYED_PORT, total));
    row("baseline", &base, &base, "baseline");
    row("proxy", &proxy, &base, "baseline");
    row("relayed", &relayed, &base, "baseline");

    // An SSH session as Nix uses it, through our proxy and with no proxy at all.
    let out = fixture.cli(&["ssh-config"]);
    let config_dir = tempfile::Builder::new()
        .prefix("dvn-bench-")
        .tempdir()
        .unwrap();
    let config = config_dir.path().join("ssh_config");
    std::fs::write(&config, &out.stdout).unwrap();
    // Command-line -o options win over the file's, so these replace its ProxyCommand.
    let direct_options = [
        format!(
            "ProxyCommand=/usr/sbin/sshd -i -f \"{}\"",
            harness.vm.sshd_config().display()
        ),
        "ProxyUseFdpass=no".to_string(),
    ];
    let relay_options = [
        format!(
            "ProxyCommand=\"{}\" proxy --state-dir \"{}\"",
            env!("CARGO_BIN_EXE_darwin-vz-nix"),
            fixture.state_dir.display()
        ),
        "ProxyUseFdpass=no".to_string(),
    ];
    assert!(fixture.cli(&["start"]).status.success());
    let direct = measure(&|| ssh_sink(&config, &direct_options, total));
    let relay = measure(&|| ssh_sink(&config, &relay_options, total));
    let fdpass = measure(&|| ssh_sink(&config, &[], total));
    println!("ssh session, {mib} MiB into `cat > /dev/null`, MiB/s (min/median/max)");
    row("ssh direct", &direct, &direct, "direct");
    row("ssh relay", &relay, &direct, "direct");
    row("ssh fdpass", &fdpass, &direct, "direct");
}
