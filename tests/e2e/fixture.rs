//! What a scenario's cluster files say: its nodes and their addresses, its pods,
//! where they run and the addresses they have. Read once, used by the layout (what
//! the lab makes of it) and the scenario runner (what it probes).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::Value;

/// The objects of a YAML text, `List`s flattened.
pub fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(de).expect("valid YAML");
        if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
            out.extend(v["items"].as_array().cloned().unwrap_or_default());
        } else if !v.is_null() {
            out.push(v);
        }
    }
    out
}

/// What a scenario's cluster files say: node names in order, node addresses, and
/// each pod's fixed address and node.
#[derive(Debug, Default, Clone)]
pub struct Fixture {
    pub nodes: Vec<String>,
    /// Every pod, `ns/name`, in file order.
    pub pods: Vec<String>,
    /// Every IPv4 address of every node.
    pub node_ips: Vec<String>,
    /// Each node's first IPv4 address (what `lab up --node-ips` gives it).
    pub node_ip: BTreeMap<String, Ipv4Addr>,
    pub pod_ips: BTreeMap<String, String>,
    /// `spec.nodeName` of each pod that names one (the scenario's node name).
    pub pod_nodes: BTreeMap<String, String>,
}

pub fn fixture(cluster: &[PathBuf]) -> Fixture {
    let mut fx = Fixture::default();
    for f in cluster {
        for v in documents(&std::fs::read_to_string(f).unwrap()) {
            match v["kind"].as_str() {
                Some("Node") => {
                    let name = v["metadata"]["name"].as_str().unwrap().to_string();
                    for a in v["status"]["addresses"].as_array().into_iter().flatten() {
                        if let Some(ip) = a["address"]
                            .as_str()
                            .and_then(|s| s.parse::<Ipv4Addr>().ok())
                        {
                            fx.node_ips.push(ip.to_string());
                            fx.node_ip.entry(name.clone()).or_insert(ip);
                        }
                    }
                    fx.nodes.push(name);
                }
                Some("Pod") => {
                    let ns = v["metadata"]["namespace"].as_str().unwrap_or("default");
                    let name = v["metadata"]["name"].as_str().unwrap();
                    let key = format!("{ns}/{name}");
                    if let Some(ip) = v["status"]["podIP"].as_str() {
                        fx.pod_ips.insert(key.clone(), ip.to_string());
                    }
                    if let Some(n) = v["spec"]["nodeName"].as_str() {
                        fx.pod_nodes.insert(key.clone(), n.to_string());
                    }
                    fx.pods.push(key);
                }
                _ => {}
            }
        }
    }
    fx
}

impl Fixture {
    /// Scenario node name → lab node name.
    pub fn node_map(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), format!("node-{}", i + 1)))
            .collect()
    }

    pub fn map_node(&self, name: &str) -> String {
        self.node_map()
            .into_iter()
            .find(|(a, _)| a == name)
            .map(|(_, b)| b)
            .unwrap_or_else(|| name.to_string())
    }
}
