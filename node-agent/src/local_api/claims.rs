//! `claim-block`: the block of a pod's requested address, claimed for this node by
//! the agent, which alone writes the cluster's block store
//! ([`crate::datastore::block_lifecycle::claim_requested`] decides and writes).

use std::path::PathBuf;
use std::sync::Arc;

use sluice_ipam::blocks::Pool;
use sluice_ipam::store::BlockStore;
use sluice_node_files::local_api::Response;

use super::BlockClaims;
use crate::datastore::block_lifecycle::{BlockSettings, RequestedClaim, claim_requested};
use crate::metrics::Metrics;

/// [`claim_requested`] as `claim-block` serves it: each answer in the API's
/// terms, a store failure as an error the plugin reports (it maps it to "try again").
pub fn block_claims<S: BlockStore + Clone + Send + Sync + 'static>(
    store: S,
    pool: Pool,
    node: String,
    file: PathBuf,
    settings: BlockSettings,
    metrics: Arc<Metrics>,
) -> BlockClaims {
    Arc::new(move |address| {
        let (store, node, file, settings, metrics) = (
            store.clone(),
            node.clone(),
            file.clone(),
            settings.clone(),
            metrics.clone(),
        );
        Box::pin(async move {
            let r = claim_requested(
                &store,
                &pool,
                &node,
                &file,
                &settings,
                address,
                Some(&metrics),
            )
            .await;
            match r {
                Ok(RequestedClaim::Claimed(block)) => Response::BlockClaimed {
                    block: block.to_string(),
                },
                Ok(RequestedClaim::Taken { block, owner }) => Response::BlockTaken {
                    block: block.to_string(),
                    owner,
                },
                Ok(RequestedClaim::OutsidePool) => Response::Error {
                    message: format!("{address} is outside the agent's pool {}", pool.cidr()),
                },
                Err(e) => {
                    tracing::warn!(error = %e, %address, "claiming the block of a requested address failed");
                    Response::Error {
                        message: e.to_string(),
                    }
                }
            }
        })
    })
}
