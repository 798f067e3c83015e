//! Root: kubelet's CNI path. containerd 1.6's CRI plugin, driven over its gRPC
//! socket the way kubelet drives it (RunPodSandbox, StopPodSandbox,
//! RemovePodSandbox), calls sluice + sluice-ipam chained with portmap from the
//! conflist a node would have. Each case runs its own containerd in a throwaway
//! node network namespace and a private mount namespace (`sluice_testkit::
//! containerd`), with a locally built sandbox image (no registry is reachable).
//!
//! After every case: no sluice link, route, portmap rule or IPAM entry is left,
//! and while a pod runs its wiring is the one of docs/architecture.md (a /32 on
//! eth0, a link route to 169.254.1.1 and a default via it inside; a /32 route to
//! the slc veth on the node) and a packet from the node reaches it.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_cri_tests::api::PodSandboxState;
use sluice_cri_tests::{
    CriClient, PAUSE_IMAGE, build_pause_image, pod_config, sandbox_pid, tcp_host_port,
};
use sluice_testkit::containerd::{Containerd, Options};
use sluice_testkit::node::{NODE_IP, assert_no_node_leftovers, links, setup_node, sluice_links};
use sluice_testkit::{bin_path, in_new_netns, require_root, require_tool, sh, try_sh};

/// One node: containerd with its CRI, our CNI files, and a kubelet-like client.
/// Lives on the thread of the node's network namespace.
struct Node {
    containerd: Containerd,
    rt: tokio::runtime::Runtime,
    cri: CriClient,
    dir: PathBuf,
}

/// What a running sandbox looks like from outside.
struct Pod {
    id: String,
    ip: String,
    pid: u32,
}

impl Node {
    fn start(dir: &Path) -> Node {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for b in ["sluice", "sluice-ipam"] {
            std::os::unix::fs::symlink(bin_path(b), bin.join(b)).unwrap();
        }
        // containerd's CRI adds `lo` with the loopback plugin before the pod network.
        for p in ["portmap", "loopback"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p)).unwrap();
        }
        let netd = dir.join("net.d");
        std::fs::create_dir_all(&netd).unwrap();
        std::fs::write(netd.join("10-sluice.conflist"), conflist(dir).to_string()).unwrap();

        let extra_config = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
             \x20 sandbox_image = \"{PAUSE_IMAGE}\"\n\
             \x20 restrict_oom_score_adj = true\n\
             \x20 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
             \x20   bin_dir = \"{}\"\n\
             \x20   conf_dir = \"{}\"\n\
             \x20   max_conf_num = 1\n",
            bin.display(),
            netd.display()
        );
        let containerd = Containerd::start(
            dir,
            &Options {
                extra_config,
                bind: vec![],
            },
        );
        let image = build_pause_image(dir);
        let out = containerd.ctr("k8s.io", &["images", "import", image.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "import {PAUSE_IMAGE}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cri = rt
            .block_on(CriClient::connect(&containerd.socket()))
            .unwrap();
        let node = Node {
            containerd,
            rt,
            cri,
            dir: dir.to_owned(),
        };
        node.wait_for_cri();
        let v = node.rt.block_on(node.cri.version()).expect("CRI Version");
        assert_eq!(v.runtime_api_version, "v1", "{v:?}");
        node
    }

    /// containerd serves its socket before the CRI plugin has recovered its state
    /// ("server is not initialized yet"); kubelet retries until it answers.
    fn wait_for_cri(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = self.rt.block_on(self.cri.list_pod_sandbox()) {
            assert!(
                Instant::now() < deadline,
                "the CRI did not become ready: {e}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- cni.log:\n{}\n--- containerd.log (tail):\n{}",
            std::fs::read_to_string(self.dir.join("cni.log")).unwrap_or_default(),
            tail(&self.containerd.log(), 40)
        )
    }

    /// RunPodSandbox, then the sandbox's address and pid from PodSandboxStatus.
    fn run_pod(&self, config: sluice_cri_tests::api::PodSandboxConfig) -> Pod {
        let id = self
            .rt
            .block_on(self.cri.run_pod_sandbox(config))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.logs()));
        self.pod(&id)
    }

    fn pod(&self, id: &str) -> Pod {
        pod_of(&self.rt.block_on(self.cri.pod_sandbox_status(id)).unwrap())
    }

    fn stop(&self, id: &str) {
        self.rt
            .block_on(self.cri.stop_pod_sandbox(id))
            .unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e}\n{}", self.logs()));
    }

    fn remove(&self, id: &str) {
        self.rt
            .block_on(self.cri.remove_pod_sandbox(id))
            .unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e}\n{}", self.logs()));
    }

    /// Stop and remove `pod`, as kubelet does when a pod is deleted.
    fn delete(&self, id: &str) {
        self.stop(id);
        self.remove(id);
    }

    /// containerd restarted (as by systemd): a new connection, as kubelet makes.
    fn restart_containerd(&mut self) {
        self.containerd.restart();
        self.cri = self
            .rt
            .block_on(CriClient::connect(&self.containerd.socket()))
            .unwrap();
        self.wait_for_cri();
    }

    /// Every address sluice-ipam has given out and not released, as JSON text (one
    /// allocation a line); released addresses it keeps aside are not held.
    fn ipam_state(&self) -> String {
        let mut all = String::new();
        for f in sluice_testkit::files_under(&self.dir.join("sluice-ipam")) {
            // The state's kept temporary file (`.allocations.json.tmp`) holds the
            // state before the last write: not state, as for every sluice reader.
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(&f).unwrap_or_default(),
            ) else {
                continue;
            };
            for block in v["blocks"].as_array().into_iter().flatten() {
                for a in block["allocations"].as_array().into_iter().flatten() {
                    all += &a.to_string();
                    all.push('\n');
                }
            }
        }
        all
    }

    /// Nothing of any pod is left: no sandbox known to containerd, no sluice link,
    /// no route but the node's own, no portmap rule or chain of a pod, and no IPAM
    /// record of `ids` or `ips`.
    fn assert_clean(&self, ids: &[String], ips: &[String]) {
        let left = self.rt.block_on(self.cri.list_pod_sandbox()).unwrap();
        assert!(left.is_empty(), "sandboxes left: {left:?}");
        assert_eq!(
            sluice_links(),
            Vec::<String>::new(),
            "leftover links\n{}",
            self.logs()
        );
        assert_no_node_leftovers();
        let addrs: BTreeSet<String> = sh("ip -4 -o addr show")
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
            .collect();
        assert_eq!(
            addrs,
            BTreeSet::from(["127.0.0.1/8".to_owned(), format!("{NODE_IP}/24")]),
            "leftover addresses on the node"
        );
        let rules = iptables_save();
        let stale: Vec<&str> = rules
            .lines()
            .filter(|l| {
                l.contains("CNI-DN-")
                    || l.contains("CNI-SN-")
                    || ips.iter().any(|ip| l.contains(&format!("{ip}/32")))
                    || ids.iter().any(|id| l.contains(&id[..12]))
            })
            .collect();
        assert!(stale.is_empty(), "leftover portmap rules: {stale:#?}");
        let ipam = self.ipam_state();
        for id in ids {
            assert!(
                !ipam.contains(id.as_str()),
                "IPAM still holds {id}:\n{ipam}"
            );
        }
        for ip in ips {
            assert!(
                !ipam.contains(&format!("\"{ip}\"")),
                "IPAM still holds {ip}:\n{ipam}"
            );
        }
    }
}

fn pod_of(status: &sluice_cri_tests::api::PodSandboxStatusResponse) -> Pod {
    let s = status.status.as_ref().expect("status");
    Pod {
        id: s.id.clone(),
        ip: s.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default(),
        pid: sandbox_pid(status).unwrap_or(0),
    }
}

impl Pod {
    /// A shell command in the pod's network namespace.
    fn exec(&self, cmd: &str) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.pid))
            .args(["sh", "-c", cmd])
            .output()
            .unwrap()
    }

    fn exec_ok(&self, cmd: &str) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "in pod {}: `{cmd}`: {}",
            self.id,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The wiring of docs/architecture.md, and a packet from the node that arrives.
    fn assert_wired(&self, node: &Node) {
        assert!(!self.ip.is_empty(), "pod {} has no IP", self.id);
        assert!(self.pid > 0, "pod {} has no sandbox pid", self.id);
        let addrs = self.exec_ok("ip -4 -o addr show dev eth0");
        assert!(
            addrs.contains(&format!("inet {}/32", self.ip)),
            "eth0 of {}: {addrs}",
            self.id
        );
        let routes = self.exec_ok("ip -4 route show");
        let routes: BTreeSet<&str> = routes.lines().map(str::trim).collect();
        assert!(
            routes.contains("169.254.1.1 dev eth0 scope link"),
            "{routes:?}"
        );
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes:?}"
        );
        let host = sh(&format!("ip -4 route show exact {}/32", self.ip));
        let dev = host
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        assert!(
            dev.starts_with("slc") && host.contains("scope link"),
            "host route to {}: {host:?}\n{}",
            self.ip,
            node.logs()
        );
        // The host end: no address, the MAC every pod sees as its gateway's.
        let link = sh(&format!(
            "ip -o addr show dev {dev}; ip -o link show dev {dev}"
        ));
        assert!(
            !link.contains(" inet ") && link.contains("link/ether ee:ee:ee:ee:ee:ee"),
            "host end {dev}: {link}"
        );
        assert!(
            try_sh(&format!("busybox ping -c 1 -W 2 {}", self.ip))
                .status
                .success(),
            "the node cannot reach pod {} at {}",
            self.id,
            self.ip
        );
    }
}

/// The conflist an operator installs without the agent: examples/
/// sluice-standalone.conflist (sluice + directory-backed sluice-ipam, chained with
/// portmap), its paths moved under `dir`.
fn conflist(dir: &Path) -> serde_json::Value {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sluice-standalone.conflist");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    let p = &mut v["plugins"][0];
    assert_eq!(p["type"], "sluice");
    p["logFile"] = dir.join("cni.log").to_str().into();
    p["mtuFile"] = dir.join("mtu").to_str().into();
    p["ipam"]["stateDir"] = dir.join("sluice-ipam").to_str().into();
    p["ipam"]["blockStore"]["path"] = dir.join("blocks").to_str().into();
    assert_eq!(v["plugins"][1]["type"], "portmap");
    v
}

fn iptables_save() -> String {
    let mut all = String::new();
    for tool in ["iptables-save", "iptables-legacy-save"] {
        all += &String::from_utf8_lossy(&try_sh(tool).stdout);
    }
    all
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Gate, then run `case` against a fresh node in a throwaway network namespace.
fn with_node(test: &str, case: impl FnOnce(&mut Node) + Send) {
    if !require_root(test)
        || !require_tool(test, "containerd")
        || !require_tool(test, "ctr")
        || !require_tool(test, "runc")
        || !require_tool(test, "busybox")
        || !require_tool(test, "iptables-save")
    {
        return;
    }
    if !Path::new("/usr/lib/cni/portmap").exists() {
        assert!(
            !sluice_testkit::privileged_required(),
            "{test}: needs containernetworking-plugins (/usr/lib/cni/portmap)"
        );
        eprintln!("SKIP {test}: /usr/lib/cni/portmap not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    in_new_netns(|| {
        setup_node();
        let mut node = Node::start(tmp.path());
        case(&mut node);
    });
    if std::env::var_os("SLUICE_CRI_KEEP").is_some() {
        // cni.log, containerd.log and the IPAM state, for a look after a run.
        eprintln!("{test}: kept {}", tmp.keep().display());
    }
}

/// A TCP server in the pod's netns that writes `greeting` to the first client.
fn serve_in_pod(pod: &Pod, port: u16, greeting: &str) -> std::process::Child {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", pod.pid))
        .args(["busybox", "nc", "-l", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(greeting.as_bytes()).unwrap();
    drop(stdin);
    child
}

/// Connect from the node to `addr` (retrying while the server starts), read all.
fn read_from(addr: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut got = String::new();
                let _ = s.read_to_string(&mut got);
                return got;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {addr}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn pods_with_and_without_host_port_are_wired_and_leave_nothing_when_removed() {
    with_node("cri pods", |node| {
        let plain = node.run_pod(pod_config("default", "plain", 0, vec![]));
        let web = node.run_pod(pod_config(
            "default",
            "web",
            0,
            vec![tcp_host_port(80, 8080)],
        ));
        plain.assert_wired(node);
        web.assert_wired(node);
        assert_ne!(plain.ip, web.ip);
        assert_eq!(sluice_links().len(), 2, "{:?}", links());
        let ipam = node.ipam_state();
        for p in [&plain, &web] {
            assert!(
                ipam.contains(&p.id) && ipam.contains(&format!("\"{}\"", p.ip)),
                "IPAM does not hold {} for {}:\n{ipam}",
                p.ip,
                p.id
            );
        }

        // portmap ran after sluice, with containerd's capability args: the hostPort
        // answers from the node's own address.
        let rules = iptables_save();
        assert!(
            rules
                .lines()
                .any(|l| l.contains("CNI-DN-") && l.contains(&format!("{}:80", web.ip))),
            "no DNAT to {}:80:\n{rules}",
            web.ip
        );
        let mut server = serve_in_pod(&web, 80, "hello from web\n");
        let got = read_from(format!("{NODE_IP}:8080").parse().unwrap());
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(got, "hello from web\n");

        let ids = [plain.id.clone(), web.id.clone()];
        let ips = [plain.ip.clone(), web.ip.clone()];
        node.stop(&plain.id);
        node.stop(&web.id);
        // Stopped: the network is gone already, the sandboxes still exist.
        assert_eq!(sluice_links(), Vec::<String>::new(), "{}", node.logs());
        node.remove(&plain.id);
        node.remove(&web.id);
        node.assert_clean(&ids, &ips);
    });
}

/// Issue 16: kubelet replaces a dead sandbox (attempt 1) and garbage-collects the
/// old one later. The old one's DEL must not take the new one's network.
#[test]
fn removing_a_pods_old_sandbox_keeps_the_network_of_its_new_one() {
    with_node("cri sandbox replaced", |node| {
        let a = node.run_pod(pod_config("default", "web", 0, vec![]));
        a.assert_wired(node);
        node.stop(&a.id);
        let b = node.run_pod(pod_config("default", "web", 1, vec![]));
        b.assert_wired(node);
        node.remove(&a.id);
        // Both sandboxes of `default/web` map to one host veth name; the DEL of A
        // (containerd sends it without netns on RemovePodSandbox) must see that
        // the link now belongs to B.
        assert_eq!(
            sluice_links().len(),
            1,
            "RemovePodSandbox of the old sandbox deleted the new sandbox's host veth\n{}",
            node.logs()
        );
        b.assert_wired(node);
        let ipam = node.ipam_state();
        assert!(!ipam.contains(&a.id), "A's address is still held:\n{ipam}");
        assert!(ipam.contains(&b.id), "B's address was released:\n{ipam}");
        node.delete(&b.id);
        node.assert_clean(&[a.id, b.id], &[a.ip, b.ip]);
    });
}

#[test]
fn pods_keep_their_network_across_a_containerd_restart_and_are_removed_after() {
    with_node("cri restart", |node| {
        let p1 = node.run_pod(pod_config("default", "one", 0, vec![]));
        let p2 = node.run_pod(pod_config(
            "default",
            "two",
            0,
            vec![tcp_host_port(80, 8081)],
        ));
        node.restart_containerd();
        for p in [&p1, &p2] {
            let now = node.pod(&p.id);
            assert_eq!((now.ip.as_str(), now.pid), (p.ip.as_str(), p.pid));
            p.assert_wired(node);
        }
        let mut server = serve_in_pod(&p2, 80, "still here\n");
        let got = read_from(format!("{NODE_IP}:8081").parse().unwrap());
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(got, "still here\n");
        node.delete(&p1.id);
        node.delete(&p2.id);
        node.assert_clean(&[p1.id, p2.id], &[p1.ip, p2.ip]);
    });
}

#[test]
fn a_pod_whose_netns_is_gone_before_stop_is_stopped_and_removed_cleanly() {
    with_node("cri netns gone", |node| {
        let p = node.run_pod(pod_config("default", "gone", 0, vec![]));
        p.assert_wired(node);
        let status = node
            .rt
            .block_on(node.cri.pod_sandbox_status(&p.id))
            .unwrap();
        let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .unwrap_or_else(|| panic!("no netns path in {info}"))
            .to_owned();
        // The sandbox process dies and its netns mount goes: nothing holds the
        // namespace, so the kernel destroys it with the pod end of the veth.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // kubelet stops a sandbox once it sees it dead; a Stop racing containerd's
        // own handling of the exit fails with "ttrpc: closed" and is retried.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = node
                .rt
                .block_on(node.cri.pod_sandbox_status(&p.id))
                .unwrap();
            let state = status.status.map(|s| s.state).unwrap_or_default();
            if state == PodSandboxState::SandboxNotready as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "sandbox still ready after kill");
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = node
            .containerd
            .ns(&["sh", "-c", &format!("umount {netns} && rm -f {netns}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "umount {netns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sluice_links().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the pod's netns outlived its process and mount: {:?}",
                links()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // containerd now DELs with an empty CNI_NETNS: nothing left to unwire but
        // the IPAM record.
        node.delete(&p.id);
        node.assert_clean(&[p.id], &[p.ip]);
    });
}

#[test]
fn fifty_pods_created_and_removed_concurrently_get_distinct_addresses_and_leak_nothing() {
    const PODS: usize = 50;
    const PARALLEL: usize = 8;
    with_node("cri fifty pods", |node| {
        let started = Instant::now();
        let cri = node.cri.clone();
        let ids: Vec<String> = node.rt.block_on(
            futures::stream::iter(0..PODS)
                .map(|i| {
                    let cri = cri.clone();
                    async move {
                        cri.run_pod_sandbox(pod_config("load", &format!("pod-{i}"), 0, vec![]))
                            .await
                    }
                })
                .buffer_unordered(PARALLEL)
                .map(|r| r.unwrap_or_else(|e| panic!("RunPodSandbox: {e}")))
                .collect(),
        );
        let pods: Vec<Pod> = ids.iter().map(|id| node.pod(id)).collect();
        let ips: BTreeSet<&str> = pods.iter().map(|p| p.ip.as_str()).collect();
        assert_eq!(ips.len(), PODS, "addresses given twice or not at all");
        assert_eq!(sluice_links().len(), PODS);
        assert_eq!(node.ipam_state().lines().count(), PODS);
        for p in &pods {
            p.assert_wired(node);
        }
        let errors: Vec<String> = node.rt.block_on(
            futures::stream::iter(ids.clone())
                .map(|id| {
                    let cri = cri.clone();
                    async move {
                        cri.stop_pod_sandbox(&id).await?;
                        cri.remove_pod_sandbox(&id).await
                    }
                })
                .buffer_unordered(PARALLEL)
                .filter_map(|r| async move { r.err().map(|e| e.to_string()) })
                .collect(),
        );
        assert!(errors.is_empty(), "{errors:#?}\n{}", node.logs());
        let ips: Vec<String> = pods.iter().map(|p| p.ip.clone()).collect();
        node.assert_clean(&ids, &ips);
        eprintln!("{PODS} pods up and down in {:?}", started.elapsed());
    });
}

/// kubelet retries a failed or timed-out Stop, and its garbage collection may
/// remove a sandbox it never stopped: both end with nothing left.
#[test]
fn stop_twice_and_remove_without_stop_leave_nothing() {
    with_node("cri retries", |node| {
        let x = node.run_pod(pod_config("default", "twice", 0, vec![]));
        let y = node.run_pod(pod_config("default", "unstopped", 0, vec![]));
        x.assert_wired(node);
        y.assert_wired(node);
        node.stop(&x.id);
        node.stop(&x.id);
        node.remove(&x.id);
        // The other pod is untouched by all of that.
        y.assert_wired(node);
        node.remove(&y.id);
        node.assert_clean(&[x.id, y.id], &[x.ip, y.ip]);
    });
}

/// Issue 12's address annotations on the path a kubeadm node takes: kubelet copies a
/// pod's annotations into its sandbox config, and containerd's CRI hands them to a
/// plugin that declares `io.kubernetes.cri.pod-annotations` (the conflist does). No
/// agent runs here, so the addresses can only have come that way. A malformed
/// annotation fails RunPodSandbox with the plugin's error and leaves nothing.
#[test]
fn address_annotations_reach_the_plugin_from_containerd_without_the_agent() {
    with_node("cri annotations", |node| {
        let annotated = |name: &str, key: &str, value: &str| {
            let mut c = pod_config("default", name, 0, vec![]);
            c.annotations.insert(key.to_owned(), value.to_owned());
            c
        };
        let pinned = node.run_pod(annotated(
            "pinned",
            "sluice.dev/ip-addrs",
            r#"["10.244.9.77"]"#,
        ));
        let outside = node.run_pod(annotated(
            "outside",
            "sluice.dev/ip-addrs-no-ipam",
            r#"["192.0.2.50"]"#,
        ));
        let plain = node.run_pod(pod_config("default", "plain", 0, vec![]));
        assert_eq!(pinned.ip, "10.244.9.77", "{}", node.logs());
        assert_eq!(outside.ip, "192.0.2.50", "{}", node.logs());
        for p in [&pinned, &outside, &plain] {
            p.assert_wired(node);
        }
        let ipam = node.ipam_state();
        assert!(
            ipam.contains(&pinned.id) && ipam.contains("\"10.244.9.77\""),
            "IPAM does not hold the pinned address:\n{ipam}"
        );
        assert!(
            !ipam.contains(&outside.id) && !ipam.contains("192.0.2.50"),
            "IPAM holds the no-IPAM address:\n{ipam}"
        );

        // Not a JSON list: the runtime sees the plugin's error, nothing is created.
        let before = (sluice_links(), node.ipam_state());
        let err = node
            .rt
            .block_on(node.cri.run_pod_sandbox(annotated(
                "malformed",
                "sluice.dev/ip-addrs",
                "10.244.9.200",
            )))
            .expect_err("a malformed annotation must fail RunPodSandbox");
        assert!(
            err.to_string().contains("sluice.dev/ip-addrs"),
            "RunPodSandbox's error does not name the annotation: {err}"
        );
        assert_eq!(
            (sluice_links(), node.ipam_state()),
            before,
            "links or IPAM changed\n{}",
            node.logs()
        );

        let ids = [pinned.id.clone(), outside.id.clone(), plain.id.clone()];
        let ips = [pinned.ip.clone(), outside.ip.clone(), plain.ip.clone()];
        for id in &ids {
            node.delete(id);
        }
        // containerd keeps no sandbox of the failed RunPodSandbox either.
        node.assert_clean(&ids, &ips);
    });
}
