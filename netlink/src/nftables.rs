//! nf_tables' ruleset generation, read over `NETLINK_NETFILTER`.
//!
//! The kernel keeps one generation counter per network namespace for the whole
//! nf_tables ruleset (every table of every family) and bumps it once per committed
//! transaction, whoever sends it (`nft`, iptables-nft, kube-proxy, a netlink
//! library); a batch that commits nothing does not bump it. So two equal reads mean
//! nothing in nf_tables changed in between, and a read of `g + 1` after one's own
//! transaction, having read `g` before it, means that transaction was the only one.
//! `NFT_MSG_GETGEN` is one small request and reply, a few microseconds: a sync can
//! ask before trusting what it last wrote instead of reading its table back.

use crate::error::NetlinkError;
use crate::nfnl::{self, NLM_F_REQUEST};

/// `NFNL_SUBSYS_NFTABLES`, the high byte of every nf_tables message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_NEWGEN`, the reply (and notification) carrying the generation.
const NFT_MSG_NEWGEN: u16 = 15;
/// `NFT_MSG_GETGEN`.
const NFT_MSG_GETGEN: u16 = 16;
/// `NFTA_GEN_ID`: the generation, big-endian u32.
const NFTA_GEN_ID: u16 = 1;
/// `struct nfgenmsg`: family, version, resource id.
const NFGENMSG_LEN: usize = 4;
const OP: &str = "reading the nf_tables generation";

/// The nf_tables ruleset generation of the calling thread's network namespace.
///
/// A fresh socket per call: a netlink socket stays in the namespace it was made in,
/// and the caller's thread may have entered another one since (tests, benches).
pub fn ruleset_generation() -> Result<u32, NetlinkError> {
    let socket = nfnl::open()?;
    let seq = 1;
    socket
        .send(&getgen_request(seq), 0)
        .map_err(NetlinkError::Socket)?;
    loop {
        let (data, _) = socket.recv_from_full().map_err(NetlinkError::Socket)?;
        if let Some(generation) = parse_reply(&data, seq)? {
            return Ok(generation);
        }
    }
}

/// `NFT_MSG_GETGEN` with sequence number `seq`.
pub(crate) fn getgen_request(seq: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, resource id 0.
    nfnl::message(
        &mut buf,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        NLM_F_REQUEST,
        seq,
        &[0; NFGENMSG_LEN],
    );
    buf
}

/// The generation a NEWGEN message's body (`body`, after the netlink header) carries;
/// `op` names the caller's operation in a decoding error.
pub(crate) fn generation_in(body: &[u8], op: &str) -> Result<u32, NetlinkError> {
    let decode = |detail: &str| NetlinkError::Decode {
        op: op.into(),
        detail: detail.into(),
    };
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    // Attributes after the nfgenmsg: {len u16, type u16, value}, 4-byte aligned.
    let mut a = NFGENMSG_LEN;
    while a + 4 <= body.len() {
        let (alen, atype) = (u16_at(body, a) as usize, u16_at(body, a + 2) & 0x3fff);
        if alen < 4 || a + alen > body.len() {
            return Err(decode("bad attribute length"));
        }
        if atype == NFTA_GEN_ID && alen >= 8 {
            let v = &body[a + 4..a + 8];
            return Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        }
        a += (alen + 3) & !3;
    }
    Err(decode("NEWGEN without NFTA_GEN_ID"))
}

/// The generation in a datagram of replies, `None` when it holds no reply to `seq`.
fn parse_reply(data: &[u8], seq: u32) -> Result<Option<u32>, NetlinkError> {
    for reply in nfnl::replies(data, OP) {
        let reply = reply?;
        if reply.seq != seq {
            continue;
        }
        if let Some(errno) = reply.errno(OP)? {
            return Err(NetlinkError::Kernel {
                op: OP.into(),
                errno,
            });
        }
        if reply.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
            return generation_in(reply.body, OP).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newgen(seq: u32, generation: u32) -> Vec<u8> {
        let mut body = vec![0, 0, 0, 0];
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        body.extend_from_slice(&generation.to_be_bytes());
        let mut m = Vec::new();
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN;
        nfnl::message(&mut m, kind, 0, seq, &body);
        m
    }

    #[test]
    fn the_request_is_a_bare_getgen_of_the_nftables_subsystem() {
        let r = getgen_request(7);
        assert_eq!(r.len(), 20);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0a10);
        assert_eq!(u32::from_ne_bytes([r[8], r[9], r[10], r[11]]), 7);
    }

    #[test]
    fn the_reply_yields_its_big_endian_generation_and_other_sequences_are_skipped() {
        assert_eq!(
            parse_reply(&newgen(3, 0x0102_0304), 3).unwrap(),
            Some(0x0102_0304)
        );
        assert_eq!(parse_reply(&newgen(2, 9), 3).unwrap(), None);
    }

    #[test]
    fn the_generation_is_read_from_the_kernel_and_moves_with_a_commit() {
        if !sluice_testkit::require_root("nftables_generation") {
            return;
        }
        sluice_testkit::in_new_netns(|| {
            let g0 = ruleset_generation().expect("GETGEN");
            assert_eq!(ruleset_generation().unwrap(), g0, "no commit, no change");
            sluice_testkit::sh("nft add table ip sluice-netlink-gen");
            assert_eq!(ruleset_generation().unwrap(), g0.wrapping_add(1));
        });
    }
}
