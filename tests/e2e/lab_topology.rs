//! The lab itself: `down` leaves nothing behind; pods come and go through the real
//! CNI ADD and DEL; re-apply changes labels and `--prune` removes what a file no
//! longer holds; probes that cannot be sent are errors, never "blocked"; traffic
//! between nodes crosses the tunnel with pods' own addresses.

use std::collections::BTreeSet;
use std::process::Command;

use sluice_e2e::{Dataplane, Lab, e2e_data};

fn encap() -> String {
    std::env::var("SLUICE_E2E_ENCAP").unwrap_or_else(|_| "auto".into())
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What the host itself has: links, routes, rules (counters stripped), sets, and
/// named namespaces.
fn host_snapshot() -> Vec<String> {
    let strip = |s: String| -> String {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.find(" [") {
                Some(i) if l.starts_with(':') => l[..i].to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    vec![
        sh("ip -o link show | awk '{print $2}'"),
        sh("ip route show table all"),
        strip(sh("iptables-save 2>/dev/null")),
        strip(sh("iptables-legacy-save 2>/dev/null")),
        sh("ipset list -n 2>/dev/null"),
    ]
}

fn lab_namespaces(name: &str) -> Vec<String> {
    sh("ip netns list")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{name}-")))
        .map(str::to_string)
        .collect()
}

/// Processes whose command line mentions the lab's directory (agents, servers).
fn lab_processes(name: &str) -> Vec<String> {
    let needle = format!("/run/sluice-lab/{name}/");
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(&needle) {
                v.push(format!("{}: {c}", e.file_name().to_string_lossy()));
            }
        }
    }
    v
}

fn state_pids(name: &str) -> BTreeSet<u32> {
    let text = std::fs::read_to_string(format!("/run/sluice-lab/{name}/state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut pids = BTreeSet::new();
    for n in v["nodes"].as_array().unwrap() {
        pids.extend(n["agent_pid"].as_u64().map(|p| p as u32));
    }
    for p in v["pods"].as_object().unwrap().values() {
        pids.extend(p["server_pid"].as_u64().map(|p| p as u32));
        for s in p["extra_servers"].as_array().unwrap() {
            pids.insert(s["pid"].as_u64().unwrap() as u32);
        }
    }
    for e in v["externals"].as_object().unwrap().values() {
        for s in e["servers"].as_array().unwrap() {
            pids.insert(s["pid"].as_u64().unwrap() as u32);
        }
    }
    pids
}

#[test]
fn lab_down_leaves_no_namespace_link_rule_set_file_or_process() {
    if !sluice_testkit::require_root("lab_down_leaves_nothing") {
        return;
    }
    let before = host_snapshot();
    let lab = Lab::up("e2e-down", 2, &encap());
    lab.apply(&[
        &e2e_data("basic/pods.yaml"),
        &e2e_data("basic/deny-back.yaml"),
    ]);
    lab.apply(&[&e2e_data("../../e2e/data/seed-001/service-cluster.yaml")]);
    // An outside host with a server, and a server on an undeclared port.
    assert!(
        lab.probe("web/front", "ip:198.51.100.7", 443, "TCP")
            .connected()
    );
    assert!(lab.probe("web/back", "web/front", 8443, "TCP").connected());
    let pids = state_pids("e2e-down");
    assert!(pids.len() >= 6, "agents and servers recorded: {pids:?}");
    assert!(!lab_namespaces("e2e-down").is_empty());
    assert!(!lab_processes("e2e-down").is_empty());

    lab.down();

    assert_eq!(
        lab_namespaces("e2e-down"),
        Vec::<String>::new(),
        "namespaces left"
    );
    assert_eq!(
        lab_processes("e2e-down"),
        Vec::<String>::new(),
        "processes left"
    );
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "pid {p} still running"
        );
    }
    assert!(
        !std::path::Path::new("/run/sluice-lab/e2e-down").exists(),
        "state dir left"
    );
    assert_eq!(
        host_snapshot(),
        before,
        "the host's links, routes, rules or sets changed"
    );
}

fn node_has(lab: &str, node: &str, cmd: &str, needle: &str) -> bool {
    sh(&format!("ip netns exec {lab}-{node} {cmd}")).contains(needle)
}

#[test]
fn pods_are_added_and_deleted_through_cni_and_release_their_addresses() {
    if !sluice_testkit::require_root("pods_through_cni") {
        return;
    }
    let lab = Lab::up("e2e-cni", 2, &encap());
    lab.apply(&[&e2e_data("basic/pods.yaml")]);
    let ip = lab.pod_ip("web/back");
    // ADD wired it: host route on node-2 to the pod's /32 over a sluice veth, and
    // an allocation in node-2's IPAM state.
    assert!(node_has(
        "e2e-cni",
        "node-2",
        "ip route",
        &format!("{ip} dev slc")
    ));
    let held = || {
        let out = Command::new(sluice_testkit::bin_path("sluicectl"))
            .args(["ipam", "show", "-o", "json", "--state-dir"])
            .arg("/run/sluice-lab/e2e-cni/nodes/node-2/var/lib/sluice/ipam")
            .output()
            .expect("sluicectl ipam show");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ipam json");
        v["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["ip"].as_str() == Some(ip.as_str()))
    };
    assert!(held(), "allocation recorded");
    assert!(sh("ip netns list").contains("e2e-cni-web-back"));

    lab.delete_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: back, namespace: web}\nspec: {containers: [{name: c}]}\n",
    );
    assert!(
        !node_has("e2e-cni", "node-2", "ip route", &format!("{ip} ")),
        "route left"
    );
    assert!(
        !node_has("e2e-cni", "node-2", "ip -o link", "slc"),
        "host veth left"
    );
    assert!(!held(), "allocation released by CNI DEL");
    assert!(!sh("ip netns list").contains("e2e-cni-web-back"));
    // A pod to a deleted pod is an error, not "blocked".
    let err = lab.probe_error("web/front", "web/back", 80, "TCP");
    assert!(err.contains("no pod web/back"), "{err}");
}

#[test]
fn reapply_changes_labels_and_prune_removes_what_the_file_dropped() {
    if !sluice_testkit::require_root("reapply_and_prune") {
        return;
    }
    let lab = Lab::up("e2e-apply", 2, &encap());
    let pods = e2e_data("basic/pods.yaml");
    lab.apply(&[&pods, &e2e_data("basic/deny-back.yaml")]);
    assert!(!lab.probe("web/front", "web/back", 80, "TCP").connected());
    // Relabel front as a client: same sandbox, same address, now allowed.
    let ip = lab.pod_ip("web/front");
    lab.apply(&[&e2e_data("basic/front-client.yaml")]);
    assert_eq!(
        lab.pod_ip("web/front"),
        ip,
        "a label change keeps the sandbox"
    );
    let o = lab.probe("web/front", "web/back", 80, "TCP");
    assert!(o.connected(), "{o:?}");
    assert_eq!(o.source_seen.as_deref(), Some(ip.as_str()));

    // Applying a copy of pods.yaml without web/back and with --prune deletes it;
    // without --prune it would stay.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pods.yaml");
    std::fs::copy(&pods, &p).unwrap();
    lab.apply(&[&p]);
    let text = std::fs::read_to_string(&pods).unwrap();
    let cut = text
        .find("- apiVersion: v1\n  kind: Pod\n  metadata: {name: back")
        .unwrap();
    std::fs::write(&p, &text[..cut]).unwrap();
    lab.apply(&[&p]);
    assert!(
        lab.status()["pods"].to_string().contains("\"back\""),
        "no prune, still there"
    );
    lab.apply_prune(&p);
    assert!(
        !lab.status()["pods"].to_string().contains("\"back\""),
        "pruned"
    );
}

#[test]
fn probes_that_cannot_be_sent_are_errors_not_blocked() {
    if !sluice_testkit::require_root("probe_errors") {
        return;
    }
    let lab = Lab::up("e2e-err", 2, &encap());
    lab.apply(&[&e2e_data("basic/pods.yaml")]);
    assert!(
        lab.probe_error("web/nope", "web/back", 80, "TCP")
            .contains("no pod web/nope")
    );
    assert!(
        lab.probe_error("web/front", "ip:10.244.9.9", 80, "TCP")
            .contains("pod pool")
    );
    assert!(
        lab.probe_error("node:node-9", "web/back", 80, "TCP")
            .contains("no node node-9")
    );
    // A --probes batch: results in input order; one that cannot be sent is an
    // "error" element and a non-zero exit, the others still get their verdicts.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("probes.jsonl");
    std::fs::write(
        &f,
        "{\"from\":\"web/front\",\"to\":\"web/back\",\"port\":80}\n\
         {\"from\":\"web/nope\",\"to\":\"web/back\",\"port\":80}\n\
         {\"from\":\"web/back\",\"to\":\"web/front\",\"port\":53,\"protocol\":\"UDP\"}\n",
    )
    .unwrap();
    let out = Command::new(sluice_testkit::bin_path("sluicectl"))
        .args([
            "lab", "probe", "--name", "e2e-err", "-o", "json", "--probes",
        ])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a batch with an unsendable probe fails"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON array");
    assert_eq!(v[0]["result"], "connected");
    assert!(
        v[1]["error"].as_str().unwrap().contains("no pod web/nope"),
        "{v}"
    );
    assert!(v[1].get("result").is_none(), "an error is never a verdict");
    assert_eq!(v[2]["result"], "connected");
    if !lab.serves_sctp() {
        let e = lab.probe_error("web/front", "web/back", 9, "SCTP");
        assert!(e.contains("SCTP"), "{e}");
        // and `status` says the declared SCTP port is not served
        assert!(
            lab.status()["pods"]
                .to_string()
                .contains("\"unservedPorts\":[{\"port\":9")
        );
    }
}

#[test]
fn cross_node_traffic_crosses_the_tunnel_with_pod_addresses_and_reaches_outside_on_nftables() {
    cross_node(Dataplane::Nftables);
}

#[test]
fn cross_node_traffic_crosses_the_tunnel_with_pod_addresses_and_reaches_outside_on_iptables() {
    cross_node(Dataplane::Iptables);
}

fn cross_node(dataplane: Dataplane) {
    if !dataplane.runs("cross_node") {
        return;
    }
    let lab = Lab::up_on("e2e-x", 2, &encap(), dataplane);
    lab.apply(&[&e2e_data("basic/pods.yaml")]);
    let front = lab.pod_ip("web/front");
    let back = lab.pod_ip("web/back");
    // node-1 reaches node-2's pods through the tunnel device, not the underlay.
    let route = sh(&format!("ip -n {}-node-1 route get {back}", lab.name));
    assert!(
        route.contains("tunl0") || route.contains("sluice.vxlan"),
        "{route}"
    );
    for proto in ["TCP", "UDP"] {
        let port = if proto == "TCP" { 80 } else { 53 };
        let o = lab.probe("web/front", "web/back", port, proto);
        assert!(o.connected(), "{proto}: {o:?}");
        assert_eq!(
            o.source_seen.as_deref(),
            Some(front.as_str()),
            "{proto}: no SNAT inside the cluster"
        );
        let o = lab.probe("web/back", "web/front", port, proto);
        assert_eq!(o.source_seen.as_deref(), Some(back.as_str()));
    }
    // Outside the cluster, the lab's network routes pod addresses (nat-outgoing off):
    // the outside server sees the pod's own address.
    let o = lab.probe("web/back", "ip:198.51.100.7", 443, "TCP");
    assert!(o.connected(), "{o:?}");
    assert_eq!(o.source_seen.as_deref(), Some(back.as_str()));
    let o = lab.probe("ip:198.51.100.7", "web/back", 53, "UDP");
    assert_eq!(o.source_seen.as_deref(), Some("198.51.100.7"));
    drop(lab);

    // With nat-outgoing on, the agent masquerades pod traffic leaving the pool:
    // the outside server sees the node's uplink address instead.
    let lab = Lab::up_with(
        &dataplane.lab_name("e2e-xnat"),
        &[
            "--nodes",
            "2",
            "--encap",
            &encap(),
            "--nat-outgoing",
            "true",
            "--dataplane",
            dataplane.as_str(),
        ],
    );
    lab.assert_dataplane(dataplane);
    lab.apply(&[&e2e_data("basic/pods.yaml")]);
    let o = lab.probe("web/back", "ip:198.51.100.7", 443, "TCP");
    assert!(o.connected(), "{o:?}");
    assert_eq!(
        o.source_seen.as_deref(),
        Some("192.168.77.12"),
        "masqueraded to node-2"
    );
    // ...but never pod-to-pod traffic.
    let o = lab.probe("web/back", "web/front", 80, "TCP");
    assert_eq!(o.source_seen, Some(lab.pod_ip("web/back")));
}
