//! The Kubernetes datastore's block lifecycle end to end, against a fake API server
//! that speaks the real HTTP/JSON wire format (lists, watch streams, create with 409
//! AlreadyExists, get, delete with uid/resourceVersion preconditions): the agent's
//! loop claims another block when the IPAM state runs low and republishes the
//! node-blocks file, and releases the blocks of a node only after it has been gone
//! for the grace period, never those of a live node.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::json;
use sluice_agent::datastore::block_lifecycle::BlockSettings;
use sluice_agent::datastore::kube::KubeDatastore;
use sluice_agent::datastore::{Datastore, Snapshot};
use sluice_agent::metrics::Metrics;
use sluice_ipam::blocks::{Pool, block_name};
use sluice_ipam::store::kube::KubeStore;
use sluice_ipam::{AttachmentKey, StateDir};
use sluice_testkit::fake_kube::{self, Fake, Shared};

async fn fake_api(nodes: &[(&str, &str)], blocks: &[(&str, &str)]) -> (kube::Client, Shared) {
    let shared = Fake::with_nodes(nodes);
    for (i, (cidr, owner)) in blocks.iter().enumerate() {
        let net: Ipv4Net = cidr.parse().unwrap();
        let name = block_name(net);
        let b = fake_kube::block(&name, cidr, owner, i as u64 + 1);
        shared.lock().unwrap().blocks.insert(name, b);
    }
    let addr = fake_kube::start_local(shared.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (kube::Client::try_from(config).unwrap(), shared)
}

fn owners(shared: &Shared) -> BTreeMap<String, String> {
    Fake::owners(shared)
}

/// Wait (up to 20 s) for `cond`, polling.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn published(file: &Path) -> Vec<Ipv4Net> {
    sluice_ipam::node_blocks::read(file)
        .unwrap()
        .map(|n| n.blocks)
        .unwrap_or_default()
}

struct Agent {
    rx: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<()>,
}

fn start(client: kube::Client, dir: &Path, low_water: u32, grace: Duration) -> Agent {
    let pool = Pool::new("10.250.0.0/24".parse().unwrap(), 29).unwrap();
    let metrics = Arc::new(Metrics::new());
    let ds = KubeDatastore::new(
        client.clone(),
        KubeStore::new(client),
        pool,
        "n1".into(),
        dir.join("ipam/node-blocks.json"),
        Duration::from_millis(20),
    )
    .with_block_settings(
        BlockSettings {
            state_dir: dir.join("ipam"),
            low_water,
            orphan_grace: Some(grace),
            publish_lock: Default::default(),
        },
        metrics.clone(),
    );
    let (tx, rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(async move {
        ds.run(tx).await.unwrap();
    });
    Agent { rx, metrics, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_loop_claims_a_second_block_when_the_first_fills_and_republishes() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("ipam")).unwrap();
    let (client, shared) = fake_api(&[("n1", "192.168.1.1")], &[]).await;
    let mut a = start(client, d.path(), 2, Duration::from_secs(600));
    let file = d.path().join("ipam/node-blocks.json");

    a.rx.wait_for(|s| s.as_ref().is_some_and(|s| s.blocks_of("n1").len() == 1))
        .await
        .unwrap();
    let first = published(&file);
    assert_eq!(first.len(), 1);
    // Nothing else is claimed while the block has room.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        owners(&shared).len(),
        1,
        "no claim while the block has room"
    );

    // Four of five addresses in use, as sluice-ipam ADDs would leave them.
    {
        let state = StateDir::new(d.path().join("ipam"));
        let mut l = state.lock().unwrap();
        for i in 0..4 {
            l.allocator
                .allocate(&AttachmentKey::new(format!("c{i}"), "eth0"), &first, 0)
                .unwrap();
        }
        l.commit().unwrap();
    }
    eventually("a second block published", || published(&file).len() == 2).await;
    let snap =
        a.rx.wait_for(|s| s.as_ref().is_some_and(|s| s.blocks_of("n1").len() == 2))
            .await
            .unwrap()
            .clone()
            .unwrap();
    assert_eq!(snap.blocks_of("n1"), published(&file));
    assert!(owners(&shared).values().all(|n| n == "n1"));
    assert_eq!(a.metrics.blocks_claimed.get(), 2);
    a.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_loop_releases_blocks_of_gone_nodes_after_the_grace_period_only() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("ipam")).unwrap();
    let (client, shared) = fake_api(
        &[("n1", "192.168.1.1"), ("n2", "192.168.1.2")],
        &[("10.250.0.8/29", "gone"), ("10.250.0.16/29", "n2")],
    )
    .await;
    let grace = Duration::from_secs(4);
    let mut a = start(client, d.path(), 2, grace);
    a.rx.wait_for(|s| s.is_some()).await.unwrap();
    assert_eq!(
        owners(&shared).get("10.250.0.8/29").map(String::as_str),
        Some("gone"),
        "not released before the grace period"
    );

    eventually("the gone node's block released", || {
        !owners(&shared).contains_key("10.250.0.8/29")
    })
    .await;
    assert_eq!(a.metrics.blocks_released.get(), 1);
    assert_eq!(
        owners(&shared).get("10.250.0.16/29").map(String::as_str),
        Some("n2"),
        "a live node keeps its block"
    );

    // n2 is deleted: its block goes too, after its own grace period.
    let n2 = shared.lock().unwrap().nodes.remove("n2").unwrap();
    let ev = json!({"type": "DELETED", "object": n2}).to_string();
    shared.lock().unwrap().node_events.send(ev).unwrap();
    a.rx.wait_for(|s| {
        s.as_ref()
            .is_some_and(|s| !s.cluster.nodes.keys().any(|n| n == "n2"))
    })
    .await
    .unwrap();
    assert!(owners(&shared).contains_key("10.250.0.16/29"));
    eventually("n2's block released", || {
        !owners(&shared).contains_key("10.250.0.16/29")
    })
    .await;
    assert_eq!(a.metrics.blocks_released.get(), 2);
    assert!(owners(&shared).values().all(|n| n == "n1"));
    a.task.abort();
}

/// Issue 12: a pod asks for an address (`sluice.dev/ip-addrs`) in a block no node
/// holds. The plugin's IPAM asks the agent over the node-local API (`claim-block`,
/// the plugin's own client); the agent claims the block in the cluster's store,
/// publishes it, and the address is allocated. A block another node holds is refused
/// with code 116 and nothing allocated, and the agent's later polls keep the claimed
/// block published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_address_in_a_free_block_is_claimed_by_the_agent_over_the_local_api() {
    use sluice_agent::local_api::{self, LocalApi};
    use sluice_ipam::config::{BlockSource, IpamSettings};
    use sluice_ipam::{NodeIpam, cni::AgentClaimer};

    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("ipam")).unwrap();
    let (client, shared) = fake_api(
        &[("n1", "192.168.1.1"), ("n2", "192.168.1.2")],
        &[("10.250.0.16/29", "n2")],
    )
    .await;
    let mut a = start(client.clone(), d.path(), 2, Duration::from_secs(600));
    let file = d.path().join("ipam/node-blocks.json");
    a.rx.wait_for(|s| s.as_ref().is_some_and(|s| s.blocks_of("n1").len() == 1))
        .await
        .unwrap();

    // The agent's node-local API, serving claim-block from the same store.
    let (_ds_tx, ds_rx) = tokio::sync::watch::channel(None);
    let api = LocalApi::new(ds_rx, a.metrics.clone());
    let pool = Pool::new("10.250.0.0/24".parse().unwrap(), 29).unwrap();
    api.set_block_claims(local_api::claims::block_claims(
        KubeStore::new(client),
        pool,
        "n1".into(),
        file.clone(),
        BlockSettings::new(d.path().join("ipam")),
        a.metrics.clone(),
    ));
    let socket = d.path().join("run/agent.sock");
    tokio::spawn(local_api::serve(local_api::bind(&socket).unwrap(), api));

    let ipam = NodeIpam::new(IpamSettings {
        node: "n1".into(),
        pool,
        state_dir: d.path().join("ipam"),
        source: BlockSource::NodeBlocksFile(file.clone()),
        routes: vec![],
    })
    .with_claimer(Box::new(AgentClaimer { socket }));
    let ipam = Arc::new(ipam);
    let add = |c: &'static str, ip: &'static str| {
        let ipam = ipam.clone();
        tokio::task::spawn_blocking(move || {
            ipam.add(
                &AttachmentKey::new(c, "eth0"),
                "net",
                Some(ip.parse().unwrap()),
            )
        })
    };

    let got = add("c1", "10.250.0.42").await.unwrap().unwrap();
    assert_eq!(got.block.to_string(), "10.250.0.40/29");
    assert_eq!(owners(&shared)["10.250.0.40/29"], "n1");
    assert!(published(&file).contains(&got.block));

    let e = add("c2", "10.250.0.18").await.unwrap().unwrap_err();
    assert_eq!(e.cni_code().code(), 116, "requested address unavailable");
    assert!(e.to_string().contains("node n2 owns"), "{e}");
    let state = StateDir::new(d.path().join("ipam")).snapshot().unwrap();
    assert!(state.lookup(&AttachmentKey::new("c2", "eth0")).is_none());
    assert_eq!(
        owners(&shared)["10.250.0.16/29"],
        "n2",
        "n2's block untouched"
    );

    // The agent's own loop sees the claim and keeps publishing it.
    let snap =
        a.rx.wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| s.blocks_of("n1").contains(&got.block))
        })
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(snap.blocks_of("n1"), published(&file));
    a.task.abort();
}
