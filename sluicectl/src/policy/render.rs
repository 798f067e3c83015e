//! `sluicectl policy render [-f PATH ...] --node NAME`: the `ipset restore` and
//! `iptables-restore --noflush -w` text of everything the agent programs on that
//! node (policy chains, tunnel guard, NAT outgoing, held pods), and the jumps it
//! keeps at the top of the built-in chains. The rules come from the same function
//! the agent calls ([`node_ruleset`]), with the agent's settings given by the flags
//! of the same names and defaults as `sluice-agent run`.
//!
//! The default output is both texts under `#` comment lines (both tools skip them);
//! `--only ipset` or `--only iptables` prints one text alone, ready to pipe.
//! `--dataplane nftables` prints instead the `nft -f` text of sluice's table, the
//! agent's nftables form of the same node (`sluice-agent run --dataplane nftables`).

use std::net::Ipv4Addr;
use std::process::ExitCode;

use anyhow::Context;
use std::collections::BTreeMap;

use sluice_policy::compile::Ruleset;
use sluice_policy::dataplane::DataplaneKind;
use sluice_policy::dataplane::node::{NodeSettings, TunnelFilter, node_ruleset};
use sluice_policy::model::{Cluster, Peer, Peers, PortMatch, Ports};
use sluice_policy::names::{self, Direction};
use sluice_policy::render::{ipset, iptables, nft};
use sluice_policy::veth_names::VethNames;

const AFTER_HELP: &str = "\
Apply order on a node: the ipset text, then the iptables text, then (once) the jumps.
Interfaces are named as the CNI plugin names them (slc + namespace hash + pod hash);
a pod not in the input whose namespace has a policy is dropped until it is known.
--pool, --encapsulation, --vxlan-port, --nat-outgoing and --node-ip mean what they mean
to `sluice-agent run` and have its defaults: give the agent's values to see exactly
what it programs.";

/// The VXLAN port the agent uses unless told otherwise (`sluice-agent run --vxlan-port`).
const DEFAULT_VXLAN_PORT: u16 = 4799;

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    #[command(flatten)]
    source: super::Source,
    /// The node whose rules to print (its pods are those with this spec.nodeName).
    #[arg(long, value_name = "NAME")]
    node: String,
    /// Print only one of the two texts.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// The cluster pod pool (the agent's --pool).
    #[arg(long, value_name = "CIDR", default_value = "10.244.0.0/16")]
    pool: ipnet::Ipv4Net,
    /// Encapsulation between nodes, which the tunnel guard filters (the agent's
    /// --encapsulation).
    #[arg(long, alias = "encap", value_enum, default_value_t = Encapsulation::Ipip)]
    encapsulation: Encapsulation,
    /// VXLAN UDP port (the agent's --vxlan-port).
    #[arg(long, default_value_t = DEFAULT_VXLAN_PORT)]
    vxlan_port: u16,
    /// Masquerade pod traffic leaving the pool (the agent's --nat-outgoing).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    nat_outgoing: bool,
    /// This node's address, instead of its Node object's (the agent's --node-ip).
    #[arg(long, value_name = "IPV4")]
    node_ip: Option<Ipv4Addr>,
    /// Which dataplane's text: iptables (ipset + iptables-restore) or nftables (the
    /// `nft -f` text of sluice's table). The agent's --dataplane, resolved.
    #[arg(long, value_enum, default_value_t = Dataplane::Iptables)]
    dataplane: Dataplane,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Dataplane {
    Iptables,
    Nftables,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Only {
    Ipset,
    Iptables,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Encapsulation {
    Ipip,
    Vxlan,
    None,
}

impl Args {
    fn settings(&self) -> NodeSettings {
        NodeSettings {
            node: self.node.clone(),
            pool: self.pool,
            tunnel: match self.encapsulation {
                Encapsulation::Ipip => TunnelFilter::Ipip,
                Encapsulation::Vxlan => TunnelFilter::Vxlan {
                    port: self.vxlan_port,
                },
                Encapsulation::None => TunnelFilter::None,
            },
            nat_outgoing: self.nat_outgoing,
            node_ip: self.node_ip,
            dataplane: match self.dataplane {
                Dataplane::Iptables => DataplaneKind::Iptables,
                Dataplane::Nftables => DataplaneKind::Nftables,
            },
        }
    }
}

pub fn exec(args: Args) -> anyhow::Result<ExitCode> {
    let (cluster, warnings) = super::load_cluster(&args.source)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    for (key, rejected) in &cluster.rejected_policies {
        let kind = if key.is_cluster_scoped() {
            "ClusterNetworkPolicy"
        } else {
            "NetworkPolicy"
        };
        eprintln!(
            "warning: {kind} {key} cannot be enforced ({}); the pods it selects are held fail-closed",
            rejected.reason
        );
    }
    let known = cluster.nodes.contains_key(&args.node)
        || cluster
            .pods
            .values()
            .any(|p| p.node.as_deref() == Some(args.node.as_str()));
    if !known {
        eprintln!(
            "warning: no Node and no pod names node {:?}: only the node-wide rules are printed",
            args.node
        );
    }
    let ruleset = node_ruleset(&cluster, &args.settings(), &VethNames)
        .with_context(|| format!("compiling the rules of node {}", args.node))?;
    if args.dataplane == Dataplane::Nftables {
        if args.only.is_some() {
            anyhow::bail!("--only picks one of the iptables dataplane's texts; nftables has one");
        }
        print!("{}", nft::render(&ruleset));
        return Ok(ExitCode::SUCCESS);
    }
    let out = match args.only {
        Some(Only::Ipset) => ipset::render(&ruleset),
        Some(Only::Iptables) => iptables::render(&ruleset),
        None => {
            let mut out = format!(
                "# node {}: {} chains, {} rules, {} sets, {} set members\n",
                args.node,
                ruleset.chain_count(),
                ruleset.rule_count(),
                ruleset.sets.len(),
                ruleset.set_member_count()
            );
            for (name, what) in legend(&cluster, &ruleset) {
                out.push_str(&format!("# {name}: {what}\n"));
            }
            out.push_str("# --- ipset restore ---\n");
            out.push_str(&ipset::render(&ruleset));
            out.push_str("# --- iptables-restore --noflush -w ---\n");
            out.push_str(&iptables::render(&ruleset));
            out.push_str("# --- jumps the agent keeps at the top of built-in chains ---\n");
            for j in iptables::builtin_jump_specs(&ruleset) {
                out.push_str(&format!(
                    "# iptables -t {} -I {} 1 {}\n",
                    j.table.as_str(),
                    j.chain,
                    j.spec
                ));
            }
            out
        }
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// What each hashed chain and set name stands for, for people reading the text.
fn legend(cluster: &Cluster, ruleset: &Ruleset) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut note = |name: String, what: String| {
        let present = ruleset.sets.contains_key(&name)
            || ruleset.tables.values().any(|t| t.contains_key(&name));
        if present {
            out.entry(name).or_insert(what);
        }
    };
    for policy in cluster.policies.values() {
        let key = policy.key();
        note(
            names::policy_chain(&key, Direction::Ingress),
            format!("ingress rules of policy {key}"),
        );
        note(
            names::policy_chain(&key, Direction::Egress),
            format!("egress rules of policy {key}"),
        );
        for rule in policy.ingress.iter().chain(&policy.egress) {
            if let Peers::Listed(peers) = &rule.peers {
                for peer in peers {
                    match peer {
                        Peer::Pods(pp) => note(
                            names::pod_peer_set(&policy.namespace, pp),
                            format!("pods named by a peer of {key}"),
                        ),
                        Peer::IpBlock(b) => note(
                            names::ip_block_set(b),
                            if b.except.is_empty() {
                                format!("ipBlock {} of {key}", b.cidr)
                            } else {
                                let except: Vec<String> =
                                    b.except.iter().map(|e| e.to_string()).collect();
                                format!("ipBlock {} except {} of {key}", b.cidr, except.join(","))
                            },
                        ),
                    }
                }
            }
            if let Ports::Listed(ports) = &rule.ports {
                for p in ports {
                    if let PortMatch::Named(n) = &p.port {
                        note(
                            names::named_port_set(n, p.protocol),
                            format!("pods declaring port {n}/{}", p.protocol),
                        );
                    }
                }
            }
        }
    }
    out
}
