//! Names of the chains and ipsets sluice owns, and the hashes that identify them.
//!
//! Every object carries the `SLUICE-` prefix so the agent can find (and only touch)
//! its own. iptables chain names are limited to 28 characters (`XT_EXTENSION_MAXNAMELEN`
//! 29 with the NUL), ipset names to 31 (`IPSET_MAXNAMELEN` 32). Names derived from user
//! objects (policy keys, selectors, CIDRs) are a fixed-length hash of a canonical,
//! unambiguous encoding, so equal objects share one chain or set and the length bound
//! holds whatever the user wrote.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::model::{IpBlock, NamespaceScope, NamespacedName, PodPeer, Protocol, Tier};
use crate::selector::{LabelSelector, Operator};

/// Prefix of every chain and ipset sluice owns.
pub const PREFIX: &str = "SLUICE-";
/// Longest iptables chain name the kernel accepts.
pub const MAX_CHAIN_LEN: usize = 28;
/// Longest ipset name the kernel accepts.
pub const MAX_SET_LEN: usize = 31;

/// Jumped to from the built-in `FORWARD`: picks out traffic to or from pod interfaces.
pub const CHAIN_FORWARD: &str = "SLUICE-FORWARD";
/// Jumped to from the built-in `INPUT`: picks out traffic from pods to the node.
pub const CHAIN_INPUT: &str = "SLUICE-INPUT";
/// Forwarded traffic that touches a pod interface: conntrack, then egress, then ingress.
pub const CHAIN_FWD_POD: &str = "SLUICE-FWD-POD";
/// Pod → node traffic: conntrack, then egress.
pub const CHAIN_IN_POD: &str = "SLUICE-IN-POD";
/// Egress dispatch: `-i <veth>` → the pod's egress chain (with anti-spoofing).
pub const CHAIN_FROM_POD: &str = "SLUICE-FROM-POD";
/// Ingress dispatch: `-o <veth>` → the pod's ingress chain.
pub const CHAIN_TO_POD: &str = "SLUICE-TO-POD";

/// Interface-name prefixes of every sluice pod interface: `slc` for Kubernetes pods,
/// `slx` for containers outside Kubernetes (the naming rule's own constant).
pub use sluice_node_files::ifname::POD_IFACE_PREFIXES;

/// 64 bits of SHA-256 of `data`, as 16 lowercase hex digits. Stable across platforms
/// and releases (unlike `std`'s hasher), which byte-for-byte determinism needs.
pub fn hash16(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut out = String::with_capacity(16);
    for byte in &digest[..8] {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Direction of a policy chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

/// The chain of a group of local pods (iptables form) whose chain of `direction`
/// is the same: selected by the same NetworkPolicies `policies` (in key order), in
/// the same ClusterNetworkPolicy tier group chains (`admin`, and `baseline` when no
/// NetworkPolicy isolates them), with allowed connections logged or not
/// (`log_allowed`): `SLUICE-TW-<hash>` ("to workload") / `SLUICE-FW-<hash>` ("from
/// workload"). Nothing of a pod is in it, so a new pod joining an existing group
/// adds no chain, only members of [`pod_group_set`].
pub fn pod_group_chain(
    direction: Direction,
    policies: &[NamespacedName],
    admin: Option<&str>,
    baseline: Option<&str>,
    log_allowed: bool,
) -> String {
    let kind = match direction {
        Direction::Ingress => "TW",
        Direction::Egress => "FW",
    };
    let mut key = String::from("pod-group|");
    for p in policies {
        push_str(&mut key, &p.namespace);
        push_str(&mut key, &p.name);
    }
    for tier in [admin, baseline] {
        key.push('|');
        push_str(&mut key, tier.unwrap_or(""));
    }
    key.push_str(if log_allowed { "|log" } else { "|" });
    format!("{PREFIX}{kind}-{}", hash16(key.as_bytes()))
}

/// The hash:net,iface set whose members are sent to the pod group chain `chain` of
/// `direction` ([`pod_group_chain`]) by the dispatch chain: `SLUICE-TD-<hash>` /
/// `SLUICE-FD-<hash>`.
pub fn pod_group_set(direction: Direction, chain: &str) -> String {
    let kind = match direction {
        Direction::Ingress => "TD",
        Direction::Egress => "FD",
    };
    format!("{PREFIX}{kind}-{}", hash16(chain.as_bytes()))
}

/// One shard of the hash:net,iface sets of every local pod's veth (any address):
/// what the dispatch's spoofed-source drop matches, after every pod's own addresses
/// went to its group chain. `SLUICE-POD-VETHS-<shard>`.
pub fn pod_veths_set(shard: usize) -> String {
    format!("{PREFIX}POD-VETHS-{shard}")
}

/// The chain holding one policy's rules for one direction, shared by every local pod
/// the policy selects: `SLUICE-PI-<hash>` / `SLUICE-PE-<hash>` of `namespace/name`.
pub fn policy_chain(policy: &NamespacedName, direction: Direction) -> String {
    let kind = match direction {
        Direction::Ingress => "PI",
        Direction::Egress => "PE",
    };
    let mut key = String::new();
    push_str(&mut key, &policy.namespace);
    push_str(&mut key, &policy.name);
    format!("{PREFIX}{kind}-{}", hash16(key.as_bytes()))
}

/// The chain of a ClusterNetworkPolicy tier of a group of local pods (nftables flat
/// form) isolated in `direction` by the same `policies` and, for ingress, resolving
/// the named ports those policies reference to the same numbers (`named`: name,
/// protocol, ports): `SLUICE-GI-<hash>` / `SLUICE-GE-<hash>`. Its sets are named by
/// [`flat_set`].
pub fn group_chain(
    direction: Direction,
    policies: &[NamespacedName],
    named: &[(String, Protocol, Vec<u16>)],
) -> String {
    let kind = match direction {
        Direction::Ingress => "GI",
        Direction::Egress => "GE",
    };
    let mut key = String::new();
    for p in policies {
        push_str(&mut key, &p.namespace);
        push_str(&mut key, &p.name);
    }
    key.push('|');
    for (name, protocol, ports) in named {
        push_str(&mut key, name);
        push_str(&mut key, protocol.as_str());
        for port in ports {
            let _ = write!(key, "{port},");
        }
        key.push(';');
    }
    format!("{PREFIX}{kind}-{}", hash16(key.as_bytes()))
}

/// Where an opted-in pod's allowed connections go before they are allowed: new ones
/// logged (`deny_log::allow_log_chain`), then back to the caller, allowed.
pub const CHAIN_ALLOW_LOG_INGRESS: &str = "SLUICE-ALLOW-LOG-I";
/// The egress counterpart of [`CHAIN_ALLOW_LOG_INGRESS`].
pub const CHAIN_ALLOW_LOG_EGRESS: &str = "SLUICE-ALLOW-LOG-E";

/// [`CHAIN_ALLOW_LOG_INGRESS`] or [`CHAIN_ALLOW_LOG_EGRESS`].
pub fn allow_log_chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => CHAIN_ALLOW_LOG_INGRESS,
        Direction::Egress => CHAIN_ALLOW_LOG_EGRESS,
    }
}

/// The chain of a group of local pods (nftables flat form) isolated in `direction` by
/// the same NetworkPolicies `policies`, which allow them the same (peer, ports) pairs
/// (`pairs`, canonical, ingress named ports resolved): `SLUICE-GI-<hash>` /
/// `SLUICE-GE-<hash>`. Pods resolving a named port differently but to the same pairs
/// share it.
pub fn policy_group_chain(
    direction: Direction,
    policies: &[NamespacedName],
    pairs: &str,
) -> String {
    let kind = match direction {
        Direction::Ingress => "GI",
        Direction::Egress => "GE",
    };
    let mut key = String::from("pairs|");
    for p in policies {
        push_str(&mut key, &p.namespace);
        push_str(&mut key, &p.name);
    }
    key.push('|');
    push_str(&mut key, pairs);
    format!("{PREFIX}{kind}-{}", hash16(key.as_bytes()))
}

/// iptables form of ClusterNetworkPolicy: an Accept rule goes here (`-g`), which
/// marks the packet allowed and decided, and returns to the tier's group chain.
pub const CHAIN_CNP_ACCEPT: &str = "SLUICE-CNP-ACCEPT";
/// The same for a Pass rule: decided (the rest of the tier is skipped), not allowed.
pub const CHAIN_CNP_PASS: &str = "SLUICE-CNP-PASS";

fn direction_letter(direction: Direction) -> char {
    match direction {
        Direction::Ingress => 'I',
        Direction::Egress => 'E',
    }
}

/// The chain holding one ClusterNetworkPolicy's rules of one direction, in written
/// order (iptables form), shared by every local pod it selects:
/// `SLUICE-CPI-<hash>` / `SLUICE-CPE-<hash>` of its tier and name.
pub fn cluster_policy_chain(tier: Tier, name: &str, direction: Direction) -> String {
    let mut key = String::new();
    push_str(&mut key, tier.as_str());
    push_str(&mut key, name);
    format!(
        "{PREFIX}CP{}-{}",
        direction_letter(direction),
        hash16(key.as_bytes())
    )
}

/// The chain walking one tier's `policies` (names, in evaluation order) for the
/// local pods they all select (iptables form): `SLUICE-CGI-<hash>` / `SLUICE-CGE-…`.
pub fn cluster_group_chain(tier: Tier, direction: Direction, policies: &[&str]) -> String {
    let mut key = String::new();
    push_str(&mut key, tier.as_str());
    for p in policies {
        push_str(&mut key, p);
    }
    format!(
        "{PREFIX}CG{}-{}",
        direction_letter(direction),
        hash16(key.as_bytes())
    )
}

/// The hash:net set of the peers of one ClusterNetworkPolicy rule (pod and node
/// addresses as /32s, networks as they are), named after the rule's place, so pods
/// and labels coming and going change members only: `SLUICE-CR-<hash>`.
pub fn cluster_rule_set(tier: Tier, policy: &str, direction: Direction, rule: usize) -> String {
    let mut key = String::new();
    push_str(&mut key, tier.as_str());
    push_str(&mut key, policy);
    let _ = write!(key, "{}{rule}", direction_letter(direction));
    format!("{PREFIX}CR-{}", hash16(key.as_bytes()))
}

/// A set of the nftables flat form, named after the (peer, ports) pairs it is built
/// from (`key`, canonical), so groups allowing the same pairs share it:
/// `SLUICE-FT-<hash>` for (address . protocol . port) tuples, `SLUICE-FA-<hash>` for
/// peers allowed on every port of every protocol (`any`).
/// nftables: the chain a ClusterNetworkPolicy tier chain sends its denied packets to,
/// which logs each under the policy that denied it (see `compile::flat`).
pub fn tier_deny_chain(tier_chain: &str) -> String {
    format!("{PREFIX}DN-{}", hash16(tier_chain.as_bytes()))
}

pub fn flat_set(any: bool, key: &str) -> String {
    let kind = if any { "FA" } else { "FT" };
    format!("{PREFIX}{kind}-{}", hash16(key.as_bytes()))
}

/// A flat-form set of address classes ([`crate::compile::classes`]) built from the
/// (peer, ports) pairs `key` names: `SLUICE-CA-<hash>` (every protocol) or
/// `SLUICE-CT-<hash>` (class . protocol . port).
pub fn class_set(any: bool, key: &str) -> String {
    let kind = if any { "CA" } else { "CT" };
    format!("{PREFIX}{kind}-{}", hash16(key.as_bytes()))
}

/// The chain that gives a packet's peer address class `class` in the mark:
/// `SLUICE-C-<class>`.
pub fn class_chain(class: u32) -> String {
    format!("{PREFIX}C-{class}")
}

/// The hash:ip set of the pods a pod peer names. The policy's namespace is part of the
/// identity only when the peer is scoped to it, so the same namespaceSelector peer
/// written in two namespaces shares one set.
pub fn pod_peer_set(policy_namespace: &str, peer: &PodPeer) -> String {
    let mut key = String::from("pods;");
    match &peer.namespaces {
        NamespaceScope::PolicyNamespace => {
            key.push_str("ns=");
            push_str(&mut key, policy_namespace);
        }
        NamespaceScope::Matching(sel) => {
            key.push_str("nssel=");
            push_selector(&mut key, sel);
        }
    }
    key.push_str("podsel=");
    push_selector(&mut key, &peer.pods);
    format!("{PREFIX}P-{}", hash16(key.as_bytes()))
}

/// The hash:net set of one ipBlock (its CIDR, its excepts as `nomatch`).
pub fn ip_block_set(block: &IpBlock) -> String {
    let mut excepts: Vec<String> = block.except.iter().map(|e| e.to_string()).collect();
    excepts.sort();
    excepts.dedup();
    let mut key = format!("net;{};", block.cidr);
    for e in excepts {
        push_str(&mut key, &e);
    }
    format!("{PREFIX}N-{}", hash16(key.as_bytes()))
}

/// The hash:ip,port set resolving a named port: `ip,proto:port` of every pod that
/// declares a container port with this name and protocol.
pub fn named_port_set(name: &str, protocol: Protocol) -> String {
    let mut key = format!("port;{};", protocol.as_str());
    push_str(&mut key, name);
    format!("{PREFIX}NP-{}", hash16(key.as_bytes()))
}

/// The scratch set a full sync fills and then swaps with `set` (`SLUICE-T-…`), so a
/// set is never observed half-filled.
pub fn temp_set(set: &str) -> String {
    let rest = set.strip_prefix(PREFIX).unwrap_or(set);
    format!("{PREFIX}T-{rest}")
}

/// Length-prefixed, so that no two different inputs encode the same way.
fn push_str(out: &mut String, s: &str) {
    let _ = write!(out, "{}:{s};", s.len());
}

/// A canonical encoding: labels already ordered, requirements sorted and deduplicated
/// (their order in the manifest does not change the meaning).
fn push_selector(out: &mut String, sel: &LabelSelector) {
    out.push('{');
    for (k, v) in &sel.match_labels {
        push_str(out, k);
        push_str(out, v);
    }
    let mut reqs: Vec<_> = sel.match_expressions.iter().collect();
    reqs.sort();
    reqs.dedup();
    out.push('|');
    for r in reqs {
        push_str(out, &r.key);
        match &r.operator {
            Operator::In(values) | Operator::NotIn(values) => {
                out.push_str(if matches!(r.operator, Operator::In(_)) {
                    "in("
                } else {
                    "notin("
                });
                for v in values {
                    push_str(out, v);
                }
                out.push(')');
            }
            Operator::Exists => out.push_str("exists"),
            Operator::DoesNotExist => out.push_str("!exists"),
        }
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Requirement;

    #[test]
    fn every_derived_name_fits_the_kernel_limits() {
        let long = "x".repeat(300);
        let key = NamespacedName::new(&long, &long);
        assert!(policy_chain(&key, Direction::Ingress).len() <= MAX_CHAIN_LEN);
        let group = pod_group_chain(
            Direction::Egress,
            std::slice::from_ref(&key),
            Some(&long),
            None,
            true,
        );
        assert!(group.len() <= MAX_CHAIN_LEN);
        assert!(temp_set(&pod_group_set(Direction::Egress, &group)).len() <= MAX_SET_LEN);
        assert!(temp_set(&pod_veths_set(1 << 20)).len() <= MAX_SET_LEN);
        let peer = PodPeer {
            namespaces: NamespaceScope::PolicyNamespace,
            pods: LabelSelector::from_labels([(long.clone(), long.clone())]),
        };
        let set = pod_peer_set(&long, &peer);
        assert!(set.len() <= MAX_SET_LEN);
        assert!(temp_set(&set).len() <= MAX_SET_LEN);
        let np = named_port_set(&long, Protocol::Sctp);
        assert!(temp_set(&np).len() <= MAX_SET_LEN, "{}", temp_set(&np));
        let cr = cluster_rule_set(Tier::Baseline, &long, Direction::Egress, 24);
        assert!(temp_set(&cr).len() <= MAX_SET_LEN, "{}", temp_set(&cr));
        assert!(cluster_policy_chain(Tier::Admin, &long, Direction::Egress).len() <= MAX_CHAIN_LEN);
        assert!(
            cluster_group_chain(Tier::Admin, Direction::Ingress, &[&long]).len() <= MAX_CHAIN_LEN
        );
        for name in [
            CHAIN_FORWARD,
            CHAIN_INPUT,
            CHAIN_FWD_POD,
            CHAIN_IN_POD,
            CHAIN_CNP_ACCEPT,
            CHAIN_CNP_PASS,
        ] {
            assert!(name.len() <= MAX_CHAIN_LEN);
        }
    }

    #[test]
    fn a_pod_group_chain_is_named_by_every_part_of_its_key() {
        let a = NamespacedName::new("ns", "a");
        let b = NamespacedName::new("ns", "b");
        let only_a = std::slice::from_ref(&a);
        let base = pod_group_chain(Direction::Ingress, only_a, None, None, false);
        assert!(base.starts_with("SLUICE-TW-"));
        for other in [
            pod_group_chain(Direction::Egress, only_a, None, None, false),
            pod_group_chain(Direction::Ingress, &[a.clone(), b], None, None, false),
            pod_group_chain(Direction::Ingress, only_a, Some("X"), None, false),
            pod_group_chain(Direction::Ingress, only_a, None, Some("X"), false),
            pod_group_chain(Direction::Ingress, only_a, None, None, true),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(
            base,
            pod_group_chain(Direction::Ingress, only_a, None, None, false)
        );
    }

    #[test]
    fn requirement_order_does_not_change_a_set_name() {
        let a = Requirement {
            key: "a".into(),
            operator: Operator::Exists,
        };
        let b = Requirement {
            key: "b".into(),
            operator: Operator::DoesNotExist,
        };
        let peer = |reqs: Vec<Requirement>| PodPeer {
            namespaces: NamespaceScope::PolicyNamespace,
            pods: LabelSelector {
                match_labels: Default::default(),
                match_expressions: reqs,
            },
        };
        assert_eq!(
            pod_peer_set("ns", &peer(vec![a.clone(), b.clone()])),
            pod_peer_set("ns", &peer(vec![b, a]))
        );
    }

    #[test]
    fn scope_is_part_of_a_pod_set_identity_only_when_it_is_the_policy_namespace() {
        let own = PodPeer {
            namespaces: NamespaceScope::PolicyNamespace,
            pods: LabelSelector::everything(),
        };
        assert_ne!(pod_peer_set("x", &own), pod_peer_set("y", &own));
        let sel = PodPeer {
            namespaces: NamespaceScope::Matching(LabelSelector::everything()),
            pods: LabelSelector::everything(),
        };
        assert_eq!(pod_peer_set("x", &sel), pod_peer_set("y", &sel));
    }

    #[test]
    fn length_prefixing_keeps_concatenations_apart() {
        let a = NamespacedName::new("ab", "c");
        let b = NamespacedName::new("a", "bc");
        assert_ne!(
            policy_chain(&a, Direction::Ingress),
            policy_chain(&b, Direction::Ingress)
        );
    }
}
