//! The agent's block lifecycle against a real block store (the ipam crate's
//! `DirStore` in a tempdir) and a real IPAM state directory: a node whose blocks run
//! low gets another block and republishes the node-blocks file; no claim when there
//! is room; blocks of vanished nodes are released only after the grace period, never
//! for a live node, and exactly once when several agents release at the same time.
//! The last test closes the loop with the real `sluice-ipam` binary: ADD answers
//! code 11 on a full node until the agent claims and publishes, then succeeds.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use sluice_agent::datastore::block_lifecycle::{
    BlockSettings, OrphanTracker, ensure_capacity, publish, release_orphans,
};
use sluice_agent::metrics::Metrics;
use sluice_ipam::blocks::Pool;
use sluice_ipam::store::{BlockStore, ClaimOutcome, dir::DirStore};
use sluice_ipam::{AttachmentKey, StateDir};

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// A pool of /29 blocks: 5 pod addresses each (network, broadcast and the tunnel
/// address reserved), so filling a block takes a handful of allocations.
fn small_pool() -> Pool {
    Pool::new(net("10.250.0.0/24"), 29).unwrap()
}

fn settings(state: &Path, low_water: u32) -> BlockSettings {
    BlockSettings {
        state_dir: state.to_path_buf(),
        low_water,
        orphan_grace: Some(Duration::from_secs(600)),
        publish_lock: Default::default(),
    }
}

/// Allocate `n` addresses from `owned`, as `sluice-ipam` ADD would.
fn allocate(state: &Path, owned: &[Ipv4Net], n: usize, prefix: &str) {
    let dir = StateDir::new(state);
    let mut l = dir.lock().unwrap();
    for i in 0..n {
        l.allocator
            .allocate(
                &AttachmentKey::new(format!("{prefix}{i}"), "eth0"),
                owned,
                0,
            )
            .unwrap();
    }
    l.commit().unwrap();
}

fn published(file: &Path) -> Vec<Ipv4Net> {
    sluice_ipam::node_blocks::read(file)
        .unwrap()
        .unwrap()
        .blocks
}

fn names(n: &[&str]) -> BTreeSet<String> {
    n.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_node_whose_block_fills_up_gets_a_second_one_and_republishes() {
    let d = tempfile::tempdir().unwrap();
    let (state, file) = (
        d.path().join("ipam"),
        d.path().join("ipam/node-blocks.json"),
    );
    std::fs::create_dir_all(&state).unwrap();
    let store = DirStore::new(d.path().join("blocks"));
    let (pool, s, m) = (small_pool(), settings(&state, 2), Metrics::new());

    let own = ensure_capacity(&store, &pool, "n1", &s, Some(&m))
        .await
        .unwrap();
    assert_eq!(own.len(), 1, "a node with no block claims its first");
    assert!(publish(&file, "n1", &own).unwrap());
    assert_eq!(published(&file), own);

    // 4 of 5 used: 1 free is below the low-water mark of 2.
    allocate(&state, &own, 4, "c");
    let grown = ensure_capacity(&store, &pool, "n1", &s, Some(&m))
        .await
        .unwrap();
    assert_eq!(grown.len(), 2, "a nearly full node claims another block");
    assert!(grown.contains(&own[0]));
    assert!(
        publish(&file, "n1", &grown).unwrap(),
        "the new block is published"
    );
    assert_eq!(published(&file), grown);
    assert_eq!(m.blocks_claimed.get(), 2);
    let in_store: Vec<_> = store.list().await.unwrap();
    assert_eq!(in_store.len(), 2);
    assert!(in_store.iter().all(|c| c.node == "n1"));
}

#[tokio::test]
async fn no_claim_while_the_blocks_have_room() {
    let d = tempfile::tempdir().unwrap();
    let (state, file) = (d.path().join("ipam"), d.path().join("node-blocks.json"));
    std::fs::create_dir_all(&state).unwrap();
    let store = DirStore::new(d.path().join("blocks"));
    let (pool, s, m) = (small_pool(), settings(&state, 2), Metrics::new());

    let own = ensure_capacity(&store, &pool, "n1", &s, Some(&m))
        .await
        .unwrap();
    publish(&file, "n1", &own).unwrap();
    // 3 of 5 used: 2 free is not below the mark.
    allocate(&state, &own, 3, "c");
    for _ in 0..5 {
        let again = ensure_capacity(&store, &pool, "n1", &s, Some(&m))
            .await
            .unwrap();
        assert_eq!(again, own);
        assert!(
            !publish(&file, "n1", &again).unwrap(),
            "unchanged file is not rewritten"
        );
    }
    assert_eq!(store.list().await.unwrap().len(), 1);
    assert_eq!(m.blocks_claimed.get(), 1);
}

#[tokio::test]
async fn an_exhausted_pool_keeps_the_blocks_a_node_has() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("ipam");
    std::fs::create_dir_all(&state).unwrap();
    let store = DirStore::new(d.path().join("blocks"));
    // A pool of exactly one /29 block.
    let pool = Pool::new(net("10.250.0.0/29"), 29).unwrap();
    let (s, m) = (settings(&state, 2), Metrics::new());
    let own = ensure_capacity(&store, &pool, "n1", &s, Some(&m))
        .await
        .unwrap();
    allocate(&state, &own, 5, "c");
    let after = ensure_capacity(&store, &pool, "n1", &s, Some(&m))
        .await
        .unwrap();
    assert_eq!(after, own);
    assert_eq!(m.block_claim_failures.get(), 1);
    // A node with no block at all gets the pool-exhausted error.
    let err = ensure_capacity(&store, &pool, "n2", &s, Some(&m))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");
}

async fn store_with(dir: &Path, claims: &[(&str, &str)]) -> DirStore {
    let store = DirStore::new(dir.join("blocks"));
    for (cidr, node) in claims {
        assert_eq!(
            store.claim(net(cidr), node).await.unwrap(),
            ClaimOutcome::Claimed
        );
    }
    store
}

#[tokio::test]
async fn orphan_blocks_are_released_only_after_the_grace_period_and_never_for_live_nodes() {
    let d = tempfile::tempdir().unwrap();
    let store = store_with(
        d.path(),
        &[
            ("10.250.0.0/29", "self"),
            ("10.250.0.8/29", "gone"),
            ("10.250.0.16/29", "gone"),
            ("10.250.0.24/29", "live"),
        ],
    )
    .await;
    let (grace, m) = (Duration::from_secs(600), Metrics::new());
    let live = names(&["self", "live"]);
    let mut t = OrphanTracker::default();
    let t0 = Instant::now();
    for at in [
        Duration::ZERO,
        Duration::from_secs(300),
        Duration::from_secs(599),
    ] {
        let r = release_orphans(&store, &mut t, t0 + at, "self", &live, grace, Some(&m))
            .await
            .unwrap();
        assert!(
            r.is_empty(),
            "nothing released {at:?} into the grace period"
        );
    }
    assert_eq!(store.list().await.unwrap().len(), 4);

    let r = release_orphans(&store, &mut t, t0 + grace, "self", &live, grace, Some(&m))
        .await
        .unwrap();
    let released: BTreeSet<Ipv4Net> = r.iter().map(|c| c.cidr).collect();
    assert_eq!(
        released,
        [net("10.250.0.8/29"), net("10.250.0.16/29")].into()
    );
    let left: BTreeSet<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.node)
        .collect();
    assert_eq!(left, names(&["self", "live"]));
    assert_eq!(m.blocks_released.get(), 2);

    // Much later, live nodes still keep their blocks.
    let r = release_orphans(
        &store,
        &mut t,
        t0 + grace * 100,
        "self",
        &live,
        grace,
        Some(&m),
    )
    .await
    .unwrap();
    assert!(r.is_empty());
    assert_eq!(store.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_node_list_without_ourselves_releases_nothing() {
    let d = tempfile::tempdir().unwrap();
    let store = store_with(
        d.path(),
        &[("10.250.0.0/29", "self"), ("10.250.0.8/29", "other")],
    )
    .await;
    let mut t = OrphanTracker::default();
    let t0 = Instant::now();
    let grace = Duration::from_secs(1);
    // An empty (or partial) list is no evidence that nodes are gone.
    for k in 0..5 {
        let r = release_orphans(
            &store,
            &mut t,
            t0 + grace * k * 10,
            "self",
            &BTreeSet::new(),
            grace,
            None,
        )
        .await
        .unwrap();
        assert!(r.is_empty());
    }
    assert_eq!(store.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_node_that_returns_within_the_grace_period_keeps_its_blocks() {
    let d = tempfile::tempdir().unwrap();
    let store = store_with(
        d.path(),
        &[("10.250.0.0/29", "self"), ("10.250.0.8/29", "flaky")],
    )
    .await;
    let mut t = OrphanTracker::default();
    let (t0, grace) = (Instant::now(), Duration::from_secs(600));
    let without = names(&["self"]);
    let with = names(&["self", "flaky"]);
    release_orphans(&store, &mut t, t0, "self", &without, grace, None)
        .await
        .unwrap();
    release_orphans(&store, &mut t, t0 + grace / 2, "self", &with, grace, None)
        .await
        .unwrap();
    // Absent again: the clock starts over, so grace after t0 is not enough.
    let r = release_orphans(&store, &mut t, t0 + grace, "self", &without, grace, None)
        .await
        .unwrap();
    assert!(r.is_empty());
    assert_eq!(store.list().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_agents_releasing_at_once_release_each_block_once() {
    let d = tempfile::tempdir().unwrap();
    let mut claims = vec![("10.250.0.0/29".to_string(), "a".to_string())];
    for i in 1..20u32 {
        claims.push((format!("10.250.0.{}/29", i * 8), format!("gone{i}")));
    }
    let refs: Vec<(&str, &str)> = claims
        .iter()
        .map(|(c, n)| (c.as_str(), n.as_str()))
        .collect();
    store_with(d.path(), &refs).await;
    let grace = Duration::from_secs(1);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for agent in ["a", "b", "c", "e"] {
        let dir = d.path().join("blocks");
        tasks.push(tokio::spawn(async move {
            let store = DirStore::new(dir);
            let live = names(&["a", "b", "c", "e"]);
            let mut t = OrphanTracker::default();
            release_orphans(&store, &mut t, t0, agent, &live, grace, None)
                .await
                .unwrap();
            release_orphans(&store, &mut t, t0 + grace, agent, &live, grace, None)
                .await
                .unwrap()
        }));
    }
    let mut released = Vec::new();
    for t in tasks {
        released.extend(t.await.unwrap());
    }
    assert_eq!(
        released.len(),
        19,
        "each orphan block released by exactly one agent"
    );
    let distinct: BTreeSet<_> = released.iter().map(|c| c.cidr).collect();
    assert_eq!(distinct.len(), 19);
    let left = DirStore::new(d.path().join("blocks")).list().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].node, "a");
}

/// Run the real `sluice-ipam` ADD for `container` with a cluster-node config.
fn ipam_add(conf: &serde_json::Value, container: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(sluice_testkit::bin_path("sluice-ipam"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sluice-ipam");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn added_in(out: &std::process::Output) -> std::net::Ipv4Addr {
    assert!(
        out.status.success(),
        "ADD failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a: Ipv4Net = v["ips"][0]["address"].as_str().unwrap().parse().unwrap();
    a.addr()
}

#[tokio::test]
async fn the_ipam_plugin_stops_at_a_full_block_and_continues_in_the_block_the_agent_claims() {
    let d = tempfile::tempdir().unwrap();
    let (state, file) = (
        d.path().join("ipam"),
        d.path().join("ipam/node-blocks.json"),
    );
    std::fs::create_dir_all(&state).unwrap();
    let store = DirStore::new(d.path().join("blocks"));
    let pool = small_pool();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "sluice-test",
        "type": "sluice",
        "ipam": {
            "type": "sluice-ipam",
            "nodeName": "n1",
            "pool": pool.cidr().to_string(),
            "blockSize": pool.block_prefix(),
            "stateDir": state,
            "nodeBlocksFile": file,
        }
    });
    // Low-water mark 1: claim only when nothing is free, so the plugin hits the wall.
    let s = settings(&state, 1);
    let own = ensure_capacity(&store, &pool, "n1", &s, None)
        .await
        .unwrap();
    publish(&file, "n1", &own).unwrap();
    for i in 0..5 {
        let a = added_in(&ipam_add(&conf, &format!("c{i}")));
        assert!(own[0].contains(&a));
    }
    let full = ipam_add(&conf, "c5");
    assert!(!full.status.success());
    let err: serde_json::Value = serde_json::from_slice(&full.stdout).unwrap();
    assert_eq!(err["code"], 11, "full node: try again later, {err}");

    // What the agent's capacity check does on its next tick.
    let grown = ensure_capacity(&store, &pool, "n1", &s, None)
        .await
        .unwrap();
    assert_eq!(grown.len(), 2);
    assert!(publish(&file, "n1", &grown).unwrap());
    let a = added_in(&ipam_add(&conf, "c5"));
    let new_block = grown.iter().find(|b| **b != own[0]).unwrap();
    assert!(
        new_block.contains(&a),
        "the retried ADD lands in the new block: {a}"
    );
}
