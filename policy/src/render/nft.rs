//! `nft -f` input from a [`Ruleset`]: sluice's one table, `ip sluice`, holding every
//! chain, set and verdict map of the model. Nothing outside that table is ever
//! written, so kube-proxy's, Docker's and iptables-nft's tables are left alone by
//! construction.
//!
//! CONTRACT (the agent's executor relies on these signatures; the bodies are filled
//! in by the nftables work of issue 11).

use super::super::dataplane::Ruleset;

/// The table's family and name: `ip sluice`.
pub const FAMILY: &str = "ip";
pub const TABLE: &str = "sluice";

/// The complete table as `nft -f` input that creates it, or replaces an existing one,
/// in one transaction (`add table`, `delete table`, then the table's full text).
pub fn render(ruleset: &Ruleset) -> String {
    let _ = ruleset;
    todo!("issue 11: nftables renderer")
}

/// `nft -f` input that removes sluice's table and everything in it, and succeeds when
/// there is none (`add table` first, then `delete table`, one transaction).
pub fn delete_script() -> String {
    format!("add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")
}

/// A throwaway table using every nftables feature the renderer emits (concatenated
/// interval sets, verdict maps, the hooks and priorities), for `nft --check -f -`:
/// the kernel validates it in a transaction that is never committed. Success means
/// the host can run the nftables dataplane.
pub fn probe_script() -> String {
    todo!("issue 11: probe of the features the renderer uses")
}
