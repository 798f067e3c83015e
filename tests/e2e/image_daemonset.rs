//! Root, CI: the sluice image, built here from the repository's Dockerfile (podman,
//! a debootstrapped base, the workspace's binaries), run as `manifests/daemonset.yaml`
//! runs it on a lab node:
//!
//! - the lab node is a network namespace with an uplink to a second node; podman is
//!   started inside it (`nsenter --net`) with `--network host`, which is what
//!   `hostNetwork: true` means on that node;
//! - each container's securityContext, env (fieldRef and ConfigMap keys resolved from
//!   `manifests/`), volume mounts (host paths under a temp dir standing in for the
//!   node's `/`) and command come from the parsed manifest, not from a copy; podman,
//!   like containerd, mounts `/proc/sys` and `/sys` read-only for such a container;
//! - `install-cni` runs first, as the init container, then the agent, against a fake
//!   Kubernetes API server (the manifest's datastore) listening in the node's
//!   namespace.
//!
//! The manifest's encapsulation is `ipip`, which this kernel lacks: the agent must
//! say so on `/readyz`. Then the ConfigMap is changed to `vxlan` (what
//! docs/configuration.md tells an operator on such a kernel) and the agent becomes
//! ready, programs its chains, tunnel device and routes, and writes the node files.
//!
//! Runtimes are printed (cold: debootstrap ≈ 1.5 min + import + build; warm: the
//! base tarball and podman's layers are cached under the target dir).

mod image_support;
#[path = "../repo/manifests_common/mod.rs"]
mod manifests_common;

use std::path::Path;
use std::time::{Duration, Instant};

use image_support::{PodRun, Podman, build_image, http_get};
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec};
use manifests_common::{Bundle, pod_spec};
use sluice_agent::tunnel::VXLAN_DEVICE;
use sluice_testkit::fake_kube::{self, Fake, FakeApi};
use sluice_testkit::{NetnsHolder, require_root, require_tool};

const TEST: &str = "image_daemonset";
const RELEASE: &str = "bookworm";
const NODE: &str = "node-1";
const NODE_IP: &str = "192.168.77.1";
const PEER: &str = "node-2";
const PEER_IP: &str = "192.168.77.2";
/// node-2's block, announced by the fake API server: node-1's agent must route it.
const PEER_BLOCK: &str = "10.244.200.0/24";
/// Where the kubeconfig is mounted in the agent's container.
const KUBECONFIG_IN_CONTAINER: &str = "/etc/sluice-test/kubeconfig";

/// A two-node lab: node-1's namespace with `eth0` to node-2's, a default route via
/// node-2 (the uplink the agent detects the MTU from).
struct Lab {
    node: NetnsHolder,
    _peer: NetnsHolder,
}

impl Lab {
    fn new() -> Lab {
        let node = NetnsHolder::new();
        let peer = NetnsHolder::new();
        node.exec(&format!(
            "ip link add eth0 type veth peer name eth0 netns {} && \
             ip addr add {NODE_IP}/24 dev eth0 && ip link set eth0 up && \
             ip route add default via {PEER_IP}",
            peer.pid()
        ));
        peer.exec(&format!(
            "ip addr add {PEER_IP}/24 dev eth0 && ip link set eth0 up"
        ));
        Lab { node, _peer: peer }
    }
}

/// Removes the agent's container even when an assertion fails half-way.
struct Running<'a> {
    podman: &'a Podman,
    name: String,
}

impl Running<'_> {
    fn logs(&self) -> String {
        let out = self.podman.output(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn pid(&self) -> u32 {
        self.podman
            .ok(&["inspect", "--format", "{{.State.Pid}}", &self.name])
            .parse()
            .expect("a pid")
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .output(&["rm", "--force", "--time", "0", &self.name]);
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("timed out after {timeout:?} waiting for {what}");
    None
}

fn config_map(bundle: &Bundle) -> ConfigMap {
    bundle
        .config_map("kube-system", "sluice-config")
        .expect("the bundle holds sluice-config")
        .clone()
}

/// Start the agent container of `pod` on the lab node, detached.
fn start_agent<'a>(
    podman: &'a Podman,
    pod: &PodSpec,
    cm: &ConfigMap,
    host_root: &Path,
    kubeconfig: &Path,
    name: &str,
) -> Running<'a> {
    let agent = &pod.containers[0];
    assert_eq!(agent.name, "sluice-agent");
    let run = PodRun {
        pod,
        container: agent,
        config_map: cm,
        node_name: NODE,
        host_root,
        // In a cluster the kubelet gives the pod KUBERNETES_SERVICE_HOST/PORT and a
        // service-account token with the cluster CA, and kube-rs builds an https
        // client from them. The fake API server speaks plain HTTP on the node's
        // loopback, so a kubeconfig naming it stands in for that injected in-cluster
        // configuration: KUBECONFIG and its mount are the only additions.
        extra_env: vec![("KUBECONFIG".into(), KUBECONFIG_IN_CONTAINER.into())],
        extra_mounts: vec![(kubeconfig.to_owned(), KUBECONFIG_IN_CONTAINER.into())],
    };
    // Unique per test process: a run killed before its clean-up cannot block the next.
    let name = format!("{name}-{}", std::process::id());
    let mut args: Vec<String> = vec!["run".into(), "--detach".into(), format!("--name={name}")];
    args.extend(run.args());
    podman.ok(&args);
    Running { podman, name }
}

fn iptables_rules(lab: &Lab) -> String {
    // Whichever backend the agent picked: both, read with the host's tools inside
    // the node's namespace.
    ["iptables-save", "iptables-legacy-save"]
        .iter()
        .map(|t| String::from_utf8_lossy(&lab.node.try_exec(t).stdout).into_owned())
        .collect()
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it_installs_cni_and_becomes_ready_with_vxlan() {
    if !require_root(TEST)
        || ![
            "podman",
            "runc",
            "debootstrap",
            "nsenter",
            "strip",
            "tar",
            "iptables-save",
            "nft",
        ]
        .iter()
        .all(|t| require_tool(TEST, t))
    {
        return;
    }
    let bundle = Bundle::load();
    let ds = bundle.daemonset();
    let pod = pod_spec(ds);
    let mut cm = config_map(&bundle);
    let agent_image = pod.containers[0].image.clone().expect("agent image");

    // --- build
    let t0 = Instant::now();
    let podman = Podman::new();
    let built = build_image(&podman, RELEASE, &format!("localhost/{agent_image}"));
    let build_time = t0.elapsed();
    eprintln!(
        "image {} built in {:.1} s (base {})",
        built.image,
        build_time.as_secs_f64(),
        if built.base_imported {
            "debootstrapped/imported"
        } else {
            "cached"
        }
    );

    // --- the node and its API server
    let lab = Lab::new();
    let tmp = tempfile::tempdir().unwrap();
    let host_root = tmp.path().join("host");
    let fake = Fake::with_nodes(&[(NODE, NODE_IP), (PEER, PEER_IP)]);
    {
        let net: ipnet::Ipv4Net = PEER_BLOCK.parse().unwrap();
        let name = sluice_ipam::blocks::block_name(net);
        let b = fake_kube::block(&name, PEER_BLOCK, PEER, 1);
        fake.lock().unwrap().blocks.insert(name, b);
    }
    let api = FakeApi::start_in_netns(lab.node.path(), fake.clone());
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let podman_node = podman.in_netns(lab.node.path());

    // --- init container: install-cni, run to completion
    let init = &pod.init_containers.as_ref().expect("init containers")[0];
    assert_eq!(init.name, "install-cni");
    let init_run = PodRun {
        pod: &pod,
        container: init,
        config_map: &cm,
        node_name: NODE,
        host_root: &host_root,
        extra_env: vec![],
        extra_mounts: vec![],
    };
    let mut args = vec!["run".to_string(), "--rm".into()];
    args.extend(init_run.args());
    podman_node.ok(&args);
    let conflist_path = host_root.join("etc/cni/net.d/10-sluice.conflist");
    let conflist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist_path).unwrap()).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "sluice", "{conflist}");
    assert!(
        conflist.to_string().contains(NODE),
        "the node name is substituted: {conflist}"
    );
    for bin in ["sluice", "sluice-ipam"] {
        let p = host_root.join("opt/cni/bin").join(bin);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).unwrap().permissions());
        assert!(mode & 0o111 != 0, "{} is executable", p.display());
    }

    // --- the agent as the manifest configures it: encapsulation ipip
    let port = pod.containers[0]
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .map(|h| match &h.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p as u16,
            other => panic!("probe port {other:?}"),
        })
        .expect("an httpGet readiness probe");
    let encap = cm.data.as_ref().unwrap()["encapsulation"].clone();
    let ipip_kernel = lab
        .node
        .try_exec("ip link add t-ipip type ipip")
        .status
        .success();
    if encap == "ipip" && !ipip_kernel {
        let agent = start_agent(
            &podman_node,
            &pod,
            &cm,
            &host_root,
            &kubeconfig,
            "sluice-agent-ipip",
        );
        let said = wait_for(
            "/readyz to name the missing ipip",
            Duration::from_secs(60),
            || match http_get(lab.node.path(), port, "/readyz") {
                Ok((503, body)) if body.contains("ipip") => Some(body),
                _ => None,
            },
        );
        let said = said.unwrap_or_else(|| panic!("agent logs:\n{}", agent.logs()));
        eprintln!("manifest's encapsulation ipip on a kernel without it: /readyz 503: {said}");
        let (code, _) = http_get(lab.node.path(), port, "/healthz").unwrap();
        assert_eq!(code, 200, "alive while not ready");
        drop(agent);
    } else {
        eprintln!("encapsulation {encap}, ipip available: {ipip_kernel}");
    }

    // --- what an operator does on a kernel without ipip: the ConfigMap says vxlan
    cm.data
        .as_mut()
        .unwrap()
        .insert("encapsulation".into(), "vxlan".into());
    let t1 = Instant::now();
    let agent = start_agent(
        &podman_node,
        &pod,
        &cm,
        &host_root,
        &kubeconfig,
        "sluice-agent",
    );
    let ready = wait_for("/readyz 200", Duration::from_secs(60), || {
        match http_get(lab.node.path(), port, "/readyz") {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    });
    let logs = agent.logs();
    assert!(
        ready.is_some(),
        "the agent never became ready; logs:\n{logs}"
    );
    eprintln!("agent ready after {:.1} s", t1.elapsed().as_secs_f64());

    // The runtime's view: /proc/sys and /sys read-only, only the manifest's capabilities.
    let pid = agent.pid();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    for m in ["/proc/sys", "/sys"] {
        let line = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(m))
            .unwrap_or_else(|| panic!("{m} not mounted:\n{mountinfo}"));
        let opts = line.split_whitespace().nth(5).unwrap();
        assert!(
            opts.split(',').any(|o| o == "ro"),
            "{m} is read-only: {line}"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    // CAP_NET_ADMIN = 12, CAP_NET_RAW = 13.
    assert_eq!(
        cap_eff,
        (1 << 12) | (1 << 13),
        "effective capabilities {cap_eff:#x}"
    );

    // Probes and metrics.
    let (code, _) = http_get(lab.node.path(), port, "/healthz").unwrap();
    assert_eq!(code, 200, "/healthz");
    let (code, metrics) = http_get(lab.node.path(), port, "/metrics").unwrap();
    assert_eq!(code, 200, "/metrics");
    assert!(metrics.contains("sluice_"), "{metrics}");

    // Dataplane: the ConfigMap says `auto` and the image carries `nft`, so the agent
    // runs sluice's nftables table in the node's namespace, and no iptables chains.
    let table = lab.node.try_exec("nft list table ip sluice");
    let table_text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success() && table_text.contains("chain SLUICE-FORWARD"),
        "no nftables table of sluice's:\n{table_text}\nlogs:\n{logs}"
    );
    let rules = iptables_rules(&lab);
    assert!(
        !rules.contains(":SLUICE-"),
        "iptables chains on an nftables node:\n{rules}\nlogs:\n{logs}"
    );

    // Tunnel: the VXLAN device and the route to node-2's block through it.
    let link = lab.node.exec(&format!("ip -d link show {VXLAN_DEVICE}"));
    assert!(link.contains("vxlan id"), "{link}");
    let route = wait_for(
        "the route to node-2's block",
        Duration::from_secs(20),
        || {
            let r = lab.node.exec(&format!("ip route show {PEER_BLOCK}"));
            r.contains(VXLAN_DEVICE).then_some(r)
        },
    );
    assert!(
        route.is_some(),
        "no route to {PEER_BLOCK} via {VXLAN_DEVICE}:\n{}\nlogs:\n{}",
        lab.node.exec("ip route"),
        agent.logs()
    );

    // Node files in the host paths: the MTU (uplink 1500 − 50 for VXLAN), the status
    // file the plugin's STATUS verb reads, and the node's own claimed block.
    let mtu = std::fs::read_to_string(host_root.join("var/lib/sluice/mtu")).unwrap();
    assert_eq!(mtu.trim(), "1450");
    assert!(
        host_root
            .join("run/sluice")
            .read_dir()
            .unwrap()
            .next()
            .is_some(),
        "status file"
    );
    assert!(
        Fake::owners(&fake).values().any(|n| n == NODE),
        "node-1 claimed a block: {:?}",
        Fake::owners(&fake)
    );

    eprintln!(
        "RUNTIME build {:.1} s, total {:.1} s",
        build_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop(agent);
    drop(api);
}
