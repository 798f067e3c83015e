//! The raw `NETLINK_NETFILTER` wire basics that [`crate::nftables`],
//! [`crate::nft_elements`] and [`crate::ipset`] share: a socket in the caller's
//! namespace, the message header and attributes, and the walk over one datagram of
//! replies. `netlink-packet-route` speaks only rtnetlink, so these three build and read
//! their nfnetlink messages by hand; this is the one place that knows the framing.

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::error::NetlinkError;

/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;

/// A `NETLINK_NETFILTER` socket bound and connected to the kernel.
///
/// A fresh socket per call: a netlink socket stays in the namespace it was made in,
/// and the caller's thread may have entered another one since (tests, benches).
pub(crate) fn open() -> Result<Socket, NetlinkError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;
    Ok(socket)
}

/// Append one message: the header (port id 0, the kernel's), `body`, padding to 4.
pub(crate) fn message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) {
    let len = (NLMSG_HDRLEN + body.len()) as u32;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    pad(out);
}

/// Zero bytes up to the next multiple of 4 (netlink's alignment).
pub(crate) fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Append one attribute `{len, kind, value}`, padded.
pub(crate) fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    pad(out);
}

/// Append a nested attribute of `kind` whose contents `fill` appends.
pub(crate) fn nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    fill(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// One message of a reply datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reply<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// What follows the header, up to the message's length.
    pub body: &'a [u8],
}

impl Reply<'_> {
    /// For an `NLMSG_ERROR` message, the errno it carries (0: an ack); `None` for any
    /// other message. `op` names the caller's operation in a decoding error.
    pub(crate) fn errno(&self, op: &str) -> Result<Option<i32>, NetlinkError> {
        if self.kind != NLMSG_ERROR {
            return Ok(None);
        }
        let code = self
            .body
            .first_chunk::<4>()
            .ok_or_else(|| NetlinkError::Decode {
                op: op.into(),
                detail: "short error message".into(),
            })?;
        Ok(Some(-i32::from_ne_bytes(*code)))
    }
}

/// The messages of one datagram in order; a message whose length does not fit ends
/// the walk with a decoding error naming `op`.
pub(crate) fn replies<'a>(
    data: &'a [u8],
    op: &'a str,
) -> impl Iterator<Item = Result<Reply<'a>, NetlinkError>> + 'a {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset + NLMSG_HDRLEN > data.len() {
            return None;
        }
        let msg = &data[offset..];
        let len = u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
        if len < NLMSG_HDRLEN || len > msg.len() {
            offset = data.len();
            return Some(Err(NetlinkError::Decode {
                op: op.into(),
                detail: "bad message length".into(),
            }));
        }
        offset += len.next_multiple_of(4);
        Some(Ok(Reply {
            kind: u16::from_ne_bytes([msg[4], msg[5]]),
            flags: u16::from_ne_bytes([msg[6], msg[7]]),
            seq: u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]),
            body: &msg[NLMSG_HDRLEN..len],
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_is_walked_message_by_message_with_padding_skipped() {
        let mut data = Vec::new();
        message(&mut data, 0x0a0f, 0, 3, &[1, 2, 3, 4, 5]);
        message(&mut data, NLMSG_ERROR, 0, 4, &(-2i32).to_ne_bytes());
        let got: Vec<_> = replies(&data, "t").collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].kind, got[0].seq, got[0].body),
            (0x0a0f, 3, &[1, 2, 3, 4, 5][..])
        );
        assert_eq!(got[0].errno("t").unwrap(), None);
        assert_eq!(got[1].errno("t").unwrap(), Some(2));
    }

    #[test]
    fn a_message_longer_than_its_datagram_is_a_decoding_error_and_ends_the_walk() {
        let mut data = Vec::new();
        message(&mut data, 1, 0, 1, &[0; 8]);
        data[0] = 200;
        let mut walk = replies(&data, "reading");
        assert!(matches!(
            walk.next(),
            Some(Err(NetlinkError::Decode { .. }))
        ));
        assert!(walk.next().is_none());
    }

    #[test]
    fn a_short_error_message_is_a_decoding_error() {
        let r = Reply {
            kind: NLMSG_ERROR,
            flags: 0,
            seq: 1,
            body: &[0, 0],
        };
        assert!(r.errno("t").is_err());
    }

    #[test]
    fn a_nested_attribute_carries_its_length_and_the_nested_flag() {
        let mut out = Vec::new();
        nested(&mut out, 7, |b| attr(b, 1, &[9]));
        assert_eq!(out, [12, 0, 7, 0x80, 5, 0, 1, 0, 9, 0, 0, 0]);
    }
}
