//! Kernel-side records of denied connections: one log rule (NFLOG on iptables,
//! `log group` on nftables) ahead of each drop that decides a new connection, so
//! the agent can say what was dropped and why.
//!
//! The rule's prefix is the record's identity: `slc:<reason>:<direction>[:<id>]`.
//! Reason and direction are in the prefix itself; for an isolation drop the id is
//! the isolating chain, and [`super::Ruleset::deny_policies`] maps it to the
//! policies that isolated the pod. Prefixes stay short (iptables' NFLOG takes 64
//! bytes, nft 127) and never name a policy: names are long, chains are not.
//!
//! Every log rule matches `ct state new` only (one record per connection, not per
//! packet) and is rate-limited in the kernel, so a flood costs bounded work and
//! never delays what is allowed.
//!
//! Allowed connections are logged only where an operator opted in
//! (`sluice.dev/log-allowed`, [`crate::model::LogAllowed`]): an opted-in pod's
//! "allowed" verdicts go through [`allow_log_chain`] of their direction, which logs
//! new connections as `slc:allow:<i|e>` ([`AllowTag`]) and returns. The prefix
//! names no policy: the agent evaluates the connection to name every policy that
//! allowed it, and keeps only what an opt-in asked for (docs/flows.md).

use super::{CtState, Match, Rule, Target};
use crate::names::Direction;

/// The netlink log group the agent listens on.
pub const LOG_GROUP: u16 = 7;
/// Records per second each log rule may emit; beyond it the kernel drops the record,
/// never the verdict.
pub const LOG_RATE_PER_SECOND: u32 = 100;
/// Records a log rule may emit in a burst above its rate.
pub const LOG_BURST: u32 = 100;
/// Every sluice log prefix starts with this.
pub const PREFIX_HEAD: &str = "slc:";

/// A log rule's target: where its records go and what they carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogSpec {
    pub group: u16,
    pub prefix: String,
}

/// Why a connection was denied, as records spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenyReason {
    /// Policies isolated the pod in this direction and none allowed the connection.
    Isolated,
    /// A rule denied it outright (ClusterNetworkPolicy `Deny`).
    DeniedByRule,
    /// The pod is held (not yet programmed) or unknown to the last compile.
    PodNotYetProgrammed,
    /// A pod sent with an address that is not its own.
    Spoofed,
    /// An encapsulated packet from somewhere other than a node, or from a pod.
    TunnelGuard,
}

impl DenyReason {
    pub const ALL: [DenyReason; 5] = [
        DenyReason::Isolated,
        DenyReason::DeniedByRule,
        DenyReason::PodNotYetProgrammed,
        DenyReason::Spoofed,
        DenyReason::TunnelGuard,
    ];

    /// The spelling in records.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Isolated => "isolated",
            DenyReason::DeniedByRule => "denied-by-rule",
            DenyReason::PodNotYetProgrammed => "pod-not-yet-programmed",
            DenyReason::Spoofed => "spoofed",
            DenyReason::TunnelGuard => "tunnel-guard",
        }
    }

    /// The short code in prefixes.
    fn code(self) -> &'static str {
        match self {
            DenyReason::Isolated => "iso",
            DenyReason::DeniedByRule => "rule",
            DenyReason::PodNotYetProgrammed => "hold",
            DenyReason::Spoofed => "spoof",
            DenyReason::TunnelGuard => "tun",
        }
    }
}

/// What a log prefix says, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyTag {
    pub reason: DenyReason,
    pub direction: Direction,
    /// The isolating chain (isolation), the rule's id (denied-by-rule), or nothing.
    pub id: Option<String>,
}

impl DenyTag {
    pub fn new(reason: DenyReason, direction: Direction, id: Option<String>) -> Self {
        DenyTag {
            reason,
            direction,
            id,
        }
    }

    pub fn prefix(&self) -> String {
        let dir = direction_code(self.direction);
        let mut out = format!("{PREFIX_HEAD}{}:{dir}", self.reason.code());
        if let Some(id) = &self.id {
            out.push(':');
            out.push_str(id);
        }
        out
    }

    /// Reads a prefix written by [`DenyTag::prefix`]; anything else is `None` (not
    /// ours, or from a newer agent).
    pub fn parse(prefix: &str) -> Option<DenyTag> {
        let rest = prefix.strip_prefix(PREFIX_HEAD)?;
        let mut parts = rest.splitn(3, ':');
        let code = parts.next()?;
        let reason = DenyReason::ALL.into_iter().find(|r| r.code() == code)?;
        let direction = match parts.next()? {
            "i" => Direction::Ingress,
            "e" => Direction::Egress,
            _ => return None,
        };
        let id = parts.next().map(str::to_string);
        Some(DenyTag {
            reason,
            direction,
            id,
        })
    }
}

/// The code of allow prefixes, `slc:allow:<i|e>`.
const ALLOW_CODE: &str = "allow";

/// What an allow log prefix says: the direction that allowed a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowTag {
    pub direction: Direction,
}

impl AllowTag {
    pub fn prefix(&self) -> String {
        format!(
            "{PREFIX_HEAD}{ALLOW_CODE}:{}",
            direction_code(self.direction)
        )
    }

    /// Reads a prefix written by [`AllowTag::prefix`]; anything else is `None`.
    pub fn parse(prefix: &str) -> Option<AllowTag> {
        let rest = prefix.strip_prefix(PREFIX_HEAD)?.strip_prefix(ALLOW_CODE)?;
        let direction = match rest {
            ":i" => Direction::Ingress,
            ":e" => Direction::Egress,
            _ => return None,
        };
        Some(AllowTag { direction })
    }
}

/// Any sluice log prefix, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTag {
    Deny(DenyTag),
    Allow(AllowTag),
}

impl LogTag {
    pub fn parse(prefix: &str) -> Option<LogTag> {
        DenyTag::parse(prefix)
            .map(LogTag::Deny)
            .or_else(|| AllowTag::parse(prefix).map(LogTag::Allow))
    }
}

fn direction_code(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "i",
        Direction::Egress => "e",
    }
}

/// The chain an opted-in pod's allowed connections of `direction` go to (by goto,
/// in place of the `return` that allows them): logs the new ones and falls off its
/// end, back to where the pod's chain was called from, allowed. One per direction
/// per node, so all opted-in pods share its rate limit ([`LOG_RATE_PER_SECOND`]),
/// apart from every deny log rule's.
pub fn allow_log_chain(direction: Direction) -> super::Chain {
    let tag = AllowTag { direction };
    super::Chain {
        name: crate::names::allow_log_chain(direction).to_string(),
        rules: vec![Rule::new(
            vec![Match::CtState(vec![CtState::New])],
            Target::Log(LogSpec {
                group: LOG_GROUP,
                prefix: tag.prefix(),
            }),
        )],
    }
}

/// The log rule to put right before a drop with `matches`: the same matches, new
/// connections only.
pub fn log_rule(matches: &[Match], tag: &DenyTag) -> Rule {
    let mut m = matches.to_vec();
    m.push(Match::CtState(vec![CtState::New]));
    Rule::new(
        m,
        Target::Log(LogSpec {
            group: LOG_GROUP,
            prefix: tag.prefix(),
        }),
    )
}

/// A logged drop: the log rule, then the drop.
pub fn deny(matches: Vec<Match>, tag: &DenyTag) -> [Rule; 2] {
    [log_rule(&matches, tag), Rule::new(matches, Target::Drop)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_reads_back_as_the_tag_that_wrote_it() {
        for reason in DenyReason::ALL {
            for direction in [Direction::Ingress, Direction::Egress] {
                for id in [None, Some("SLUICE-TW-abc:def".to_string())] {
                    let tag = DenyTag::new(reason, direction, id);
                    assert_eq!(DenyTag::parse(&tag.prefix()), Some(tag));
                }
            }
        }
    }

    #[test]
    fn prefixes_fit_the_nflog_limit_for_the_longest_chain_name() {
        let tag = DenyTag::new(
            DenyReason::Isolated,
            Direction::Egress,
            Some("x".repeat(28)),
        );
        assert!(tag.prefix().len() < 64, "{}", tag.prefix());
    }

    #[test]
    fn an_allow_prefix_reads_back_as_an_allow_and_never_as_a_deny() {
        for direction in [Direction::Ingress, Direction::Egress] {
            let tag = AllowTag { direction };
            assert_eq!(LogTag::parse(&tag.prefix()), Some(LogTag::Allow(tag)));
            assert_eq!(DenyTag::parse(&tag.prefix()), None);
        }
        for p in ["slc:allow", "slc:allow:x", "slc:allow:i:x", "slc:allowi"] {
            assert_eq!(LogTag::parse(p), None, "{p}");
        }
        let deny = DenyTag::new(DenyReason::Spoofed, Direction::Egress, None);
        assert_eq!(LogTag::parse(&deny.prefix()), Some(LogTag::Deny(deny)));
    }

    #[test]
    fn foreign_prefixes_are_not_read_as_ours() {
        for p in [
            "",
            "slc:",
            "slc:nope:i",
            "slc:iso:x",
            "kube:iso:i",
            "IN=eth0",
        ] {
            assert_eq!(DenyTag::parse(p), None, "{p}");
        }
    }
}
