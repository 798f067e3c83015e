//! Text for the kernel's tools, from a [`crate::dataplane::Ruleset`]: `iptables-restore`
//! input ([`iptables`]) and `ipset restore` input ([`ipset`]), or `nft -f` input
//! ([`nft`]). Byte-for-byte
//! deterministic: chains, sets and members are emitted in sorted order, rules in
//! chain order, and every rule's identity comment is a hash of its chain, its
//! predecessor and its text.
//!
//! Apply order for a full sync: ipset text first (rules may only reference sets that
//! exist), then the iptables text (`iptables-restore --noflush -w`), then the ipset
//! cleanup of sets no rule references any more.

pub mod ipset;
pub mod iptables;
pub mod nft;
