//! Root: ADD/DEL cycles with `kill -9` of the plugin (whose IPAM runs in-process
//! with the default `sluice-ipam`) or of its exec'd IPAM child at random moments, as a node sees them when the runtime, the machine's OOM killer or a
//! timeout ends a CNI call. After each batch, the runtime's own cleanup runs (GC with
//! the list of attachments it still believes in) and the node must hold exactly
//! those: 0 leaked links, 0 leaked or duplicated addresses, every live pod wired.
//! Each call picks in-process or exec'd IPAM at random, over one state directory,
//! so the two interleave as they do on a node whose other plugins chain sluice-ipam.
//!
//! `SLUICE_FAULT_CYCLES` sets the number of cycles (default 1000, in batches of 50);
//! `SLUICE_FAULT_SEED` replays a run (the seed is printed).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::time::Duration;

use serde_json::json;
use sluice_cni::veth::{PodIdentity, host_veth_name};
use sluice_testkit::{NetnsHolder, in_new_netns, require_root, sh};
use support::*;

const PER_BATCH: usize = 50;

#[derive(Debug, Clone, Copy)]
enum Victim {
    Plugin,
    Ipam,
}

#[derive(Debug, Default)]
struct Tally {
    cycles: usize,
    plugin_killed: usize,
    ipam_killed: usize,
    add_ok: usize,
    add_failed: usize,
    del_ok: usize,
    gc_runs: usize,
}

/// What became of one call.
enum Ending {
    Ok(String),
    Failed,
    Killed,
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) on a pid we spawned (or its child); ESRCH is fine.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// The IPAM plugin `sluice` has exec'd, if it is running right now.
fn ipam_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn finish(mut child: Child, kill: Option<(Duration, Victim)>, tally: &mut Tally) -> Ending {
    if let Some((delay, victim)) = kill {
        std::thread::sleep(delay);
        match victim {
            Victim::Plugin => kill9(child.id()),
            Victim::Ipam => {
                if let Some(p) = ipam_child(child.id()) {
                    kill9(p);
                    tally.ipam_killed += 1;
                }
            }
        }
    }
    let out = std::mem::replace(&mut child, unreachable_child()).wait_with_output();
    let out = out.unwrap();
    if out.status.signal() == Some(libc::SIGKILL) {
        tally.plugin_killed += 1;
        Ending::Killed
    } else if out.status.success() {
        Ending::Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Ending::Failed
    }
}

/// A placeholder for `mem::replace`; never waited on.
fn unreachable_child() -> Child {
    std::process::Command::new("true").spawn().unwrap()
}

fn random_kill(rng: &mut Rng, percent: u64) -> Option<(Duration, Victim)> {
    if !rng.chance(percent) {
        return None;
    }
    // Debug builds take a few to a few tens of milliseconds per call: spread the
    // kill over that whole span so every step of ADD and DEL gets hit.
    let delay = Duration::from_micros(rng.below(25_000) as u64);
    let victim = if rng.chance(50) {
        Victim::Plugin
    } else {
        Victim::Ipam
    };
    Some((delay, victim))
}

fn veth(cid: &str) -> String {
    host_veth_name(PodIdentity::Container { id: cid })
}

/// Links of the node other than what `setup_node` made.
fn pod_links() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let text = sh("ip -d -o link show");
    for line in text.lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name).to_owned();
        if ["lo", "gw0", UPLINK].contains(&name.as_str()) {
            continue;
        }
        let alias = line
            .split(" alias ")
            .nth(1)
            .map(|a| a.split_whitespace().next().unwrap_or("").to_owned())
            .unwrap_or_default();
        out.insert(name, alias);
    }
    out
}

#[test]
fn add_and_del_killed_at_random_moments_leave_nothing_behind_after_gc() {
    if !require_root("faults_kill") {
        return;
    }
    if !require_sluice_ipam("faults_kill") {
        return;
    }
    let cycles: usize = std::env::var("SLUICE_FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let (mut rng, seed) = Rng::from_env("SLUICE_FAULT_SEED");
    eprintln!("faults_kill: {cycles} cycles, SLUICE_FAULT_SEED={seed}");
    let mut tally = Tally::default();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    let ipam = Ipam::SluiceIpam;
    in_new_netns(|| {
        setup_node();
        let in_process = conf("1.1.0", ipam, dir);
        let confs = [exec_ipam(&in_process), in_process];
        let mut next_id = 0usize;
        while tally.cycles < cycles {
            let n = PER_BATCH.min(cycles - tally.cycles);
            let mut pods: BTreeMap<String, NetnsHolder> = BTreeMap::new();
            // Attachments the runtime believes in: container id → address.
            let mut live: BTreeMap<String, String> = BTreeMap::new();
            for _ in 0..n {
                next_id += 1;
                tally.cycles += 1;
                let cid = format!("fault-{next_id:05}");
                let pod = NetnsHolder::new();
                let conf = &confs[rng.below(2)];
                let add = Call::new("ADD", &cid, Some(pod.path()), conf);
                let ending = finish(add.spawn(&bins), random_kill(&mut rng, 30), &mut tally);
                match ending {
                    Ending::Ok(stdout) => {
                        tally.add_ok += 1;
                        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
                        live.insert(cid.clone(), result_ip(&r));
                    }
                    Ending::Failed | Ending::Killed => {
                        tally.add_failed += 1;
                        // libcni follows a failed ADD with a DEL, which may die too;
                        // a runtime that died with it never sends one (GC's job).
                        if rng.chance(50) {
                            let conf = &confs[rng.below(2)];
                            let del = Call::new("DEL", &cid, Some(pod.path()), conf);
                            finish(del.spawn(&bins), random_kill(&mut rng, 30), &mut tally);
                        }
                    }
                }
                // Some pods end within the batch; their DEL may be killed, and is
                // then either retried (as kubelet does) or left to GC.
                if live.contains_key(&cid) && rng.chance(40) {
                    let netns = if rng.chance(50) {
                        Some(pod.path())
                    } else {
                        None
                    };
                    let conf = &confs[rng.below(2)];
                    let del = Call::new("DEL", &cid, netns, conf);
                    match finish(del.spawn(&bins), random_kill(&mut rng, 30), &mut tally) {
                        Ending::Ok(_) => {
                            tally.del_ok += 1;
                            live.remove(&cid);
                        }
                        Ending::Failed | Ending::Killed => {
                            live.remove(&cid);
                            if rng.chance(50) {
                                Call::new("DEL", &cid, None, conf)
                                    .run(&bins)
                                    .assert_silent_ok();
                                tally.del_ok += 1;
                            }
                        }
                    }
                }
                pods.insert(cid, pod);
            }

            // The runtime's cleanup: GC with what it still runs.
            let mut gc = confs[1].clone();
            gc["cni.dev/valid-attachments"] = live
                .keys()
                .map(|cid| json!({"containerID": cid, "ifname": "eth0"}))
                .collect();
            Call::new("GC", "", None, &gc).run(&bins).assert_silent_ok();
            tally.gc_runs += 1;

            // Exactly the live attachments remain, each owned by its container.
            let want: BTreeMap<String, String> = live
                .keys()
                .map(|cid| (veth(cid), format!("sluice:sluice-test:{cid}:eth0")))
                .collect();
            assert_eq!(
                pod_links(),
                want,
                "links after GC (seed {seed}, cycle {})",
                tally.cycles
            );
            let held = ipam.allocations(dir);
            for (cid, pod) in &pods {
                match live.get(cid) {
                    Some(ip) => {
                        assert!(held.contains(cid.as_str()), "{cid} lost its address");
                        let a = pod.exec("ip -4 -o addr show dev eth0");
                        assert!(a.contains(&format!("inet {ip}/32")), "{cid}: {a}");
                        let r = sh(&format!("ip route show {ip}/32"));
                        assert!(r.contains(&veth(cid)), "{cid}: route {r:?}");
                    }
                    None => {
                        assert!(
                            !held.contains(cid.as_str()),
                            "{cid} was collected but still holds an address (seed {seed})"
                        );
                        assert_pod_empty(pod);
                    }
                }
            }
            let addrs: BTreeSet<&String> = live.values().collect();
            assert_eq!(addrs.len(), live.len(), "an address was handed out twice");

            // End of the batch: the runtime stops its pods.
            for cid in live.keys() {
                Call::new("DEL", cid, Some(pods[cid].path()), &confs[1])
                    .run(&bins)
                    .assert_silent_ok();
            }
            drop(pods);
            assert_no_node_leftovers();
        }
        assert!(
            !ipam.allocations(dir).contains("fault-"),
            "addresses left after every pod ended"
        );
        // Killed writers leave at most the one fixed-name temporary file, which the
        // next write replaces: no litter that grows with the kills.
        let strays: Vec<String> = std::fs::read_dir(dir.join("sluice-ipam"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(strays.len() <= 1, "temporary files left: {strays:?}");
    });
    eprintln!("faults_kill: {tally:?}");
    // The run must have exercised what it claims to.
    assert!(
        tally.plugin_killed > 0 && tally.ipam_killed > 0,
        "{tally:?}"
    );
}
