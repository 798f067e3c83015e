//! An element-only nftables plan sent over netlink ([`sluice_netlink::nft_elements`])
//! instead of through `nft -f`: the planner's element texts (written by
//! [`sluice_policy::render::nft`]) read back into netlink's typed elements.
//!
//! Only the forms that renderer writes are read; anything else (a declaration it does
//! not emit, an element that does not parse) makes [`netlink_changes`] return `None`,
//! and the executor writes that plan with `nft -f`, which reads every form.

use std::net::Ipv4Addr;

use sluice_netlink::nft_elements::{Element, Key, SetChanges, Verdict};
use sluice_policy::dataplane::nft_plan::NftElementChanges;
use sluice_policy::render::nft;

/// How the elements of a set or map of one declaration are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Form {
    Addr,
    AddrRange,
    Tuple,
    Marks,
    MarkTuple,
    IfaceMap,
    IfaceAddrMap,
    AddrRangeMap,
}

/// The form of the elements of a set or map declared `decl` ([`nft::NftSet::state_text`]).
pub(super) fn form(decl: &str) -> Option<Form> {
    let set = |d: String| format!("set {d}");
    let map = |key| format!("map {}", nft::map_decl_of(key));
    use sluice_policy::dataplane::{MapKey, SetKind};
    [
        (set(nft::set_decl_of(SetKind::HashIp)), Form::Addr),
        (
            set(nft::set_decl_of(SetKind::AddrIntervals)),
            Form::AddrRange,
        ),
        (
            set(nft::set_decl_of(SetKind::AddrProtoPortIntervals)),
            Form::Tuple,
        ),
        (set(nft::set_decl_of(SetKind::ClassIntervals)), Form::Marks),
        (
            set(nft::set_decl_of(SetKind::ClassProtoPortIntervals)),
            Form::MarkTuple,
        ),
        (map(MapKey::OutIface), Form::IfaceMap),
        (map(MapKey::InIfaceSource), Form::IfaceAddrMap),
        (map(MapKey::Addr), Form::AddrRangeMap),
    ]
    .into_iter()
    .find(|(d, _)| d == decl)
    .map(|(_, f)| f)
}

/// The plan's element changes as netlink sets them, or `None` when one of them is
/// in a form this reader does not know.
pub fn netlink_changes(changes: &[NftElementChanges]) -> Option<Vec<SetChanges>> {
    changes
        .iter()
        .map(|c| {
            let form = form(&c.decl)?;
            Some(SetChanges {
                set: c.name.clone(),
                delete: c
                    .delete
                    .iter()
                    .map(|t| element(form, t, false))
                    .collect::<Option<_>>()?,
                add: c
                    .add
                    .iter()
                    .map(|t| element(form, t, true))
                    .collect::<Option<_>>()?,
            })
        })
        .collect()
}

/// One element's text: a key (a deletion), or for a map added to, `key : verdict`.
pub(super) fn element(form: Form, text: &str, add: bool) -> Option<Element> {
    let is_map = matches!(
        form,
        Form::IfaceMap | Form::IfaceAddrMap | Form::AddrRangeMap
    );
    let (key, verdict) = match (is_map, add) {
        (true, true) => {
            let (k, v) = text.split_once(" : ")?;
            (k, Some(verdict(v)?))
        }
        _ => (text, None),
    };
    let key = match form {
        Form::Addr => Key::Addr(key.parse().ok()?),
        Form::AddrRange | Form::AddrRangeMap => {
            let (a, b) = addr_range(key)?;
            Key::AddrRange(a, b)
        }
        Form::Marks => {
            let (a, b) = mark_range(key)?;
            Key::MarkRange(a, b)
        }
        Form::MarkTuple => {
            let mut parts = key.split(" . ");
            let marks = mark_range(parts.next()?)?;
            let protocol = protocol(parts.next()?)?;
            let ports = port_range(parts.next()?)?;
            if parts.next().is_some() {
                return None;
            }
            Key::MarkTuple {
                marks,
                protocol,
                ports,
            }
        }
        Form::Tuple => {
            let mut parts = key.split(" . ");
            let addrs = addr_range(parts.next()?)?;
            let protocol = protocol(parts.next()?)?;
            let ports = port_range(parts.next()?)?;
            if parts.next().is_some() {
                return None;
            }
            Key::Tuple {
                addrs,
                protocol,
                ports,
            }
        }
        Form::IfaceMap => Key::Iface(iface(key)?),
        Form::IfaceAddrMap => {
            let (i, a) = key.split_once(" . ")?;
            Key::IfaceAddr(iface(i)?, a.parse().ok()?)
        }
    };
    Some(Element { key, verdict })
}

fn addr_range(text: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    match text.split_once('-') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => {
            let a = text.parse().ok()?;
            Some((a, a))
        }
    }
}

/// Address classes as [`nft::class_text`] writes them: `a` or `a-b`, decimal (nft's
/// own hexadecimal `0x…` is read too).
fn mark_range(text: &str) -> Option<(u32, u32)> {
    let mark = |t: &str| match t.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    };
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (mark(a)?, mark(b)?),
        None => {
            let a = mark(text)?;
            (a, a)
        }
    };
    (a <= b).then_some((a, b))
}

fn port_range(text: &str) -> Option<(u16, u16)> {
    match text.split_once('-') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => {
            let p = text.parse().ok()?;
            Some((p, p))
        }
    }
}

fn protocol(text: &str) -> Option<u8> {
    use sluice_policy::model::Protocol;
    [
        (Protocol::Tcp, 6),
        (Protocol::Udp, 17),
        (Protocol::Sctp, 132),
        (Protocol::Icmp, 1),
    ]
    .into_iter()
    .find(|(p, _)| nft::proto_text(*p) == text)
    .map(|(_, n)| n)
    .or_else(|| text.parse().ok())
}

/// `"name"`, an exact interface name (a `*` wildcard is nft's, not a key).
fn iface(text: &str) -> Option<String> {
    let name = text.strip_prefix('"')?.strip_suffix('"')?;
    (!name.contains(['"', '*']) && name.len() <= sluice_netlink::nft_elements::MAX_IFNAME)
        .then(|| name.to_string())
}

fn verdict(text: &str) -> Option<Verdict> {
    Some(match text.split_once(' ') {
        None => match text {
            "accept" => Verdict::Accept,
            "drop" => Verdict::Drop,
            "return" => Verdict::Return,
            "continue" => Verdict::Continue,
            _ => return None,
        },
        Some(("jump", c)) => Verdict::Jump(c.to_string()),
        Some(("goto", c)) => Verdict::Goto(c.to_string()),
        Some(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::render::nft::{nft_map, nft_set, probe_ruleset};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Every element the renderer writes for the probe table (one of each kind).
    fn probe_changes() -> Vec<NftElementChanges> {
        let rs = probe_ruleset();
        rs.sets
            .values()
            .map(nft_set)
            .chain(rs.maps.values().map(nft_map))
            .map(|s| NftElementChanges {
                name: s.name.clone(),
                decl: s.state_text(),
                delete: vec![],
                add: s.elements.into_iter().collect(),
            })
            .collect()
    }

    #[test]
    fn every_element_the_renderer_writes_is_read_into_its_netlink_form() {
        let changes = netlink_changes(&probe_changes()).expect("every form known");
        let by_name = |n: &str| &changes.iter().find(|c| c.set == n).unwrap().add;
        assert_eq!(
            by_name("SLUICE-T")[0].key,
            Key::Tuple {
                addrs: (ip("10.0.0.0"), ip("10.0.0.9")),
                protocol: 132,
                ports: (80, 90)
            }
        );
        assert_eq!(
            by_name("SLUICE-A")[0].key,
            Key::AddrRange(ip("10.0.0.0"), ip("10.0.0.9"))
        );
        assert_eq!(by_name("SLUICE-I")[0].key, Key::Addr(ip("10.0.0.1")));
        // hash:net: the painted ranges, as an interval set.
        assert_eq!(by_name("SLUICE-N").len(), 2);
        assert!(by_name("SLUICE-MO").contains(&Element {
            key: Key::Iface("slc0".into()),
            verdict: Some(Verdict::Goto("SLUICE-G".into()))
        }));
        assert_eq!(
            by_name("SLUICE-MS")[0],
            Element {
                key: Key::IfaceAddr("slc0".into(), ip("10.0.0.1")),
                verdict: Some(Verdict::Goto("SLUICE-G".into()))
            }
        );
        assert_eq!(by_name("SLUICE-MI")[0].verdict, Some(Verdict::Drop));
        assert_eq!(
            by_name("SLUICE-CT")[0].key,
            Key::MarkTuple {
                marks: (0, 7),
                protocol: 6,
                ports: (80, 90)
            }
        );
        assert_eq!(by_name("SLUICE-CA")[0].key, Key::MarkRange(3, 3));
        assert_eq!(
            by_name("SLUICE-MC")[0],
            Element {
                key: Key::AddrRange(ip("10.0.0.0"), ip("10.0.0.9")),
                verdict: Some(Verdict::Jump("SLUICE-C".into()))
            }
        );
    }

    #[test]
    fn address_classes_are_read_decimal_or_hexadecimal_and_a_reversed_range_is_not_read() {
        let decl = nft::set_decl_of(sluice_policy::dataplane::SetKind::ClassIntervals);
        let marks = |texts: &[&str]| {
            netlink_changes(&[NftElementChanges {
                name: "CA".into(),
                decl: format!("set {decl}"),
                delete: texts.iter().map(|t| t.to_string()).collect(),
                add: vec![],
            }])
            .map(|c| {
                c[0].delete
                    .iter()
                    .map(|e| e.key.clone())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            marks(&["12", "0x10-0x3fff"]),
            Some(vec![Key::MarkRange(12, 12), Key::MarkRange(16, 0x3fff)])
        );
        assert_eq!(marks(&["9-3"]), None);
        assert_eq!(marks(&["0x00000000/29"]), None);
    }

    #[test]
    fn a_deleted_map_element_is_its_key_and_an_unknown_form_falls_back_to_nft() {
        let del = NftElementChanges {
            name: "M".into(),
            decl: "map type ifname : verdict;".into(),
            delete: vec!["\"slc1\"".into()],
            add: vec![],
        };
        assert_eq!(
            netlink_changes(std::slice::from_ref(&del)).unwrap()[0].delete,
            [Element {
                key: Key::Iface("slc1".into()),
                verdict: None
            }]
        );
        let odd = NftElementChanges {
            decl: "set type ether_addr;".into(),
            ..del.clone()
        };
        assert_eq!(netlink_changes(&[odd]), None);
        let wildcard = NftElementChanges {
            delete: vec!["\"slc*\"".into()],
            ..del
        };
        assert_eq!(netlink_changes(&[wildcard]), None);
    }
}
