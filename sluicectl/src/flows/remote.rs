//! `sluicectl flows --node NODE` through the cluster, from wherever kubectl works:
//! list the sluice agent pods on NODE (namespace and labels of
//! `manifests/daemonset.yaml`), then GET the agent's `/flows` through the API
//! server's pod proxy, `/api/v1/namespaces/NS/pods/NAME:PORT/proxy/flows?…`, PORT
//! being the agent's health and metrics port. The agent answers
//! `application/x-ndjson`, one `FlowRecord` per line; with `follow=1` it keeps the
//! response open and writes records as they come, and each is printed at once.
//!
//! The operator's credentials need `list` on `pods` and `get` on `pods/proxy` in the
//! agent's namespace (docs/troubleshooting.md has the Role).

use std::ops::ControlFlow;

use serde_json::Value;
use sluice_node_files::flows::{FlowQuery, FlowRecord};

use crate::apiserver::{ApiServer, ApiServerError, KubeArgs, query_escape};

/// The agent DaemonSet's namespace (manifests/daemonset.yaml).
pub const AGENT_NAMESPACE: &str = "kube-system";
/// The agent pods' labels (the DaemonSet's selector), as a label selector.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=sluice,app.kubernetes.io/component=agent";
/// The agent's health and metrics port (`--health-addr`, container port `health`),
/// which serves `/flows`.
pub const AGENT_PORT: u16 = 9099;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Api(#[from] ApiServerError),
    #[error(
        "{what} was refused (403 Forbidden): reading a node's records through the cluster \
         needs `list` on pods and `get` on pods/proxy in namespace {AGENT_NAMESPACE} \
         (docs/troubleshooting.md)"
    )]
    Forbidden { what: String },
    #[error(
        "no sluice agent pod on node {node:?} (namespace {AGENT_NAMESPACE}, labels \
         {AGENT_SELECTOR}); check the node's name (kubectl get nodes) and that the \
         sluice-agent DaemonSet runs there"
    )]
    NoAgent { node: String },
    #[error("the sluice agent pod on node {node:?} is not running: {pods}")]
    NotRunning { node: String, pods: String },
    #[error("the agent pod list from the API server does not parse: {0}")]
    PodList(#[source] serde_json::Error),
    #[error("the agent sent a line that is not a flow record ({source}): {line}")]
    Record {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing the records: {0}")]
    Output(#[source] std::io::Error),
}

/// The path that lists the agent pods on `node`.
pub fn agent_pods_path(node: &str) -> String {
    format!(
        "/api/v1/namespaces/{AGENT_NAMESPACE}/pods?labelSelector={}&fieldSelector={}",
        query_escape(AGENT_SELECTOR),
        query_escape(&format!("spec.nodeName={node}"))
    )
}

/// The pod proxy path of `pod`'s `/flows` with `query`.
pub fn flows_path(pod: &str, query: &FlowQuery) -> String {
    let query = query.to_query_string();
    let mut path =
        format!("/api/v1/namespaces/{AGENT_NAMESPACE}/pods/{pod}:{AGENT_PORT}/proxy/flows");
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query);
    }
    path
}

/// The agent pod to ask, from the API's pod list on `node`: a running one not being
/// deleted, the newest if a rollout left two.
pub fn choose_agent_pod(list: &Value, node: &str) -> Result<String, RemoteError> {
    let items = list["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if items.is_empty() {
        return Err(RemoteError::NoAgent {
            node: node.to_string(),
        });
    }
    let name = |p: &Value| p["metadata"]["name"].as_str().unwrap_or("?").to_string();
    items
        .iter()
        .filter(|p| p["status"]["phase"] == "Running")
        .filter(|p| p["metadata"].get("deletionTimestamp").is_none())
        // RFC 3339 times as the API writes them (UTC, seconds) sort as strings.
        .max_by_key(|p| p["metadata"]["creationTimestamp"].as_str().unwrap_or(""))
        .map(name)
        .ok_or_else(|| RemoteError::NotRunning {
            node: node.to_string(),
            pods: items
                .iter()
                .map(|p| {
                    let phase = p["status"]["phase"].as_str().unwrap_or("Unknown");
                    let deleting = if p["metadata"].get("deletionTimestamp").is_some() {
                        ", being deleted"
                    } else {
                        ""
                    };
                    format!("{} ({phase}{deleting})", name(p))
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Reads `node`'s records matching `query` through the cluster and hands each to
/// `each` as it arrives; an error from `each` stops the read and is returned.
pub fn read(
    kube: &KubeArgs,
    node: &str,
    query: &FlowQuery,
    mut each: impl FnMut(FlowRecord) -> std::io::Result<()>,
) -> Result<(), RemoteError> {
    let api = ApiServer::connect(kube)?;
    let forbidden = |what: &str| {
        let what = what.to_string();
        move |e: ApiServerError| match e {
            ApiServerError::Get {
                source: kube::Error::Api(s),
                ..
            } if s.code == 403 => RemoteError::Forbidden { what },
            e => RemoteError::Api(e),
        }
    };
    let pods_path = agent_pods_path(node);
    let list = api
        .get_text(&pods_path)
        .map_err(forbidden("listing the agent pods"))?
        // The pods collection is always served; a 404 would be a broken proxy.
        .ok_or_else(|| RemoteError::NoAgent {
            node: node.to_string(),
        })?;
    let list: Value = serde_json::from_str(&list).map_err(RemoteError::PodList)?;
    let pod = choose_agent_pod(&list, node)?;

    let mut failed = None;
    api.get_lines(&flows_path(&pod, query), |line| {
        if line.trim().is_empty() {
            return ControlFlow::Continue(());
        }
        let result = serde_json::from_str::<FlowRecord>(line)
            .map_err(|source| RemoteError::Record {
                line: line.to_string(),
                source,
            })
            .and_then(|r| each(r).map_err(RemoteError::Output));
        match result {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    })
    .map_err(forbidden(&format!(
        "reading /flows of pod {pod} through the pod proxy"
    )))?;
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_agent_pod_is_found_by_the_namespace_labels_and_port_of_the_daemonset() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/daemonset.yaml"
        ))
        .unwrap();
        let ds: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(ds["metadata"]["namespace"], AGENT_NAMESPACE);
        let labels = ds["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .unwrap();
        let selector: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect();
        let mut ours: Vec<&str> = AGENT_SELECTOR.split(',').collect();
        ours.sort();
        assert_eq!(selector, ours);
        let agent = ds["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "sluice-agent")
            .unwrap();
        assert_eq!(agent["ports"][0]["name"], "health");
        assert_eq!(agent["ports"][0]["containerPort"], AGENT_PORT);
    }

    #[test]
    fn the_proxy_path_carries_the_agents_query() {
        let q = FlowQuery {
            since: Some("2026-12-06T10:00:00+01:00".into()),
            denied: true,
            namespace: Some("shop".into()),
            limit: Some(50),
            follow: true,
        };
        assert_eq!(
            flows_path("sluice-agent-x7k2p", &q),
            format!(
                "/api/v1/namespaces/kube-system/pods/sluice-agent-x7k2p:9099/proxy/flows?{}",
                q.to_query_string()
            )
        );
        assert_eq!(
            flows_path("p", &FlowQuery::default()),
            "/api/v1/namespaces/kube-system/pods/p:9099/proxy/flows"
        );
    }

    fn pod(name: &str, phase: &str, created: &str, deleting: bool) -> Value {
        let mut p = json!({"metadata": {"name": name, "creationTimestamp": created},
                           "status": {"phase": phase}});
        if deleting {
            p["metadata"]["deletionTimestamp"] = json!("2026-12-06T10:00:00Z");
        }
        p
    }

    #[test]
    fn the_newest_running_agent_pod_is_chosen_and_one_being_deleted_is_not() {
        let list = json!({"items": [
            pod("old", "Running", "2026-12-01T00:00:00Z", true),
            pod("a", "Running", "2026-12-02T00:00:00Z", false),
            pod("b", "Running", "2026-12-03T00:00:00Z", false),
            pod("c", "Pending", "2026-12-04T00:00:00Z", false),
        ]});
        assert_eq!(choose_agent_pod(&list, "n1").unwrap(), "b");
    }

    #[test]
    fn no_agent_pod_and_no_running_agent_pod_are_told_apart() {
        let none = choose_agent_pod(&json!({"items": []}), "n9").unwrap_err();
        assert!(matches!(none, RemoteError::NoAgent { .. }), "{none}");
        let pending = json!({"items": [pod("a", "Pending", "2026-12-02T00:00:00Z", false)]});
        let err = choose_agent_pod(&pending, "n1").unwrap_err().to_string();
        assert!(err.contains("a (Pending)"), "{err}");
    }
}
