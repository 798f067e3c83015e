//! ADD and DEL latency of `sluice` (with sluice-ipam in-process, as the default
//! conflist runs it; with sluice-ipam exec'd; with host-local) against the
//! reference `bridge` + `host-local` from containernetworking-plugins, on the same
//! machine in the same run: every binary exec'd exactly as a runtime does, in a
//! throwaway node namespace, one fresh pod namespace per iteration. The variants
//! are interleaved per iteration so machine noise hits all of them alike. Then a
//! VERSION exec of each, and 100 ADDs started at once on one node (sluice with the
//! default IPAM, then the reference), then their DELs, all at once too.
//!
//! Root only. Build the CNI binaries as they are installed (scripts/build-cni.sh:
//! static, release) and point the bench at them, then run:
//!   eval "$(scripts/build-cni.sh)"        # exports SLUICE_BIN_SLUICE, SLUICE_BIN_SLUICE_IPAM
//!   cargo bench -p sluice-cni --bench add_del            (RUNS=100 to change N,
//!                                                          BURST=100 the burst)
//! Without those variables it measures this build's own `sluice` and the
//! `sluice-ipam` beside it (`cargo build --release -p sluice-cni -p sluice-ipam`).
//! `BASELINE_SLUICE=<an earlier sluice binary>` adds it as one more interleaved
//! variant (default conflist) and VERSION, for a before/after within one run.
//! Results go to stdout as Markdown tables (recorded in cni-plugin/BENCH.md).

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
    let child = spawn(plugin, cni_path, command, cid, netns, conf);
    wait(plugin, command, child);
    start.elapsed()
}

fn spawn(
    plugin: &Path,
    cni_path: &Path,
    command: &str,
    cid: &str,
    netns: &Path,
    conf: &Value,
) -> std::process::Child {
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        // One pod name per container: a burst's pods must not share a host veth name.
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={cid}"),
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
    child
}

fn wait(plugin: &Path, command: &str, child: std::process::Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} {command} failed: {}{}",
        plugin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` ADDs started at once on one node, then their `n` DELs at once: each call's
/// latency and the wall time of each wave.
struct Burst {
    add: Vec<Duration>,
    del: Vec<Duration>,
    add_wall: Duration,
    del_wall: Duration,
}

fn burst(plugin: &Path, cni_path: &Path, tag: &str, conf: &Value, n: usize) -> Burst {
    let pods: Vec<NetnsHolder> = (0..n).map(|_| NetnsHolder::new()).collect();
    let wave = |command: &str| {
        let go = std::sync::Barrier::new(n + 1);
        std::thread::scope(|sc| {
            // Threads made here share this thread's (the node's) network namespace.
            let handles: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    let go = &go;
                    sc.spawn(move || {
                        go.wait();
                        let t = Instant::now();
                        let cid = format!("{tag}-{i}");
                        let c = spawn(plugin, cni_path, command, &cid, pod.path(), conf);
                        wait(plugin, command, c);
                        t.elapsed()
                    })
                })
                .collect();
            go.wait();
            let start = Instant::now();
            let lat: Vec<Duration> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            (lat, start.elapsed())
        })
    };
    let (add, add_wall) = wave("ADD");
    let (del, del_wall) = wave("DEL");
    Burst {
        add,
        del,
        add_wall,
        del_wall,
    }
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
    // The lab's and the tests' convention (`SLUICE_BIN_<NAME>`) names the binaries.
    let from_env = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let sluice = from_env("SLUICE_BIN_SLUICE")
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sluice")));
    let ipam = from_env("SLUICE_BIN_SLUICE_IPAM")
        .unwrap_or_else(|| sluice.parent().unwrap().join("sluice-ipam"));
    println!(
        "sluice: {}\nsluice-ipam: {}\n",
        sluice.display(),
        ipam.display()
    );
    std::os::unix::fs::symlink(&sluice, bin.join("sluice")).unwrap();
    let have_ipam = ipam.is_file();
    if have_ipam {
        std::os::unix::fs::symlink(&ipam, bin.join("sluice-ipam")).unwrap();
        // The same binary under another name: the plugin execs it (only the type
        // `sluice-ipam` runs in-process), for the before/after comparison.
        std::os::unix::fs::symlink(&ipam, bin.join("sluice-ipam-exec")).unwrap();
    } else {
        eprintln!(
            "{} not built: `cargo build --release -p sluice-ipam`; skipping the exec'd variant",
            ipam.display()
        );
    }
    for p in ["host-local", "bridge"] {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p)).unwrap();
    }
    let burst_n: usize = std::env::var("BURST")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100);
    let host_local = |sub: &str, subnet: &str| json!({"type": "host-local", "dataDir": dir.join(sub), "ranges": [[{"subnet": subnet}]]});
    // The default conflist's sluice plugin (examples/sluice-standalone.conflist,
    // node-files' NodeConflist): sluice-ipam, MTU from a file, a log file.
    let sluice_ipam = |tag: &str, ty: &str, pool: &str| {
        json!({"cniVersion": "1.0.0", "name": format!("bench-{tag}"), "type": "sluice",
        "mtu": 0, "mtuFile": dir.join("mtu"), "logFile": dir.join("cni.log"), "capabilities": {"ips": true},
        "ipam": {"type": ty, "nodeName": "bench", "pool": pool, "blockSize": 24,
            "stateDir": dir.join(format!("{tag}-state")), "blockStore": {"type": "dir", "path": dir.join(format!("{tag}-blocks"))}}})
    };
    std::fs::write(dir.join("mtu"), "1480\n").unwrap();
    let reference = json!({"cniVersion": "1.0.0", "name": "bench-c", "type": "bridge", "bridge": "cni-bench0", "isGateway": true, "ipam": host_local("c", "10.93.0.0/16")});
    let default_conf = sluice_ipam("b", "sluice-ipam", "10.92.0.0/16");
    let mut variants = vec![
        Variant {
            name: "sluice + sluice-ipam in-process (default conflist)",
            plugin: bin.join("sluice"),
            conf: default_conf.clone(),
            add: vec![],
            del: vec![],
        },
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
            conf: reference.clone(),
            add: vec![],
            del: vec![],
        },
    ];
    if have_ipam {
        variants.insert(
            1,
            Variant {
                name: "sluice + sluice-ipam exec'd",
                plugin: bin.join("sluice"),
                conf: sluice_ipam("e", "sluice-ipam-exec", "10.94.0.0/16"),
                add: vec![],
                del: vec![],
            },
        );
    }
    // BASELINE_SLUICE=<an earlier `sluice` binary>: the default conflist run by it
    // too, interleaved with everything else, for a before/after in one run.
    let baseline = std::env::var_os("BASELINE_SLUICE").map(PathBuf::from);
    if let Some(b) = &baseline {
        std::os::unix::fs::symlink(b, bin.join("sluice-baseline")).unwrap();
        println!("baseline sluice: {}\n", b.display());
        variants.insert(
            1,
            Variant {
                name: "baseline sluice + sluice-ipam in-process (default conflist)",
                plugin: bin.join("sluice-baseline"),
                conf: sluice_ipam("z", "sluice-ipam", "10.95.0.0/16"),
                add: vec![],
                del: vec![],
            },
        );
    }
    let mut version: Vec<Duration> = Vec::new();
    let mut version_baseline: Vec<Duration> = Vec::new();
    let mut version_bridge: Vec<Duration> = Vec::new();
    let mut bursts: Vec<(&str, Burst)> = Vec::new();
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
            for (plugin, times) in [
                ("sluice", &mut version),
                ("sluice-baseline", &mut version_baseline),
                ("bridge", &mut version_bridge),
            ] {
                if plugin == "sluice-baseline" && baseline.is_none() {
                    continue;
                }
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
        if burst_n > 0 {
            bursts.push((
                "sluice + sluice-ipam in-process (default conflist)",
                burst(&bin.join("sluice"), &bin, "burst-s", &default_conf, burst_n),
            ));
            bursts.push((
                "bridge + host-local (reference)",
                burst(&bin.join("bridge"), &bin, "burst-r", &reference, burst_n),
            ));
        }
    });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "runs per variant: {runs} (after one warm-up), release build, interleaved; load average at the end: {}\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("| variant | ADD median | ADD p90 | DEL median | DEL p90 |");
    println!("|---|---|---|---|---|");
    let mut medians = Vec::new();
    for v in &mut variants {
        let (add, del) = (percentile(&mut v.add, 0.5), percentile(&mut v.del, 0.5));
        medians.push((v.name, add, del));
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            v.name,
            ms(add),
            ms(percentile(&mut v.add, 0.9)),
            ms(del),
            ms(percentile(&mut v.del, 0.9)),
        );
    }
    let (_, ref_add, ref_del) = *medians.last().expect("the reference is last");
    println!("\n| variant | ADD / reference | DEL / reference |");
    println!("|---|---|---|");
    for (name, add, del) in &medians {
        println!(
            "| {name} | {:.2}x | {:.2}x |",
            add.as_secs_f64() / ref_add.as_secs_f64(),
            del.as_secs_f64() / ref_del.as_secs_f64()
        );
    }
    println!(
        "\nVERSION (a bare exec) median: sluice {:.2} ms, bridge {:.2} ms",
        ms(percentile(&mut version, 0.5)),
        ms(percentile(&mut version_bridge, 0.5))
    );
    if !version_baseline.is_empty() {
        println!(
            "VERSION median of the baseline sluice: {:.2} ms",
            ms(percentile(&mut version_baseline, 0.5))
        );
    }
    if !bursts.is_empty() {
        println!(
            "\n{burst_n} ADDs started at once on one node, then their {burst_n} DELs at once:\n"
        );
        println!(
            "| variant | ADD wave wall | ADD median | ADD p99 | DEL wave wall | DEL median | DEL p99 |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (name, b) in &mut bursts {
            println!(
                "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                ms(b.add_wall),
                ms(percentile(&mut b.add, 0.5)),
                ms(percentile(&mut b.add, 0.99)),
                ms(b.del_wall),
                ms(percentile(&mut b.del, 0.5)),
                ms(percentile(&mut b.del, 0.99)),
            );
        }
    }
}
