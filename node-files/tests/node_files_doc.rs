//! docs/node-files.md describes this crate: every default path, the refresh
//! interval and the staleness limit it states are the constants here.

use sluice_node_files::{paths, status};

#[test]
fn the_contract_doc_states_this_crates_paths_and_timings() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/node-files.md");
    let doc = std::fs::read_to_string(path).unwrap();
    for p in [
        paths::MTU_FILE,
        paths::AGENT_STATUS_FILE,
        paths::IPAM_STATE_DIR,
        paths::NODE_BLOCKS_FILE,
        paths::CNI_LOG_FILE,
    ] {
        assert!(
            doc.contains(&format!("`{p}")),
            "docs/node-files.md lacks {p}"
        );
    }
    let refresh = format!("at least every {} s", status::REFRESH.as_secs());
    assert!(doc.contains(&refresh), "docs/node-files.md: {refresh:?}");
    let stale = format!("older than {} s", status::STALE_AFTER.as_secs());
    assert!(doc.contains(&stale), "docs/node-files.md: {stale:?}");
}
