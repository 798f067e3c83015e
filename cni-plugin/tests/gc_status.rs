//! CNI 1.1 GC and STATUS, driven as a 1.1 runtime would (no runtime on this machine
//! speaks 1.1). GC needs root (it deletes links in a throwaway node namespace);
//! STATUS only reads files and execs the IPAM plugin.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{Value, json};
use sluice_cni::veth::{PodIdentity, host_veth_name};
use sluice_testkit::{NetnsHolder, in_new_netns, require_root};
use support::*;

fn veth(cid: &str) -> String {
    host_veth_name(PodIdentity::Container { id: cid })
}

fn gc_scenario(ipam: Ipam) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    in_new_netns(|| {
        setup_node();
        let conf = conf("1.1.0", ipam, dir);
        let pods: Vec<NetnsHolder> = (0..3).map(|_| NetnsHolder::new()).collect();
        let cids = ["ctr-gc-keep", "ctr-gc-stale-1", "ctr-gc-stale-2"];
        for (cid, pod) in cids.iter().zip(&pods) {
            Call::new("ADD", cid, Some(pod.path()), &conf)
                .run(&bins)
                .result();
        }
        // Another network's attachment on the same node: never ours to collect.
        let mut other = conf.clone();
        other["name"] = "other-net".into();
        other["ipam"] = Ipam::HostLocal.section(&dir.join("other"));
        other["ipam"]["ranges"][0][0]["subnet"] = "10.97.0.0/24".into();
        let other_pod = NetnsHolder::new();
        Call::new("ADD", "ctr-gc-other", Some(other_pod.path()), &other)
            .run(&bins)
            .result();

        // Without the list, GC refuses rather than collect everything.
        let refused = Call::new("GC", "", None, &conf).run(&bins);
        assert_eq!(refused.code(), 7);
        // GC is a 1.1 verb.
        let mut old = conf.clone();
        old["cniVersion"] = "1.0.0".into();
        old["cni.dev/valid-attachments"] = json!([]);
        assert_eq!(Call::new("GC", "", None, &old).run(&bins).code(), 1);
        for cid in cids {
            assert!(
                links().contains(&veth(cid)),
                "{cid} collected by a refused GC"
            );
        }

        // The older key, keeping two of three.
        let mut gc = conf.clone();
        gc["cni.dev/attachments"] = json!([
            {"containerID": "ctr-gc-keep", "ifname": "eth0"},
            {"containerID": "ctr-gc-stale-2", "ifname": "eth0"}
        ]);
        Call::new("GC", "", None, &gc).run(&bins).assert_silent_ok();
        assert!(!links().contains(&veth("ctr-gc-stale-1")));
        assert!(links().contains(&veth("ctr-gc-stale-2")));

        // The 1.1 key, keeping one. The same container with another ifname is a
        // different attachment.
        let mut gc = conf.clone();
        gc["cni.dev/valid-attachments"] = json!([
            {"containerID": "ctr-gc-keep", "ifname": "eth0"},
            {"containerID": "ctr-gc-stale-2", "ifname": "net1"}
        ]);
        Call::new("GC", "", None, &gc).run(&bins).assert_silent_ok();
        let l = links();
        assert!(l.contains(&veth("ctr-gc-keep")), "{l:?}");
        assert!(!l.contains(&veth("ctr-gc-stale-2")), "{l:?}");
        assert!(
            l.contains(&veth("ctr-gc-other")),
            "other network touched: {l:?}"
        );
        assert!(
            ping_from(Some(&pods[0]), NODE_IP),
            "the kept pod lost its network"
        );

        let held = ipam.allocations(dir);
        assert!(held.contains("ctr-gc-keep"));
        if ipam == Ipam::SluiceIpam {
            // sluice-ipam speaks 1.1: GC was forwarded and released the others.
            assert!(
                !held.contains("ctr-gc-stale-1") && !held.contains("ctr-gc-stale-2"),
                "{held}"
            );
        }
        for (cid, pod) in cids.iter().zip(&pods) {
            Call::new("DEL", cid, Some(pod.path()), &conf)
                .run(&bins)
                .assert_silent_ok();
        }
        Call::new("DEL", "ctr-gc-other", Some(other_pod.path()), &other)
            .run(&bins)
            .assert_silent_ok();
        assert_no_node_leftovers();
    });
}

#[test]
fn gc_removes_only_this_networks_stale_attachments_and_forwards_to_ipam() {
    if !require_root("gc") {
        return;
    }
    for ipam in ipams() {
        eprintln!("--- {ipam:?}");
        gc_scenario(ipam);
    }
}

fn status(bins: &CniBin, conf: &Value) -> Outcome {
    Call::new("STATUS", "", None, conf).run(bins)
}

fn agent_file(dir: &Path, ready: bool, age: i64, reason: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let p = dir.join("agent-status.json");
    std::fs::write(
        &p,
        json!({"ready": ready, "reason": reason, "node": "node-1", "updatedUnix": now - age})
            .to_string(),
    )
    .unwrap();
    p.to_str().unwrap().into()
}

#[test]
fn status_reports_ready_only_when_an_add_would_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    let base = conf("1.1.0", Ipam::HostLocal, dir);

    // No agent required, host-local present (pre-1.1, so not asked): ready.
    status(&bins, &base).assert_silent_ok();
    // STATUS is a 1.1 verb.
    let mut old = base.clone();
    old["cniVersion"] = "1.0.0".into();
    assert_eq!(status(&bins, &old).code(), 1);

    // The agent, when required: missing, not ready, stale, ready.
    let mut c = base.clone();
    c["requireAgent"] = true.into();
    c["agentStatusFile"] = dir.join("agent-status.json").to_str().into();
    let e = status(&bins, &c).error();
    assert_eq!(e["code"], 50, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("sluice-agent"), "{e}");
    c["agentStatusFile"] = agent_file(dir, false, 0, "policy for new pods not programmed yet");
    let e = status(&bins, &c).error();
    assert_eq!(e["code"], 50);
    assert!(
        e["msg"].as_str().unwrap().contains("policy for new pods"),
        "{e}"
    );
    c["agentStatusFile"] = agent_file(dir, true, 300, "ok");
    assert_eq!(
        status(&bins, &c).code(),
        51,
        "a silent agent means limited connectivity"
    );
    c["agentStatusFile"] = agent_file(dir, true, 2, "ok");
    status(&bins, &c).assert_silent_ok();

    // A missing IPAM plugin or an unusable MTU file: not ready.
    let mut c = base.clone();
    c["ipam"]["type"] = "no-such-ipam".into();
    assert_eq!(status(&bins, &c).code(), 50);
    std::fs::write(dir.join("mtu"), "garbage").unwrap();
    assert_eq!(status(&bins, &base).code(), 50);
    std::fs::remove_file(dir.join("mtu")).unwrap();

    // A 1.1 IPAM plugin's own verdict is forwarded, code and reason.
    let fake = bins.dir.join("fake-ipam");
    std::fs::write(
        &fake,
        "#!/bin/sh\ncat >/dev/null\ncase \"$CNI_COMMAND\" in\n\
         VERSION) echo '{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"1.0.0\",\"1.1.0\"]}';;\n\
         STATUS) echo '{\"cniVersion\":\"1.1.0\",\"code\":50,\"msg\":\"pool exhausted: no free block\"}'; exit 1;;\n\
         esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = base.clone();
    c["ipam"] = json!({"type": "fake-ipam"});
    let e = status(&bins, &c).error();
    assert_eq!(e["code"], 50);
    assert!(e["msg"].as_str().unwrap().contains("pool exhausted"), "{e}");

    // sluice-ipam answers STATUS itself (it can claim a block in its dir store).
    if sluice_ipam_bin().is_some() {
        status(&bins, &conf("1.1.0", Ipam::SluiceIpam, dir)).assert_silent_ok();
    }
}

#[test]
fn version_is_fast_and_needs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bins = CniBin::new(tmp.path());
    // No stdin, no other variable: podman runs this for every plugin, every time.
    let out = std::process::Command::new(bins.sluice())
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    assert!(out.stderr.is_empty(), "VERSION logs nothing");
}
