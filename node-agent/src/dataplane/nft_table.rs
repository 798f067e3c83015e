//! A plan that replaces sluice's whole table (the first write, or a declaration that
//! cannot change in place) sent over netlink ([`sluice_netlink::nft_table`]) instead of
//! through `nft -f`: the model's chains, sets and rules as nf_tables objects and
//! expressions, the same ones `nft` makes of [`sluice_policy::render::nft`]'s text.
//!
//! Why: on a realistic node `nft -f` of the full table spends twice the kernel's time
//! in userspace, parsing ~350 KB of text and expanding ~5,900 elements.
//!
//! Only the forms that renderer writes are encoded, each as nft 1.0.6 compiles it
//! (`nft --debug=netlink`); anything else (a prefix nft would simplify, an interface
//! name that does not fit, a set declaration or element this module does not read)
//! makes [`table`] return `None`, and the executor writes that plan with `nft -f`.
//! Elements are read from the renderer's text by the element writer's own reader
//! ([`super::nft_elements`]), so the two netlink writers share one reading of it.

use std::collections::BTreeMap;

use sluice_netlink::nft_elements::Verdict;
use sluice_netlink::nft_table::{
    Chain, CmpOp, Expr, Hook, MetaKey, PayloadBase, Rule as NlRule, Set, SetForm, Table,
};
use sluice_policy::dataplane::deny_log::{LOG_BURST, LOG_RATE_PER_SECOND};
use sluice_policy::dataplane::{
    CtState, Interface, MARK_CLASS_MASK, MapKey, Match, Rule, Ruleset, SetDirection, SetKind,
    Target,
};
use sluice_policy::model::Protocol;
use sluice_policy::render::{iptables, nft};

use super::nft_elements::{Form, element, form};

/// The whole table of `ruleset` as netlink objects, in the order `nft -f` of
/// [`nft::render`] creates them; `None` when some of it is in a form not encoded here.
pub fn table(ruleset: &Ruleset) -> Option<Table> {
    let model = model_rules(ruleset);
    let chains = nft::chains(ruleset);
    let mut out = Table::default();
    for c in chains.values() {
        out.chains.push(Chain {
            name: c.name.clone(),
            hook: match &c.hook {
                Some(h) => Some(hook(h)?),
                None => None,
            },
            comment: c.comment.clone(),
        });
    }
    for s in nft::sets(ruleset).values() {
        let f = form(&s.state_text())?;
        out.sets.push(Set {
            name: s.name.clone(),
            form: set_form(f),
            elements: s
                .elements
                .iter()
                .map(|t| element(f, t, true))
                .collect::<Option<_>>()?,
        });
    }
    for c in chains.values() {
        let rules = model.get(&c.name)?;
        if rules.len() != c.rules.len() {
            return None;
        }
        for (rule, (_, hash)) in rules.iter().zip(&c.rules) {
            out.rules.push(NlRule {
                chain: c.name.clone(),
                exprs: rule_exprs(ruleset, rule)?,
                comment: Some(format!("{}{hash}", iptables::COMMENT_PREFIX)),
            });
        }
    }
    Some(out)
}

/// The model's rules of every nft chain, base chains included, as [`nft::chains`]
/// gathers them.
fn model_rules(ruleset: &Ruleset) -> BTreeMap<String, Vec<&Rule>> {
    let mut out: BTreeMap<String, Vec<&Rule>> = BTreeMap::new();
    for chains in ruleset.tables.values() {
        for c in chains.values() {
            out.insert(c.name.clone(), c.rules.iter().collect());
        }
    }
    let mut base: BTreeMap<String, Vec<&Rule>> = BTreeMap::new();
    for j in &ruleset.jumps {
        let (name, _) = nft::base_chain(j.table, &j.chain);
        base.entry(name).or_default().push(&j.rule);
    }
    out.extend(base);
    out
}

fn hook(h: &nft::BaseHook) -> Option<Hook> {
    let hooknum = match h.hook {
        "prerouting" => 0,
        "input" => 1,
        "forward" => 2,
        "output" => 3,
        "postrouting" => 4,
        _ => return None,
    };
    Some(Hook {
        kind: h.kind.to_string(),
        hooknum,
        priority: h.priority_number,
    })
}

fn set_form(f: Form) -> SetForm {
    match f {
        Form::Addr => SetForm::Addr,
        Form::AddrRange => SetForm::AddrIntervals,
        Form::Tuple => SetForm::AddrTuples,
        Form::Marks => SetForm::Marks,
        Form::MarkTuple => SetForm::MarkTuples,
        Form::IfaceMap => SetForm::IfaceMap,
        Form::IfaceAddrMap => SetForm::IfaceAddrMap,
        Form::AddrRangeMap => SetForm::AddrIntervalMap,
    }
}

/// `NFT_REG_1` (16 bytes), `NFT_REG_2`, and the 4-byte registers nft puts a
/// concatenation's second and third fields in (`NFT_REG32_01`, `NFT_REG32_02`).
const REG1: u32 = 1;
const REG2: u32 = 2;
const REG32_01: u32 = 9;
const REG32_02: u32 = 10;
/// Offsets of the source and destination addresses in the IPv4 header, and of the
/// destination port in a TCP, UDP or SCTP header.
const SADDR: u32 = 12;
const DADDR: u32 = 16;
const DPORT: u32 = 2;

fn addr_offset(d: SetDirection) -> u32 {
    match d {
        SetDirection::Src => SADDR,
        SetDirection::Dst | SetDirection::DstDstPort => DADDR,
        SetDirection::SrcInIface | SetDirection::DstOutIface => unreachable!(
            "interface-keyed set lookups are the iptables dispatch's; the flat form never \
             makes one"
        ),
    }
}

fn load_addr(offset: u32, dreg: u32) -> Expr {
    Expr::Payload {
        base: PayloadBase::Network,
        offset,
        len: 4,
        dreg,
    }
}

fn load_dport(dreg: u32) -> Expr {
    Expr::Payload {
        base: PayloadBase::Transport,
        offset: DPORT,
        len: 2,
        dreg,
    }
}

fn lookup(set: &str, invert: bool) -> Expr {
    Expr::Lookup {
        sreg: REG1,
        set: set.to_string(),
        invert,
        verdict_map: false,
    }
}

/// `FIRST . meta l4proto . th dport`, FIRST already in register 1.
fn proto_port_fields(out: &mut Vec<Expr>) {
    out.push(Expr::Meta {
        key: MetaKey::L4Proto,
        dreg: REG32_01,
    });
    out.push(Expr::Hton {
        reg: REG32_01,
        size: 2,
        len: 1,
    });
    out.push(load_dport(REG32_02));
}

/// `meta mark & MASK` into register 1 (host order).
fn masked_mark(out: &mut Vec<Expr>, mask: u32) {
    out.push(Expr::Meta {
        key: MetaKey::Mark,
        dreg: REG1,
    });
    out.push(Expr::Bitwise {
        reg: REG1,
        len: 4,
        mask: mask.to_ne_bytes().to_vec(),
        xor: vec![0; 4],
        explicit: true,
    });
}

/// `meta mark & MARK_CLASS_MASK`, big-endian as the class sets hold it.
fn class(out: &mut Vec<Expr>) {
    masked_mark(out, MARK_CLASS_MASK);
    out.push(Expr::Hton {
        reg: REG1,
        size: 4,
        len: 4,
    });
}

fn cmp(op: CmpOp, data: &[u8]) -> Expr {
    Expr::Cmp {
        op,
        sreg: REG1,
        data: data.to_vec(),
    }
}

fn iface(out: &mut Vec<Expr>, key: MetaKey, i: &Interface) -> Option<()> {
    out.push(Expr::Meta { key, dreg: REG1 });
    if i.wildcard {
        // `"slc*"`: the prefix's bytes, without a NUL.
        if i.name.is_empty() {
            return None;
        }
        out.push(cmp(CmpOp::Eq, i.name.as_bytes()));
    } else {
        // An exact name: all IFNAMSIZ bytes, zero-padded.
        if i.name.len() > sluice_netlink::nft_elements::MAX_IFNAME || i.name.contains('\0') {
            return None;
        }
        let mut name = [0u8; 16];
        name[..i.name.len()].copy_from_slice(i.name.as_bytes());
        out.push(cmp(CmpOp::Eq, &name));
    }
    Some(())
}

/// `ip saddr|daddr [!=] NET`: a whole-byte prefix loads and compares only its bytes,
/// another a masked word.
fn addr_match(out: &mut Vec<Expr>, offset: u32, net: ipnet::Ipv4Net, negated: bool) -> Option<()> {
    if net.addr() != net.network() || net.prefix_len() == 0 {
        return None;
    }
    let op = if negated { CmpOp::Neq } else { CmpOp::Eq };
    let bytes = net.network().octets();
    let plen = u32::from(net.prefix_len());
    if plen % 8 == 0 {
        let len = plen / 8;
        out.push(Expr::Payload {
            base: PayloadBase::Network,
            offset,
            len,
            dreg: REG1,
        });
        out.push(cmp(op, &bytes[..len as usize]));
    } else {
        out.push(load_addr(offset, REG1));
        out.push(Expr::Bitwise {
            reg: REG1,
            len: 4,
            mask: net.netmask().octets().to_vec(),
            xor: vec![0; 4],
            explicit: false,
        });
        out.push(cmp(op, &bytes));
    }
    Some(())
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
        Protocol::Icmp => 1,
    }
}

fn ct_bit(s: CtState) -> u32 {
    // NF_CT_STATE_INVALID_BIT, then NF_CT_STATE_BIT(IP_CT_ESTABLISHED, _RELATED, _NEW).
    match s {
        CtState::Invalid => 1,
        CtState::Established => 2,
        CtState::Related => 4,
        CtState::New => 8,
    }
}

/// A rule's expressions as nft compiles [`nft::rule_text`] of it.
fn rule_exprs(ruleset: &Ruleset, rule: &Rule) -> Option<Vec<Expr>> {
    let mut out = Vec::new();
    for m in &rule.matches {
        match m {
            Match::InInterface(i) => iface(&mut out, MetaKey::IifName, i)?,
            Match::OutInterface(i) => iface(&mut out, MetaKey::OifName, i)?,
            Match::Source { net, negated } => addr_match(&mut out, SADDR, *net, *negated)?,
            Match::Destination { net, negated } => addr_match(&mut out, DADDR, *net, *negated)?,
            Match::Protocol(p) => {
                out.push(Expr::Meta {
                    key: MetaKey::L4Proto,
                    dreg: REG1,
                });
                out.push(cmp(CmpOp::Eq, &[proto_number(*p)]));
            }
            Match::IpProtocol(n) => {
                out.push(Expr::Meta {
                    key: MetaKey::L4Proto,
                    dreg: REG1,
                });
                out.push(cmp(CmpOp::Eq, &[*n]));
            }
            Match::DestinationPorts { start, end } => {
                out.push(load_dport(REG1));
                if start == end {
                    out.push(cmp(CmpOp::Eq, &start.to_be_bytes()));
                } else {
                    out.push(cmp(CmpOp::Gte, &start.to_be_bytes()));
                    out.push(cmp(CmpOp::Lte, &end.to_be_bytes()));
                }
            }
            Match::Set {
                name,
                direction,
                negated,
            } => {
                let kind = ruleset.sets.get(name)?.kind;
                if *direction == SetDirection::DstDstPort || kind == SetKind::HashIpPort {
                    out.push(load_addr(DADDR, REG1));
                    proto_port_fields(&mut out);
                } else {
                    out.push(load_addr(addr_offset(*direction), REG1));
                }
                out.push(lookup(name, *negated));
            }
            Match::Tuple { set, direction } => {
                out.push(load_addr(addr_offset(*direction), REG1));
                proto_port_fields(&mut out);
                out.push(lookup(set, false));
            }
            Match::CtState(states) => {
                let bits = states.iter().fold(0, |b, s| b | ct_bit(*s));
                out.push(Expr::CtState { dreg: REG1 });
                out.push(Expr::Bitwise {
                    reg: REG1,
                    len: 4,
                    mask: bits.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                    explicit: false,
                });
                out.push(cmp(CmpOp::Neq, &[0; 4]));
            }
            Match::Mark { value, mask } => {
                // nft drops an all-ones mask; not written by sluice, left to nft.
                if *mask == u32::MAX {
                    return None;
                }
                masked_mark(&mut out, *mask);
                out.push(cmp(CmpOp::Eq, &value.to_ne_bytes()));
            }
            Match::ClassTuple { set } => {
                class(&mut out);
                proto_port_fields(&mut out);
                out.push(lookup(set, false));
            }
            Match::ClassSet { set } => {
                class(&mut out);
                out.push(lookup(set, false));
            }
            Match::Comment(_) => {}
        }
    }
    match &rule.target {
        Target::Accept => out.push(Expr::Verdict(Verdict::Accept)),
        Target::Drop => out.push(Expr::Verdict(Verdict::Drop)),
        Target::Return => out.push(Expr::Verdict(Verdict::Return)),
        Target::Jump(c) => out.push(Expr::Verdict(Verdict::Jump(c.clone()))),
        Target::Goto(c) => out.push(Expr::Verdict(Verdict::Goto(c.clone()))),
        Target::SetMark { value, mask } => {
            // mark = (mark & !mask) | value; nft writes an all-ones mask as a constant.
            if *mask == u32::MAX {
                return None;
            }
            out.push(Expr::Meta {
                key: MetaKey::Mark,
                dreg: REG1,
            });
            out.push(Expr::Bitwise {
                reg: REG1,
                len: 4,
                mask: (!mask).to_ne_bytes().to_vec(),
                xor: value.to_ne_bytes().to_vec(),
                explicit: true,
            });
            out.push(Expr::MetaSet {
                key: MetaKey::Mark,
                sreg: REG1,
            });
        }
        Target::Masquerade => out.push(Expr::Masquerade),
        Target::Log(spec) => {
            out.push(Expr::LimitPerSecond {
                rate: u64::from(LOG_RATE_PER_SECOND),
                burst: LOG_BURST,
            });
            out.push(Expr::Log {
                prefix: spec.prefix.clone(),
                group: spec.group,
            });
        }
        Target::Vmap(name) => {
            match ruleset.maps.get(name)?.key {
                MapKey::OutIface => out.push(Expr::Meta {
                    key: MetaKey::OifName,
                    dreg: REG1,
                }),
                MapKey::InIface => out.push(Expr::Meta {
                    key: MetaKey::IifName,
                    dreg: REG1,
                }),
                MapKey::InIfaceSource => {
                    out.push(Expr::Meta {
                        key: MetaKey::IifName,
                        dreg: REG1,
                    });
                    out.push(load_addr(SADDR, REG2));
                }
                MapKey::Addr => out.push(load_addr(SADDR, REG1)),
            }
            out.push(vmap(name));
        }
        Target::AddrVmap { map, direction } => {
            out.push(load_addr(addr_offset(*direction), REG1));
            out.push(vmap(map));
        }
    }
    Some(out)
}

fn vmap(name: &str) -> Expr {
    Expr::Lookup {
        sreg: REG1,
        set: name.to_string(),
        invert: false,
        verdict_map: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::render::nft::probe_ruleset;

    #[test]
    fn every_object_of_the_probe_table_is_encoded_in_the_order_nft_creates_it() {
        let rs = probe_ruleset();
        let t = table(&rs).expect("every form of the renderer is encoded");
        let chains: Vec<_> = nft::chains(&rs).into_keys().collect();
        assert_eq!(
            t.chains.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
            chains
        );
        let sets: Vec<_> = nft::sets(&rs).into_keys().collect();
        assert_eq!(
            t.sets.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            sets
        );
        let rules: usize = nft::chains(&rs).values().map(|c| c.rules.len()).sum();
        assert_eq!(t.rules.len(), rules);
        assert!(t.rules.iter().all(|r| {
            r.comment
                .as_deref()
                .is_some_and(|c| c.starts_with("sluice:"))
        }));
    }

    #[test]
    fn a_prefix_nft_would_rewrite_is_left_to_nft() {
        let mut rs = probe_ruleset();
        let chain = rs
            .tables
            .values_mut()
            .flat_map(|t| t.values_mut())
            .find(|c| c.name == "SLUICE-F")
            .unwrap();
        chain.rules.push(Rule::new(
            vec![Match::Source {
                net: "0.0.0.0/0".parse().unwrap(),
                negated: false,
            }],
            Target::Accept,
        ));
        assert!(table(&rs).is_none());
    }
}
