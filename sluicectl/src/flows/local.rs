//! Records from this node's agent, over the node-local API's `flows` op.

use std::path::Path;
use std::time::Duration;

use sluice_node_files::flows::{FlowQuery, FlowRecord};

use super::FlowsError;

/// How long a one-shot read may take (4096 records in memory at most).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub fn read(
    socket: &Path,
    query: &FlowQuery,
    each: impl FnMut(FlowRecord) -> bool,
) -> Result<(), FlowsError> {
    sluice_node_files::local_api::flows(socket, query, READ_TIMEOUT, each)?;
    Ok(())
}
