//! ClusterNetworkPolicy in the per-policy (iptables) form: the Admin tier ahead of a
//! pod's NetworkPolicy part, the Baseline tier in its place when no NetworkPolicy
//! isolates the pod in that direction (`evaluate.rs` is the meaning).
//!
//! ```text
//! SLUICE-TW-<group>: -j SLUICE-CGI-<admin group>
//!                    -m mark --mark ALLOW -j RETURN         (an Admin Accept)
//!                    NetworkPolicy part as before (isolated), else
//!                    -j SLUICE-CGI-<baseline group>         (then fall off: allowed)
//! SLUICE-CGI-<h>:    -j MARK --set-xmark 0/DECIDED
//!                    -j SLUICE-CPI-<policy 1>               (priority, then name)
//!                    -m mark --mark DECIDED -j RETURN
//!                    -j SLUICE-CPI-<policy 2> ...
//! SLUICE-CPI-<h>:    one rule per (rule, port entry), in written order:
//!                    -m comment --comment "ClusterNetworkPolicy/NAME ingress[i]"
//!                    -m set --match-set SLUICE-CR-<rule> src [-p P --dport A:B]
//!                    -j DROP (Deny) | -g SLUICE-CNP-ACCEPT | -g SLUICE-CNP-PASS
//! SLUICE-CNP-ACCEPT: -j MARK --set-xmark ALLOW|DECIDED      (falls off: back to the
//! SLUICE-CNP-PASS:   -j MARK --set-xmark DECIDED             group chain, by goto)
//! ```
//!
//! Deny and Pass are ordered decisions, and iptables has no verdict map, so a tier is
//! walked: a new connection costs one rule per (rule, port entry) of the policies
//! selecting the pod up to the deciding one, plus two per policy walked past. The
//! walk is as flat as iptables allows otherwise: each rule's peers (pods, nodes,
//! networks) are one `hash:net` lookup, whatever their number; conntrack first, so
//! only new connections walk at all. A Deny is a `DROP` of its own, commented with
//! the policy and the rule, so a drop is traced to the rule that made it.
//!
//! Decisions, and why:
//! - A policy's chain is shared by every local pod it selects, and a group chain by
//!   every local pod the same policies select (in the same order), as NetworkPolicy's
//!   policy chains are; rule count is O(rules of the policies + groups × policies).
//! - A rule's set is named after the rule's place (tier, policy, direction, index), so
//!   pods, labels and nodes coming and going change members only.
//! - Named ports are the NetworkPolicy form's `hash:ip,port` sets, keyed by the
//!   destination address (`dst,dst`), so chains stay shared when a name means a
//!   different number on each pod.
//! - `Accept` and `Pass` jump to a marking chain by goto: its end returns straight to
//!   the group chain, one rule per decision instead of a mark and a return. The group
//!   chain clears [`MARK_DECIDED`] first, so a Pass of the Admin tier never stops the
//!   Baseline walk; [`MARK_ALLOW`] is cleared before each direction as before.
//! - A `Deny` is a logged drop (`deny_log`): the record names the policy through its
//!   chain, which `Ruleset::deny_policies` maps to `ClusterNetworkPolicy/NAME`.

use std::collections::BTreeSet;

use super::incremental::Selected;
use super::members::ip_block_members;
use super::{Compiler, jump_rule, port_spec_matches};
use crate::dataplane::deny_log::{self, DenyReason, DenyTag};
use crate::dataplane::{
    Chain, MARK_ALLOW, MARK_DECIDED, Match, Rule, SetDirection, SetKind, SetMember, Table, Target,
};
use crate::model::{Action, ClusterNetworkPolicy, ClusterRule, Tier};
use crate::names::{self, Direction};

/// The longest `-m comment` text the kernel keeps (`XT_MAX_COMMENT_LEN` 256 with
/// its NUL).
const MAX_COMMENT: usize = 255;

fn rules_of(policy: &ClusterNetworkPolicy, direction: Direction) -> &[ClusterRule] {
    match direction {
        Direction::Ingress => &policy.ingress,
        Direction::Egress => &policy.egress,
    }
}

/// `ClusterNetworkPolicy/NAME ingress[i]`: what a rule's comment says, and what a
/// log line in front of a drop can repeat.
pub fn rule_comment(policy: &str, direction: Direction, index: usize) -> String {
    let dir = match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let tail = format!(" {dir}[{index}]");
    let head = "ClusterNetworkPolicy/";
    // Object names are at most 253 characters: only the longest need cutting, and
    // then the rule's place is kept whole.
    let room = MAX_COMMENT - head.len() - tail.len();
    let name: String = policy.chars().take(room).collect();
    format!("{head}{name}{tail}")
}

fn is_decided() -> Match {
    Match::Mark {
        value: MARK_DECIDED,
        mask: MARK_DECIDED,
    }
}

impl Compiler<'_> {
    /// The group chain of `tier` for the pod `selected` is of, in `direction` (built
    /// on first use), or `None` when no policy of the tier with rules of that
    /// direction selects it.
    pub(super) fn tier_group(
        &mut self,
        tier: Tier,
        selected: &Selected<'_>,
        direction: Direction,
    ) -> Option<String> {
        let policies = selected.tier(tier, direction);
        if policies.is_empty() {
            return None;
        }
        let keys: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
        let name = names::cluster_group_chain(tier, direction, &keys);
        if self.ruleset.chain(Table::Filter, &name).is_some() {
            return Some(name);
        }
        let mut rules = vec![Rule::new(
            vec![],
            Target::SetMark {
                value: 0,
                mask: MARK_DECIDED,
            },
        )];
        for (i, policy) in policies.iter().enumerate() {
            let chain = self.cluster_policy_chain(policy, direction);
            rules.push(jump_rule(&chain));
            if i + 1 < policies.len() {
                rules.push(Rule::new(vec![is_decided()], Target::Return));
            }
        }
        self.ruleset.add_chain(
            Table::Filter,
            Chain {
                name: name.clone(),
                rules,
            },
        );
        Some(name)
    }

    /// One policy's rules of `direction` in written order, each (rule, port entry)
    /// one iptables rule; returns the chain's name (built on first use).
    fn cluster_policy_chain(
        &mut self,
        policy: &ClusterNetworkPolicy,
        direction: Direction,
    ) -> String {
        let name = names::cluster_policy_chain(policy.tier, &policy.name, direction);
        if self.ruleset.chain(Table::Filter, &name).is_some() {
            return name;
        }
        self.marking_chains();
        let set_dir = match direction {
            Direction::Ingress => SetDirection::Src,
            Direction::Egress => SetDirection::Dst,
        };
        let mut rules = Vec::new();
        for (i, rule) in rules_of(policy, direction).iter().enumerate() {
            let set = names::cluster_rule_set(policy.tier, &policy.name, direction, i);
            let members = self.cluster_rule_members(rule);
            self.add_set(set.clone(), SetKind::HashNet, members);
            let target = match rule.action {
                Action::Deny => Target::Drop,
                Action::Accept => Target::Goto(names::CHAIN_CNP_ACCEPT.into()),
                Action::Pass => Target::Goto(names::CHAIN_CNP_PASS.into()),
            };
            let comment = Match::Comment(rule_comment(&policy.name, direction, i));
            for port in self.port_specs(&rule.ports) {
                let mut matches = vec![
                    comment.clone(),
                    Match::Set {
                        name: set.clone(),
                        direction: set_dir,
                        negated: false,
                    },
                ];
                matches.extend(port_spec_matches(&port));
                if rule.action == Action::Deny {
                    // Logged under this chain, which deny_policies names the policy by.
                    let tag = DenyTag::new(DenyReason::DeniedByRule, direction, Some(name.clone()));
                    rules.extend(deny_log::deny(matches, &tag));
                } else {
                    rules.push(Rule::new(matches, target.clone()));
                }
            }
        }
        if rules_of(policy, direction)
            .iter()
            .any(|r| r.action == Action::Deny)
        {
            self.ruleset.deny_policies.insert(
                name.clone(),
                vec![format!("ClusterNetworkPolicy/{}", policy.name)],
            );
        }
        self.ruleset.add_chain(
            Table::Filter,
            Chain {
                name: name.clone(),
                rules,
            },
        );
        name
    }

    /// The hash:net members of a rule's peers: addresses as /32s, networks whole
    /// (a /0 as two halves, which hash:net can hold).
    fn cluster_rule_members(&self, rule: &ClusterRule) -> BTreeSet<SetMember> {
        let mut members = BTreeSet::new();
        for peer in &rule.peers {
            let (ips, nets) = self.index.cluster_peer_addresses(peer);
            members.extend(ips.into_iter().map(|ip| SetMember::Net {
                net: ip.into(),
                nomatch: false,
            }));
            for net in nets {
                members.extend(ip_block_members(net, &[]));
            }
        }
        members
    }

    /// The two chains Accept and Pass go to, once.
    fn marking_chains(&mut self) {
        for (name, value) in [
            (names::CHAIN_CNP_ACCEPT, MARK_ALLOW | MARK_DECIDED),
            (names::CHAIN_CNP_PASS, MARK_DECIDED),
        ] {
            let mark = Rule::new(vec![], Target::SetMark { value, mask: value });
            self.ruleset.add_chain(
                Table::Filter,
                Chain {
                    name: name.into(),
                    rules: vec![mark],
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Hook, Packet, Verdict, classify};
    use crate::compile::compile;
    use crate::dataplane::{CtState, InterfaceNames, Ruleset};
    use crate::model::{
        Cluster, ClusterPeer, Pod, PolicyPort, PortMatch, Ports, Protocol, Subject,
    };
    use crate::selector::LabelSelector;

    struct Veths;

    impl InterfaceNames for Veths {
        fn host_veth(&self, pod: &Pod) -> String {
            format!("slc{}", pod.name)
        }
        fn namespace_prefix(&self, namespace: &str) -> String {
            format!("slc{}", &namespace[..1])
        }
    }

    fn pod(name: &str, ip: &str) -> Pod {
        Pod {
            namespace: "prod".into(),
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            ips: vec![ip.parse().unwrap()],
            node: Some("n1".into()),
            ports: vec![],
            host_network: false,
        }
    }

    fn admin(name: &str, priority: u16, action: Action, cidr: &str) -> ClusterNetworkPolicy {
        ClusterNetworkPolicy {
            log_allowed: Default::default(),
            name: name.into(),
            tier: Tier::Admin,
            priority,
            subject: Subject::Namespaces(LabelSelector::everything()),
            ingress: vec![ClusterRule {
                name: None,
                action,
                peers: vec![ClusterPeer::Networks(vec![cidr.parse().unwrap()])],
                ports: Ports::Listed(vec![PolicyPort {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Numbers { start: 80, end: 80 },
                }]),
            }],
            egress: vec![],
            not_implemented: vec![],
        }
    }

    fn ingress_from(rs: &Ruleset, src: &str) -> (Verdict, usize) {
        let packet = Packet {
            hook: Hook::Forward,
            in_iface: Some("eth0".into()),
            out_iface: Some("slca".into()),
            src: src.parse().unwrap(),
            dst: "10.244.1.2".parse().unwrap(),
            protocol: Protocol::Tcp,
            dport: 80,
            ct: CtState::New,
        };
        let cls = classify(rs, Table::Filter, &packet).unwrap();
        (cls.verdict, cls.trace.len())
    }

    /// `n` Admin policies, alternately Deny and Accept, each for its own /24.
    fn cluster_with_admin(n: usize) -> Cluster {
        let mut c = Cluster::default();
        c.add_pod(pod("a", "10.244.1.2"));
        c.add_pod(pod("b", "10.244.1.3"));
        for i in 0..n {
            let action = if i.is_multiple_of(2) {
                Action::Deny
            } else {
                Action::Accept
            };
            let cidr = format!("10.{}.{}.0/24", i / 256, i % 256);
            c.add_cluster_policy(admin(&format!("p{i:03}"), i as u16, action, &cidr));
        }
        c
    }

    #[test]
    fn each_deny_is_a_drop_of_its_own_naming_the_policy_and_the_rule() {
        let rs = compile(&cluster_with_admin(2), "n1", &Veths).unwrap();
        let chain = names::cluster_policy_chain(Tier::Admin, "p000", Direction::Ingress);
        let rules = &rs.chain(Table::Filter, &chain).unwrap().rules;
        // The log rule, then the drop, both carrying the rule's comment.
        assert_eq!(rules.len(), 2);
        let Target::Log(log) = &rules[0].target else {
            panic!("a log rule first: {:?}", rules[0]);
        };
        let tag = DenyTag::parse(&log.prefix).unwrap();
        assert_eq!(tag.reason, DenyReason::DeniedByRule);
        assert_eq!(
            rs.deny_policies[tag.id.as_deref().unwrap()],
            ["ClusterNetworkPolicy/p000"]
        );
        assert_eq!(rules[1].target, Target::Drop);
        assert_eq!(
            rules[1].matches[0],
            Match::Comment("ClusterNetworkPolicy/p000 ingress[0]".into())
        );
        let text = crate::render::iptables::rule_body(&rules[1]);
        assert!(
            text.contains("-m comment --comment \"ClusterNetworkPolicy/p000 ingress[0]\""),
            "{text}"
        );
        assert_eq!(ingress_from(&rs, "10.0.0.9").0, Verdict::Drop);
        assert_eq!(ingress_from(&rs, "10.0.1.9").0, Verdict::Accept);
    }

    #[test]
    fn a_comment_keeps_the_rules_place_however_long_the_name() {
        let c = rule_comment(&"x".repeat(253), Direction::Egress, 24);
        assert!(c.len() <= MAX_COMMENT, "{}", c.len());
        assert!(c.ends_with("x egress[24]"), "{c}");
    }

    #[test]
    fn pods_selected_by_the_same_cluster_policies_share_their_chains() {
        let rs = compile(&cluster_with_admin(2), "n1", &Veths).unwrap();
        let group = |veth: &str| {
            crate::compile::pod_group_chain_of(&rs, veth, Direction::Ingress)
                .unwrap()
                .rules
                .clone()
        };
        assert_eq!(group("slca"), group("slcb"));
        let pod_groups = rs.tables[&Table::Filter]
            .keys()
            .filter(|c| c.starts_with("SLUICE-TW-"))
            .count();
        assert_eq!(pod_groups, 1, "one ingress group chain for both pods");
        let groups = rs.tables[&Table::Filter]
            .keys()
            .filter(|c| c.starts_with("SLUICE-CGI-"))
            .count();
        assert_eq!(groups, 1);
    }

    #[test]
    fn the_iptables_form_holds_cluster_policies_as_iptables_and_ipset_can() {
        let rs = compile(&cluster_with_admin(3), "n1", &Veths).unwrap();
        rs.check_iptables().unwrap();
        rs.validate().unwrap();
        assert!(
            rs.sets
                .values()
                .filter(|s| s.name.starts_with("SLUICE-CR-"))
                .all(|s| s.kind == SetKind::HashNet)
        );
    }

    /// The cost the docs quote: rules grow by three per Admin policy (its rule, the
    /// group's jump to it and the group's decided-return), pod chains not at all,
    /// and a new connection decided by the last policy walks past every earlier one.
    #[test]
    fn admin_policies_cost_three_rules_each_and_a_walk_linear_in_them() {
        let count = |n: usize| {
            let rs = compile(&cluster_with_admin(n), "n1", &Veths).unwrap();
            let pod_chain = crate::compile::pod_group_chain_of(&rs, "slca", Direction::Ingress)
                .unwrap()
                .rules
                .len();
            let last = n - 1;
            let (verdict, walked) =
                ingress_from(&rs, &format!("10.{}.{}.9", last / 256, last % 256));
            let expected = if last.is_multiple_of(2) {
                Verdict::Drop
            } else {
                Verdict::Accept
            };
            assert_eq!(verdict, expected);
            (rs.rule_count(), pod_chain, walked, rs.sets.len())
        };
        let (rules_2, pod_2, walked_2, sets_2) = count(2);
        let (rules_100, pod_100, walked_100, sets_100) = count(100);
        eprintln!(
            "iptables form, one pod's node: 2 Admin policies {rules_2} rules, {sets_2} sets, \
             {walked_2} rules matched by the last one's packet; 100: {rules_100}, {sets_100}, \
             {walked_100}"
        );
        // Three rules per policy, and the log rule before each Deny policy's drop
        // (every other policy denies: 49 of the 98 added).
        assert_eq!(rules_100 - rules_2, 98 * 3 + 49);
        assert_eq!(pod_2, pod_100);
        assert_eq!(sets_100 - sets_2, 98);
        // Matched rules only: the jump into each policy chain walked past, plus the
        // last one's decision; every other rule walked past does not match.
        assert_eq!(walked_100 - walked_2, 98);
    }
}
