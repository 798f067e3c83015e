//! The nftables change planner: from a desired [`Ruleset`] and what sluice's table
//! holds ([`NftState`], read back with `nft -j list table ip sluice` or left by the
//! previous write), one `nft -f` transaction with the least change: element adds and
//! deletes for sets and maps, whole rewrites only of chains that differ.
//!
//! CONTRACT (the agent's executor relies on these signatures; the bodies are filled
//! in by the nftables work of issue 11).

use super::{ModelError, Ruleset};

/// What sluice's table holds, as far as planning cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftState {}

impl NftState {
    /// What the table holds after a successful write of `ruleset`.
    pub fn of(ruleset: &Ruleset) -> NftState {
        let _ = ruleset;
        todo!("issue 11: nftables state of a model")
    }
}

/// `nft -j list table ip sluice` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading nft's JSON listing: {0}")]
pub struct NftParseError(pub String);

/// What the kernel holds, from `nft -j list table ip sluice` output.
pub fn parse_listing(json: &str) -> Result<NftState, NftParseError> {
    let _ = json;
    todo!("issue 11: parse nft -j listing")
}

/// One sync's transaction and what it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftPlan {
    /// `nft -f` input, one transaction; empty when nothing changes.
    pub script: String,
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

/// The transaction from `kernel` (`None`: no sluice table yet) to `desired`.
pub fn plan(desired: &Ruleset, kernel: Option<&NftState>) -> Result<NftPlan, ModelError> {
    let _ = (desired, kernel);
    todo!("issue 11: nftables planner")
}
