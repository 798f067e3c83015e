//! Addresses a pod asks for, through the real plugin → agent path of the lab, with
//! real packets: a lab laid out with `--node-ips`; `sluice.dev/ip-addrs-no-ipam` pods
//! on three nodes, with addresses from one /24 outside the pool and from inside the
//! pool, reaching each other and an outside host, and policy treating those addresses
//! as the pods'; a `sluice.dev/ip-addrs` pod gets its address from a block its node
//! claims; each bad request gives its code and leaves nothing behind.

use std::process::Command;

use sluice_e2e::Lab;

fn encap() -> String {
    std::env::var("SLUICE_E2E_ENCAP").unwrap_or_else(|_| "auto".into())
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn pod(name: &str, node: &str, labels: &str, annotation: Option<(&str, &str)>) -> String {
    let ann = annotation
        .map(|(k, v)| format!(", annotations: {{{k}: '{v}'}}"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: pinned, labels: {{{labels}}}{ann}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}\n"
    )
}

const NO_IPAM: &str = "sluice.dev/ip-addrs-no-ipam";
const IP_ADDRS: &str = "sluice.dev/ip-addrs";

#[test]
fn no_ipam_pods_on_three_nodes_reach_each_other_and_the_outside_and_bad_requests_leave_nothing() {
    if !sluice_testkit::require_root("lab_addresses") {
        return;
    }
    let name = "e2e-addr";
    let e = encap();
    let lab = Lab::up_with(
        name,
        &["--node-ips", "10.0.5.21,10.0.5.22,10.0.5.23", "--encap", &e],
    );
    let st = lab.status();
    let uplinks: Vec<&str> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["uplinkIP"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(uplinks, ["10.0.5.21", "10.0.5.22", "10.0.5.23"], "{st}");

    // Ingress to `c` only from `a`: policy must know the no-IPAM addresses.
    let objects = [
        pod("a", "node-1", "app: a", Some((NO_IPAM, r#"["172.20.9.1"]"#))),
        pod("b", "node-2", "app: b", Some((NO_IPAM, r#"["172.20.9.2"]"#))),
        pod("c", "node-3", "app: c", Some((NO_IPAM, r#"["172.20.9.3"]"#))),
        pod("d", "node-2", "app: d", Some((NO_IPAM, r#"["10.244.250.4"]"#))),
        pod("plain", "node-1", "app: plain", None),
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: c-from-a, namespace: pinned}\n\
         spec: {podSelector: {matchLabels: {app: c}}, ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]}\n"
            .to_string(),
    ]
    .concat();
    lab.apply_yaml(&objects);
    for (p, ip) in [
        ("pinned/a", "172.20.9.1"),
        ("pinned/b", "172.20.9.2"),
        ("pinned/c", "172.20.9.3"),
        ("pinned/d", "10.244.250.4"),
    ] {
        assert_eq!(lab.pod_ip(p), ip, "{p}");
    }
    // Every node routes each remote no-IPAM address as a /32 to the pod's node,
    // the way the agent routes blocks (route protocol 181), learned from the datastore.
    for (node, remote) in [
        ("node-1", "172.20.9.2"),
        ("node-1", "172.20.9.3"),
        ("node-2", "172.20.9.1"),
        ("node-3", "10.244.250.4"),
    ] {
        let r = sh(&format!("ip -n {name}-{node} route show {remote}/32"));
        assert!(r.contains("proto 181"), "{node} -> {remote}: {r:?}");
    }
    // Every pair across nodes, both ways, except what the policy closes.
    for (from, to) in [
        ("pinned/a", "pinned/b"),
        ("pinned/b", "pinned/a"),
        ("pinned/a", "pinned/c"),
        ("pinned/a", "pinned/d"),
        ("pinned/d", "pinned/a"),
        ("pinned/plain", "pinned/b"),
        ("pinned/b", "pinned/plain"),
    ] {
        assert!(lab.probe(from, to, 80, "TCP").connected(), "{from} -> {to}");
    }
    assert!(
        !lab.probe("pinned/b", "pinned/c", 80, "TCP").connected(),
        "policy sees b's no-IPAM address as b's and keeps it out of c"
    );
    for from in ["pinned/a", "pinned/b", "pinned/c", "pinned/d"] {
        assert!(
            lab.probe(from, "ip:198.51.100.7", 443, "TCP").connected(),
            "{from} -> outside"
        );
    }

    // sluice.dev/ip-addrs: from the pool through IPAM; a free block is claimed by
    // the pod's node, and the address is routed like any pod's.
    lab.apply_yaml(&pod(
        "ipam-pinned",
        "node-3",
        "app: e",
        Some((IP_ADDRS, r#"["10.244.200.9"]"#)),
    ));
    assert_eq!(lab.pod_ip("pinned/ipam-pinned"), "10.244.200.9");
    assert!(
        lab.probe("pinned/a", "pinned/ipam-pinned", 80, "TCP")
            .connected()
    );
    assert!(
        lab.probe("pinned/ipam-pinned", "ip:198.51.100.7", 443, "TCP")
            .connected()
    );
    let plain = lab.pod_ip("pinned/plain");
    let in_node1_block = format!("{}.200", plain.rsplit_once('.').expect("dotted quad").0);

    // Bad requests: the error, and nothing left (no pod, no namespace, no manifest).
    let namespaces_before = sh("ip netns list | grep -o \"^e2e-addr-[^ ]*\" | sort");
    let manifests_before = sh(&format!("ls /run/sluice-lab/{name}/manifests | sort"));
    let bad = [
        (
            "malformed",
            pod("bad1", "node-1", "app: x", Some((NO_IPAM, "172.20.9.9"))),
            "code 130",
        ),
        (
            "two addresses",
            pod(
                "bad2",
                "node-1",
                "app: x",
                Some((IP_ADDRS, r#"["10.244.1.5","10.244.1.6"]"#)),
            ),
            "code 130",
        ),
        (
            "the node's own address",
            pod(
                "bad3",
                "node-2",
                "app: x",
                Some((NO_IPAM, r#"["10.0.5.22"]"#)),
            ),
            "code 131",
        ),
        (
            "held by a pod on the node",
            pod(
                "bad4",
                "node-1",
                "app: x",
                Some((NO_IPAM, r#"["172.20.9.1"]"#)),
            ),
            "code 131",
        ),
        (
            "ip-addrs outside the pool",
            pod(
                "bad5",
                "node-1",
                "app: x",
                Some((IP_ADDRS, r#"["172.20.9.50"]"#)),
            ),
            "code 115",
        ),
        (
            "ip-addrs in another node's block",
            pod(
                "bad6",
                "node-2",
                "app: x",
                Some((IP_ADDRS, &format!("[\"{in_node1_block}\"]"))),
            ),
            "code 116",
        ),
        (
            "ip-addrs already held",
            pod(
                "bad7",
                "node-3",
                "app: x",
                Some((IP_ADDRS, r#"["10.244.200.9"]"#)),
            ),
            "code 116",
        ),
    ];
    for (what, yaml, code) in bad {
        let err = lab.apply_yaml_fails(&yaml);
        assert!(err.contains(code), "{what}: {err}");
        assert_eq!(
            sh("ip netns list | grep -o \"^e2e-addr-[^ ]*\" | sort"),
            namespaces_before,
            "{what}: a namespace is left"
        );
        assert_eq!(
            sh(&format!("ls /run/sluice-lab/{name}/manifests | sort")),
            manifests_before,
            "{what}: a manifest is left"
        );
    }
    lab.down();
}

/// An agent this test started; killed when the test ends, before `lab down`.
struct Restarted(std::process::Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn state(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(format!("/run/sluice-lab/{name}/state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn status_ready(path: &str) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["ready"] == true)
}

#[test]
fn a_pod_added_while_its_agent_is_down_gets_its_address_is_fail_closed_and_is_enforced_at_the_agents_first_sync()
 {
    if !sluice_testkit::require_root("lab_agent_down_during_add") {
        return;
    }
    let name = "e2e-agentdown";
    let lab = Lab::up_with(name, &["--nodes", "2", "--encap", &encap()]);
    lab.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: guarded, labels: {app: client}}\n\
         spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 80}]}]}\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-from-client, namespace: guarded}\n\
         spec: {podSelector: {matchLabels: {app: server}}, ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]}\n",
    );

    // node-1's agent dies (its status file still says ready: a crash, not a stop).
    let st = state(name);
    let node1 = &st["nodes"][0];
    let pid = node1["agent_pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(argv[0].ends_with("sluice-agent"), "{argv:?}");
    sh(&format!("kill -9 {pid}"));
    for _ in 0..100 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // ADD while it is down: the pod gets its address, and is fail-closed.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("server.yaml");
    std::fs::write(
        &f,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: guarded, labels: {app: server}}\n\
         spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}\n",
    )
    .unwrap();
    sluice_e2e::sluicectl_out(&[
        "lab",
        "apply",
        "--name",
        name,
        "-f",
        f.to_str().unwrap(),
        "--no-wait",
    ]);
    // (`lab status` exits non-zero while an agent is down: read the lab's state.)
    let ip = state(name)["pods"]["guarded/server"]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(ip.starts_with("10.244."), "{ip}");
    assert!(
        !lab.probe("guarded/client", "guarded/server", 80, "TCP")
            .connected(),
        "a pod whose policy is not programmed yet is fail-closed"
    );

    // The agent comes back: at its first sync (when it reports ready) the pod is
    // enforced, and the allowed connection goes through.
    let status = format!(
        "{}/run/sluice/agent-status.json",
        node1["root"].as_str().unwrap()
    );
    std::fs::write(
        &status,
        r#"{"ready":false,"reason":"restarting","node":"node-1","updated_unix":0}"#,
    )
    .unwrap();
    let netns = node1["netns"].as_str().unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let started = std::time::Instant::now();
    let _agent = Restarted(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(&argv)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    while !status_ready(&status) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the restarted agent never became ready: {}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let ready_after = started.elapsed();
    assert!(
        lab.probe("guarded/client", "guarded/server", 80, "TCP")
            .connected(),
        "enforced at the restarted agent's first sync ({ready_after:?} after its start)"
    );
    eprintln!("agent restart → first sync (pod enforced): {ready_after:?}");
    drop(_agent);
    lab.down();
}
