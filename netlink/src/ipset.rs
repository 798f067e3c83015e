//! ipset member adds and deletes over `NETLINK_NETFILTER` (subsystem
//! `NFNL_SUBSYS_IPSET`), without an `ipset` process.
//!
//! The iptables dataplane changes set members on every pod event (a new pod's address
//! enters the peer sets that select it). `ipset restore` costs a process start, a few
//! milliseconds on an idle node and tens on a busy one, on the path between a pod's
//! ADD and its first allowed packet; these messages cost microseconds. Creating,
//! swapping and destroying sets stays with `ipset restore`: it is rare and off that
//! path.
//!
//! Each change is one `IPSET_CMD_ADD`/`IPSET_CMD_DEL` request with `NLM_F_ACK`, all
//! sent in one datagram and applied in order, as `ipset restore` applies its lines;
//! without `NLM_F_EXCL` the kernel treats them as `-exist` (adding a member already
//! there or deleting one that is not is no error). The first refusal is returned; the
//! changes before it stay applied, as with `ipset restore`.

use std::net::Ipv4Addr;

use crate::error::NetlinkError;
use crate::nfnl::{self, NLM_F_ACK, NLM_F_REQUEST, attr, nested};

/// `NFNL_SUBSYS_IPSET`, the high byte of every ipset message type.
const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_ADD: u16 = 9;
const IPSET_CMD_DEL: u16 = 10;
/// The protocol version `ipset` 7.x speaks (`IPSET_PROTOCOL`).
const IPSET_PROTOCOL: u8 = 7;
// Command-level attributes.
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_DATA: u16 = 7;
// Attributes inside IPSET_ATTR_DATA.
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_CIDR: u16 = 3;
const IPSET_ATTR_PORT: u16 = 4;
const IPSET_ATTR_PROTO: u16 = 7;
const IPSET_ATTR_CADT_FLAGS: u16 = 8;
/// `IPSET_ATTR_CADT_MAX + 7`: the interface of a hash:net,iface member, a
/// NUL-terminated name.
const IPSET_ATTR_IFACE: u16 = 23;
/// Inside IPSET_ATTR_IP.
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
/// `IPSET_FLAG_NOMATCH` (bit 2 of the CADT flags).
const IPSET_FLAG_NOMATCH: u32 = 1 << 2;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NFPROTO_IPV4: u8 = 2;
const OP: &str = "changing ipset members";

/// One member of a `hash:ip`, `hash:net`, `hash:ip,port` or `hash:net,iface` set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Ip(Ipv4Addr),
    Net {
        addr: Ipv4Addr,
        prefix: u8,
        nomatch: bool,
    },
    /// `protocol` is the IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP).
    IpPort {
        ip: Ipv4Addr,
        protocol: u8,
        port: u16,
    },
    /// A network on an interface (`hash:net,iface`); `iface` at most 15 bytes.
    NetIface {
        addr: Ipv4Addr,
        prefix: u8,
        iface: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Del,
}

/// One member added to or deleted from one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub op: Op,
    pub set: String,
    pub member: Member,
}

/// Apply `changes` in order in the calling thread's network namespace.
///
/// A fresh socket per call: a netlink socket stays in the namespace it was made in,
/// and the caller's thread may have entered another one since (tests, benches).
pub fn apply(changes: &[Change]) -> Result<(), NetlinkError> {
    if changes.is_empty() {
        return Ok(());
    }
    let socket = nfnl::open()?;
    // A datagram's worth at a time: the kernel acks each, and the socket's receive
    // buffer must hold the acks of one datagram.
    for chunk in changes.chunks(256) {
        let mut buf = Vec::new();
        for (i, c) in chunk.iter().enumerate() {
            buf.extend_from_slice(&request(c, i as u32 + 1));
        }
        socket.send(&buf, 0).map_err(NetlinkError::Socket)?;
        let mut acked = 0;
        while acked < chunk.len() {
            let (data, _) = socket.recv_from_full().map_err(NetlinkError::Socket)?;
            for (seq, errno) in acks(&data)? {
                if errno != 0 {
                    let c = seq
                        .checked_sub(1)
                        .and_then(|i| chunk.get(i as usize))
                        .map(|c| format!(" ({:?} {:?} in {})", c.op, c.member, c.set))
                        .unwrap_or_default();
                    return Err(NetlinkError::Kernel {
                        op: format!("{OP}{c}"),
                        errno,
                    });
                }
                acked += 1;
            }
        }
    }
    Ok(())
}

/// The request for one change, with sequence number `seq`.
fn request(change: &Change, seq: u32) -> Vec<u8> {
    let cmd = match change.op {
        Op::Add => IPSET_CMD_ADD,
        Op::Del => IPSET_CMD_DEL,
    };
    let mut buf = Vec::new();
    // nfgenmsg: family, NFNETLINK_V0, resource id 0.
    buf.extend_from_slice(&[NFPROTO_IPV4, 0, 0, 0]);
    attr(&mut buf, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    let mut name = change.set.as_bytes().to_vec();
    name.push(0);
    attr(&mut buf, IPSET_ATTR_SETNAME, &name);
    let ip = |buf: &mut Vec<u8>, a: Ipv4Addr| {
        nested(buf, IPSET_ATTR_IP, |b| {
            attr(b, IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &a.octets())
        });
    };
    nested(&mut buf, IPSET_ATTR_DATA, |b| match change.member {
        Member::Ip(a) => ip(b, a),
        Member::NetIface {
            addr,
            prefix,
            ref iface,
        } => {
            ip(b, addr);
            attr(b, IPSET_ATTR_CIDR, &[prefix]);
            let mut name = iface.as_bytes().to_vec();
            name.push(0);
            attr(b, IPSET_ATTR_IFACE, &name);
        }
        Member::Net {
            addr,
            prefix,
            nomatch,
        } => {
            ip(b, addr);
            attr(b, IPSET_ATTR_CIDR, &[prefix]);
            if nomatch {
                attr(
                    b,
                    IPSET_ATTR_CADT_FLAGS | NLA_F_NET_BYTEORDER,
                    &IPSET_FLAG_NOMATCH.to_be_bytes(),
                );
            }
        }
        Member::IpPort {
            ip: a,
            protocol,
            port,
        } => {
            ip(b, a);
            attr(
                b,
                IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER,
                &port.to_be_bytes(),
            );
            attr(b, IPSET_ATTR_PROTO, &[protocol]);
        }
    });
    let mut out = Vec::new();
    nfnl::message(
        &mut out,
        (NFNL_SUBSYS_IPSET << 8) | cmd,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &buf,
    );
    out
}

/// The (sequence number, errno) of every ack in a datagram (errno 0: success).
fn acks(data: &[u8]) -> Result<Vec<(u32, i32)>, NetlinkError> {
    let mut out = Vec::new();
    for reply in nfnl::replies(data, OP) {
        let reply = reply?;
        if let Some(errno) = reply.errno(OP)? {
            out.push((reply.seq, errno));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_add_is_one_acked_request_naming_the_set_and_the_address() {
        let r = request(
            &Change {
                op: Op::Add,
                set: "SLUICE-P".into(),
                member: Member::Ip(Ipv4Addr::new(10, 244, 0, 7)),
            },
            3,
        );
        assert_eq!(r.len() as u32, u32::from_ne_bytes([r[0], r[1], r[2], r[3]]));
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), (6 << 8) | 9);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes([r[8], r[9], r[10], r[11]]), 3);
        assert_eq!(r[16], NFPROTO_IPV4);
        let body = &r[20..];
        // protocol, then the NUL-terminated set name, then the nested data.
        assert_eq!(&body[..5], &[5, 0, 1, 0, IPSET_PROTOCOL]);
        assert_eq!(&body[8..12], &[13, 0, 2, 0]);
        assert_eq!(&body[12..21], b"SLUICE-P\0");
        assert!(r.ends_with(&[10, 244, 0, 7]));
        assert_eq!(r.len() % 4, 0);
    }

    #[test]
    fn a_nomatch_net_carries_its_prefix_and_the_flag() {
        let r = request(
            &Change {
                op: Op::Del,
                set: "S".into(),
                member: Member::Net {
                    addr: Ipv4Addr::new(10, 0, 0, 0),
                    prefix: 8,
                    nomatch: true,
                },
            },
            1,
        );
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), (6 << 8) | 10);
        let cidr = [5, 0, IPSET_ATTR_CIDR as u8, 0, 8];
        assert!(r.windows(5).any(|w| w == cidr));
        assert!(r.ends_with(&IPSET_FLAG_NOMATCH.to_be_bytes()));
    }

    #[test]
    fn a_net_on_an_interface_carries_its_prefix_and_the_nul_terminated_name() {
        let r = request(
            &Change {
                op: Op::Add,
                set: "S".into(),
                member: Member::NetIface {
                    addr: Ipv4Addr::new(0, 0, 0, 0),
                    prefix: 0,
                    iface: "slc1a2b".into(),
                },
            },
            1,
        );
        let cidr = [5, 0, IPSET_ATTR_CIDR as u8, 0, 0];
        assert!(r.windows(5).any(|w| w == cidr));
        // header (len 4 + 8 bytes of name with its NUL = 12), then the name.
        let mut iface = vec![12, 0, IPSET_ATTR_IFACE as u8, 0];
        iface.extend_from_slice(b"slc1a2b\0");
        assert!(r.ends_with(&iface), "{r:?}");
    }

    #[test]
    fn acks_are_read_with_their_errno() {
        let ack = |seq: u32, code: i32| {
            let mut m = 36u32.to_ne_bytes().to_vec();
            m.extend_from_slice(&nfnl::NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&code.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        let mut data = ack(1, 0);
        data.extend(ack(2, -libc::ENOENT));
        assert_eq!(acks(&data).unwrap(), [(1, 0), (2, libc::ENOENT)]);
    }
}
