//! The lab's stand-in for kube-proxy (iptables mode), NodePort Services only.
//!
//! It installs the same nat rules kube-proxy does, so NodePort traffic meets sluice
//! exactly as it would on a real node: KUBE-SERVICES hooked into nat PREROUTING and
//! OUTPUT, KUBE-NODEPORTS for local destination addresses, a KUBE-EXT chain per
//! service port that marks for masquerade (`externalTrafficPolicy: Cluster`) or
//! sends to local endpoints only without masquerade (`Local`), KUBE-SVC/KUBE-SVL
//! picking an endpoint with `statistic`, KUBE-SEP doing the DNAT, and KUBE-POSTROUTING
//! masquerading marked packets (mark 0x4000). With `Local` and no local endpoint
//! the node drops the connection (kube-proxy's filter KUBE-EXTERNAL-SERVICES).
//!
//! It is a stand-in, not kube-proxy: no ClusterIPs, no KUBE-FORWARD accept rule, no
//! health-check node ports, no session affinity. Its chains are kube-proxy's, never
//! sluice's (`SLUICE-*`), and it only ever rewrites chains named KUBE-*.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::manifests::{self, NodePort, TargetPort};
use super::state::{LabPaths, LabState, PodState};
use super::{LabError, netns};

/// kube-proxy's masquerade mark bit.
pub const MASQ_MARK: &str = "0x4000";

/// kube-proxy names per-service chains with a hash of the service port; same idea.
fn chain(prefix: &str, key: &str) -> String {
    let h = hex::encode(Sha256::digest(key.as_bytes())).to_uppercase();
    format!("{prefix}-{}", &h[..16])
}

fn port_key(np: &NodePort) -> String {
    format!(
        "{}/{}:{}/{}",
        np.namespace,
        np.service,
        np.port_name,
        np.protocol.lower()
    )
}

/// An endpoint of a service port: a ready pod matching the selector, with the
/// target port resolved against that pod's declared ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: std::net::Ipv4Addr,
    pub port: u16,
    pub node: String,
}

pub fn endpoints(np: &NodePort, pods: &BTreeMap<String, PodState>) -> Vec<Endpoint> {
    if np.selector.is_empty() {
        return Vec::new();
    }
    pods.values()
        .filter(|p| p.namespace == np.namespace)
        .filter(|p| np.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .filter_map(|p| {
            let port = match &np.target {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => p
                    .ports
                    .iter()
                    .chain(p.unserved.iter())
                    .find(|d| d.name.as_deref() == Some(name) && d.protocol == np.protocol)
                    .map(|d| d.port),
            }?;
            Some(Endpoint {
                pod: p.key(),
                ip: p.ip,
                port,
                node: p.node.clone(),
            })
        })
        .collect()
}

/// The rules one node gets: `(nat, filter)` iptables-restore text (with `--noflush`
/// semantics: every chain listed is flushed and rewritten) and the chains it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub nat: String,
    pub filter: String,
    pub nat_chains: BTreeSet<String>,
}

fn statistic_rules(out: &mut Vec<String>, from: &str, seps: &[String], comment: &str) {
    let n = seps.len();
    for (i, sep) in seps.iter().enumerate() {
        let left = n - i;
        if left > 1 {
            out.push(format!(
                "-A {from} -m comment --comment \"{comment}\" -m statistic --mode random --probability {:.11} -j {sep}",
                1.0 / left as f64
            ));
        } else {
            out.push(format!(
                "-A {from} -m comment --comment \"{comment}\" -j {sep}"
            ));
        }
    }
}

/// Pure: render node `node`'s rules for these NodePorts and pods.
pub fn render(
    node: &str,
    node_ports: &[NodePort],
    pods: &BTreeMap<String, PodState>,
    pool: ipnet::Ipv4Net,
) -> Rendered {
    let mut chains: BTreeSet<String> = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut rules = vec![
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
        // clear the mark so a re-traversal (e.g. after encapsulation) is not masqueraded twice
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_string(),
    ];
    let mut filter_rules = Vec::new();
    let mut nodeport_rules = Vec::new();
    for np in node_ports {
        let key = port_key(np);
        let proto = np.protocol.lower();
        let eps = endpoints(np, pods);
        let svc = chain("KUBE-SVC", &key);
        let ext = chain("KUBE-EXT", &key);
        let mut seps = Vec::new();
        let mut local_seps = Vec::new();
        for ep in &eps {
            let sep = chain("KUBE-SEP", &format!("{key}/{}:{}", ep.ip, ep.port));
            chains.insert(sep.clone());
            rules.push(format!(
                "-A {sep} -m comment --comment \"{key}\" -s {}/32 -j KUBE-MARK-MASQ",
                ep.ip
            ));
            rules.push(format!(
                "-A {sep} -m comment --comment \"{key}\" -p {proto} -m {proto} -j DNAT --to-destination {}:{}",
                ep.ip, ep.port
            ));
            if ep.node == node {
                local_seps.push(sep.clone());
            }
            seps.push(sep);
        }
        if np.local && local_seps.is_empty() {
            // kube-proxy: no local endpoint, so the node itself refuses the traffic.
            filter_rules.push(format!(
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{key} has no local endpoints\" -m addrtype --dst-type LOCAL -p {proto} -m {proto} --dport {} -j DROP",
                np.node_port
            ));
        }
        if seps.is_empty() {
            continue;
        }
        chains.insert(svc.clone());
        chains.insert(ext.clone());
        statistic_rules(&mut rules, &svc, &seps, &key);
        nodeport_rules.push(format!(
            "-A KUBE-NODEPORTS -m comment --comment \"{key}\" -p {proto} -m {proto} --dport {} -j {ext}",
            np.node_port
        ));
        if np.local {
            let svl = chain("KUBE-SVL", &key);
            rules.push(format!(
                "-A {ext} -s {pool} -m comment --comment \"pod traffic for {key} external destinations\" -j {svc}"
            ));
            rules.push(format!(
                "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {key} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
            ));
            rules.push(format!(
                "-A {ext} -m comment --comment \"route LOCAL traffic for {key} external destinations\" -m addrtype --src-type LOCAL -j {svc}"
            ));
            if local_seps.is_empty() {
                // dropped in filter (above) before it gets here from outside
                continue;
            }
            chains.insert(svl.clone());
            rules.push(format!("-A {ext} -j {svl}"));
            statistic_rules(&mut rules, &svl, &local_seps, &key);
        } else {
            rules.push(format!(
                "-A {ext} -m comment --comment \"masquerade traffic for {key} external destinations\" -j KUBE-MARK-MASQ"
            ));
            rules.push(format!("-A {ext} -j {svc}"));
        }
    }
    rules.extend(nodeport_rules);
    rules.push("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".to_string());

    let mut nat = String::from("*nat\n");
    for c in &chains {
        nat.push_str(&format!(":{c} - [0:0]\n"));
    }
    for r in &rules {
        nat.push_str(r);
        nat.push('\n');
    }
    nat.push_str("COMMIT\n");
    let mut filter = String::from("*filter\n:KUBE-EXTERNAL-SERVICES - [0:0]\n");
    for r in &filter_rules {
        filter.push_str(r);
        filter.push('\n');
    }
    filter.push_str("COMMIT\n");
    Rendered {
        nat,
        filter,
        nat_chains: chains,
    }
}

/// The jumps kube-proxy keeps at the top of the built-in chains.
const JUMPS: &[(&str, &str, &str, &str)] = &[
    (
        "nat",
        "PREROUTING",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    ),
    (
        "filter",
        "INPUT",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
];

fn ensure_jumps(ns: &str) -> Result<(), LabError> {
    for (table, builtin, comment, target) in JUMPS {
        let mut spec = vec!["-m", "comment", "--comment", comment];
        if *table == "filter" {
            spec.extend(["-m", "conntrack", "--ctstate", "NEW"]);
        }
        spec.extend(["-j", target]);
        let mut check = vec!["-w", "-t", table, "-C", builtin];
        check.extend(&spec);
        if netns::run_in(ns, "iptables", &check).is_err() {
            let mut insert = vec!["-w", "-t", table, "-I", builtin, "1"];
            insert.extend(&spec);
            netns::run_in(ns, "iptables", &insert)?;
        }
    }
    Ok(())
}

/// KUBE-* per-service chains now in the node's nat table.
fn existing_service_chains(ns: &str) -> Result<BTreeSet<String>, LabError> {
    let out = netns::run_in(ns, "iptables-save", &["-t", "nat"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| {
            ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-SEP-"]
                .iter()
                .any(|p| c.starts_with(p))
        })
        .map(str::to_string)
        .collect())
}

/// Every NodePort Service in the lab's manifests directory.
pub fn all_node_ports(paths: &LabPaths) -> Result<Vec<NodePort>, LabError> {
    let mut files: Vec<_> = std::fs::read_dir(paths.manifests())
        .map_err(|e| LabError::io(&paths.manifests(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with("Service_") && f.ends_with(".yaml"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for o in manifests::load(&files)? {
        out.extend(manifests::service_node_ports(&o)?);
    }
    Ok(out)
}

/// Bring every node's kube-proxy rules in line with the Services and pods: one
/// `iptables-restore --noflush` per table per node. A lab that never had a Service
/// gets no KUBE-* chains at all.
pub fn sync(st: &LabState, paths: &LabPaths) -> Result<(), LabError> {
    let nps = all_node_ports(paths)?;
    for node in &st.nodes {
        let stale = existing_service_chains(&node.netns)?;
        if nps.is_empty() && stale.is_empty() {
            continue;
        }
        let r = render(&node.name, &nps, &st.pods, st.pool);
        let mut nat = r.nat.trim_end_matches("COMMIT\n").to_string();
        for c in stale.difference(&r.nat_chains) {
            nat.push_str(&format!("-X {c}\n"));
        }
        nat.push_str("COMMIT\n");
        // chains to delete must be flushed (declared) first
        let decl: String = stale
            .difference(&r.nat_chains)
            .map(|c| format!(":{c} - [0:0]\n"))
            .collect();
        let nat = nat.replacen("*nat\n", &format!("*nat\n{decl}"), 1);
        netns::run_in_input(&node.netns, "iptables-restore", &["-w", "--noflush"], &nat)?;
        netns::run_in_input(
            &node.netns,
            "iptables-restore",
            &["-w", "--noflush"],
            &r.filter,
        )?;
        // jumps last: their target chains exist now
        ensure_jumps(&node.netns)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::state::{DeclaredPort, Protocol};

    fn pod(ns: &str, name: &str, ip: &str, node: &str, app: &str) -> PodState {
        PodState {
            namespace: ns.into(),
            name: name.into(),
            uid: "u".into(),
            node: node.into(),
            netns: format!("l-{ns}-{name}"),
            container_id: "c".into(),
            ip: ip.parse().unwrap(),
            ports: vec![DeclaredPort {
                port: 8080,
                protocol: Protocol::Tcp,
                name: Some("http".into()),
            }],
            labels: [("app".to_string(), app.to_string())].into(),
            server_pid: None,
            unserved: vec![],
            extra_servers: vec![],
        }
    }

    fn np(local: bool) -> NodePort {
        NodePort {
            namespace: "foo".into(),
            service: "web".into(),
            port_name: "".into(),
            protocol: Protocol::Tcp,
            node_port: 30080,
            target: TargetPort::Name("http".into()),
            local,
            selector: [("app".to_string(), "web".to_string())].into(),
        }
    }

    fn pods() -> BTreeMap<String, PodState> {
        let mut m = BTreeMap::new();
        for p in [
            pod("foo", "web-1", "10.244.1.2", "node-1", "web"),
            pod("foo", "other", "10.244.1.3", "node-1", "db"),
            pod("bar", "web-2", "10.244.2.2", "node-2", "web"),
        ] {
            m.insert(p.key(), p);
        }
        m
    }

    #[test]
    fn endpoints_are_selected_pods_in_the_service_namespace_with_named_ports_resolved() {
        let eps = endpoints(&np(false), &pods());
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].pod, "foo/web-1");
        assert_eq!(eps[0].port, 8080);
    }

    #[test]
    fn cluster_policy_masquerades_and_dnats_on_every_node() {
        let r = render(
            "node-2",
            &[np(false)],
            &pods(),
            "10.244.0.0/16".parse().unwrap(),
        );
        assert!(r.nat.contains("--dport 30080 -j KUBE-EXT-"), "{}", r.nat);
        assert!(r.nat.contains("external destinations\" -j KUBE-MARK-MASQ"));
        assert!(r.nat.contains("-j DNAT --to-destination 10.244.1.2:8080"));
        assert!(!r.filter.contains("DROP"));
    }

    #[test]
    fn local_policy_never_masquerades_outside_traffic_and_uses_only_local_endpoints() {
        let pool = "10.244.0.0/16".parse().unwrap();
        let on_pod_node = render("node-1", &[np(true)], &pods(), pool);
        let ext_rules: Vec<&str> = on_pod_node
            .nat
            .lines()
            .filter(|l| l.starts_with("-A KUBE-EXT-"))
            .collect();
        // outside sources go straight to KUBE-SVL; only node-local sources are marked
        assert!(ext_rules.iter().any(|l| l.contains("-j KUBE-SVL-")));
        for l in &ext_rules {
            if l.contains("KUBE-MARK-MASQ") {
                assert!(l.contains("--src-type LOCAL"), "{l}");
            }
        }
        let elsewhere = render("node-2", &[np(true)], &pods(), pool);
        assert!(!elsewhere.nat.contains("KUBE-SVL-"));
        assert!(elsewhere.filter.contains("has no local endpoints"));
        assert!(elsewhere.filter.contains("--dport 30080 -j DROP"));
    }

    #[test]
    fn rendering_is_deterministic_and_only_touches_kube_chains() {
        let pool = "10.244.0.0/16".parse().unwrap();
        let a = render("node-1", &[np(false), np(true)], &pods(), pool);
        let b = render("node-1", &[np(false), np(true)], &pods(), pool);
        assert_eq!(a, b);
        for l in a.nat.lines().chain(a.filter.lines()) {
            if let Some(c) = l.strip_prefix(':').or_else(|| l.strip_prefix("-A ")) {
                assert!(c.starts_with("KUBE-"), "{l}");
            }
        }
    }
}
