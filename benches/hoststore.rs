//! How long a remote build waits for its inputs: the time from "build requested"
//! (the host's `nix build` starts) to "the builder has all inputs" (the remote
//! builder's first command runs, which Nix starts only once every input is valid
//! there), for an input closure the host has and the builder lacks, two ways in
//! one run:
//!
//!   ssh push    hostStoreCache off: the host's Nix pushes the closure over the SSH
//!               session (ssh-ng, through the supervisor's vsock stream) — today's path
//!   host cache  hostStoreCache on: the builder's Nix substitutes it from the
//!               supervisor's binary cache (NARs made from the host store and
//!               checked while they stream), through the guest's forwarder
//!
//! and, for reference, the fastest any binary cache could be here:
//!
//!   file floor  the builder's Nix substitutes the same NARs from a local
//!               `file://` binary cache (uncompressed, unsigned): Nix's own
//!               download-and-unpack cost with no server and no transport at all
//!
//! All use the real Nix on both sides and the fake VM of tests/support (its "guest
//! port 22" is `sshd -i`, its guest→host streams are socketpairs; the guest's
//! socat is a loopback forwarder). Each run starts from an empty builder store.
//!
//! Run: `cargo bench --bench hoststore`. DVN_BENCH_CLOSURE_MIB sets the closure's
//! size (default 256; the README's figures use 1024), DVN_BENCH_PATHS its number of
//! paths (default 8), DVN_BENCH_RUNS the runs of each way (default 3). Figures, not
//! assertions: compare the ratio, measured in the same run.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use darwin_vz_nix::bench::Stats;
use support::hoststore::*;

const MIB: u64 = 1024 * 1024;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    SshPush,
    HostCache,
    FileFloor,
}

/// (seconds until the builder had all inputs, seconds for the whole build).
fn measure(client: &Client, way: Way, file_cache: &Path, tag: &str) -> (f64, f64) {
    let cache = way == Way::HostCache;
    // What a real guest allows: several substitutions at once (Nix 2.8 bounds them
    // by max-jobs; newer Nix by max-substitution-jobs, 16).
    let mut guest_nix_conf = "max-jobs = 4\n".to_string();
    if way == Way::FileFloor {
        guest_nix_conf.push_str(&format!(
            "substituters = file://{}\nrequire-sigs = false\n",
            file_cache.display()
        ));
    }
    let remote = Remote::new(
        client,
        RemoteOptions {
            count_ssh_bytes: false,
            guest_nix_conf,
            ..RemoteOptions::honest(cache)
        },
    );
    let requested = now();
    let out = check(remote.build(tag), "the remote build");
    let done = now();
    let text = remote.output_text(&out);
    let started: f64 = text.lines().next().unwrap().parse().unwrap();
    if way == Way::HostCache {
        let report = remote.cache_report().unwrap();
        assert_eq!(
            report.nars_served,
            client.closure.paths.len() as u64,
            "every input came from the host cache"
        );
    }
    (started - requested, done - requested)
}

fn row(name: &str, stats: &Stats, mib: f64) {
    println!(
        "  {name:<11} {:>7.2} {:>7.2} {:>7.2} s   ({:.0} MiB/s at the median)",
        stats.min,
        stats.median,
        stats.max,
        mib / stats.median
    );
}

fn main() {
    let mib = knob("DVN_BENCH_CLOSURE_MIB", 256);
    let paths = knob("DVN_BENCH_PATHS", 8);
    let runs = knob("DVN_BENCH_RUNS", 3);
    let per_path = mib * MIB / paths;
    let count = usize::try_from(paths).unwrap();
    println!(
        "hoststore: making a closure of {paths} paths x {} MiB in the host store…",
        per_path / MIB
    );
    let client = Client::new(count, per_path);
    let nar_mib = client.closure.nar_bytes as f64 / MIB as f64;

    let file_cache = client.home().join("file-cache");
    check(
        nix_tool("nix", &client.conf, client.home())
            .args(["copy", "--to"])
            .arg(format!("file://{}?compression=none", file_cache.display()))
            .arg("--store")
            .arg(&client.store)
            .arg(&client.closure.top)
            .output()
            .unwrap(),
        "writing the file:// cache",
    );

    let (mut push, mut cache, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let (mut push_total, mut cache_total) = (Vec::new(), Vec::new());
    // Interleaved, so that every way meets the same background load.
    for run in 0..runs {
        let (inputs, total) = measure(&client, Way::SshPush, &file_cache, &format!("push-{run}"));
        push.push(inputs);
        push_total.push(total);
        let (inputs, total) = measure(
            &client,
            Way::HostCache,
            &file_cache,
            &format!("cache-{run}"),
        );
        cache.push(inputs);
        cache_total.push(total);
        let (inputs, _) = measure(&client, Way::FileFloor, &file_cache, &format!("file-{run}"));
        floor.push(inputs);
    }
    let (push, cache, floor) = (
        Stats::of(&push).unwrap(),
        Stats::of(&cache).unwrap(),
        Stats::of(&floor).unwrap(),
    );
    println!(
        "build requested -> builder has all inputs, {nar_mib:.0} MiB in {paths} paths, {runs} runs (min/median/max)"
    );
    row("ssh push", &push, nar_mib);
    row("host cache", &cache, nar_mib);
    row("file floor", &floor, nar_mib);
    println!(
        "  ratio (ssh push / host cache, medians): {:.2}x",
        push.median / cache.median
    );
    let (push_total, cache_total) = (
        Stats::of(&push_total).unwrap(),
        Stats::of(&cache_total).unwrap(),
    );
    println!(
        "whole build (median): ssh push {:.2} s, host cache {:.2} s",
        push_total.median, cache_total.median
    );
}
