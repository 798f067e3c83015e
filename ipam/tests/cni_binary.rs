//! The `sluice-ipam` binary driven the way a runtime drives it: exec'd with the CNI
//! environment and the config on stdin, many at once. Processes and file locks need
//! no privileges, so these run anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use sluice_ipam::StateDir;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-ipam");

/// A standalone-node config: the binary claims blocks in `blocks` itself.
fn dir_conf(root: &Path, node: &str, pool: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "sluice-test",
        "type": "sluice",
        "ipam": {
            "type": "sluice-ipam",
            "nodeName": node,
            "pool": pool,
            "stateDir": root.join(node).join("ipam"),
            "blockStore": {"type": "dir", "path": root.join("blocks")},
        }
    })
}

/// A cluster-node config: the blocks come from a node-blocks file.
fn cluster_conf(root: &Path, node: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "sluice-test",
        "type": "sluice",
        "ipam": {
            "type": "sluice-ipam",
            "nodeName": node,
            "stateDir": root.join("ipam"),
            "nodeBlocksFile": root.join("node-blocks.json"),
        }
    })
}

fn spawn(cmd: &str, container: &str, conf: &Value) -> Child {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-ipam");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(conf.to_string().as_bytes()).unwrap();
    drop(stdin);
    child
}

fn run(cmd: &str, container: &str, conf: &Value) -> Output {
    spawn(cmd, container, conf).wait_with_output().unwrap()
}

/// The address of a successful ADD, or a panic with the CNI error.
fn added(out: &Output) -> Ipv4Addr {
    assert!(
        out.status.success(),
        "ADD failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let addr: Ipv4Net = v["ips"][0]["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(addr.prefix_len(), 32, "pod addresses are returned as /32");
    addr.addr()
}

/// The CNI error code of a failed invocation.
fn error_code(out: &Output) -> (u64, String) {
    assert!(
        !out.status.success(),
        "expected failure, got {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("a CNI error on stdout");
    (
        v["code"].as_u64().unwrap(),
        v["msg"].as_str().unwrap().to_string(),
    )
}

fn publish(root: &Path, node: &str, blocks: &[&str]) {
    sluice_ipam::node_blocks::write(
        &root.join("node-blocks.json"),
        &sluice_ipam::node_blocks::NodeBlocks {
            node: node.into(),
            blocks: blocks.iter().map(|b| b.parse().unwrap()).collect(),
            updated_unix: 0,
        },
    )
    .unwrap();
}

fn concurrent_adds_are_distinct(conf: &Value, state: &Path, block: Ipv4Net) {
    let children: Vec<Child> = (0..200)
        .map(|i| spawn("ADD", &format!("pod{i}"), conf))
        .collect();
    let ips: Vec<Ipv4Addr> = children
        .into_iter()
        .map(|c| added(&c.wait_with_output().unwrap()))
        .collect();
    let distinct: BTreeSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 200, "two pods share an address");
    for ip in &ips {
        assert!(block.contains(ip), "{ip} outside {block}");
        assert!(
            ![
                block.network(),
                block.broadcast(),
                sluice_ipam::tunnel_address(block)
            ]
            .contains(ip)
        );
    }
    let snap = StateDir::new(state).snapshot().unwrap();
    assert_eq!(snap.len(), 200);
    // A repeated ADD (a runtime retry) returns the same address.
    assert_eq!(added(&run("ADD", "pod17", conf)), ips[17]);
}

#[test]
fn two_hundred_concurrent_adds_on_a_standalone_node_get_two_hundred_distinct_addresses() {
    let d = tempfile::tempdir().unwrap();
    let conf = dir_conf(d.path(), "node-a", "10.244.0.0/16");
    let first = added(&run("ADD", "first", &conf));
    let block = Ipv4Net::new(first, 24).unwrap().trunc();
    assert!(run("DEL", "first", &conf).status.success());
    concurrent_adds_are_distinct(&conf, &d.path().join("node-a/ipam"), block);
}

#[test]
fn two_hundred_concurrent_adds_on_a_cluster_node_get_two_hundred_distinct_addresses() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.42.0/24"]);
    let conf = cluster_conf(d.path(), "node-a");
    concurrent_adds_are_distinct(
        &conf,
        &d.path().join("ipam"),
        "10.244.42.0/24".parse().unwrap(),
    );
}

#[test]
fn eight_concurrent_nodes_claim_eight_distinct_blocks_and_a_ninth_finds_the_pool_exhausted() {
    let d = tempfile::tempdir().unwrap();
    // A pool of exactly 8 blocks, so every claimant has to fight for what is left.
    let pool = "10.244.0.0/21";
    let children: Vec<Child> = (0..8)
        .map(|i| {
            spawn(
                "ADD",
                "pod",
                &dir_conf(d.path(), &format!("node-{i}"), pool),
            )
        })
        .collect();
    let blocks: BTreeSet<Ipv4Net> = children
        .into_iter()
        .map(|c| {
            Ipv4Net::new(added(&c.wait_with_output().unwrap()), 24)
                .unwrap()
                .trunc()
        })
        .collect();
    assert_eq!(blocks.len(), 8, "{blocks:?}");
    let store = std::fs::read_dir(d.path().join("blocks"))
        .unwrap()
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(store, 8);

    let (code, msg) = error_code(&run("ADD", "pod", &dir_conf(d.path(), "node-8", pool)));
    assert_eq!(code, 110, "{msg}");
    assert!(msg.contains("exhausted"), "{msg}");
}

#[test]
fn a_standalone_node_claims_another_block_when_its_block_is_full() {
    let d = tempfile::tempdir().unwrap();
    let mut conf = dir_conf(d.path(), "node-a", "10.9.0.0/24");
    conf["ipam"]["blockSize"] = json!(29); // 5 pod addresses per block
    let ips: Vec<Ipv4Addr> = (0..12)
        .map(|i| added(&run("ADD", &format!("p{i}"), &conf)))
        .collect();
    let blocks: BTreeSet<Ipv4Net> = ips
        .iter()
        .map(|ip| Ipv4Net::new(*ip, 29).unwrap().trunc())
        .collect();
    assert_eq!(blocks.len(), 3, "{ips:?}");
    assert_eq!(BTreeSet::from_iter(&ips).len(), 12);
}

/// kill -9 at random moments (before, inside and after the locked section), then a
/// GC with the attachments whose ADD reported success leaves exactly those, with the
/// addresses they were told, and a state file that validates.
#[test]
fn kill_9_at_random_moments_then_gc_leaves_exactly_the_live_allocations() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    let conf = cluster_conf(d.path(), "node-a");
    let mut live: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    let mut seed = 0x9e37_79b9_u32;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let mut killed = 0;
    for round in 0..6 {
        let children: Vec<(String, Child)> = (0..30)
            .map(|i| {
                let id = format!("r{round}p{i}");
                let c = spawn("ADD", &id, &conf);
                (id, c)
            })
            .collect();
        // Half of them killed, each at a random moment of the round's first 3 ms,
        // measured from the round's start (not one after another: an ADD here takes
        // about a millisecond, so sleeps that add up would kill only exited ones).
        let start = std::time::Instant::now();
        let mut kills: Vec<(Duration, usize)> = Vec::new();
        for i in 0..children.len() {
            if rand() % 2 == 0 {
                kills.push((Duration::from_micros(u64::from(rand() % 3000)), i));
            }
        }
        kills.sort();
        let mut children = children;
        for (at, i) in kills {
            if let Some(left) = at.checked_sub(start.elapsed()) {
                std::thread::sleep(left);
            }
            let _ = children[i].1.kill();
        }
        for (id, c) in children {
            let out = c.wait_with_output().unwrap();
            if std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(9) {
                killed += 1;
            }
            // Live = the runtime saw a complete result, whatever happened after.
            if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
                && let Some(a) = v["ips"][0]["address"].as_str()
            {
                live.insert(id, a.parse::<Ipv4Net>().unwrap().addr());
            }
        }
        // Some pods of earlier rounds go away normally too.
        if round % 2 == 1 {
            let gone: Vec<String> = live.keys().step_by(3).cloned().collect();
            for id in gone {
                assert!(run("DEL", &id, &conf).status.success());
                live.remove(&id);
            }
        }
    }
    assert!(
        killed > 10,
        "only {killed} processes were killed while running"
    );
    eprintln!(
        "{killed} ADD processes killed, {} live attachments",
        live.len()
    );

    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = live
        .keys()
        .map(|id| json!({"containerID": id, "ifname": "eth0"}))
        .collect();
    let out = run("GC", "", &gc);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let snap = StateDir::new(d.path().join("ipam"))
        .snapshot()
        .expect("state survives kill -9");
    snap.validate().unwrap();
    let held: BTreeMap<String, Ipv4Addr> = snap
        .allocations()
        .map(|a| (a.key.container_id.clone(), a.ip))
        .collect();
    assert_eq!(
        held, live,
        "after GC exactly the live attachments hold addresses"
    );
}

#[test]
fn del_of_an_unknown_attachment_succeeds_and_del_releases() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    let conf = cluster_conf(d.path(), "node-a");
    assert!(
        run("DEL", "never-added", &conf).status.success(),
        "DEL before any state"
    );
    added(&run("ADD", "p1", &conf));
    assert!(run("DEL", "never-added", &conf).status.success());
    assert!(run("DEL", "p1", &conf).status.success());
    assert!(run("DEL", "p1", &conf).status.success(), "second DEL");
    assert!(
        StateDir::new(d.path().join("ipam"))
            .snapshot()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn check_compares_with_the_previous_result() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    let conf = cluster_conf(d.path(), "node-a");
    let ip = added(&run("ADD", "p1", &conf));
    let mut check = conf.clone();
    check["prevResult"] = json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{ip}/32")}]});
    assert!(run("CHECK", "p1", &check).status.success());
    check["prevResult"]["ips"][0]["address"] = json!("10.244.5.99/32");
    assert_eq!(error_code(&run("CHECK", "p1", &check)).0, 114);
    assert_eq!(error_code(&run("CHECK", "p2", &conf)).0, 114);
}

#[test]
fn gc_without_an_attachment_list_releases_nothing() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    let mut conf = cluster_conf(d.path(), "node-a");
    added(&run("ADD", "p1", &conf));
    conf["cniVersion"] = json!("1.1.0");
    assert!(run("GC", "", &conf).status.success());
    assert_eq!(
        StateDir::new(d.path().join("ipam"))
            .snapshot()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn cluster_node_without_a_published_block_is_told_to_retry() {
    let d = tempfile::tempdir().unwrap();
    let conf = cluster_conf(d.path(), "node-a");
    let (code, msg) = error_code(&run("ADD", "p1", &conf));
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("agent"), "{msg}");

    publish(d.path(), "node-b", &["10.244.5.0/24"]);
    let (code, msg) = error_code(&run("ADD", "p1", &conf));
    assert_eq!(code, 11);
    assert!(msg.contains("\"node-b\""), "{msg}");
}

#[test]
fn cluster_node_with_full_blocks_is_told_to_retry_and_gets_the_next_published_block() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/30"]);
    let conf = cluster_conf(d.path(), "node-a");
    added(&run("ADD", "p1", &conf));
    let (code, msg) = error_code(&run("ADD", "p2", &conf));
    assert_eq!(code, 11, "{msg}");
    publish(d.path(), "node-a", &["10.244.5.0/30", "10.244.6.0/24"]);
    assert_eq!(
        added(&run("ADD", "p2", &conf)),
        "10.244.6.2".parse::<Ipv4Addr>().unwrap()
    );
}

#[test]
fn corrupt_state_is_an_error_and_is_never_reset() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    let conf = cluster_conf(d.path(), "node-a");
    added(&run("ADD", "p1", &conf));
    let state = d.path().join("ipam/allocations.json");
    let garbage = b"{\"version\": 1, \"blocks\": [{\"cidr\": \"10.244.5.0/24\"";
    std::fs::write(&state, garbage).unwrap();
    for cmd in ["ADD", "DEL"] {
        let (code, msg) = error_code(&run(cmd, "p2", &conf));
        assert_eq!(code, 112, "{cmd}: {msg}");
        assert!(msg.contains("will not reset"), "{msg}");
    }
    assert_eq!(std::fs::read(&state).unwrap(), garbage);
}

/// Run an ADD of `conf` after `setup` (shell) in a private mount namespace that dies
/// with the command, so a test mount never reaches the host's mount table. After
/// the ADD, the state directory's listing goes to stderr as a `state dir: …` line.
fn add_in_private_mounts(setup: &str, state_dir: &Path, conf: &Value) -> Output {
    let script = format!(
        "{setup} && {{ {BIN}; rc=$?; echo \"state dir: $(ls -A {})\" >&2; exit $rc; }}",
        state_dir.display()
    );
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "p1")
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn unwritable_state_dir_is_reported_with_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    let ro = d.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let state_dir = ro.join("ipam");
    let mut conf = cluster_conf(d.path(), "node-a");
    conf["ipam"]["stateDir"] = json!(state_dir);
    let out = if nix_is_root() {
        // Root ignores permission bits: make the directory a read-only mount.
        let setup = format!("mount -t tmpfs -o ro sluice-test {}", ro.display());
        add_in_private_mounts(&setup, &ro, &conf)
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        run("ADD", "p1", &conf)
    };
    let (code, msg) = error_code(&out);
    assert_eq!(
        code,
        111,
        "{msg} / {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(msg.contains("not writable"), "{msg}");
    assert!(msg.contains(state_dir.to_str().unwrap()), "{msg}");

    // A full file system: the same code, a message that says so, and the atomic
    // writer's temporary file removed (only the lock file is left).
    if !nix_is_root() {
        return;
    }
    let setup = format!(
        "mount -t tmpfs -o size=64k sluice-test {ro} && mkdir {ro}/ipam && \
         {{ dd if=/dev/zero of={ro}/filler bs=4096 2>/dev/null; true; }}",
        ro = ro.display()
    );
    let out = add_in_private_mounts(&setup, &state_dir, &conf);
    let (code, msg) = error_code(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let listing = stderr
        .lines()
        .find_map(|l| l.strip_prefix("state dir: "))
        .unwrap_or_else(|| panic!("no listing in {stderr}"));
    assert_eq!(code, 111, "{msg} / {stderr}");
    assert!(msg.contains("is full"), "{msg}");
    assert!(msg.contains(state_dir.to_str().unwrap()), "{msg}");
    assert_eq!(listing.trim(), "lock", "left in the state directory");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn results_follow_the_requested_version() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    let mut conf = cluster_conf(d.path(), "node-a");
    conf["ipam"]["routes"] = json!([{"dst": "10.96.0.0/12"}]);
    conf["cniVersion"] = json!("0.4.0");
    let v: Value = serde_json::from_slice(&run("ADD", "p1", &conf).stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["ips"][0]["version"], "4");
    assert_eq!(v["routes"], json!([{"dst": "10.96.0.0/12"}]));
    conf["cniVersion"] = json!("1.1.0");
    let v: Value = serde_json::from_slice(&run("ADD", "p1", &conf).stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["ips"][0], json!({"address": "10.244.5.2/32"}));
}

#[test]
fn status_reports_not_available_without_a_published_block() {
    let d = tempfile::tempdir().unwrap();
    let mut conf = cluster_conf(d.path(), "node-a");
    conf["cniVersion"] = json!("1.1.0");
    assert_eq!(error_code(&run("STATUS", "", &conf)).0, 50);
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    assert!(run("STATUS", "", &conf).status.success());
}

#[test]
fn gc_of_one_network_leaves_another_networks_allocations_in_a_shared_state_dir() {
    let d = tempfile::tempdir().unwrap();
    publish(d.path(), "node-a", &["10.244.5.0/24"]);
    let mut a = cluster_conf(d.path(), "node-a");
    a["cniVersion"] = json!("1.1.0");
    let mut b = a.clone();
    b["name"] = json!("other-network");
    added(&run("ADD", "pa", &a));
    added(&run("ADD", "pb", &b));
    a["cni.dev/valid-attachments"] = json!([]);
    assert!(run("GC", "", &a).status.success());
    let snap = StateDir::new(d.path().join("ipam")).snapshot().unwrap();
    let left: Vec<(String, String)> = snap
        .allocations()
        .map(|x| (x.key.container_id.clone(), x.network.clone()))
        .collect();
    assert_eq!(left, [("pb".to_string(), "other-network".to_string())]);
}
