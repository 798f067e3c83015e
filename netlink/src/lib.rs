//! sluice's one rtnetlink layer, shared by the CNI plugin and the node agent.
//!
//! - [`types`]: what sluice knows about links, addresses, routes and neighbour/FDB
//!   entries, as plain values ([`Link`], [`Address`], [`Route4`], [`Neighbour`]).
//! - [`message`]: the only code that builds and parses `netlink-packet-route`
//!   messages: value → request, reply → value. Pure.
//! - [`socket`]: [`Netlink`], a synchronous socket that sends one request and
//!   collects its replies. No async runtime and no background thread: the
//!   single-threaded CNI binary drives it directly, the agent from a thread it owns.
//! - [`nftables`]: nf_tables' ruleset generation (`NFT_MSG_GETGEN` over
//!   `NETLINK_NETFILTER`), which tells the agent whether its last nftables write is
//!   still exactly what the kernel holds.
//! - [`nft_elements`]: set and map element changes sent to nf_tables as one NFNL
//!   batch, without the `nft` program.
//! - [`nft_table`]: a whole table (chains, sets, elements, rules) replaced in one NFNL
//!   batch, without the `nft` program.
//! - [`ipset`]: ipset member adds and deletes over `NETLINK_NETFILTER`, which the
//!   iptables dataplane writes on every pod event without an `ipset` process.
//! - `nfnl` (private): the `NETLINK_NETFILTER` framing those three share (socket,
//!   header and attributes, the walk over a datagram of replies).
//!
//! A netlink socket belongs to the network namespace it was created in for its whole
//! life, whichever thread then uses it: open it in the namespace you mean
//! ([`Netlink::open`] in the caller's, [`Netlink::open_in`] in another one).

pub mod error;
pub mod ipset;
pub mod message;
mod nfnl;
pub mod nft_elements;
pub mod nft_table;
pub mod nftables;
pub mod socket;
pub mod types;

pub use error::NetlinkError;
pub use socket::Netlink;
pub use types::{
    Address, Link, MAIN_TABLE, Neighbour, NeighbourTable, PROTO_BOOT, Route4, RouteKind,
    SCOPE_LINK, SCOPE_UNIVERSE, VethPeer, VxlanParams, format_mac, parse_mac,
};
