//! Allocation throughput of the real `sluice-ipam` binary, exec'd the way a runtime
//! execs it (config on stdin, CNI_* environment), with 1 and 8 concurrent processes,
//! and the state size per 1000 allocations. Numbers, never asserts:
//!
//! ```text
//! cargo bench -p sluice-ipam --bench exec_throughput
//! # or, without building the dev-dependencies in release:
//! cargo build -p sluice-ipam --release --bin sluice-ipam
//! SLUICE_BIN_SLUICE_IPAM=target/release/sluice-ipam \
//!     cargo bench -p sluice-ipam --bench exec_throughput --profile dev
//! ```
//!
//! Results are recorded in ipam/BENCH.md.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

/// The binary under test: the one cargo built for this bench (release under
/// `cargo bench`), or `SLUICE_BIN_SLUICE_IPAM` to measure a given build.
fn bin() -> String {
    std::env::var("SLUICE_BIN_SLUICE_IPAM")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice-ipam").to_string())
}

/// A realistic container id: 64 hex digits, like containerd's and podman's.
fn container_id(i: usize) -> String {
    format!("{:064x}", 0x5eed_0000_u64 as usize * 7919 + i)
}

fn exec(cmd: &str, id: &str, conf: &[u8]) {
    let mut child = Command::new(bin())
        .env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice-ipam");
    child.stdin.take().unwrap().write_all(conf).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn setup(root: &Path) -> Vec<u8> {
    sluice_ipam::node_blocks::write(
        &root.join("node-blocks.json"),
        &sluice_ipam::node_blocks::NodeBlocks {
            node: "bench".into(),
            // 4 × 253 addresses: room for every allocation below.
            blocks: (0..4)
                .map(|i| format!("10.244.{i}.0/24").parse().unwrap())
                .collect(),
            updated_unix: 0,
        },
    )
    .unwrap();
    json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "sluice",
        "ipam": {
            "type": "sluice-ipam", "nodeName": "bench",
            "stateDir": root.join("ipam"),
            "nodeBlocksFile": root.join("node-blocks.json"),
        }
    })
    .to_string()
    .into_bytes()
}

/// `total` ADDs spread over `procs` concurrent workers, each exec'ing one process
/// at a time. Returns allocations per second.
fn adds_per_second(procs: usize, total: usize) -> (f64, Duration) {
    let d = tempfile::tempdir().unwrap();
    let conf = setup(d.path());
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..procs {
            let conf = &conf;
            s.spawn(move || {
                for i in (w..total).step_by(procs) {
                    exec("ADD", &container_id(i), conf);
                }
            });
        }
    });
    let took = start.elapsed();
    let held = sluice_ipam::StateDir::new(d.path().join("ipam"))
        .snapshot()
        .unwrap()
        .len();
    assert_eq!(held, total);
    (total as f64 / took.as_secs_f64(), took)
}

fn state_size_per_1000() -> u64 {
    let d = tempfile::tempdir().unwrap();
    let conf = setup(d.path());
    std::thread::scope(|s| {
        for w in 0..8 {
            let conf = &conf;
            s.spawn(move || {
                for i in (w..1000).step_by(8) {
                    exec("ADD", &container_id(i), conf);
                }
            });
        }
    });
    std::fs::metadata(d.path().join("ipam/allocations.json"))
        .unwrap()
        .len()
}

fn version_exec_ms(n: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let out = Command::new(bin())
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    start.elapsed().as_secs_f64() * 1000.0 / f64::from(n)
}

fn main() {
    // `cargo test --benches` runs this with `--test`-style flags; stay quick then.
    let quick = std::env::args().any(|a| a == "--test");
    let total = if quick { 40 } else { 800 };
    println!("sluice-ipam exec throughput ({})", bin());
    println!(
        "bare exec (VERSION): {:.2} ms",
        version_exec_ms(if quick { 5 } else { 100 })
    );
    for procs in [1, 8] {
        let (rate, took) = adds_per_second(procs, total);
        println!(
            "ADD with {procs} concurrent process(es): {rate:.0} allocations/s ({total} in {:.2} s, {:.2} ms each)",
            took.as_secs_f64(),
            took.as_secs_f64() * 1000.0 / total as f64
        );
    }
    if !quick {
        println!(
            "state size per 1000 allocations (64-hex container ids): {} bytes",
            state_size_per_1000()
        );
    }
}
