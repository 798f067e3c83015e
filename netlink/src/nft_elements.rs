//! Set and map element changes written to nf_tables over `NETLINK_NETFILTER`, without
//! the `nft` program: one NFNL batch (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_DELSETELEM` /
//! `NFT_MSG_NEWSETELEM` per set, `NFNL_MSG_BATCH_END`), which the kernel commits
//! entirely or not at all.
//!
//! Why: `nft -f` loads every element of an interval set into its cache before it checks
//! a new interval against them, so adding one element to a set of 54,000 costs
//! milliseconds of userspace work the kernel does not need (it checks overlaps itself).
//!
//! The messages are what nft 1.0.6 sends for the same change (`nft --debug=netlink,mnl
//! -f`), for the set kinds sluice writes:
//! - a plain `ipv4_addr` set: `NFTA_SET_ELEM_KEY`, 4 bytes;
//! - an `ipv4_addr` set with `flags interval`: a range `a-b` is two elements, the
//!   start `a` and `b + 1` flagged `NFT_SET_ELEM_INTERVAL_END`; a range ending at
//!   255.255.255.255 has no end element, and its start carries nft's
//!   "open interval" user data so that `nft list` shows the range;
//! - `ipv4_addr . inet_proto . inet_service` with `flags interval`: one element,
//!   `NFTA_SET_ELEM_KEY` and `NFTA_SET_ELEM_KEY_END` (inclusive), each field padded to
//!   4 bytes (address big-endian, protocol one byte, port big-endian);
//! - a `mark` set with `flags interval`: as an `ipv4_addr` interval set, the mark
//!   big-endian (nft converts the host-order `meta mark` to network order for interval
//!   sets, in the rule and in the elements alike);
//! - `mark . inet_proto . inet_service` with `flags interval`: as the address tuple,
//!   the mark big-endian in its field;
//! - verdict maps keyed by `ifname` (16 bytes, zero-padded) or `ifname . ipv4_addr`
//!   (16 + 4): key and `NFTA_SET_ELEM_DATA` holding the verdict (code, and chain for
//!   jump and goto). A deletion names the key only.
//! - an `ipv4_addr` verdict map with `flags interval`: the interval set's elements,
//!   the verdict on the start (before the open-interval user data), none on the end.
//!
//! Every message asks for an ack; a `NFT_MSG_GETGEN` sent after the batch marks the
//! end of the replies (the kernel handles the batch within our send, so every reply to
//! it is queued before the generation's), and its answer is the generation after the
//! commit. Any error, or a message without its ack, fails the write; the kernel has
//! then aborted the whole batch.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use netlink_sys::Socket;

use crate::error::NetlinkError;
use crate::nfnl::{self, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, attr, message, pad};

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 16;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 17;
pub(crate) const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;

pub(crate) const NLM_F_CREATE: u16 = 0x400;

pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
pub(crate) const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
pub(crate) const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
/// libnftnl's element user data: `NFTNL_UDATA_SET_ELEM_FLAGS` (type 1, 4 bytes) =
/// `NFTNL_SET_ELEM_F_INTERVAL_OPEN`, as nft writes it on a range without an end.
const UDATA_INTERVAL_OPEN: [u8; 6] = [1, 4, 1, 0, 0, 0];
const IFNAMSIZ: usize = 16;

/// An interface name longer than this does not fit a key.
pub const MAX_IFNAME: usize = IFNAMSIZ - 1;

const OP: &str = "writing nf_tables set elements";

/// A map element's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Continue,
    Jump(String),
    Goto(String),
}

/// An element's key, in the form of the set it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A plain `ipv4_addr` set.
    Addr(Ipv4Addr),
    /// An `ipv4_addr` set or verdict map with `flags interval`: an inclusive range
    /// (start = end for one address).
    AddrRange(Ipv4Addr, Ipv4Addr),
    /// An `ipv4_addr . inet_proto . inet_service` interval set: inclusive ranges of
    /// addresses and ports, one protocol number.
    Tuple {
        addrs: (Ipv4Addr, Ipv4Addr),
        protocol: u8,
        ports: (u16, u16),
    },
    /// A `mark` set with `flags interval`: an inclusive range.
    MarkRange(u32, u32),
    /// A `mark . inet_proto . inet_service` interval set: inclusive ranges of marks
    /// and ports, one protocol number.
    MarkTuple {
        marks: (u32, u32),
        protocol: u8,
        ports: (u16, u16),
    },
    /// An `ifname` map.
    Iface(String),
    /// An `ifname . ipv4_addr` map.
    IfaceAddr(String, Ipv4Addr),
}

/// One element: a key, and for an element added to a map its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Key,
    pub verdict: Option<Verdict>,
}

/// The changes to one set or map of the table: `delete` first (keys), then `add`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetChanges {
    pub set: String,
    pub delete: Vec<Element>,
    pub add: Vec<Element>,
}

/// Write `changes` to table `table` of `family` (`libc::AF_INET` for `ip`) in the
/// calling thread's network namespace, as one transaction: every deletion (of every
/// set) before every addition, as nft orders a file. Returns the ruleset generation
/// read right after the commit.
pub fn write_elements(
    family: u8,
    table: &str,
    changes: &[SetChanges],
) -> Result<u32, NetlinkError> {
    let (batch, acked) = batch(family, table, changes, 1)?;
    send_batch(&batch, &acked)
}

/// Send one NFNL batch whose messages numbered `acked` must each be acked, then a
/// `NFT_MSG_GETGEN`; returns the generation after the commit. Any error, or a message
/// without its ack, fails the write (the kernel has then aborted the whole batch).
pub(crate) fn send_batch(batch: &[u8], acked: &[u32]) -> Result<u32, NetlinkError> {
    let socket = nfnl::open()?;
    // Room for the batch (the kernel refuses a message bigger than the send buffer)
    // and its acks; root may force it past the sysctl limits.
    let room = (batch.len() + 65536).max(1 << 20);
    set_buffer(&socket, libc::SO_SNDBUFFORCE, room);
    set_buffer(&socket, libc::SO_RCVBUFFORCE, room);
    // Success acks carry no payload anyway; errors then carry only the header.
    let _ = socket.set_cap_ack(true);
    socket.send(batch, 0).map_err(NetlinkError::Socket)?;
    let gen_seq = acked.last().map_or(1, |s| s + 2);
    socket
        .send(&crate::nftables::getgen_request(gen_seq), 0)
        .map_err(NetlinkError::Socket)?;
    let mut seen = vec![false; acked.len()];
    loop {
        let (data, _) = socket.recv_from_full().map_err(NetlinkError::Socket)?;
        if let Some(generation) = read_replies(&data, acked, &mut seen, gen_seq)? {
            if let Some(i) = seen.iter().position(|s| !s) {
                return Err(NetlinkError::Decode {
                    op: OP.into(),
                    detail: format!("no ack for message {} of the batch", acked[i]),
                });
            }
            return Ok(generation);
        }
    }
}

fn set_buffer(socket: &Socket, option: libc::c_int, size: usize) {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket fd and a pointer to a c_int of the size passed.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Walk one datagram of replies: acks and errors of the batch's messages, and the
/// generation answer that ends them (`Some`).
fn read_replies(
    data: &[u8],
    acked: &[u32],
    seen: &mut [bool],
    gen_seq: u32,
) -> Result<Option<u32>, NetlinkError> {
    for reply in nfnl::replies(data, OP) {
        let reply = reply?;
        match reply.errno(OP)? {
            Some(0) => {
                if let Some(i) = acked.iter().position(|s| *s == reply.seq) {
                    seen[i] = true;
                }
            }
            Some(errno) => {
                return Err(NetlinkError::Kernel {
                    op: OP.into(),
                    errno,
                });
            }
            None if reply.seq == gen_seq
                && reply.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN =>
            {
                return crate::nftables::generation_in(reply.body, OP).map(Some);
            }
            None => {}
        }
    }
    Ok(None)
}

/// Elements per message: keeps every message far below netlink's size limits.
pub(crate) const ELEMENTS_PER_MESSAGE: usize = 256;

/// The batch as bytes, sequence numbers from `first_seq`, and the sequence numbers of
/// the messages that must be acked (every set-element message).
fn batch(
    family: u8,
    table: &str,
    changes: &[SetChanges],
    first_seq: u32,
) -> Result<(Vec<u8>, Vec<u32>), NetlinkError> {
    let mut out = Vec::new();
    let mut seq = first_seq;
    let mut acked = Vec::new();
    // Batch begin/end: AF_UNSPEC, resource id = the subsystem (big-endian).
    let batch_genmsg = [0u8, 0, 0, NFNL_SUBSYS_NFTABLES as u8];
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        &batch_genmsg,
    );
    for (kind, flags, pick) in [
        (
            NFT_MSG_DELSETELEM,
            NLM_F_REQUEST | NLM_F_ACK,
            (|c: &SetChanges| &c.delete) as fn(&SetChanges) -> &Vec<Element>,
        ),
        (
            NFT_MSG_NEWSETELEM,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            |c: &SetChanges| &c.add,
        ),
    ] {
        for c in changes {
            for chunk in pick(c).chunks(ELEMENTS_PER_MESSAGE) {
                let mut body = vec![family, 0, 0, 0];
                attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
                attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(&c.set));
                let mut list = Vec::new();
                for e in chunk {
                    encode_element(&mut list, e, kind == NFT_MSG_NEWSETELEM)?;
                }
                attr(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &list);
                seq += 1;
                acked.push(seq);
                message(
                    &mut out,
                    (NFNL_SUBSYS_NFTABLES << 8) | kind,
                    flags,
                    seq,
                    &body,
                );
            }
        }
    }
    seq += 1;
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        &batch_genmsg,
    );
    Ok((out, acked))
}

pub(crate) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// `NFTA_DATA_VALUE` holding `bytes`, nested in an attribute of `kind`.
pub(crate) fn data_value(out: &mut Vec<u8>, kind: u16, bytes: &[u8]) {
    let mut inner = Vec::new();
    attr(&mut inner, NFTA_DATA_VALUE, bytes);
    attr(out, kind | NLA_F_NESTED, &inner);
}

pub(crate) fn ifname(name: &str) -> Result<[u8; IFNAMSIZ], NetlinkError> {
    if name.len() > MAX_IFNAME || name.as_bytes().contains(&0) {
        return Err(NetlinkError::Decode {
            op: OP.into(),
            detail: format!("interface name {name:?} does not fit a key"),
        });
    }
    let mut key = [0u8; IFNAMSIZ];
    key[..name.len()].copy_from_slice(name.as_bytes());
    Ok(key)
}

/// A concatenation field: the value, zero-padded to 4 bytes.
fn field(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(value);
    pad(out);
}

fn tuple_key(first: [u8; 4], protocol: u8, port: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    field(&mut k, &first);
    field(&mut k, &[protocol]);
    field(&mut k, &port.to_be_bytes());
    k
}

/// `NFTA_DATA_VERDICT` holding `v`: the code, and the chain of a jump or goto.
pub(crate) fn verdict_data(out: &mut Vec<u8>, v: &Verdict) {
    let (code, chain): (i32, Option<&str>) = match v {
        Verdict::Accept => (1, None),
        Verdict::Drop => (0, None),
        Verdict::Continue => (-1, None),
        Verdict::Jump(c) => (-3, Some(c)),
        Verdict::Goto(c) => (-4, Some(c)),
        Verdict::Return => (-5, None),
    };
    let mut verdict = Vec::new();
    attr(&mut verdict, NFTA_VERDICT_CODE, &code.to_be_bytes());
    if let Some(c) = chain {
        attr(&mut verdict, NFTA_VERDICT_CHAIN, &cstr(c));
    }
    attr(out, NFTA_DATA_VERDICT | NLA_F_NESTED, &verdict);
}

/// One element as nft sends it: one or (interval start and end) two list entries.
pub(crate) fn encode_element(
    list: &mut Vec<u8>,
    e: &Element,
    add: bool,
) -> Result<(), NetlinkError> {
    let mut one = Vec::new();
    // A one-field interval's end, exclusive (`None`: the range runs to the last value).
    let mut interval_end: Option<Option<u32>> = None;
    match &e.key {
        Key::Addr(a) => data_value(&mut one, NFTA_SET_ELEM_KEY, &a.octets()),
        Key::AddrRange(start, end) => {
            data_value(&mut one, NFTA_SET_ELEM_KEY, &start.octets());
            interval_end = Some(u32::from(*end).checked_add(1));
        }
        Key::MarkRange(start, end) => {
            data_value(&mut one, NFTA_SET_ELEM_KEY, &start.to_be_bytes());
            interval_end = Some(end.checked_add(1));
        }
        Key::Tuple {
            addrs,
            protocol,
            ports,
        } => {
            data_value(
                &mut one,
                NFTA_SET_ELEM_KEY,
                &tuple_key(addrs.0.octets(), *protocol, ports.0),
            );
            data_value(
                &mut one,
                NFTA_SET_ELEM_KEY_END,
                &tuple_key(addrs.1.octets(), *protocol, ports.1),
            );
        }
        // Always with its end, as nft sends every element of a command that has a
        // range in it. A command deleting only one-mark one-port elements, nft 1.0.6
        // sends by key alone with the mark in host order, which the kernel does not
        // find (ENOENT).
        Key::MarkTuple {
            marks,
            protocol,
            ports,
        } => {
            data_value(
                &mut one,
                NFTA_SET_ELEM_KEY,
                &tuple_key(marks.0.to_be_bytes(), *protocol, ports.0),
            );
            data_value(
                &mut one,
                NFTA_SET_ELEM_KEY_END,
                &tuple_key(marks.1.to_be_bytes(), *protocol, ports.1),
            );
        }
        Key::Iface(name) => data_value(&mut one, NFTA_SET_ELEM_KEY, &ifname(name)?),
        Key::IfaceAddr(name, a) => {
            let mut k = ifname(name)?.to_vec();
            k.extend_from_slice(&a.octets());
            data_value(&mut one, NFTA_SET_ELEM_KEY, &k);
        }
    }
    if add && let Some(v) = &e.verdict {
        let mut data = Vec::new();
        verdict_data(&mut data, v);
        attr(&mut one, NFTA_SET_ELEM_DATA | NLA_F_NESTED, &data);
    }
    match interval_end {
        // The end: `end + 1` flagged, without the verdict (both key types are 4 bytes,
        // big-endian).
        Some(Some(after)) => {
            attr(list, NFTA_LIST_ELEM | NLA_F_NESTED, &one);
            one.clear();
            attr(
                &mut one,
                NFTA_SET_ELEM_FLAGS,
                &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
            );
            data_value(&mut one, NFTA_SET_ELEM_KEY, &after.to_be_bytes());
        }
        // Up to the last value: no end element; nft marks the start so its listing
        // shows the range.
        Some(None) if add => attr(&mut one, NFTA_SET_ELEM_USERDATA, &UDATA_INTERVAL_OPEN),
        _ => {}
    }
    attr(list, NFTA_LIST_ELEM | NLA_F_NESTED, &one);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn list_of(e: &Element, add: bool) -> Vec<u8> {
        let mut l = Vec::new();
        encode_element(&mut l, e, add).unwrap();
        l
    }

    #[test]
    fn a_tuple_is_one_element_with_inclusive_key_and_key_end_fields_padded_to_four_bytes() {
        let e = Element {
            key: Key::Tuple {
                addrs: (ip("10.0.0.0"), ip("10.0.0.9")),
                protocol: 6,
                ports: (80, 90),
            },
            verdict: None,
        };
        // As nft 1.0.6 sends `10.0.0.0-10.0.0.9 . tcp . 80-90` (--debug=mnl).
        let want: Vec<u8> = [
            &[44u8, 0, 1, 0x80][..],
            &[20, 0, 1, 0x80, 16, 0, 1, 0],
            &[10, 0, 0, 0, 6, 0, 0, 0, 0, 0x50, 0, 0],
            &[20, 0, 10, 0x80, 16, 0, 1, 0],
            &[10, 0, 0, 9, 6, 0, 0, 0, 0, 0x5a, 0, 0],
        ]
        .concat();
        assert_eq!(list_of(&e, true), want);
    }

    #[test]
    fn an_address_range_is_a_start_and_an_interval_end_after_it_and_the_last_address_is_open() {
        let e = Element {
            key: Key::AddrRange(ip("10.0.2.0"), ip("10.0.2.9")),
            verdict: None,
        };
        let want: Vec<u8> = [
            &[16u8, 0, 1, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 10, 0, 2, 0][..],
            &[24, 0, 1, 0x80, 8, 0, 3, 0, 0, 0, 0, 1],
            &[12, 0, 1, 0x80, 8, 0, 1, 0, 10, 0, 2, 10],
        ]
        .concat();
        assert_eq!(list_of(&e, true), want);
        let open = Element {
            key: Key::AddrRange(ip("10.0.3.0"), ip("255.255.255.255")),
            verdict: None,
        };
        let l = list_of(&open, true);
        assert_eq!(&l[16..], &[10, 0, 6, 0, 1, 4, 1, 0, 0, 0, 0, 0]);
        assert_eq!(
            list_of(&open, false).len(),
            16,
            "a deletion names the start"
        );
    }

    #[test]
    fn a_mark_range_is_an_interval_of_big_endian_marks_as_an_address_range_is() {
        // As nft 1.0.6 sends `5-9`, `3` and `10-4294967295` to a `mark` interval set.
        let range = |a, b| Element {
            key: Key::MarkRange(a, b),
            verdict: None,
        };
        let want: Vec<u8> = [
            &[16u8, 0, 1, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 0, 0, 0, 5][..],
            &[24, 0, 1, 0x80, 8, 0, 3, 0, 0, 0, 0, 1],
            &[12, 0, 1, 0x80, 8, 0, 1, 0, 0, 0, 0, 10],
        ]
        .concat();
        assert_eq!(list_of(&range(5, 9), true), want);
        assert_eq!(list_of(&range(5, 9), false), want, "a deletion too");
        let one = list_of(&range(3, 3), true);
        assert_eq!(
            (&one[12..16], &one[36..40]),
            (&[0, 0, 0, 3][..], &[0, 0, 0, 4][..])
        );
        let open: Vec<u8> = [
            &[28u8, 0, 1, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 0, 0, 0, 10][..],
            &[10, 0, 6, 0, 1, 4, 1, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(list_of(&range(10, u32::MAX), true), open);
    }

    #[test]
    fn a_mark_tuple_is_one_element_with_key_and_key_end_and_the_mark_big_endian() {
        let e = |marks, ports| Element {
            key: Key::MarkTuple {
                marks,
                protocol: 6,
                ports,
            },
            verdict: None,
        };
        // As nft 1.0.6 sends `0-7 . tcp . 80-90` (--debug=mnl), added or deleted.
        let want: Vec<u8> = [
            &[44u8, 0, 1, 0x80][..],
            &[20, 0, 1, 0x80, 16, 0, 1, 0],
            &[0, 0, 0, 0, 6, 0, 0, 0, 0, 0x50, 0, 0],
            &[20, 0, 10, 0x80, 16, 0, 1, 0],
            &[0, 0, 0, 7, 6, 0, 0, 0, 0, 0x5a, 0, 0],
        ]
        .concat();
        assert_eq!(list_of(&e((0, 7), (80, 90)), true), want);
        assert_eq!(list_of(&e((0, 7), (80, 90)), false), want);
        // One mark and port: as nft adds `3 . tcp . 53`, and deletes `3-3 . tcp . 53`.
        let one = list_of(&e((3, 3), (53, 53)), false);
        assert_eq!(one.len(), 44);
        assert_eq!(&one[12..24], &one[32..44]);
        assert_eq!(&one[12..16], &[0, 0, 0, 3]);
    }

    #[test]
    fn an_interval_map_element_has_its_verdict_on_the_start_and_none_on_the_end() {
        let jump = |a, b| Element {
            key: Key::AddrRange(ip(a), ip(b)),
            verdict: Some(Verdict::Jump("C1".into())),
        };
        // As nft 1.0.6 sends `10.0.0.0-10.0.0.9 : jump C1` to an interval verdict map.
        let verdict: &[u8] = &[
            24, 0, 2, 0x80, 20, 0, 2, 0x80, 8, 0, 1, 0, 0xff, 0xff, 0xff, 0xfd, 7, 0, 2, 0, b'C',
            b'1', 0, 0,
        ];
        let want: Vec<u8> = [
            &[40u8, 0, 1, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 10, 0, 0, 0][..],
            verdict,
            &[24, 0, 1, 0x80, 8, 0, 3, 0, 0, 0, 0, 1],
            &[12, 0, 1, 0x80, 8, 0, 1, 0, 10, 0, 0, 10],
        ]
        .concat();
        assert_eq!(list_of(&jump("10.0.0.0", "10.0.0.9"), true), want);
        // Its deletion: the range's two elements without the verdict.
        let del: Vec<u8> = [
            &[16u8, 0, 1, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 10, 0, 0, 0][..],
            &want[40..],
        ]
        .concat();
        assert_eq!(list_of(&jump("10.0.0.0", "10.0.0.9"), false), del);
        // `10.1.0.0-255.255.255.255 : jump C1`: the verdict, then the open-interval mark.
        let open: Vec<u8> = [
            &[52u8, 0, 1, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 10, 1, 0, 0][..],
            verdict,
            &[10, 0, 6, 0, 1, 4, 1, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(list_of(&jump("10.1.0.0", "255.255.255.255"), true), open);
    }

    #[test]
    fn a_map_element_carries_a_sixteen_byte_name_and_its_verdict_and_a_deletion_only_the_key() {
        let e = Element {
            key: Key::Iface("slc0".into()),
            verdict: Some(Verdict::Goto("G".into())),
        };
        let l = list_of(&e, true);
        assert_eq!(l.len(), 4 + 24 + 24);
        assert_eq!(&l[12..16], b"slc0");
        assert_eq!(&l[40..44], &[0xff, 0xff, 0xff, 0xfc], "goto");
        assert_eq!(list_of(&e, false).len(), 4 + 24);
        let too_long = Element {
            key: Key::Iface("a-very-long-name".into()),
            verdict: None,
        };
        assert!(encode_element(&mut Vec::new(), &too_long, true).is_err());
    }

    #[test]
    fn the_batch_is_begin_deletions_additions_end_and_acks_every_element_message() {
        let changes = [SetChanges {
            set: "I".into(),
            delete: vec![Element {
                key: Key::Addr(ip("10.0.0.1")),
                verdict: None,
            }],
            add: vec![Element {
                key: Key::Addr(ip("10.0.0.2")),
                verdict: None,
            }],
        }];
        let (b, acked) = batch(2, "sluice", &changes, 1).unwrap();
        let kinds: Vec<_> = nfnl::replies(&b, "t")
            .map(|m| m.map(|m| (m.kind, m.flags)))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            kinds,
            [
                (16, 1),
                (0x0a0e, NLM_F_REQUEST | NLM_F_ACK),
                (0x0a0c, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
                (17, 1)
            ]
        );
        assert_eq!(acked, [2, 3]);
    }

    #[test]
    fn every_kind_is_written_in_one_transaction_and_a_refused_batch_changes_nothing() {
        if !sluice_testkit::require_root("nft_elements") {
            return;
        }
        sluice_testkit::in_new_netns(|| {
            sluice_testkit::sh(
                "nft -f - <<'EOF'
add table ip nftnl-t
add chain ip nftnl-t G
add set ip nftnl-t T { type ipv4_addr . inet_proto . inet_service; flags interval; }
add set ip nftnl-t A { type ipv4_addr; flags interval; }
add set ip nftnl-t I { type ipv4_addr; }
add map ip nftnl-t MO { type ifname : verdict; }
add map ip nftnl-t MS { type ifname . ipv4_addr : verdict; }
add set ip nftnl-t CT { type mark . inet_proto . inet_service; flags interval; }
add set ip nftnl-t CA { type mark; flags interval; }
add map ip nftnl-t MC { type ipv4_addr : verdict; flags interval; }
add element ip nftnl-t I { 10.9.9.9 }
EOF",
            );
            let el = |key, verdict| Element { key, verdict };
            let add = |set: &str, add: Vec<Element>| SetChanges {
                set: set.into(),
                delete: vec![],
                add,
            };
            let changes = [
                add(
                    "T",
                    vec![el(
                        Key::Tuple {
                            addrs: (ip("10.0.0.0"), ip("10.0.0.9")),
                            protocol: 132,
                            ports: (80, 90),
                        },
                        None,
                    )],
                ),
                add(
                    "A",
                    vec![
                        el(Key::AddrRange(ip("10.0.0.0"), ip("10.0.0.9")), None),
                        el(Key::AddrRange(ip("10.0.1.1"), ip("10.0.1.1")), None),
                        el(Key::AddrRange(ip("10.1.0.0"), ip("255.255.255.255")), None),
                    ],
                ),
                SetChanges {
                    set: "I".into(),
                    delete: vec![el(Key::Addr(ip("10.9.9.9")), None)],
                    add: vec![el(Key::Addr(ip("10.0.0.1")), None)],
                },
                add(
                    "MO",
                    vec![
                        el(Key::Iface("slc0".into()), Some(Verdict::Goto("G".into()))),
                        el(Key::Iface("slc1".into()), Some(Verdict::Return)),
                        el(Key::Iface("slc2".into()), Some(Verdict::Jump("G".into()))),
                        el(Key::Iface("slc3".into()), Some(Verdict::Drop)),
                    ],
                ),
                add(
                    "MS",
                    vec![el(
                        Key::IfaceAddr("slc0".into(), ip("10.0.0.1")),
                        Some(Verdict::Accept),
                    )],
                ),
                add(
                    "CT",
                    vec![
                        el(
                            Key::MarkTuple {
                                marks: (0, 7),
                                protocol: 6,
                                ports: (80, 90),
                            },
                            None,
                        ),
                        el(
                            Key::MarkTuple {
                                marks: (9, 9),
                                protocol: 17,
                                ports: (53, 53),
                            },
                            None,
                        ),
                    ],
                ),
                add(
                    "CA",
                    vec![
                        el(Key::MarkRange(3, 3), None),
                        el(Key::MarkRange(5, 9), None),
                        el(Key::MarkRange(0x4000, u32::MAX), None),
                    ],
                ),
                add(
                    "MC",
                    vec![
                        el(
                            Key::AddrRange(ip("10.0.0.0"), ip("10.0.0.9")),
                            Some(Verdict::Jump("G".into())),
                        ),
                        el(
                            Key::AddrRange(ip("10.0.1.1"), ip("10.0.1.1")),
                            Some(Verdict::Jump("G".into())),
                        ),
                        el(
                            Key::AddrRange(ip("10.1.0.0"), ip("255.255.255.255")),
                            Some(Verdict::Goto("G".into())),
                        ),
                    ],
                ),
            ];
            let g0 = crate::nftables::ruleset_generation().unwrap();
            let g1 = write_elements(libc::AF_INET as u8, "nftnl-t", &changes).expect("batch");
            assert_eq!(g1, g0.wrapping_add(1), "one commit");
            let listing = sluice_testkit::sh("nft list table ip nftnl-t");
            for want in [
                "10.0.0.0-10.0.0.9 . sctp . 80-90",
                "10.0.0.0-10.0.0.9, 10.0.1.1",
                "10.1.0.0-255.255.255.255",
                "elements = { 10.0.0.1 }",
                "\"slc0\" : goto G",
                "\"slc1\" : return",
                "\"slc2\" : jump G",
                "\"slc3\" : drop",
                "\"slc0\" . 10.0.0.1 : accept",
                "0x00000000/29 . tcp . 80-90",
                "0x00000009 . udp . 53",
                "0x00000003, 0x00000005-0x00000009, 0x00004000-0xffffffff",
                "10.0.0.0-10.0.0.9 : jump G, 10.0.1.1 : jump G",
                "10.1.0.0-255.255.255.255 : goto G",
            ] {
                assert!(listing.contains(want), "{want} in\n{listing}");
            }
            // A batch with one bad deletion: refused whole, the good addition too.
            let bad = [
                add("I", vec![el(Key::Addr(ip("10.0.0.7")), None)]),
                SetChanges {
                    set: "MO".into(),
                    delete: vec![el(Key::Iface("absent".into()), None)],
                    add: vec![],
                },
            ];
            let err = write_elements(libc::AF_INET as u8, "nftnl-t", &bad).unwrap_err();
            assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
            assert_eq!(sluice_testkit::sh("nft list table ip nftnl-t"), listing);
            assert_eq!(crate::nftables::ruleset_generation().unwrap(), g1);
        });
    }
}
