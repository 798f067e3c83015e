//! What the compiler's sets hold: pod addresses per selector, named ports per pod,
//! and ipBlocks as hash:net members. Precomputed per cluster, so set contents cost
//! O(pods) per set.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::dataplane::SetMember;
use crate::model::{Cluster, ClusterPeer, IpBlock, Pod, PodPeer, Protocol};
use crate::selector::LabelSelector;

pub(super) fn v4(ip: &IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    }
}

/// Precomputed lookups over the cluster, so set contents cost O(pods) per set rather
/// than re-deriving namespace labels for every pod.
pub(super) struct Index<'a> {
    pub(super) cluster: &'a Cluster,
    /// Non-hostNetwork pods by namespace.
    pods_by_ns: BTreeMap<&'a str, Vec<&'a Pod>>,
}

impl<'a> Index<'a> {
    pub(super) fn new(cluster: &'a Cluster) -> Self {
        // Pods come in key order, namespace first: one namespace's pods are a run,
        // gathered before one map insert (not a map lookup for each of 10,000 pods).
        let mut pods_by_ns: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        let mut run: Option<(&str, Vec<&Pod>)> = None;
        for pod in cluster.pods.values().filter(|p| !p.host_network) {
            let pod: &Pod = pod;
            match &mut run {
                Some((ns, pods)) if *ns == pod.namespace => pods.push(pod),
                _ => {
                    if let Some((ns, pods)) = run.replace((&pod.namespace, vec![pod])) {
                        pods_by_ns.entry(ns).or_default().extend(pods);
                    }
                }
            }
        }
        if let Some((ns, pods)) = run {
            pods_by_ns.entry(ns).or_default().extend(pods);
        }
        Index {
            cluster,
            pods_by_ns,
        }
    }

    pub(super) fn pod_peer_members(&self, policy_ns: &str, peer: &PodPeer) -> BTreeSet<SetMember> {
        let mut members = BTreeSet::new();
        for (ns, pods) in &self.pods_by_ns {
            let in_scope = match &peer.namespaces {
                crate::model::NamespaceScope::PolicyNamespace => *ns == policy_ns,
                crate::model::NamespaceScope::Matching(sel) => {
                    sel.matches(&self.cluster.namespace_labels(ns))
                }
            };
            if !in_scope {
                continue;
            }
            for pod in pods.iter().filter(|p| peer.pods.matches(&p.labels)) {
                members.extend(pod.ips.iter().filter_map(v4).map(SetMember::Ip));
            }
        }
        members
    }

    /// The IPv4 addresses and networks a ClusterNetworkPolicy peer names, as the
    /// evaluator's `cluster_peer_matches` reads it: pods (never hostNetwork) by
    /// namespace and pod labels, nodes' addresses by node labels, CIDRs; domain
    /// names match nothing. One reader for both compiled forms.
    pub(super) fn cluster_peer_addresses(
        &self,
        peer: &ClusterPeer,
    ) -> (Vec<Ipv4Addr>, Vec<Ipv4Net>) {
        let cluster = self.cluster;
        let pod_ips = |ns: &LabelSelector, sel: Option<&LabelSelector>| -> Vec<Ipv4Addr> {
            self.pods_by_ns
                .iter()
                .filter(|(name, _)| ns.matches(&cluster.namespace_labels(name)))
                .flat_map(|(_, pods)| pods.iter())
                .filter(|p| sel.is_none_or(|s| s.matches(&p.labels)))
                .flat_map(|p| p.ips.iter().filter_map(v4))
                .collect()
        };
        match peer {
            ClusterPeer::Namespaces(ns) => (pod_ips(ns, None), Vec::new()),
            ClusterPeer::Pods { namespaces, pods } => (pod_ips(namespaces, Some(pods)), Vec::new()),
            ClusterPeer::Nodes(sel) => {
                let ips = cluster
                    .nodes
                    .values()
                    .filter(|n| sel.matches(&cluster.labels_of_node(&n.name)))
                    .flat_map(|n| n.addresses.iter().filter_map(v4))
                    .collect();
                (ips, Vec::new())
            }
            ClusterPeer::Networks(nets) => {
                let nets = nets
                    .iter()
                    .filter_map(|n| match n {
                        IpNet::V4(n) => Some(*n),
                        IpNet::V6(_) => None,
                    })
                    .collect();
                (Vec::new(), nets)
            }
            ClusterPeer::DomainNames(_) => (Vec::new(), Vec::new()),
        }
    }

    pub(super) fn named_port_members(&self, name: &str, protocol: Protocol) -> BTreeSet<SetMember> {
        let mut members = BTreeSet::new();
        for pod in self.pods_by_ns.values().flatten() {
            for port in pod.resolve_named_port(name, protocol) {
                for ip in pod.ips.iter().filter_map(v4) {
                    members.insert(SetMember::IpPort { ip, protocol, port });
                }
            }
        }
        members
    }
}

/// The hash:net members of an ipBlock: the CIDR (split in two halves when it is /0,
/// which hash:net cannot hold) and each except as `nomatch`. An except equal to a
/// positive entry removes it instead (ipset refuses one net both ways).
pub(super) fn ip_block_members(cidr: Ipv4Net, except: &[Ipv4Net]) -> BTreeSet<SetMember> {
    let mut nets: BTreeMap<Ipv4Net, bool> = BTreeMap::new();
    let positives: Vec<Ipv4Net> = if cidr.prefix_len() == 0 {
        vec![
            Ipv4Net::new(Ipv4Addr::new(0, 0, 0, 0), 1).expect("valid /1"),
            Ipv4Net::new(Ipv4Addr::new(128, 0, 0, 0), 1).expect("valid /1"),
        ]
    } else {
        vec![cidr.trunc()]
    };
    for p in positives {
        nets.insert(p, false);
    }
    for e in except {
        let e = e.trunc();
        if nets.get(&e) == Some(&false) {
            nets.remove(&e);
        } else if e.prefix_len() > 0 {
            nets.insert(e, true);
        }
        // An except of /0 would leave nothing: no positive survives it.
        if e.prefix_len() == 0 {
            nets.clear();
            break;
        }
    }
    // A nomatch entry with no positive around it can never matter; drop it so the set
    // stays minimal (and so an all-excepted block is an empty set).
    let positives: Vec<Ipv4Net> = nets
        .iter()
        .filter(|(_, nomatch)| !**nomatch)
        .map(|(n, _)| *n)
        .collect();
    nets.into_iter()
        .filter(|(n, nomatch)| !*nomatch || positives.iter().any(|p| p.contains(n)))
        .map(|(net, nomatch)| SetMember::Net { net, nomatch })
        .collect()
}

pub(super) fn v4_excepts(block: &IpBlock) -> Vec<Ipv4Net> {
    block
        .except
        .iter()
        .filter_map(|e| match e {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn members(cidr: &str, except: &[&str]) -> Vec<String> {
        let except: Vec<Ipv4Net> = except.iter().map(|e| net(e)).collect();
        ip_block_members(net(cidr), &except)
            .into_iter()
            .map(|m| match m {
                SetMember::Net { net, nomatch } => {
                    format!("{net}{}", if nomatch { " nomatch" } else { "" })
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn ip_block_except_becomes_nomatch() {
        assert_eq!(
            members("172.16.0.0/16", &["172.16.8.0/24"]),
            ["172.16.0.0/16", "172.16.8.0/24 nomatch"]
        );
    }

    #[test]
    fn slash_zero_is_split_because_hash_net_cannot_hold_it() {
        assert_eq!(
            members("0.0.0.0/0", &["10.0.0.0/8"]),
            ["0.0.0.0/1", "10.0.0.0/8 nomatch", "128.0.0.0/1"]
        );
    }

    #[test]
    fn an_except_equal_to_a_half_removes_that_half() {
        assert_eq!(members("0.0.0.0/0", &["128.0.0.0/1"]), ["0.0.0.0/1"]);
    }

    #[test]
    fn host_bits_in_a_cidr_are_truncated() {
        assert_eq!(members("10.1.2.3/8", &[]), ["10.0.0.0/8"]);
    }
}
