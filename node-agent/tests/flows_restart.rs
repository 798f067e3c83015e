//! Restarting the agent's record reader neither loses nor repeats the records of
//! connections denied while a reader was bound (docs/flows.md, "Restarts and what
//! is lost"): a real NFLOG rule in a throwaway network namespace, two readers one
//! after the other on the same file, the second started while the first still runs.

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_agent::flows::{FlowStore, StopReader, read_loop};
use sluice_agent::metrics::Metrics;
use sluice_node_files::flows::{FlowQuery, read_records};

fn sh(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .unwrap()
        .success()
}

/// Runs `f` on a thread inside the namespace `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f_ns = std::fs::File::open(path).unwrap();
        nix::sched::setns(f_ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

struct Reader {
    store: Arc<FlowStore>,
    stop: StopReader,
    thread: std::thread::JoinHandle<()>,
}

fn start_reader(ns: &str, file: &Path) -> Reader {
    let store = FlowStore::new("node-1", 4096, Arc::new(Metrics::new()));
    let stop = StopReader::default();
    let (s, p, st) = (store.clone(), file.to_path_buf(), stop.clone());
    let thread = in_ns(ns, move || read_loop(s, p, st));
    Reader {
        store,
        stop,
        thread,
    }
}

fn wait_recording(r: &Reader) {
    let t = Instant::now();
    while !r.store.recording() {
        assert!(t.elapsed() < Duration::from_secs(10), "reader never bound");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One denied "connection" per port: a socket of its own (its own source port).
fn open(ns: &str, ports: std::ops::Range<u16>) -> Vec<UdpSocket> {
    in_ns(ns, move || {
        ports
            .map(|p| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(("127.0.0.1", p)).unwrap();
                // OUTPUT's DROP answers EPERM: the packet was logged and dropped.
                let _ = s.send(b"x");
                s
            })
            .collect()
    })
    .join()
    .unwrap()
}

#[test]
fn a_restart_neither_loses_nor_repeats_records_of_connections_denied_while_bound() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = format!("flows-agent-rs{}", std::process::id());
    assert!(sh(&format!("ip netns add {ns}")));
    // Below the log rule's own rate limit: this test is about restarts.
    assert!(sh(&format!(
        "ip netns exec {ns} sh -c 'ip link set lo up && \
         iptables -A OUTPUT -p udp --dport 9000:9999 -m conntrack --ctstate NEW \
           -j NFLOG --nflog-group 7 --nflog-prefix slc:iso:e:X && \
         iptables -A OUTPUT -p udp --dport 9000:9999 -j DROP'"
    )));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("log/flows.jsonl");
    let result = std::panic::catch_unwind(|| {
        let first = start_reader(&ns, &file);
        wait_recording(&first);
        let before = open(&ns, 9000..9040);
        // The successor starts while the first still runs: it waits for the lock.
        let second = start_reader(&ns, &file);
        std::thread::sleep(Duration::from_millis(300));
        assert!(!second.store.recording(), "two readers bound at once");
        // Denied just before the stop: queued to the first reader, drained by it.
        let late = open(&ns, 9040..9050);
        first.stop.stop();
        first.thread.join().unwrap();
        wait_recording(&second);
        // The earlier connections retransmit across the restart: not new.
        in_ns(&ns, move || {
            for s in before.iter().chain(late.iter()) {
                let _ = s.send(b"again");
            }
        })
        .join()
        .unwrap();
        let _after = open(&ns, 9050..9060);
        std::thread::sleep(Duration::from_millis(500));
        let (in_memory, _) = second.store.query(&FlowQuery::default());
        second.stop.stop();
        second.thread.join().unwrap();
        let on_disk = read_records(&file).unwrap();
        for (what, records) in [("file", &on_disk), ("memory", &in_memory)] {
            let mut ports: Vec<u16> = records.iter().map(|r| r.port).collect();
            ports.sort();
            assert_eq!(
                ports,
                (9000..9060).collect::<Vec<_>>(),
                "{what}: each denied connection exactly once"
            );
        }
    });
    sh(&format!("ip netns del {ns}"));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
