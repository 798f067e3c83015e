//! The nftables change planner: from a desired [`Ruleset`] and what sluice's table
//! holds ([`NftState`], read back with `nft -j list table ip sluice` or left by the
//! previous write), one `nft -f` transaction with the least change: element adds and
//! deletes for sets and maps, whole rewrites only of chains that differ.
//!
//! Order inside the one transaction (nft applies a file atomically, so no packet
//! ever sees a step of it; the order only has to satisfy nft's references):
//! 1. new chains are declared (map elements and rules may jump to them);
//! 2. new sets and maps are declared;
//! 3. elements no longer wanted are deleted, then wanted ones added (deleting first
//!    keeps interval sets free of overlaps: a merged range replaces its parts);
//! 4. new and changed chains get their rules (`flush chain` first when it exists);
//! 5. chains no longer wanted are flushed, then unwanted sets and maps deleted, then
//!    those chains deleted (nothing references them any more).
//!
//! A set, map or base chain whose declaration differs (type, flags, hook) cannot be
//! changed in place; the plan is then the full [`crate::render::nft::render`], which
//! replaces the table in the same single transaction.
//!
//! Chains are compared by the identity hashes in their rules' comments (the same
//! `sluice:<hash>` scheme as iptables), so nft's rewriting of rule text on listing
//! (`meta l4proto udp th dport` printed as `udp dport`) never counts as a change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde_json::Value;

use super::merge::{Merged, merge_by};
use super::{ModelError, Ruleset, SetMember};
use crate::render::iptables::COMMENT_PREFIX;
use crate::render::nft::{self, FAMILY, TABLE};

/// What sluice's table holds, as far as planning cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftState {
    /// Chain name → declaration (the base chain's hook, `None` for a regular chain)
    /// and the identity hash of each rule in order (`None`: a rule without one).
    pub chains: BTreeMap<String, NftChainState>,
    /// Set or map name → declaration and elements, as text.
    pub sets: BTreeMap<String, NftSetState>,
}

/// One chain of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftChainState {
    /// `filter forward 0 accept` for a base chain; `None` for a regular one.
    pub hook: Option<String>,
    pub rules: Vec<Option<String>>,
}

/// One set or map of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftSetState {
    /// `set type ipv4_addr; flags interval;`, `map type ifname : verdict;`.
    pub decl: String,
    pub elements: BTreeSet<String>,
}

impl NftState {
    /// What the table holds after a successful write of `ruleset`.
    pub fn of(ruleset: &Ruleset) -> NftState {
        let chains = nft::chains(ruleset)
            .into_values()
            .map(|c| {
                (
                    c.name,
                    NftChainState {
                        hook: c.hook.map(|h| h.state_text()),
                        rules: c.rules.into_iter().map(|(_, h)| Some(h)).collect(),
                    },
                )
            })
            .collect();
        let sets = nft::sets(ruleset)
            .into_values()
            .map(|s| {
                (
                    s.name.clone(),
                    NftSetState {
                        decl: s.state_text(),
                        elements: s.elements,
                    },
                )
            })
            .collect();
        NftState { chains, sets }
    }

    /// Elements of every set and map.
    pub fn element_count(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum()
    }
}

/// `nft -j list table ip sluice` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading nft's JSON listing: {0}")]
pub struct NftParseError(pub String);

fn err<T>(what: impl Into<String>) -> Result<T, NftParseError> {
    Err(NftParseError(what.into()))
}

/// What the kernel holds, from `nft -j list table ip sluice` output. Objects of other
/// tables (a listing of the whole ruleset) are ignored.
pub fn parse_listing(json: &str) -> Result<NftState, NftParseError> {
    let root: Value = serde_json::from_str(json).map_err(|e| NftParseError(e.to_string()))?;
    let Some(items) = root.get("nftables").and_then(Value::as_array) else {
        return err("no \"nftables\" array");
    };
    let mut state = NftState::default();
    let ours = |o: &Value| {
        o.get("family").and_then(Value::as_str) == Some(FAMILY)
            && o.get("table").and_then(Value::as_str) == Some(TABLE)
    };
    for item in items {
        if let Some(c) = item.get("chain") {
            if !ours(c) {
                continue;
            }
            let name = str_field(c, "name")?;
            let hook = c.get("hook").and_then(Value::as_str).map(|hook| {
                format!(
                    "{} {hook} {} {}",
                    c.get("type").and_then(Value::as_str).unwrap_or("?"),
                    c.get("prio").and_then(Value::as_i64).unwrap_or(0),
                    c.get("policy").and_then(Value::as_str).unwrap_or("accept"),
                )
            });
            state.chains.entry(name).or_default().hook = hook;
        } else if let Some(r) = item.get("rule") {
            if !ours(r) {
                continue;
            }
            let chain = str_field(r, "chain")?;
            let hash = r
                .get("comment")
                .and_then(Value::as_str)
                .and_then(|c| c.strip_prefix(COMMENT_PREFIX))
                .map(str::to_string);
            state.chains.entry(chain).or_default().rules.push(hash);
        } else if let Some((keyword, s)) = item
            .get("set")
            .map(|s| ("set", s))
            .or_else(|| item.get("map").map(|m| ("map", m)))
        {
            if !ours(s) {
                continue;
            }
            let name = str_field(s, "name")?;
            let set =
                parse_set(keyword, s).map_err(|e| NftParseError(format!("{name}: {}", e.0)))?;
            state.sets.insert(name, set);
        }
    }
    Ok(state)
}

fn str_field(o: &Value, key: &str) -> Result<String, NftParseError> {
    o.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| NftParseError(format!("object without {key}: {o}")))
}

fn parse_set(keyword: &str, s: &Value) -> Result<NftSetState, NftParseError> {
    let types: Vec<String> = match s.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| NftParseError("odd type list".into()))?,
        _ => return err("set without a type"),
    };
    let interval = s
        .get("flags")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|x| x.as_str() == Some("interval")));
    let joined = types.join(" . ");
    let decl = if keyword == "map" {
        let data = s.get("map").and_then(Value::as_str).unwrap_or("?");
        if interval {
            format!("map type {joined} : {data}; flags interval;")
        } else {
            format!("map type {joined} : {data};")
        }
    } else {
        format!("set {}", nft::set_decl(&joined, interval))
    };
    let mut elements = BTreeSet::new();
    for e in s
        .get("elem")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = if keyword == "map" {
            let pair = e
                .as_array()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| NftParseError(format!("map element {e}")))?;
            format!("{} : {}", key_text(&types, &pair[0])?, verdict(&pair[1])?)
        } else {
            // An element with options (timeout, comment) comes wrapped in "elem".
            let v = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
            key_text(&types, v)?
        };
        elements.insert(text);
    }
    Ok(NftSetState { decl, elements })
}

/// An element's key as [`nft`] writes it, from its listed form.
fn key_text(types: &[String], v: &Value) -> Result<String, NftParseError> {
    let parts: Vec<&Value> = match v.get("concat").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![v],
    };
    if parts.len() != types.len() {
        return err(format!("element {v} does not fit type {types:?}"));
    }
    let texts = types
        .iter()
        .zip(parts)
        .map(|(t, p)| component(t, p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(texts.join(" . "))
}

fn component(ty: &str, v: &Value) -> Result<String, NftParseError> {
    let bad = || NftParseError(format!("{ty} element {v}"));
    match ty {
        "ipv4_addr" => {
            let (a, b) = addr_bounds(v).ok_or_else(bad)?;
            Ok(nft::addr_text(a, b))
        }
        "inet_service" => {
            let (a, b) = match v {
                Value::Number(_) => {
                    let p = port(v).ok_or_else(bad)?;
                    (p, p)
                }
                _ => {
                    let r = v.get("range").and_then(Value::as_array).ok_or_else(bad)?;
                    (
                        port(r.first().ok_or_else(bad)?).ok_or_else(bad)?,
                        port(r.get(1).ok_or_else(bad)?).ok_or_else(bad)?,
                    )
                }
            };
            Ok(nft::port_text(a, b))
        }
        "inet_proto" => match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(match n.as_u64() {
                Some(6) => "tcp".into(),
                Some(17) => "udp".into(),
                Some(132) => "sctp".into(),
                _ => n.to_string(),
            }),
            _ => Err(bad()),
        },
        "ifname" => v.as_str().map(nft::iface_text).ok_or_else(bad),
        "mark" => {
            let (a, b) = mark_bounds(v).ok_or_else(bad)?;
            Ok(nft::class_text(a, b))
        }
        _ => Err(bad()),
    }
}

fn port(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|p| u16::try_from(p).ok())
}

fn addr(v: &Value) -> Option<u32> {
    v.as_str()
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
        .map(u32::from)
}

/// An address, prefix or range as inclusive bounds.
fn addr_bounds(v: &Value) -> Option<(u32, u32)> {
    if let Some(a) = addr(v) {
        return Some((a, a));
    }
    if let Some(p) = v.get("prefix") {
        let a = addr(p.get("addr")?)?;
        let len = u32::try_from(p.get("len")?.as_u64()?).ok()?;
        let net = ipnet::Ipv4Net::new(Ipv4Addr::from(a), u8::try_from(len).ok()?).ok()?;
        return Some(crate::compile::intervals::net_bounds(net));
    }
    let r = v.get("range")?.as_array()?;
    Some((addr(r.first()?)?, addr(r.get(1)?)?))
}

/// A mark, mark prefix (`0x00000000/18`, listed as `{"prefix": {"addr": 0, "len":
/// 18}}`) or mark range as inclusive bounds.
fn mark_bounds(v: &Value) -> Option<(u32, u32)> {
    let mark = |v: &Value| v.as_u64().and_then(|m| u32::try_from(m).ok());
    if let Some(m) = mark(v) {
        return Some((m, m));
    }
    if let Some(p) = v.get("prefix") {
        let a = mark(p.get("addr")?)?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        let net = ipnet::Ipv4Net::new(Ipv4Addr::from(a), len).ok()?;
        return Some(crate::compile::intervals::net_bounds(net));
    }
    let r = v.get("range")?.as_array()?;
    Some((mark(r.first()?)?, mark(r.get(1)?)?))
}

fn verdict(v: &Value) -> Result<String, NftParseError> {
    let obj = v
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or_else(|| NftParseError(format!("verdict {v}")))?;
    let (kind, arg) = obj.iter().next().expect("one entry");
    match kind.as_str() {
        "accept" | "drop" | "return" | "continue" => Ok(kind.clone()),
        "jump" | "goto" => {
            let target = arg
                .get("target")
                .and_then(Value::as_str)
                .ok_or_else(|| NftParseError(format!("verdict {v}")))?;
            Ok(format!("{kind} {target}"))
        }
        _ => err(format!("verdict {v}")),
    }
}

/// One sync's transaction and what it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftPlan {
    /// `nft -f` input, one transaction; empty when nothing changes.
    pub script: String,
    /// The same transaction when it changes elements of existing sets and maps only
    /// (no chain, set or map declared, rewritten or deleted): what a writer that
    /// speaks netlink can send without `nft`. `None` otherwise.
    pub element_changes: Option<Vec<NftElementChanges>>,
    /// The transaction replaces the whole table ([`nft::render`]): what a writer that
    /// encodes whole tables can send without `nft`, from the desired model alone.
    pub replaces_table: bool,
    pub chains_rewritten: usize,
    pub chains_deleted: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
    pub sets_created: usize,
    pub sets_deleted: usize,
}

impl NftPlan {
    pub fn is_empty(&self) -> bool {
        self.script.is_empty()
    }
}

/// The element changes of one existing set or map, as the script writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftElementChanges {
    pub name: String,
    /// Its declaration as [`NftSetState::decl`] says it (`set type ipv4_addr; flags
    /// interval;`, `map type ifname : verdict;`): how to read the elements.
    pub decl: String,
    /// Keys to delete (a map element's key without its verdict), deleted first.
    pub delete: Vec<String>,
    /// Elements to add (a map element as `key : verdict`).
    pub add: Vec<String>,
}

/// The model's own checks, plus one nft namespace for chains of every table and one
/// for sets and maps.
fn check(desired: &Ruleset) -> Result<(), ModelError> {
    desired.validate()?;
    let mut seen = BTreeSet::new();
    for chains in desired.tables.values() {
        for name in chains.keys() {
            if !seen.insert(name) {
                return Err(ModelError::Collision(name.clone()));
            }
        }
    }
    if let Some(name) = desired.maps.keys().find(|m| desired.sets.contains_key(*m)) {
        return Err(ModelError::Collision(name.clone()));
    }
    Ok(())
}

/// The full replacement and its counts.
fn full(desired: &Ruleset) -> NftPlan {
    let chains = nft::chains(desired);
    let sets = nft::sets(desired);
    NftPlan {
        script: nft::render(desired),
        element_changes: None,
        replaces_table: true,
        chains_rewritten: chains.len(),
        chains_deleted: 0,
        elements_added: sets.values().map(|s| s.elements.len()).sum(),
        elements_deleted: 0,
        sets_created: sets.len(),
        sets_deleted: 0,
    }
}

/// The key part of an element's text (what `delete element` names): a map element is
/// `key : verdict`.
fn element_key<'a>(keyword: &str, text: &'a str) -> &'a str {
    if keyword == "map" {
        text.split_once(" : ").map_or(text, |(k, _)| k)
    } else {
        text
    }
}

/// How `delete element` must name `key` in a set declared `decl`. nft 1.0.6 sends a
/// `mark . inet_proto . inet_service` interval element whose mark is one value, in a
/// command that names no range, by its key alone with the mark in host byte order,
/// which the kernel does not find (ENOENT: the whole transaction fails, and would
/// again at every retry). Spelled as the range `N-N`, the element goes in its interval
/// form, which the kernel finds; it is the same element.
fn deletion_key(decl: &str, key: &str) -> String {
    let class_tuples = format!(
        "set {}",
        nft::set_decl_of(crate::dataplane::SetKind::ClassProtoPortIntervals)
    );
    match key.split_once(" . ") {
        Some((mark, rest)) if decl == class_tuples && !mark.contains('-') => {
            format!("{mark}-{mark} . {rest}")
        }
        _ => key.to_string(),
    }
}

/// One set or map that a plan touches.
struct SetDelta {
    name: String,
    /// The declaration, as [`NftSetState::decl`].
    decl: String,
    /// The `add set|map` line, when the set is new.
    declare: Option<String>,
    /// Keys of elements to delete (deduplicated: two members may write one element).
    delete: BTreeSet<String>,
    /// Elements to add.
    add: BTreeSet<String>,
}

/// What a plan changes, before it is written out.
#[derive(Default)]
struct Delta {
    sets: Vec<SetDelta>,
    /// (`set` or `map`, name) of sets and maps no longer wanted.
    gone_sets: Vec<(&'static str, String)>,
}

/// The transaction from `kernel` (`None`: no sluice table yet) to `desired`.
pub fn plan(desired: &Ruleset, kernel: Option<&NftState>) -> Result<NftPlan, ModelError> {
    check(desired)?;
    let Some(have) = kernel else {
        return Ok(full(desired));
    };
    let chains = nft::chains(desired);
    let sets = nft::sets(desired);
    // What cannot change in place: replace the table instead.
    let redeclared = sets.values().any(|s| {
        have.sets
            .get(&s.name)
            .is_some_and(|h| h.decl != s.state_text())
    }) || hooks_changed(&chains, &have.chains);
    if redeclared {
        return Ok(full(desired));
    }
    let mut delta = Delta::default();
    for s in sets.values() {
        let empty = BTreeSet::new();
        let had = have.sets.get(&s.name);
        let had_elements = had.map_or(&empty, |h| &h.elements);
        let d = SetDelta {
            name: s.name.clone(),
            decl: s.state_text(),
            declare: had.is_none().then(|| nft::add_set_line(TABLE, s)),
            delete: had_elements
                .difference(&s.elements)
                .map(|e| element_key(s.keyword, e).to_string())
                .collect(),
            add: s.elements.difference(had_elements).cloned().collect(),
        };
        delta.sets.push(d);
    }
    for (name, h) in have.sets.iter().filter(|(n, _)| !sets.contains_key(*n)) {
        let keyword = if h.decl.starts_with("map") {
            "map"
        } else {
            "set"
        };
        delta.gone_sets.push((keyword, name.clone()));
    }
    Ok(write(&chains, &have.chains, delta))
}

/// The transaction from `written`, the model the last successful write brought the
/// table to, to `desired`. The same transaction [`plan`] makes from the kernel's
/// listing of that table, at the cost of the change rather than of the table: a set
/// or map whose members are unchanged is compared, never rendered, and a changed one
/// is diffed member by member in one merge walk of both sides and renders only its
/// added and removed members (`hash:net`, whose elements are the ranges all its
/// members paint together, is painted on both sides and renders only the ranges
/// that differ).
pub fn plan_from_written(desired: &Ruleset, written: &Ruleset) -> Result<NftPlan, ModelError> {
    check(desired)?;
    let (chains, had_chains) = changed_chains(desired, written);
    let set_redeclared = desired.sets.values().any(|s| {
        written.maps.contains_key(&s.name)
            || written.sets.get(&s.name).is_some_and(|w| {
                w.kind != s.kind && nft::set_decl_of(w.kind) != nft::set_decl_of(s.kind)
            })
    });
    let map_redeclared = desired.maps.values().any(|m| {
        written.sets.contains_key(&m.name)
            || written.maps.get(&m.name).is_some_and(|w| {
                w.key != m.key && nft::map_decl_of(w.key) != nft::map_decl_of(m.key)
            })
    });
    if set_redeclared || map_redeclared || hooks_changed(&chains, &had_chains) {
        return Ok(full(desired));
    }
    let mut delta = Delta::default();
    for s in desired.sets.values() {
        let Some(w) = written.sets.get(&s.name) else {
            let new = nft::nft_set(s);
            delta.sets.push(SetDelta {
                name: s.name.clone(),
                decl: new.state_text(),
                declare: Some(nft::add_set_line(TABLE, &new)),
                delete: BTreeSet::new(),
                add: new.elements,
            });
            continue;
        };
        if w.members == s.members && w.kind == s.kind {
            continue;
        }
        if w.kind != s.kind {
            // One declaration, two kinds (`hash:net` and address intervals): the
            // members do not say which elements they share; compare the elements.
            let (old, new) = (nft::nft_set(w), nft::nft_set(s));
            delta.sets.push(SetDelta {
                name: s.name.clone(),
                decl: new.state_text(),
                declare: None,
                delete: old.elements.difference(&new.elements).cloned().collect(),
                add: new.elements.difference(&old.elements).cloned().collect(),
            });
            continue;
        }
        let kind = s.kind;
        let decl = format!("set {}", nft::set_decl_of(kind));
        if !nft::member_local(kind) {
            // `hash:net`: the elements are the ranges all members paint together;
            // paint both sides, walk the two sorted range lists once, render only
            // the ranges that differ.
            let (mut delete, mut add) = (BTreeSet::new(), BTreeSet::new());
            let (old, new) = (nft::net_ranges(&w.members), nft::net_ranges(&s.members));
            for step in merge_by(&old, &new, |a, b| a.cmp(b)) {
                match step {
                    Merged::Left(&(a, b)) => delete.insert(nft::addr_text(a, b)),
                    Merged::Right(&(a, b)) => add.insert(nft::addr_text(a, b)),
                    Merged::Both(..) => false,
                };
            }
            delta.sets.push(SetDelta {
                name: s.name.clone(),
                decl,
                declare: None,
                delete,
                add,
            });
            continue;
        }
        // A member whose element another member of the other side still writes
        // (an address and its one-address range) changes nothing in the kernel.
        let written_by = |set: &BTreeSet<SetMember>, m: &SetMember| {
            nft::element_alias(kind, m).is_some_and(|a| set.contains(&a))
        };
        let (mut delete, mut add) = (BTreeSet::new(), BTreeSet::new());
        for step in merge_by(&w.members, &s.members, |a, b| a.cmp(b)) {
            match step {
                Merged::Left(m) if !written_by(&s.members, m) => {
                    delete.extend(nft::element_text(kind, m));
                }
                Merged::Right(m) if !written_by(&w.members, m) => {
                    add.extend(nft::element_text(kind, m));
                }
                _ => {}
            }
        }
        delta.sets.push(SetDelta {
            name: s.name.clone(),
            decl,
            declare: None,
            delete,
            add,
        });
    }
    for m in desired.maps.values() {
        let Some(w) = written.maps.get(&m.name) else {
            let new = nft::nft_map(m);
            delta.sets.push(SetDelta {
                name: m.name.clone(),
                decl: new.state_text(),
                declare: Some(nft::add_set_line(TABLE, &new)),
                delete: BTreeSet::new(),
                add: new.elements,
            });
            continue;
        };
        if w.elements == m.elements {
            continue;
        }
        // A key whose verdict changed is deleted and added again, as from a listing.
        // One merge walk of the two maps (the class map has thousands of elements).
        let (mut delete, mut add) = (BTreeSet::new(), BTreeSet::new());
        for step in merge_by(&w.elements, &m.elements, |a, b| a.0.cmp(b.0)) {
            match step {
                Merged::Left((k, _)) => {
                    delete.insert(nft::map_key_text(k));
                }
                Merged::Right((k, v)) => {
                    add.insert(nft::map_element_text(k, v));
                }
                Merged::Both((k, had), (_, v)) if had != v => {
                    delete.insert(nft::map_key_text(k));
                    add.insert(nft::map_element_text(k, v));
                }
                Merged::Both(..) => {}
            }
        }
        delta.sets.push(SetDelta {
            name: m.name.clone(),
            decl: format!("map {}", nft::map_decl_of(m.key)),
            declare: None,
            delete,
            add,
        });
    }
    for name in written
        .sets
        .keys()
        .filter(|n| !desired.sets.contains_key(*n))
    {
        delta.gone_sets.push(("set", name.clone()));
    }
    for name in written
        .maps
        .keys()
        .filter(|n| !desired.maps.contains_key(*n))
    {
        delta.gone_sets.push(("map", name.clone()));
    }
    Ok(write(&chains, &had_chains, delta))
}

/// The chains that differ between `written` and `desired`, rendered: those of
/// `desired` that are new or changed, and the state `written` left of those changed
/// or gone. A chain equal in both by value (hook, and rules that render alike) is in
/// neither: [`write`] then plans for it what it would after rendering both sides and
/// finding the same hashes, nothing. That is what keeps a sync's cost the change's,
/// not the table's.
fn changed_chains(
    desired: &Ruleset,
    written: &Ruleset,
) -> (
    BTreeMap<String, nft::NftChain>,
    BTreeMap<String, NftChainState>,
) {
    let want = nft::model_chains(desired);
    let had = nft::model_chains(written);
    let same = |name: &str, c: &nft::ModelChain<'_>| {
        had.get(name).is_some_and(|h| {
            h == c
                && c.rules
                    .iter()
                    .all(|r| nft::renders_alike(desired, written, r))
        })
    };
    let chains = want
        .iter()
        .filter(|(name, c)| !same(name, c))
        .map(|(name, c)| (name.clone(), nft::chain(desired, name, c.hook, &c.rules)))
        .collect();
    let had_chains = had
        .iter()
        .filter(|(name, _)| want.get(*name).is_none_or(|c| !same(name, c)))
        .map(|(name, h)| {
            let c = nft::chain(written, name, h.hook, &h.rules);
            (name.clone(), chain_state(c.hook, &c.rules))
        })
        .collect();
    (chains, had_chains)
}

fn chain_state(hook: Option<nft::BaseHook>, rules: &[(String, String)]) -> NftChainState {
    NftChainState {
        hook: hook.map(|h| h.state_text()),
        rules: rules.iter().map(|(_, h)| Some(h.clone())).collect(),
    }
}

/// Whether a base chain's hook differs from the one it has (it cannot change in place).
fn hooks_changed(
    chains: &BTreeMap<String, nft::NftChain>,
    have: &BTreeMap<String, NftChainState>,
) -> bool {
    chains.values().any(|c| {
        have.get(&c.name)
            .is_some_and(|h| h.hook != c.hook.map(|x| x.state_text()))
    })
}

/// The one transaction, in the order of the module's comment.
fn write(
    chains: &BTreeMap<String, nft::NftChain>,
    have: &BTreeMap<String, NftChainState>,
    delta: Delta,
) -> NftPlan {
    let mut p = NftPlan::default();
    let mut out = String::new();
    let table = TABLE;
    // 1, 2: declarations.
    for c in chains.values().filter(|c| !have.contains_key(&c.name)) {
        out.push_str(&nft::add_chain_line(table, c));
    }
    for line in delta.sets.iter().filter_map(|d| d.declare.as_ref()) {
        out.push_str(line);
        p.sets_created += 1;
    }
    // 3: elements, deletions first.
    for d in &delta.sets {
        p.elements_deleted += d.delete.len();
        let keys: Vec<String> = d.delete.iter().map(|k| deletion_key(&d.decl, k)).collect();
        nft::push_elements(&mut out, "delete", table, &d.name, keys.iter());
    }
    for d in &delta.sets {
        p.elements_added += d.add.len();
        nft::push_elements(&mut out, "add", table, &d.name, d.add.iter());
    }
    // 4: rules of new and changed chains.
    for c in chains.values() {
        match have.get(&c.name) {
            Some(h)
                if h.rules.len() == c.rules.len()
                    && h.rules
                        .iter()
                        .zip(&c.rules)
                        .all(|(had, (_, want))| had.as_deref() == Some(want.as_str())) =>
            {
                continue;
            }
            Some(_) => out.push_str(&format!("flush chain {FAMILY} {table} {}\n", c.name)),
            None => {}
        }
        nft::push_rules(&mut out, table, c);
        p.chains_rewritten += 1;
    }
    // 5: removals, references first.
    let gone_chains: Vec<&String> = have.keys().filter(|n| !chains.contains_key(*n)).collect();
    for name in &gone_chains {
        out.push_str(&format!("flush chain {FAMILY} {table} {name}\n"));
    }
    for (keyword, name) in &delta.gone_sets {
        out.push_str(&format!("delete {keyword} {FAMILY} {table} {name}\n"));
        p.sets_deleted += 1;
    }
    for name in &gone_chains {
        out.push_str(&format!("delete chain {FAMILY} {table} {name}\n"));
        p.chains_deleted += 1;
    }
    let element_only = p.chains_rewritten == 0
        && p.chains_deleted == 0
        && p.sets_created == 0
        && p.sets_deleted == 0
        && !out.is_empty();
    if element_only {
        p.element_changes = Some(
            delta
                .sets
                .into_iter()
                .filter(|d| !d.delete.is_empty() || !d.add.is_empty())
                .map(|d| NftElementChanges {
                    name: d.name,
                    decl: d.decl,
                    delete: d.delete.into_iter().collect(),
                    add: d.add.into_iter().collect(),
                })
                .collect(),
        );
    }
    p.script = out;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_reads_prefixes_ranges_concatenations_and_verdicts_as_written() {
        let json = r#"{"nftables": [{"metainfo": {"json_schema_version": 1}},
          {"table": {"family": "ip", "name": "sluice", "handle": 2}},
          {"set": {"family": "ip", "name": "P", "table": "sluice",
            "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 5,
            "flags": ["interval"], "elem": [
              {"concat": [{"prefix": {"addr": "10.0.0.0", "len": 24}}, "tcp", {"range": [80, 81]}]},
              {"concat": ["10.0.1.1", "udp", 53]}]}},
          {"set": {"family": "ip", "name": "A", "table": "sluice", "type": "ipv4_addr",
            "handle": 6, "flags": ["interval"],
            "elem": [{"range": ["0.0.0.0", "9.255.255.255"]}, "10.3.0.5"]}},
          {"map": {"family": "ip", "name": "M", "table": "sluice",
            "type": ["ifname", "ipv4_addr"], "handle": 9, "map": "verdict",
            "elem": [[{"concat": ["slcabc", "10.244.1.2"]}, {"goto": {"target": "G"}}]]}},
          {"chain": {"family": "ip", "table": "sluice", "name": "FORWARD", "handle": 1,
            "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
          {"chain": {"family": "ip", "table": "other", "name": "X", "handle": 1}},
          {"rule": {"family": "ip", "table": "sluice", "chain": "FORWARD", "handle": 10,
            "comment": "sluice:1111", "expr": []}},
          {"rule": {"family": "ip", "table": "sluice", "chain": "FORWARD", "handle": 11,
            "expr": []}}]}"#;
        let s = parse_listing(json).unwrap();
        assert_eq!(
            s.sets["P"].elements,
            BTreeSet::from([
                "10.0.0.0-10.0.0.255 . tcp . 80-81".to_string(),
                "10.0.1.1 . udp . 53".to_string()
            ])
        );
        assert_eq!(
            s.sets["P"].decl,
            "set type ipv4_addr . inet_proto . inet_service; flags interval;"
        );
        assert_eq!(
            s.sets["A"].elements,
            BTreeSet::from(["0.0.0.0-9.255.255.255".to_string(), "10.3.0.5".to_string()])
        );
        assert_eq!(
            s.sets["M"].elements,
            BTreeSet::from(["\"slcabc\" . 10.244.1.2 : goto G".to_string()])
        );
        assert_eq!(s.sets["M"].decl, "map type ifname . ipv4_addr : verdict;");
        assert_eq!(
            s.chains["FORWARD"],
            NftChainState {
                hook: Some("filter forward 0 accept".into()),
                rules: vec![Some("1111".into()), None]
            }
        );
        assert!(!s.chains.contains_key("X"), "another table's chain");
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_state() {
        assert!(parse_listing("nope").is_err());
        assert!(parse_listing("{}").is_err());
    }

    /// The probe model changed in every way a sync can change a set or map.
    fn changed(mut rs: Ruleset) -> Ruleset {
        use crate::dataplane::{AddrRange, MapKeyValue, MapVerdict, PortRange, SetKind};
        use crate::model::Protocol;
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let set = |rs: &mut Ruleset, n: &str| rs.sets.get_mut(n).unwrap().members.clone();
        let mut t = set(&mut rs, "SLUICE-T");
        t.clear();
        t.insert(SetMember::Tuple {
            addrs: AddrRange {
                start: ip("10.1.0.0"),
                end: ip("10.1.0.255"),
            },
            protocol: Protocol::Tcp,
            ports: PortRange { start: 1, end: 2 },
        });
        t.insert(SetMember::IpPort {
            ip: ip("10.2.0.1"),
            protocol: Protocol::Udp,
            port: 53,
        });
        rs.sets.get_mut("SLUICE-T").unwrap().members = t;
        rs.sets
            .get_mut("SLUICE-I")
            .unwrap()
            .members
            .insert(SetMember::Ip(ip("10.0.0.2")));
        rs.sets
            .get_mut("SLUICE-N")
            .unwrap()
            .members
            .insert(SetMember::Net {
                net: "10.1.2.0/24".parse().unwrap(),
                nomatch: false,
            });
        let m = rs.maps.get_mut("SLUICE-MO").unwrap();
        m.elements
            .insert(MapKeyValue::Iface("slc1".into()), MapVerdict::Drop);
        m.elements
            .insert(MapKeyValue::Iface("slc9".into()), MapVerdict::Accept);
        m.elements.remove(&MapKeyValue::Iface("slc3".into()));
        rs.sets.insert(
            "SLUICE-NEW".into(),
            crate::dataplane::IpSet {
                name: "SLUICE-NEW".into(),
                kind: SetKind::AddrIntervals,
                members: [SetMember::Ip(ip("10.9.9.9"))].into(),
            },
        );
        rs
    }

    fn sorted_lines(script: &str) -> Vec<&str> {
        let mut l: Vec<&str> = script.lines().collect();
        l.sort_unstable();
        l
    }

    #[test]
    fn planning_from_the_last_write_makes_the_transaction_planning_from_its_listing_makes() {
        let before = crate::render::nft::probe_ruleset();
        let after = changed(before.clone());
        for (from, to) in [(&before, &after), (&after, &before)] {
            let listed = plan(to, Some(&NftState::of(from))).unwrap();
            let written = plan_from_written(to, from).unwrap();
            assert_eq!(
                sorted_lines(&written.script),
                sorted_lines(&listed.script),
                "same commands"
            );
            assert_eq!(
                (
                    written.elements_added,
                    written.elements_deleted,
                    written.sets_created,
                    written.sets_deleted,
                    written.chains_rewritten
                ),
                (
                    listed.elements_added,
                    listed.elements_deleted,
                    listed.sets_created,
                    listed.sets_deleted,
                    listed.chains_rewritten
                )
            );
            assert!(written.elements_added > 0 && written.elements_deleted > 0);
        }
        assert!(plan_from_written(&before, &before).unwrap().is_empty());
    }

    #[test]
    fn two_spellings_of_one_element_change_nothing_in_the_kernel() {
        use crate::dataplane::AddrRange;
        let mut before = changed(crate::render::nft::probe_ruleset());
        let mut after = before.clone();
        let a: Ipv4Addr = "10.9.9.9".parse().unwrap();
        after.sets.get_mut("SLUICE-NEW").unwrap().members =
            [SetMember::Range(AddrRange { start: a, end: a })].into();
        assert!(plan_from_written(&after, &before).unwrap().is_empty());
        assert!(plan_from_written(&before, &after).unwrap().is_empty());
        // Both spellings at once, then neither: the element is deleted once.
        before
            .sets
            .get_mut("SLUICE-NEW")
            .unwrap()
            .members
            .insert(SetMember::Range(AddrRange { start: a, end: a }));
        after.sets.get_mut("SLUICE-NEW").unwrap().members.clear();
        let p = plan_from_written(&after, &before).unwrap();
        assert_eq!(
            p.script,
            "delete element ip sluice SLUICE-NEW { 10.9.9.9 }\n"
        );
    }

    #[test]
    fn a_plan_of_element_changes_only_lists_them_per_set_and_any_other_change_does_not() {
        use crate::dataplane::{MapKeyValue, MapVerdict};
        let before = crate::render::nft::probe_ruleset();
        let mut after = before.clone();
        after
            .sets
            .get_mut("SLUICE-I")
            .unwrap()
            .members
            .insert(SetMember::Ip("10.0.0.2".parse().unwrap()));
        let m = after.maps.get_mut("SLUICE-MO").unwrap();
        m.elements
            .insert(MapKeyValue::Iface("slc1".into()), MapVerdict::Drop);
        let want = vec![
            NftElementChanges {
                name: "SLUICE-I".into(),
                decl: "set type ipv4_addr;".into(),
                delete: vec![],
                add: vec!["10.0.0.2".into()],
            },
            NftElementChanges {
                name: "SLUICE-MO".into(),
                decl: "map type ifname : verdict;".into(),
                delete: vec!["\"slc1\"".into()],
                add: vec!["\"slc1\" : drop".into()],
            },
        ];
        let written = plan_from_written(&after, &before).unwrap();
        assert_eq!(written.element_changes.as_ref(), Some(&want));
        let listed = plan(&after, Some(&NftState::of(&before))).unwrap();
        assert_eq!(listed.element_changes, Some(want));
        // A new set, a chain, or nothing at all: not for an element writer.
        let more = changed(before.clone());
        assert_eq!(
            plan_from_written(&more, &before).unwrap().element_changes,
            None
        );
        let mut chain = before.clone();
        chain.jumps.pop();
        assert_eq!(
            plan_from_written(&chain, &before).unwrap().element_changes,
            None
        );
        assert_eq!(
            plan_from_written(&before, &before).unwrap().element_changes,
            None
        );
    }

    /// The same plan, from the last write and from a listing of what that write left.
    fn same_plan_both_ways(from: &Ruleset, to: &Ruleset) -> NftPlan {
        let listed = plan(to, Some(&NftState::of(from))).unwrap();
        let written = plan_from_written(to, from).unwrap();
        assert_eq!(sorted_lines(&written.script), sorted_lines(&listed.script));
        assert_eq!(
            (written.chains_rewritten, written.chains_deleted),
            (listed.chains_rewritten, listed.chains_deleted)
        );
        written
    }

    #[test]
    fn a_chain_changed_in_place_under_the_same_name_is_still_rewritten() {
        use crate::dataplane::{Match, Table, Target};
        let before = crate::render::nft::probe_ruleset();
        // One rule's verdict, the chain's name and length unchanged.
        let mut after = before.clone();
        let g = after
            .tables
            .get_mut(&Table::Filter)
            .unwrap()
            .get_mut("SLUICE-G")
            .unwrap();
        *g.rules.last_mut().unwrap() = crate::dataplane::Rule::new(vec![], Target::Accept);
        let p = same_plan_both_ways(&before, &after);
        assert_eq!(p.chains_rewritten, 1);
        assert!(
            p.script.contains("flush chain ip sluice SLUICE-G\n"),
            "{}",
            p.script
        );
        assert_eq!(p.element_changes, None, "a chain is not an element change");
        // One match of one rule.
        let mut after = before.clone();
        let f = after
            .tables
            .get_mut(&Table::Filter)
            .unwrap()
            .get_mut("SLUICE-F")
            .unwrap();
        f.rules[1].matches = vec![Match::CtState(vec![crate::dataplane::CtState::Related])];
        assert_eq!(same_plan_both_ways(&before, &after).chains_rewritten, 1);
        // A base chain's rule (a built-in jump) changed in place.
        let mut after = before.clone();
        after.jumps[1].rule = crate::dataplane::Rule::new(vec![], Target::Jump("SLUICE-G".into()));
        let p = same_plan_both_ways(&before, &after);
        assert_eq!(p.chains_rewritten, 1);
        assert!(
            p.script.contains("flush chain ip sluice INPUT\n"),
            "{}",
            p.script
        );
    }

    #[test]
    fn a_chain_equal_by_value_is_rewritten_when_a_set_it_names_renders_it_otherwise() {
        use crate::dataplane::{SetKind, Table};
        // SLUICE-F matches `@SLUICE-I` by source address. As `hash:ip,port` the same
        // rule is looked up by destination address, protocol and port; as a tuple
        // interval set, by source address, protocol and port: one declaration (the
        // set changes in place), two rule texts.
        let mut before = crate::render::nft::probe_ruleset();
        let i = before.sets.get_mut("SLUICE-I").unwrap();
        i.kind = SetKind::HashIpPort;
        i.members.clear();
        let mut after = before.clone();
        after.sets.get_mut("SLUICE-I").unwrap().kind = SetKind::AddrProtoPortIntervals;
        assert_eq!(
            before.chain(Table::Filter, "SLUICE-F"),
            after.chain(Table::Filter, "SLUICE-F")
        );
        let p = same_plan_both_ways(&before, &after);
        assert_eq!(p.chains_rewritten, 1, "{}", p.script);
        assert!(
            p.script.contains("flush chain ip sluice SLUICE-F\n"),
            "{}",
            p.script
        );
        let (chains, _) = changed_chains(&after, &before);
        assert!(
            !chains.contains_key("SLUICE-G"),
            "a chain that renders alike"
        );
    }

    #[test]
    fn chains_added_removed_and_renamed_plan_as_from_the_listing() {
        use crate::dataplane::{Chain, Rule, Table, Target};
        let before = crate::render::nft::probe_ruleset();
        let mut after = before.clone();
        let filter = after.tables.get_mut(&Table::Filter).unwrap();
        // SLUICE-C renamed SLUICE-C2 (same rules), and the map that jumps there with it.
        let mut c = filter.remove("SLUICE-C").unwrap();
        c.name = "SLUICE-C2".into();
        filter.insert(c.name.clone(), c);
        filter.insert(
            "SLUICE-NEWC".into(),
            Chain {
                name: "SLUICE-NEWC".into(),
                rules: vec![Rule::new(vec![], Target::Drop)],
            },
        );
        for v in after
            .maps
            .get_mut("SLUICE-MC")
            .unwrap()
            .elements
            .values_mut()
        {
            *v = crate::dataplane::MapVerdict::Jump("SLUICE-C2".into());
        }
        let p = same_plan_both_ways(&before, &after);
        assert_eq!((p.chains_rewritten, p.chains_deleted), (2, 1));
        let back = same_plan_both_ways(&after, &before);
        assert_eq!((back.chains_rewritten, back.chains_deleted), (1, 2));
        // Nothing changed: nothing rendered, nothing planned.
        let (chains, had) = changed_chains(&after, &after);
        assert!(chains.is_empty() && had.is_empty());
    }

    #[test]
    fn a_changed_set_type_replaces_the_table() {
        let before = crate::render::nft::probe_ruleset();
        let mut after = before.clone();
        after.sets.get_mut("SLUICE-I").unwrap().kind = crate::dataplane::SetKind::HashNet;
        after.sets.get_mut("SLUICE-I").unwrap().members.clear();
        let p = plan_from_written(&after, &before).unwrap();
        assert_eq!(p.script, nft::render(&after));
    }

    /// The element diff from the last write (members diffed before rendering, one
    /// merge walk per set or map, `hash:net` painted and only its differing ranges
    /// rendered) against the diff of everything rendered on both sides (the listing's
    /// planner), over random members that nest, overlap and alias each other.
    mod element_diff {
        use super::*;
        use crate::dataplane::{AddrRange, MapKeyValue, MapVerdict};
        use proptest::prelude::*;

        fn ip(a: u32) -> Ipv4Addr {
            Ipv4Addr::from(0x0a00_0000 | a)
        }

        fn net() -> impl Strategy<Value = SetMember> {
            (0u32..1024, 22u8..=32, any::<bool>()).prop_map(|(a, len, nomatch)| SetMember::Net {
                net: ipnet::Ipv4Net::new(ip(a), len).unwrap().trunc(),
                nomatch,
            })
        }

        fn addr_member() -> impl Strategy<Value = SetMember> {
            prop_oneof![
                (0u32..64).prop_map(|a| SetMember::Ip(ip(a))),
                (0u32..64, 0u32..3).prop_map(|(a, n)| SetMember::Range(AddrRange {
                    start: ip(a),
                    end: ip(a + n),
                })),
            ]
        }

        /// Class-map keys (disjoint ranges) and iface-map keys, each to one of a few
        /// verdicts.
        fn verdicts() -> impl Strategy<Value = BTreeMap<u8, u8>> {
            prop::collection::btree_map(0u8..24, 0u8..3, 0..16)
        }

        #[derive(Debug)]
        struct Draw {
            nets: BTreeSet<SetMember>,
            addrs: BTreeSet<SetMember>,
            classes: BTreeMap<u8, u8>,
            ifaces: BTreeMap<u8, u8>,
        }

        fn draw() -> impl Strategy<Value = Draw> {
            (
                prop::collection::btree_set(net(), 0..10),
                prop::collection::btree_set(addr_member(), 0..16),
                verdicts(),
                verdicts(),
            )
                .prop_map(|(nets, addrs, classes, ifaces)| Draw {
                    nets,
                    addrs,
                    classes,
                    ifaces,
                })
        }

        fn ruleset(d: &Draw) -> Ruleset {
            let mut rs = crate::render::nft::probe_ruleset();
            rs.sets.get_mut("SLUICE-N").unwrap().members = d.nets.clone();
            rs.sets.get_mut("SLUICE-A").unwrap().members = d.addrs.clone();
            let verdict = |v: u8| match v {
                0 => MapVerdict::Jump("SLUICE-C".into()),
                1 => MapVerdict::Goto("SLUICE-G".into()),
                _ => MapVerdict::Drop,
            };
            rs.maps.get_mut("SLUICE-MC").unwrap().elements = d
                .classes
                .iter()
                .map(|(k, v)| {
                    let start = u32::from(*k) * 16;
                    let key = MapKeyValue::Range(AddrRange {
                        start: ip(start),
                        end: ip(start + 9),
                    });
                    (key, verdict(*v))
                })
                .collect();
            rs.maps.get_mut("SLUICE-MO").unwrap().elements = d
                .ifaces
                .iter()
                .map(|(k, v)| (MapKeyValue::Iface(format!("slc{k}")), verdict(*v)))
                .collect();
            rs
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn the_diff_of_the_members_is_the_diff_of_everything_rendered(
                a in draw(),
                b in draw(),
            ) {
                let (old, new) = (ruleset(&a), ruleset(&b));
                let written = plan_from_written(&new, &old).unwrap();
                let listed = plan(&new, Some(&NftState::of(&old))).unwrap();
                prop_assert_eq!(sorted_lines(&written.script), sorted_lines(&listed.script));
                prop_assert_eq!(
                    (written.elements_added, written.elements_deleted),
                    (listed.elements_added, listed.elements_deleted)
                );
                // The same changes per set (the two planners visit sets in another order).
                let by_name = |p: NftPlan| {
                    p.element_changes.map(|mut c| {
                        c.sort_by(|x, y| x.name.cmp(&y.name));
                        c
                    })
                };
                prop_assert_eq!(by_name(written), by_name(listed));
            }
        }
    }
}
