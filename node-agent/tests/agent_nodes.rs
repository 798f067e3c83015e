//! Several simulated nodes (network namespaces on one bridge), each running the real
//! agent with the shared directory datastore and block store, encapsulation `none`:
//! every node's route table holds a blackhole for its own block and a route to each
//! other node's block via that node, and follows nodes joining and leaving.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_ipam::store::BlockStore;
use sluice_testkit::{NamedNetns, NetnsHolder, bin_path, require_root};

struct Node {
    name: String,
    ip: String,
    ns: NamedNetns,
    agent: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(a) = self.agent.as_mut() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

fn node_manifest(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n\
         status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
    )
}

fn start_node(fabric: &NetnsHolder, dir: &std::path::Path, i: u8) -> Node {
    let name = format!("node-{i}");
    let ip = format!("192.168.88.{i}");
    let ns = NamedNetns::new(&format!("sluice-nodes-{i}"));
    ns.exec(&format!(
        "ip link add eth0 type veth peer name p{i} netns /proc/{pid}/ns/net && \
         ip addr add {ip}/24 dev eth0 && ip link set eth0 up && \
         ip route add default via 192.168.88.254 && sysctl -qw net.ipv4.ip_forward=1",
        pid = fabric.pid()
    ));
    fabric.exec(&format!("ip link set p{i} master br0 up"));
    std::fs::write(
        dir.join(format!("manifests/{name}.yaml")),
        node_manifest(&name, &ip),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let agent = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(bin_path("sluice-agent"))
        .args(["run", "--node-name", &name, "--datastore", "directory"])
        .arg("--manifests-dir")
        .arg(dir.join("manifests"))
        .arg("--block-store-dir")
        .arg(dir.join("blocks"))
        .arg("--status-file")
        .arg(dir.join(format!("{name}/status.json")))
        .arg("--agent-socket")
        .arg(dir.join(format!("{name}/agent.sock")))
        .arg("--mtu-file")
        .arg(dir.join(format!("{name}/mtu")))
        .arg("--ipam-state-dir")
        .arg(dir.join(format!("{name}/ipam")))
        .arg("--node-blocks-file")
        .arg(dir.join(format!("{name}/ipam/node-blocks.json")))
        .args([
            "--health-addr",
            "127.0.0.1:9099",
            "--encapsulation",
            "none",
            "--iptables-backend",
            "nft",
        ])
        .args(["--poll-ms", "50", "--resync-seconds", "1"])
        .env_remove("SLUICE_NODE_NAME")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Node {
        name,
        ip,
        ns,
        agent: Some(agent),
    }
}

fn blocks(dir: &std::path::Path) -> BTreeMap<String, String> {
    let store = sluice_ipam::store::dir::DirStore::new(dir.join("blocks"));
    sluice_ipam::block_on::block_on(store.list())
        .unwrap()
        .into_iter()
        .map(|c| (c.node, c.cidr.to_string()))
        .collect()
}

/// `ip route show proto 181` of a node, normalised.
fn owned_routes(n: &Node) -> Vec<String> {
    let mut v: Vec<String> =
        n.ns.exec("ip -4 route show proto 181")
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
    v.sort();
    v
}

fn expected(n: &Node, live: &[&Node], blocks: &BTreeMap<String, String>) -> Vec<String> {
    let mut v: Vec<String> = live
        .iter()
        .filter_map(|o| {
            let b = blocks.get(&o.name)?;
            Some(if o.name == n.name {
                format!("blackhole {b}")
            } else {
                format!("{b} via {} dev eth0", o.ip)
            })
        })
        .collect();
    v.sort();
    v
}

fn converge(what: &str, nodes: &[&Node], dir: &std::path::Path) {
    let t0 = Instant::now();
    loop {
        let b = blocks(dir);
        let diffs: Vec<String> = nodes
            .iter()
            .filter_map(|n| {
                let (have, want) = (owned_routes(n), expected(n, nodes, &b));
                (have != want).then(|| format!("{}: have {have:?}, want {want:?}", n.name))
            })
            .collect();
        if diffs.is_empty() {
            return;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            panic!("{what}: routes did not converge:\n{}", diffs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn routes_follow_nodes_joining_and_leaving() {
    if !require_root("routes_follow_nodes_joining_and_leaving") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
    std::fs::create_dir_all(dir.path().join("blocks")).unwrap();
    let fabric = NetnsHolder::new();
    fabric.exec("ip link add br0 type bridge && ip addr add 192.168.88.254/24 dev br0 && ip link set br0 up");

    let n1 = start_node(&fabric, dir.path(), 1);
    let n2 = start_node(&fabric, dir.path(), 2);
    converge("two nodes", &[&n1, &n2], dir.path());

    let n3 = start_node(&fabric, dir.path(), 3);
    converge("node-3 joined", &[&n1, &n2, &n3], dir.path());
    let b = blocks(dir.path());
    assert_eq!(b.len(), 3, "one block per node: {b:?}");

    // node-2 leaves: its Node object goes, and the others drop its route.
    std::fs::remove_file(dir.path().join("manifests/node-2.yaml")).unwrap();
    drop(n2);
    converge("node-2 left", &[&n1, &n3], dir.path());
}
