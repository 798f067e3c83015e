//! ClusterNetworkPolicy in the per-policy (iptables) form: the Admin tier ahead of a
//! pod's NetworkPolicy part, the Baseline tier in its place when no NetworkPolicy
//! isolates the pod in that direction (`evaluate.rs` is the meaning).
//!
//! ```text
//! SLUICE-TW-<veth>:  -j SLUICE-CGI-<admin group>
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

use std::collections::BTreeSet;

use super::members::ip_block_members;
use super::{Compiler, jump_rule, port_spec_matches};
use crate::dataplane::{
    Chain, MARK_ALLOW, MARK_DECIDED, Match, Rule, SetDirection, SetKind, SetMember, Table, Target,
};
use crate::model::{Action, ClusterNetworkPolicy, ClusterRule, Pod, Tier};
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
    /// The group chain of `tier` for `pod` in `direction` (built on first use), or
    /// `None` when no policy of the tier with rules of that direction selects it.
    pub(super) fn tier_group(
        &mut self,
        tier: Tier,
        pod: &Pod,
        direction: Direction,
    ) -> Option<String> {
        let policies: Vec<&ClusterNetworkPolicy> = self
            .index
            .cluster
            .cluster_policies_selecting(tier, pod)
            .into_iter()
            .filter(|p| !rules_of(p, direction).is_empty())
            .collect();
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
                rules.push(Rule::new(matches, target.clone()));
            }
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
