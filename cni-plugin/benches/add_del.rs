//! ADD and DEL latency of `sluice` (with host-local and with sluice-ipam) against
//! the reference `bridge` + `host-local` from containernetworking-plugins, on the
//! same machine in the same run: every binary exec'd exactly as a runtime does,
//! in a throwaway node namespace, one fresh pod namespace per iteration. The
//! variants are interleaved per iteration so machine noise hits all of them alike.
//!
//! Root only. Build the release binaries first, then run:
//!   cargo build --release -p sluice-cni -p sluice-ipam
//!   cargo bench -p sluice-cni --bench add_del            (RUNS=100 to change N)
//! Results go to stdout as a Markdown table (recorded in cni-plugin/BENCH.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_testkit::{NetnsHolder, in_new_netns, sh};

struct Variant {
    name: &'static str,
    plugin: PathBuf,
    conf: Value,
    add: Vec<Duration>,
    del: Vec<Duration>,
}

fn exec(
    plugin: &Path,
    cni_path: &Path,
    command: &str,
    cid: &str,
    netns: &Path,
    conf: &Value,
) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=p",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{} {command} failed: {}{}",
        plugin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list tests
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("add_del bench needs root (it creates namespaces and links); skipped");
        return;
    }
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(60);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let sluice = PathBuf::from(env!("CARGO_BIN_EXE_sluice"));
    let profile = sluice.parent().unwrap().to_owned();
    let ipam = profile.join("sluice-ipam");
    std::os::unix::fs::symlink(&sluice, bin.join("sluice")).unwrap();
    let have_ipam = ipam.is_file();
    if have_ipam {
        std::os::unix::fs::symlink(&ipam, bin.join("sluice-ipam")).unwrap();
    } else {
        eprintln!(
            "{} not built: `cargo build --release -p sluice-ipam`; skipping that variant",
            ipam.display()
        );
    }
    for p in ["host-local", "bridge"] {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p)).unwrap();
    }
    let host_local = |sub: &str, subnet: &str| json!({"type": "host-local", "dataDir": dir.join(sub), "ranges": [[{"subnet": subnet}]]});
    let mut variants = vec![
        Variant {
            name: "sluice + host-local",
            plugin: bin.join("sluice"),
            conf: json!({"cniVersion": "1.0.0", "name": "bench-a", "type": "sluice", "mtu": 1480, "ipam": host_local("a", "10.91.0.0/16")}),
            add: vec![],
            del: vec![],
        },
        Variant {
            name: "bridge + host-local (reference)",
            plugin: bin.join("bridge"),
            conf: json!({"cniVersion": "1.0.0", "name": "bench-c", "type": "bridge", "bridge": "cni-bench0", "isGateway": true, "ipam": host_local("c", "10.93.0.0/16")}),
            add: vec![],
            del: vec![],
        },
    ];
    if have_ipam {
        variants.insert(1, Variant {
            name: "sluice + sluice-ipam",
            plugin: bin.join("sluice"),
            conf: json!({"cniVersion": "1.0.0", "name": "bench-b", "type": "sluice", "mtu": 1480, "ipam": {
                "type": "sluice-ipam", "nodeName": "bench", "pool": "10.92.0.0/16", "blockSize": 24,
                "stateDir": dir.join("b-state"), "blockStore": {"type": "dir", "path": dir.join("b-blocks")}}}),
            add: vec![],
            del: vec![],
        });
    }
    let mut version: Vec<Duration> = Vec::new();
    let mut version_bridge: Vec<Duration> = Vec::new();
    in_new_netns(|| {
        sh(
            "ip link add up0 type veth peer name gw0 && ip addr add 192.168.77.2/24 dev up0 && ip link set up0 up && ip link set gw0 up && ip route add default via 192.168.77.1",
        );
        // One warm-up round (page cache, first block claim), not measured.
        for (i, round) in (0..runs + 1).enumerate() {
            for (k, v) in variants.iter_mut().enumerate() {
                let pod = NetnsHolder::new();
                let cid = format!("bench-{k}-{i}");
                let add = exec(&v.plugin, &bin, "ADD", &cid, pod.path(), &v.conf);
                let del = exec(&v.plugin, &bin, "DEL", &cid, pod.path(), &v.conf);
                if round > 0 {
                    v.add.push(add);
                    v.del.push(del);
                }
            }
            for (plugin, times) in [("sluice", &mut version), ("bridge", &mut version_bridge)] {
                let start = Instant::now();
                let out = Command::new(bin.join(plugin))
                    .env("CNI_COMMAND", "VERSION")
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                assert!(out.status.success());
                times.push(start.elapsed());
            }
        }
    });
    println!("runs per variant: {runs} (after one warm-up), release build, interleaved\n");
    println!("| variant | ADD median | ADD p90 | DEL median | DEL p90 |");
    println!("|---|---|---|---|---|");
    for v in &mut variants {
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            v.name,
            ms(percentile(&mut v.add, 0.5)),
            ms(percentile(&mut v.add, 0.9)),
            ms(percentile(&mut v.del, 0.5)),
            ms(percentile(&mut v.del, 0.9)),
        );
    }
    println!(
        "\nVERSION (a bare exec) median: sluice {:.2} ms, bridge {:.2} ms",
        ms(percentile(&mut version, 0.5)),
        ms(percentile(&mut version_bridge, 0.5))
    );
}
