//! Owned ipsets: parse `ipset save`, and build one `ipset restore` that brings every
//! owned set to its desired members with adds and deletes only, so a pod joining a
//! selector changes one member and no set is ever briefly empty.
//!
//! Sets are owned by name prefix (the same [`super::iptables::CHAIN_PREFIX`] family
//! of names); sets of anyone else are never listed in a payload.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetKind {
    HashIp,
    HashNet,
    HashIpPort,
}

impl SetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SetKind::HashIp => "hash:ip",
            SetKind::HashNet => "hash:net",
            SetKind::HashIpPort => "hash:ip,port",
        }
    }

    fn parse(s: &str) -> Option<SetKind> {
        match s {
            "hash:ip" => Some(SetKind::HashIp),
            "hash:net" => Some(SetKind::HashNet),
            "hash:ip,port" => Some(SetKind::HashIpPort),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSet {
    pub name: String,
    pub kind: SetKind,
    pub members: BTreeSet<String>,
}

impl IpSet {
    pub fn new(name: impl Into<String>, kind: SetKind) -> IpSet {
        IpSet {
            name: name.into(),
            kind,
            members: BTreeSet::new(),
        }
    }

    pub fn with<I: IntoIterator<Item = S>, S: Into<String>>(mut self, members: I) -> IpSet {
        self.members
            .extend(members.into_iter().map(|m| normalize(&m.into())));
        self
    }
}

/// `ipset save` prints a hash:net member of /32 as the bare address.
fn normalize(member: &str) -> String {
    match member.split_once(' ') {
        Some((net, flags)) => format!("{} {flags}", net.strip_suffix("/32").unwrap_or(net)),
        None => member.strip_suffix("/32").unwrap_or(member).to_string(),
    }
}

/// Room for a large cluster's pods in one selector set (the kernel default is 65536).
const MAXELEM: u32 = 1_048_576;

fn create_line(name: &str, kind: SetKind) -> String {
    format!(
        "create {name} {} family inet hashsize 1024 maxelem {MAXELEM}",
        kind.as_str()
    )
}

/// A set as the kernel holds it; `kind` is `None` for types we never create.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SavedSet {
    pub kind: Option<SetKind>,
    pub members: BTreeSet<String>,
}

/// Parse `ipset save` output, keeping only sets whose name starts with `prefix`.
pub fn parse_save(text: &str, prefix: &str) -> BTreeMap<String, SavedSet> {
    let mut sets: BTreeMap<String, SavedSet> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("create"), Some(name)) if name.starts_with(prefix) => {
                sets.entry(name.to_string()).or_default().kind = w.next().and_then(SetKind::parse);
            }
            (Some("add"), Some(name)) if name.starts_with(prefix) => {
                // The member is the rest of the line: `10.0.0.0/8 nomatch` is one.
                let m = w.collect::<Vec<_>>().join(" ");
                if !m.is_empty() {
                    sets.entry(name.to_string())
                        .or_default()
                        .members
                        .insert(normalize(&m));
                }
            }
            _ => {}
        }
    }
    sets
}

/// The changes for one sync: `restore` runs before iptables (sets must exist before a
/// rule names them), `destroy` after (a set cannot go while a rule still names it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetPlan {
    pub restore: Option<String>,
    pub destroy: Vec<String>,
    pub members_added: usize,
    pub members_removed: usize,
}

pub fn plan_sets(desired: &[IpSet], current: &BTreeMap<String, SavedSet>, prefix: &str) -> SetPlan {
    let mut plan = SetPlan::default();
    let mut out = String::new();
    let empty = SavedSet::default();
    for set in desired {
        let have = current.get(&set.name);
        let kind_ok = have.is_some_and(|h| h.kind == Some(set.kind));
        if have.is_some() && !kind_ok {
            // Same name, other type: build a replacement and swap it in atomically.
            let tmp = temp_name(&set.name);
            out.push_str(&format!(
                "{} -exist\nflush {tmp}\n",
                create_line(&tmp, set.kind)
            ));
            for m in &set.members {
                out.push_str(&format!("add {tmp} {m}\n"));
            }
            out.push_str(&format!("swap {tmp} {}\ndestroy {tmp}\n", set.name));
            plan.members_added += set.members.len();
            continue;
        }
        if have.is_none() {
            out.push_str(&format!("{}\n", create_line(&set.name, set.kind)));
        }
        let have = have.unwrap_or(&empty);
        for m in set.members.difference(&have.members) {
            out.push_str(&format!("add {} {m}\n", set.name));
            plan.members_added += 1;
        }
        for m in have.members.difference(&set.members) {
            out.push_str(&format!("del {} {m}\n", set.name));
            plan.members_removed += 1;
        }
    }
    let wanted: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
    plan.destroy = current
        .keys()
        .filter(|n| n.starts_with(prefix) && !wanted.contains(n.as_str()))
        .cloned()
        .collect();
    if !out.is_empty() {
        plan.restore = Some(out);
    }
    plan
}

/// ipset names are at most 31 bytes; the swap partner keeps the prefix so it is ours.
fn temp_name(name: &str) -> String {
    let mut t = format!("{name}-T");
    if t.len() > 31 {
        t = format!("{}-T", &name[..29]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "create SLUICE-NODES hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n\
add SLUICE-NODES 10.0.0.1\n\
add SLUICE-NODES 10.0.0.9\n\
create KUBE-LOOP hash:ip family inet\n\
add KUBE-LOOP 1.2.3.4\n\
create SLUICE-OLD hash:net family inet\n";

    #[test]
    fn parse_keeps_only_owned_sets() {
        let s = parse_save(SAVED, "SLUICE-");
        assert_eq!(s.keys().collect::<Vec<_>>(), ["SLUICE-NODES", "SLUICE-OLD"]);
        assert_eq!(s["SLUICE-NODES"].members.len(), 2);
    }

    #[test]
    fn deltas_only_and_stale_sets_destroyed() {
        let cur = parse_save(SAVED, "SLUICE-");
        let want = [
            IpSet::new("SLUICE-NODES", SetKind::HashIp).with(["10.0.0.1", "10.0.0.2"]),
            IpSet::new("SLUICE-POOLS", SetKind::HashNet).with(["10.244.0.0/16"]),
        ];
        let plan = plan_sets(&want, &cur, "SLUICE-");
        assert_eq!(
            plan.restore.as_deref(),
            Some(
                "add SLUICE-NODES 10.0.0.2\ndel SLUICE-NODES 10.0.0.9\n\
create SLUICE-POOLS hash:net family inet hashsize 1024 maxelem 1048576\n\
add SLUICE-POOLS 10.244.0.0/16\n"
            )
        );
        assert_eq!(plan.destroy, ["SLUICE-OLD"]);
        assert_eq!((plan.members_added, plan.members_removed), (2, 1));
    }

    #[test]
    fn in_sync_sets_need_nothing() {
        let cur = parse_save(SAVED, "SLUICE-");
        let want = [
            IpSet::new("SLUICE-NODES", SetKind::HashIp).with(["10.0.0.1", "10.0.0.9"]),
            IpSet::new("SLUICE-OLD", SetKind::HashNet),
        ];
        assert_eq!(plan_sets(&want, &cur, "SLUICE-"), SetPlan::default());
    }

    #[test]
    fn host_routes_in_hash_net_compare_equal_to_saved_bare_addresses() {
        let cur = parse_save(
            "create SLUICE-X hash:net family inet\nadd SLUICE-X 10.1.1.1\n",
            "SLUICE-",
        );
        let want = [IpSet::new("SLUICE-X", SetKind::HashNet).with(["10.1.1.1/32"])];
        assert_eq!(plan_sets(&want, &cur, "SLUICE-").restore, None);
    }

    #[test]
    fn type_change_swaps() {
        let cur = parse_save("create SLUICE-X hash:ip family inet\n", "SLUICE-");
        let want = [IpSet::new("SLUICE-X", SetKind::HashNet).with(["10.0.0.0/8"])];
        let r = plan_sets(&want, &cur, "SLUICE-").restore.unwrap();
        assert!(
            r.contains("swap SLUICE-X-T SLUICE-X\ndestroy SLUICE-X-T\n"),
            "{r}"
        );
    }
}
