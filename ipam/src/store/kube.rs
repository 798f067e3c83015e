//! The Kubernetes block store: one cluster-scoped `IPAMBlock` object (group
//! `sluice.dev`) per claimed block, named after the block (`10-244-3-0-24`), with the
//! owner in `spec.node`. The API server's create is the atomic claim: it fails with
//! 409 AlreadyExists for everyone but the first. The CRD is `manifests/crds/`.
//!
//! Only the node agent uses this (feature `kube`); the CNI binaries never talk to the
//! API server.

use ipnet::Ipv4Net;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Client, CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{BlockClaim, BlockStore, ClaimOutcome, StoreError};
use crate::blocks::{block_name, parse_block_name};

/// The spec of an `IPAMBlock`: which node owns which block.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1",
    kind = "IPAMBlock",
    plural = "ipamblocks",
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct IPAMBlockSpec {
    /// The node that owns the block (a Node's name).
    pub node: String,
    /// The block, e.g. `10.244.3.0/24`; the object's name is the same block written
    /// `10-244-3-0-24`.
    pub cidr: String,
}

/// `IPAMBlock` objects through a Kubernetes client.
#[derive(Clone)]
pub struct KubeStore {
    api: Api<IPAMBlock>,
}

impl KubeStore {
    pub fn new(client: Client) -> KubeStore {
        KubeStore {
            api: Api::all(client),
        }
    }

    fn claim_of(obj: &IPAMBlock) -> Result<BlockClaim, StoreError> {
        let name = obj.name_any();
        let corrupt = |reason: String| StoreError::Corrupt {
            path: format!("ipamblocks.sluice.dev/{name}").into(),
            reason,
        };
        let cidr: Ipv4Net = obj
            .spec
            .cidr
            .parse()
            .map_err(|e| corrupt(format!("spec.cidr {:?}: {e}", obj.spec.cidr)))?;
        if parse_block_name(&name) != Some(cidr) {
            return Err(corrupt(format!(
                "its name does not match spec.cidr {cidr} (expected {})",
                block_name(cidr)
            )));
        }
        Ok(BlockClaim {
            cidr,
            node: obj.spec.node.clone(),
        })
    }
}

fn api_error(op: &'static str, name: &str, e: kube::Error) -> StoreError {
    StoreError::Api {
        op,
        name: name.to_string(),
        message: e.to_string(),
    }
}

fn status_of(e: &kube::Error) -> Option<&kube::core::Status> {
    match e {
        kube::Error::Api(s) => Some(s),
        _ => None,
    }
}

impl BlockStore for KubeStore {
    async fn list(&self) -> Result<Vec<BlockClaim>, StoreError> {
        let objs = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error("list", "ipamblocks", e))?;
        let mut claims = objs
            .items
            .iter()
            .map(KubeStore::claim_of)
            .collect::<Result<Vec<_>, _>>()?;
        claims.sort();
        Ok(claims)
    }

    async fn claim(&self, cidr: Ipv4Net, node: &str) -> Result<ClaimOutcome, StoreError> {
        let name = block_name(cidr);
        let obj = IPAMBlock::new(
            &name,
            IPAMBlockSpec {
                node: node.to_string(),
                cidr: cidr.to_string(),
            },
        );
        match self.api.create(&PostParams::default(), &obj).await {
            Ok(_) => Ok(ClaimOutcome::Claimed),
            Err(e) if status_of(&e).is_some_and(|s| s.is_already_exists() || s.code == 409) => {
                Ok(ClaimOutcome::Taken)
            }
            Err(e) => Err(api_error("create", &name, e)),
        }
    }

    async fn release(&self, cidr: Ipv4Net, node: &str) -> Result<bool, StoreError> {
        let name = block_name(cidr);
        let obj = match self.api.get_opt(&name).await {
            Ok(Some(o)) => o,
            Ok(None) => return Ok(false),
            Err(e) => return Err(api_error("get", &name, e)),
        };
        if obj.spec.node != node {
            return Ok(false);
        }
        // Delete exactly the object we looked at: if it was deleted and claimed again
        // by another node in between, the uid differs and the server refuses (409).
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: obj.metadata.uid.clone(),
                resource_version: obj.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&name, &dp).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e).is_some_and(|s| s.is_not_found() || s.is_conflict()) => {
                Ok(false)
            }
            Err(e) => Err(api_error("delete", &name, e)),
        }
    }
}
