//! The Kubernetes block store against a fake API server that speaks the real wire
//! format (paths, JSON objects, `Status` errors with 409 AlreadyExists / Conflict and
//! 404 NotFound, delete preconditions), since no API server runs on this machine.
//! Also checks that the CRD manifest matches the Rust type.
#![cfg(feature = "kube")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ipnet::Ipv4Net;
use kube::CustomResourceExt;
use serde_json::{Value, json};
use sluice_ipam::blocks::{Pool, claim_block, release_orphan_blocks};
use sluice_ipam::store::kube::{IPAMBlock, KubeStore};
use sluice_ipam::store::{BlockClaim, BlockStore, ClaimOutcome, StoreError};

const COLLECTION: &str = "/apis/sluice.dev/v1/ipamblocks";

#[derive(Default)]
struct Fake {
    objects: BTreeMap<String, Value>,
    next_uid: u64,
    resource_version: u64,
    /// Bodies of DELETE requests, to check the preconditions sent.
    deletes: Vec<Value>,
    creates: u32,
    /// After the next GET of this object, replace it with a new one (new uid) owned
    /// by the given node, as if it had been released and claimed again meanwhile.
    reclaim_after_get: Option<(String, String)>,
}

type Shared = Arc<Mutex<Fake>>;

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// A `Status` object as the API server sends it with an error.
fn status(code: u16, reason: &str, message: String, name: &str) -> Response {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "details": {"name": name, "group": "sluice.dev", "kind": "ipamblocks"},
            "code": code,
        }),
    )
}

async fn list(State(s): State<Shared>) -> Response {
    let f = s.lock().unwrap();
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": "sluice.dev/v1", "kind": "IPAMBlockList",
            "metadata": {"resourceVersion": f.resource_version.to_string()},
            "items": f.objects.values().cloned().collect::<Vec<_>>(),
        }),
    )
}

async fn create(State(s): State<Shared>, body: Bytes) -> Response {
    let mut obj: Value = serde_json::from_slice(&body).expect("create body is JSON");
    assert_eq!(obj["apiVersion"], "sluice.dev/v1");
    assert_eq!(obj["kind"], "IPAMBlock");
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    // Cluster-scoped: the object must not carry a namespace.
    assert!(obj["metadata"].get("namespace").is_none());
    let mut f = s.lock().unwrap();
    f.creates += 1;
    if f.objects.contains_key(&name) {
        return status(
            409,
            "AlreadyExists",
            format!("ipamblocks.sluice.dev \"{name}\" already exists"),
            &name,
        );
    }
    f.next_uid += 1;
    f.resource_version += 1;
    obj["metadata"]["uid"] = json!(format!("uid-{}", f.next_uid));
    obj["metadata"]["resourceVersion"] = json!(f.resource_version.to_string());
    obj["metadata"]["creationTimestamp"] = json!("2026-11-23T19:00:00Z");
    f.objects.insert(name, obj.clone());
    json_response(StatusCode::CREATED, &obj)
}

async fn get_one(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    let mut f = s.lock().unwrap();
    match f.objects.get(&name).cloned() {
        Some(o) => {
            if f.reclaim_after_get
                .as_ref()
                .is_some_and(|(n, _)| *n == name)
            {
                let (_, node) = f.reclaim_after_get.take().unwrap();
                f.next_uid += 1;
                f.resource_version += 1;
                let (uid, rv) = (
                    format!("uid-{}", f.next_uid),
                    f.resource_version.to_string(),
                );
                let obj = f.objects.get_mut(&name).unwrap();
                obj["metadata"]["uid"] = json!(uid);
                obj["metadata"]["resourceVersion"] = json!(rv);
                obj["spec"]["node"] = json!(node);
            }
            json_response(StatusCode::OK, &o)
        }
        None => status(
            404,
            "NotFound",
            format!("ipamblocks.sluice.dev \"{name}\" not found"),
            &name,
        ),
    }
}

async fn delete(State(s): State<Shared>, Path(name): Path<String>, body: Bytes) -> Response {
    let opts: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).expect("delete body is JSON")
    };
    let mut f = s.lock().unwrap();
    f.deletes.push(opts.clone());
    let Some(obj) = f.objects.get(&name).cloned() else {
        return status(
            404,
            "NotFound",
            format!("ipamblocks.sluice.dev \"{name}\" not found"),
            &name,
        );
    };
    let pre = &opts["preconditions"];
    for field in ["uid", "resourceVersion"] {
        if let Some(want) = pre.get(field).and_then(Value::as_str)
            && obj["metadata"][field].as_str() != Some(want)
        {
            return status(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on ipamblocks.sluice.dev \"{name}\": Precondition failed: {field} in precondition: {want}"
                ),
                &name,
            );
        }
    }
    f.objects.remove(&name);
    f.resource_version += 1;
    json_response(StatusCode::OK, &obj)
}

/// Start the fake API server; returns a store talking to it and the shared state.
async fn fake_api() -> (KubeStore, Shared) {
    let shared: Shared = Arc::default();
    let app = Router::new()
        .route(COLLECTION, get(list).post(create))
        .route(
            &format!("{COLLECTION}/{{name}}"),
            get(get_one).delete(delete),
        )
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    (KubeStore::new(client), shared)
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[tokio::test]
async fn create_is_the_claim_and_409_already_exists_means_taken() {
    let (store, fake) = fake_api().await;
    let b = net("10.244.3.0/24");
    assert_eq!(
        store.claim(b, "node-a").await.unwrap(),
        ClaimOutcome::Claimed
    );
    assert_eq!(store.claim(b, "node-b").await.unwrap(), ClaimOutcome::Taken);
    assert_eq!(
        store.list().await.unwrap(),
        [BlockClaim {
            cidr: b,
            node: "node-a".into()
        }]
    );
    let f = fake.lock().unwrap();
    let obj = &f.objects["10-244-3-0-24"];
    assert_eq!(
        obj["spec"],
        json!({"node": "node-a", "cidr": "10.244.3.0/24"})
    );
    assert_eq!(f.creates, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_claimants_get_eight_distinct_blocks() {
    let (store, fake) = fake_api().await;
    let pool = Pool::new(net("10.244.0.0/21"), 24).unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                claim_block(&store, &pool, &format!("node-{i}"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut got = BTreeSet::new();
    for t in tasks {
        got.insert(t.await.unwrap());
    }
    assert_eq!(got.len(), 8);
    assert_eq!(fake.lock().unwrap().objects.len(), 8);
    let err = claim_block(&store, &pool, "node-8").await.unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");
}

#[tokio::test]
async fn release_deletes_only_the_owners_block_with_preconditions() {
    let (store, fake) = fake_api().await;
    let b = net("10.244.3.0/24");
    store.claim(b, "node-a").await.unwrap();
    assert!(
        !store.release(b, "node-b").await.unwrap(),
        "not node-b's block"
    );
    assert!(
        fake.lock().unwrap().deletes.is_empty(),
        "no DELETE for someone else's block"
    );
    assert!(store.release(b, "node-a").await.unwrap());
    {
        let f = fake.lock().unwrap();
        assert!(f.objects.is_empty());
        assert_eq!(f.deletes[0]["preconditions"]["uid"], "uid-1");
        assert_eq!(f.deletes[0]["preconditions"]["resourceVersion"], "1");
    }
    assert!(!store.release(b, "node-a").await.unwrap(), "already gone");
}

/// The block is released and re-claimed by another node between our GET and our
/// DELETE: the uid precondition makes the server refuse, and the new owner keeps it.
#[tokio::test]
async fn a_block_reclaimed_between_get_and_delete_is_not_deleted() {
    let (store, fake) = fake_api().await;
    let b = net("10.244.3.0/24");
    store.claim(b, "node-a").await.unwrap();
    fake.lock().unwrap().reclaim_after_get = Some(("10-244-3-0-24".into(), "node-b".into()));
    assert!(!store.release(b, "node-a").await.unwrap());
    let f = fake.lock().unwrap();
    assert_eq!(f.objects["10-244-3-0-24"]["spec"]["node"], "node-b");
    assert_eq!(f.deletes.len(), 1, "the DELETE was sent, and refused");
}

#[tokio::test]
async fn orphan_blocks_of_deleted_nodes_are_released() {
    let (store, fake) = fake_api().await;
    let pool = Pool::new(net("10.244.0.0/16"), 24).unwrap();
    for n in ["node-a", "node-b", "node-c"] {
        claim_block(&store, &pool, n).await.unwrap();
    }
    let live: BTreeSet<String> = ["node-b".to_string()].into();
    let released = release_orphan_blocks(&store, &live).await.unwrap();
    let nodes: BTreeSet<String> = released.into_iter().map(|c| c.node).collect();
    assert_eq!(nodes, ["node-a".to_string(), "node-c".to_string()].into());
    let left: Vec<String> = fake
        .lock()
        .unwrap()
        .objects
        .values()
        .map(|o| o["spec"]["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, ["node-b"]);
}

#[tokio::test]
async fn an_object_whose_name_does_not_match_its_cidr_is_reported() {
    let (store, fake) = fake_api().await;
    fake.lock().unwrap().objects.insert(
        "10-244-3-0-24".into(),
        json!({"apiVersion": "sluice.dev/v1", "kind": "IPAMBlock",
               "metadata": {"name": "10-244-3-0-24", "uid": "u", "resourceVersion": "1"},
               "spec": {"node": "n", "cidr": "10.244.4.0/24"}}),
    );
    assert!(matches!(
        store.list().await,
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn api_errors_other_than_conflicts_are_errors() {
    // Nothing listens on port 1.
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
    let store = KubeStore::new(client);
    assert!(matches!(
        store.claim(net("10.244.3.0/24"), "n").await,
        Err(StoreError::Api { .. })
    ));
}

/// `manifests/crds/ipamblocks.sluice.dev.yaml` is what the Rust type generates.
/// Regenerate with `SLUICE_WRITE_CRD=1 cargo test -p sluice-ipam --features kube --test kube_store`.
#[test]
fn crd_manifest_matches_the_rust_type() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/crds/ipamblocks.sluice.dev.yaml");
    let generated = serde_json::to_value(IPAMBlock::crd()).unwrap();
    if std::env::var_os("SLUICE_WRITE_CRD").is_some() {
        let yaml = serde_yaml_ng::to_string(&generated).unwrap();
        let header = "# IPAMBlock: one per claimed IPAM block, named after the block (10-244-3-0-24),\n\
                      # spec.node = the owning node. Generated from sluice_ipam::store::kube::IPAMBlock\n\
                      # (ipam/tests/kube_store.rs checks it; SLUICE_WRITE_CRD=1 regenerates).\n";
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("{header}{yaml}")).unwrap();
    }
    let on_disk: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&path).expect("CRD manifest exists"))
            .unwrap();
    assert_eq!(on_disk, generated, "regenerate with SLUICE_WRITE_CRD=1");
    assert_eq!(on_disk["spec"]["scope"], "Cluster");
    assert_eq!(on_disk["spec"]["group"], "sluice.dev");
    assert_eq!(on_disk["spec"]["names"]["kind"], "IPAMBlock");
}
