//! `sluicectl lab status`: nodes (uplink, agent health), pods (node, address, ports
//! served), outside hosts.

use std::process::ExitCode;

use serde_json::json;

use super::{Output, agents, netns, state};

#[derive(clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub name: String,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The address the agent gave the node's tunnel device (`tunl0` or `sluice.vxlan`):
/// the source of traffic the node forwards into the tunnel after masquerade.
pub fn tunnel_ip(ns: &str) -> Option<String> {
    for dev in ["tunl0", "sluice.vxlan"] {
        let Ok(out) = netns::run_in(ns, "ip", &["-4", "-o", "addr", "show", "dev", dev]) else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(a) = text
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
        {
            return Some(a.to_string());
        }
    }
    None
}

pub fn exec(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let st = state::load(&args.name)?;
    let nodes: Vec<_> = st
        .nodes
        .iter()
        .map(|n| {
            let h = if st.agents {
                agents::health(n)
            } else {
                agents::Health {
                    running: false,
                    ready: false,
                    reason: "lab made without agents".into(),
                    dataplane: None,
                }
            };
            (n, h)
        })
        .collect();
    let all_ready = nodes.iter().all(|(_, h)| h.ready);
    match args.output {
        Output::Json => {
            let v = json!({
                "name": st.name,
                "encap": st.encap.as_str(),
                "dataplaneRequested": st.dataplane.as_str(),
                "sctp": super::serve::sctp_supported(),
                "pool": st.pool.to_string(),
                "underlay": st.underlay_cidr.to_string(),
                "gateway": st.gateway.to_string(),
                "nodes": nodes.iter().map(|(n, h)| json!({
                    "name": n.name, "netns": n.netns, "uplinkIP": n.uplink_ip.to_string(),
                    "tunnelIP": tunnel_ip(&n.netns),
                    "agent": h,
                })).collect::<Vec<_>>(),
                "pods": st.pods.values().map(|p| json!({
                    "namespace": p.namespace, "name": p.name, "node": p.node,
                    "ip": p.ip.to_string(), "netns": p.netns, "labels": p.labels,
                    "ports": p.ports, "unservedPorts": p.unserved,
                })).collect::<Vec<_>>(),
                "externals": st.externals.values().map(|e| json!({
                    "address": e.addr.to_string(), "netns": e.netns,
                    "ports": e.servers.iter().map(|s| format!("{}/{}", s.protocol, s.port)).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            println!(
                "lab {}: encapsulation {}, pool {}, underlay {}",
                st.name,
                st.encap.as_str(),
                st.pool,
                st.underlay_cidr
            );
            println!("NODE      UPLINK           NETNS                     AGENT");
            for (n, h) in &nodes {
                let mut agent = if h.ready {
                    "ready".to_string()
                } else {
                    format!("not ready: {}", h.reason)
                };
                if let Some(d) = &h.dataplane {
                    agent.push_str(&format!(", {d}"));
                }
                println!(
                    "{:9} {:16} {:25} {agent}",
                    n.name,
                    n.uplink_ip.to_string(),
                    n.netns
                );
            }
            if !st.pods.is_empty() {
                println!("\nPOD                  NODE      IP               PORTS");
                for p in st.pods.values() {
                    let ports: Vec<String> = p
                        .ports
                        .iter()
                        .map(|d| format!("{}/{}", d.protocol, d.port))
                        .chain(
                            p.unserved
                                .iter()
                                .map(|d| format!("{}/{}(unserved)", d.protocol, d.port)),
                        )
                        .collect();
                    println!(
                        "{:20} {:9} {:16} {}",
                        p.key(),
                        p.node,
                        p.ip.to_string(),
                        ports.join(",")
                    );
                }
            }
            if !st.externals.is_empty() {
                println!("\nOUTSIDE HOST     NETNS");
                for e in st.externals.values() {
                    println!("{:16} {}", e.addr.to_string(), e.netns);
                }
            }
        }
    }
    Ok(if all_ready || !st.agents {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
