//! `sluicectl policy check` and the agent agree on a file with one malformed policy:
//! the same manifest file, a good policy and one whose ipBlock `except` lies outside
//! its `cidr`. check answers deny for the pods the bad policy selects, naming it, and
//! the normal verdict for the others; the real agent (directory datastore, in a
//! throwaway node namespace) holds exactly those pods against real TCP connections
//! and names the object (file, kind, namespace/name) in its log and counts it in its
//! metrics. Needs `cargo build --workspace --bins` (both binaries are exec'd).

mod agent_support;

use std::process::Command;
use std::time::Duration;

use agent_support::*;
use sluice_testkit::{bin_path, require_root};

const WEB_IP: &str = "10.244.1.10";
const API_IP: &str = "10.244.1.11";

/// One file: the node, the namespace, two pods, `api-from-lb` (good) and `broken`
/// (selects web; `except` outside `cidr`, which the API server would refuse).
fn manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status: {{addresses: [{{type: InternalIP, address: {NODE_IP}}}]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: prod}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: prod, labels: {{app: web}}}}
spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: {WEB_IP}, podIPs: [{{ip: {WEB_IP}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: api, namespace: prod, labels: {{app: api}}}}
spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: {API_IP}, podIPs: [{{ip: {API_IP}}}]}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: api-from-lb, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: {CLIENT_IP}/32}}}}]
    ports: [{{port: 8080}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: broken, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}}}]
"#
    )
}

/// `sluicectl policy check -o json` for one probe: (verdict, reason, stderr).
fn check(file: &std::path::Path, from: &str, to: &str) -> (String, String, String) {
    let out = Command::new(bin_path("sluicectl"))
        .args(["policy", "check", "-f"])
        .arg(file)
        .args(["--from", from, "--to", to, "--port", "8080", "-o", "json"])
        .output()
        .expect("run sluicectl");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "policy check failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (
        v["verdict"].as_str().unwrap().to_string(),
        v["reason"].as_str().unwrap().to_string(),
        stderr,
    )
}

#[test]
fn policy_check_and_the_agent_agree_on_a_file_with_one_malformed_policy() {
    if !require_root("policy_check_and_the_agent_agree_on_a_file_with_one_malformed_policy") {
        return;
    }
    let mut w = World::new();
    w.add_pod("prod", "web", WEB_IP);
    w.add_pod("prod", "api", API_IP);
    w.pod_mut("web").serve_peer_addr(8080);
    w.pod_mut("api").serve_peer_addr(8080);
    w.write_manifest("cluster.yaml", &manifest());
    let file = w.manifests().join("cluster.yaml");

    // (a) sluicectl on the file.
    let client = format!("ip:{CLIENT_IP}");
    let (verdict, reason, stderr) = check(&file, &client, "prod/web");
    assert_eq!(verdict, "deny", "{reason}");
    assert!(
        reason.contains("held fail-closed by rejected NetworkPolicy prod/broken")
            && reason.contains("is not inside 10.0.0.0/8"),
        "{reason}"
    );
    assert!(
        stderr.contains(&format!("{}: NetworkPolicy prod/broken:", file.display())),
        "{stderr}"
    );
    let (verdict, reason, _) = check(&file, &client, "prod/api");
    assert_eq!(verdict, "allow", "{reason}");
    assert!(
        reason.contains("allowed by prod/api-from-lb ingress[0]"),
        "{reason}"
    );
    let (verdict, reason, _) = check(&file, &format!("ip:{OTHER_CLIENT_IP}"), "prod/api");
    assert_eq!(verdict, "deny", "{reason}");
    assert!(!reason.contains("broken"), "{reason}");

    // (b) the agent on the same file, probed with real connections.
    let agent = w.start_agent(&["--encapsulation", "none", "--iptables-backend", "nft"]);
    w.wait_ready(&agent, Duration::from_secs(20));
    let log = || std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert_eq!(
        w.client_connect(CLIENT_IP, API_IP, 8080).as_deref(),
        Ok(CLIENT_IP),
        "api: allowed by api-from-lb, as check says\n{}",
        log()
    );
    assert!(
        w.client_connect(OTHER_CLIENT_IP, API_IP, 8080).is_err(),
        "api: the other client is denied, as check says"
    );
    assert!(
        w.client_connect(CLIENT_IP, WEB_IP, 8080).is_err(),
        "web: held by the broken policy, as check says\n{}",
        log()
    );
    // Held both ways: web cannot open a connection out either, api (not egress
    // isolated) can; check says the same.
    let mut outside_server = Command::new("nsenter")
        .arg(format!("--net={}", w.outside.path().display()))
        .args([
            "sh",
            "-c",
            "exec socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo $SOCAT_PEERADDR'",
        ])
        .spawn()
        .unwrap();
    wait_for("outside server", Duration::from_secs(3), || {
        String::from_utf8_lossy(&w.outside.try_exec("cat /proc/net/tcp").stdout)
            .contains(":1F90 00000000:0000 0A")
    });
    let (verdict, reason, _) = check(&file, "prod/web", &client);
    assert_eq!(verdict, "deny", "{reason}");
    assert!(
        reason.contains("egress: held fail-closed by rejected NetworkPolicy prod/broken"),
        "{reason}"
    );
    assert_eq!(check(&file, "prod/api", &client).0, "allow");
    let web_out = w.pod("web").connect(CLIENT_IP, 8080);
    let api_out = w.pod("api").connect(CLIENT_IP, 8080);
    let _ = outside_server.kill();
    let _ = outside_server.wait();
    assert!(web_out.is_err(), "web: egress is held too: {web_out:?}");
    assert!(api_out.is_ok(), "api → outside: {api_out:?}");
    // The node still reaches the held pod (kubelet probes), in check and in the kernel.
    assert_eq!(
        check(&file, "node:node-1", "prod/web").0,
        "allow",
        "own node → held pod"
    );
    assert!(w.node_connect(WEB_IP, 8080).is_ok(), "node → held web");

    // The agent names the object: file, kind, namespace/name, in its log and metrics.
    let logged = log();
    assert!(
        logged.lines().any(|l| l
            .contains(&format!("{}: NetworkPolicy prod/broken:", file.display()))
            && l.contains("held fail-closed")),
        "{logged}"
    );
    let metrics = w.http_get("/metrics");
    assert!(
        metrics.contains("sluice_agent_rejected_policies 1"),
        "{metrics}"
    );

    // Control: with the broken policy fixed in the same file, both let web through.
    let fixed = manifest().replace(
        "cidr: 10.0.0.0/8, except: [192.168.0.0/16]",
        "cidr: 192.168.0.0/16, except: [192.168.1.0/24]",
    );
    w.write_manifest("cluster.yaml", &fixed);
    assert_eq!(check(&file, &client, "prod/web").0, "allow");
    wait_for("web released", Duration::from_secs(10), || {
        w.client_connect(CLIENT_IP, WEB_IP, 8080).is_ok()
    });
    drop(agent);
}
