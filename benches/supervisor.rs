//! The supervisor's own costs, with the fake VM (boot takes no time, so what is left
//! is ours): a control round-trip (`status`), and `connect` on a stopped VM until the
//! first byte from the guest (here the banner of a freshly spawned `sshd -i`).
//!
//! Run: `cargo bench --bench supervisor` (DVN_BENCH_RUNS sets the round-trips,
//! default 1000; a twentieth as many cold connects). On a Mac, `darwin-vz-nix bench
//! control` measures the same against the real VM.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use darwin_vz_nix::bench::{self, Stats};
use support::*;

fn main() {
    let runs: usize = std::env::var("DVN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let fixture = Fixture::new();
    let behaviour = FakeVmBehaviour {
        boot_delay: Duration::ZERO,
        listen_delay: Duration::ZERO,
        ..Default::default()
    };
    let _harness = Harness::start(&fixture, behaviour, None);

    let trips = bench::control_round_trips(&fixture.state_dir, runs).unwrap();
    println!(
        "control round-trip (status)                 {}",
        Stats::of(&trips).unwrap()
    );

    let cold = (runs / 20).max(3);
    let first =
        bench::connect_to_first_byte(&fixture.state_dir, 22, cold, Duration::from_secs(30), false)
            .unwrap();
    println!(
        "connect on a stopped VM to first guest byte {}",
        Stats::of(&first).unwrap()
    );
    println!("  (fake VM: boot and listen delays are zero; the figure is the supervisor's");
    println!("   boot bookkeeping, readiness probe, fd passing and sshd -i start-up)");
}
