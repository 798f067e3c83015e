//! A one-node world for whole-agent tests: a node network namespace with an uplink to
//! an "outside" namespace (external clients, the internet), pods as namespaces wired
//! the way the CNI plugin wires them (veth named by `sluice_node_files::ifname`, /32, proxy ARP,
//! 169.254.1.1 gateway), a manifests directory, and the real `sluice-agent` binary
//! running inside the node namespace.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_testkit::{NamedNetns, NetnsHolder, bin_path};

pub const NODE_IP: &str = "192.168.77.1";
pub const CLIENT_IP: &str = "192.168.77.100";
pub const OTHER_CLIENT_IP: &str = "192.168.77.101";
pub const POOL: &str = "10.244.0.0/16";

pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub veth: String,
    pub ns: NetnsHolder,
    servers: Vec<Child>,
}

impl Pod {
    /// Echo the peer's address on `port` (what the pod's socket sees as the client).
    pub fn serve_peer_addr(&mut self, port: u16) {
        self.servers.push(self.spawn(&format!(
            "exec socat TCP-LISTEN:{port},fork,reuseaddr SYSTEM:'echo $SOCAT_PEERADDR'"
        )));
        wait_listening(|c| self.ns.try_exec(c), port);
    }

    /// Echo back what is sent on `port`.
    pub fn serve_echo(&mut self, port: u16) {
        self.servers.push(self.spawn(&format!(
            "exec socat TCP-LISTEN:{port},fork,reuseaddr EXEC:cat"
        )));
        wait_listening(|c| self.ns.try_exec(c), port);
    }

    fn spawn(&self, cmd: &str) -> Child {
        Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path().display()))
            .args(["sh", "-c", cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server")
    }

    /// Connect to `ip:port` and return what the server says (its view of our address).
    pub fn connect(&self, ip: &str, port: u16) -> Result<String, String> {
        connect_with(|c| self.ns.try_exec(c), ip, port)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

fn wait_listening(exec: impl Fn(&str) -> std::process::Output, port: u16) {
    for _ in 0..200 {
        let out = exec("cat /proc/net/tcp");
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port:04X} 00000000:0000 0A")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("server on port {port} did not start");
}

fn connect_with(
    exec: impl Fn(&str) -> std::process::Output,
    ip: &str,
    port: u16,
) -> Result<String, String> {
    let out = exec(&format!(
        "timeout 3 socat -T2 STDIN!!STDOUT TCP:{ip}:{port},connect-timeout=1 </dev/null"
    ));
    if out.status.success() && !out.stdout.is_empty() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "connect {ip}:{port}: status {:?} {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A long-lived TCP connection from a pod that sends a line every few ms and checks
/// the echo; any lost echo or a closed socket is a cut.
pub struct Established {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    sent: u64,
}

impl Established {
    pub fn open(from: &Pod, ip: &str, port: u16) -> Established {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", from.ns.path().display()))
            .args([
                "socat",
                "STDIO",
                &format!("TCP:{ip}:{port},connect-timeout=2"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socat");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(l) = line else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut e = Established {
            child,
            stdin,
            lines: rx,
            sent: 0,
        };
        e.ping().expect("established connection works at start");
        e
    }

    /// One round trip.
    pub fn ping(&mut self) -> Result<(), String> {
        self.sent += 1;
        let msg = format!("ping {}", self.sent);
        writeln!(self.stdin, "{msg}").map_err(|e| format!("write: {e}"))?;
        match self.lines.recv_timeout(Duration::from_secs(3)) {
            Ok(l) if l == msg => Ok(()),
            Ok(l) => Err(format!("expected {msg:?}, got {l:?}")),
            Err(e) => Err(format!("no echo for {msg:?}: {e}")),
        }
    }
}

impl Drop for Established {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Agent {
    child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().map(|s| s.is_none()).unwrap_or(false)
    }

    pub fn pid(&self) -> u32 {
        // `ip netns exec` execs the agent in place: the child is the agent.
        self.child.id()
    }

    pub fn stop(mut self) {
        // SIGTERM: the agent's orderly exit, which must leave rules in place.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct World {
    pub node: NamedNetns,
    pub outside: NetnsHolder,
    pub dir: tempfile::TempDir,
    pub pods: Vec<Pod>,
    pub health_port: u16,
}

impl World {
    pub fn new() -> World {
        let node = NamedNetns::new("sluice-agent-e2e");
        let outside = NetnsHolder::new();
        let dir = tempfile::tempdir().unwrap();
        for d in ["manifests", "blocks", "run", "ipam"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        // Uplink: node eth0 <-> outside ext0, with two client addresses outside.
        node.exec(&format!(
            "ip link add eth0 type veth peer name ext0 && ip link set ext0 netns /proc/{}/ns/net && \
             ip addr add {NODE_IP}/24 dev eth0 && ip link set eth0 up && \
             ip route add default via {CLIENT_IP} && sysctl -qw net.ipv4.ip_forward=1",
            outside.pid()
        ));
        outside.exec(&format!(
            "ip addr add {CLIENT_IP}/24 dev ext0 && ip addr add {OTHER_CLIENT_IP}/24 dev ext0 && \
             ip link set ext0 up && ip route add {POOL} via {NODE_IP}"
        ));
        World {
            node,
            outside,
            dir,
            pods: Vec::new(),
            health_port: 9099,
        }
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn status_file(&self) -> PathBuf {
        self.dir.path().join("run/agent-status.json")
    }

    /// Write a manifest file atomically (the agent polls the directory).
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests().join(name)).unwrap();
    }

    /// Wire a pod the way the CNI plugin does; returns its index in `pods`.
    pub fn add_pod(&mut self, namespace: &str, name: &str, ip: &str) -> usize {
        let veth = sluice_node_files::ifname::host_veth_name(
            sluice_node_files::ifname::PodIdentity::Kubernetes {
                namespace,
                pod: name,
            },
        );
        let ns = NetnsHolder::new();
        self.node.exec(&format!(
            "ip link add {veth} type veth peer name eth0 netns /proc/{pid}/ns/net && \
             ip link set {veth} address ee:ee:ee:ee:ee:ee up && \
             sysctl -qw net.ipv4.conf.{veth}.proxy_arp=1 && \
             sysctl -qw net.ipv4.neigh.{veth}.proxy_delay=0 && \
             ip route add {ip}/32 dev {veth} scope link",
            pid = ns.pid()
        ));
        ns.exec(&format!(
            "ip addr add {ip}/32 dev eth0 && ip link set eth0 up && \
             ip route add 169.254.1.1 dev eth0 scope link && ip route add default via 169.254.1.1 dev eth0"
        ));
        self.pods.push(Pod {
            namespace: namespace.into(),
            name: name.into(),
            ip: ip.into(),
            veth,
            ns,
            servers: Vec::new(),
        });
        self.pods.len() - 1
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod exists")
    }

    pub fn pod_mut(&mut self, name: &str) -> &mut Pod {
        self.pods
            .iter_mut()
            .find(|p| p.name == name)
            .expect("pod exists")
    }

    /// From outside the cluster, bound to `src`.
    pub fn client_connect(&self, src: &str, ip: &str, port: u16) -> Result<String, String> {
        self.client_connect_within(src, ip, port, "1")
    }

    /// As [`World::client_connect`] with a connect timeout in seconds (`"0.1"`), for
    /// polling loops that must notice the first success quickly.
    pub fn client_connect_within(
        &self,
        src: &str,
        ip: &str,
        port: u16,
        timeout: &str,
    ) -> Result<String, String> {
        let out = self.outside.try_exec(&format!(
            "timeout 3 socat -T2 STDIN!!STDOUT TCP:{ip}:{port},connect-timeout={timeout},bind={src} </dev/null"
        ));
        if out.status.success() && !out.stdout.is_empty() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!("connect from {src} to {ip}:{port} failed"))
        }
    }

    /// From the node itself (kubelet probes).
    pub fn node_connect(&self, ip: &str, port: u16) -> Result<String, String> {
        connect_with(|c| self.node.try_exec(c), ip, port)
    }

    pub fn start_agent(&self, extra: &[&str]) -> Agent {
        let log = self
            .dir
            .path()
            .join(format!("agent-{}.log", sluice_testkit::unique()));
        let logf = std::fs::File::create(&log).unwrap();
        let d = self.dir.path();
        let child = Command::new("ip")
            .args(["netns", "exec", self.node.name()])
            .arg(bin_path("sluice-agent"))
            .args(["run", "--node-name", "node-1", "--datastore", "directory"])
            .arg("--manifests-dir")
            .arg(self.manifests())
            .arg("--block-store-dir")
            .arg(d.join("blocks"))
            .arg("--status-file")
            .arg(self.status_file())
            .arg("--agent-socket")
            .arg(d.join("run/agent.sock"))
            .arg("--mtu-file")
            .arg(d.join("run/mtu"))
            .arg("--ipam-state-dir")
            .arg(d.join("ipam"))
            .arg("--node-blocks-file")
            .arg(d.join("ipam/node-blocks.json"))
            .args(["--health-addr", &format!("127.0.0.1:{}", self.health_port)])
            .args([
                "--pool",
                POOL,
                "--poll-ms",
                "50",
                "--coalesce-ms",
                "20",
                "--resync-seconds",
                "1",
            ])
            .args(["--log", "info,sluice_agent=debug"])
            // Tests that read iptables state name no dataplane: iptables for them, not
            // whatever `auto` finds; the nftables cases pass `--dataplane nftables`.
            .args(
                (!extra.contains(&"--dataplane"))
                    .then_some(["--dataplane", "iptables"])
                    .into_iter()
                    .flatten(),
            )
            .args(extra)
            .env_remove("SLUICE_NODE_NAME")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn sluice-agent");
        Agent { child, log }
    }

    /// Wait until the agent's status file says ready.
    pub fn wait_ready(&self, agent: &Agent, timeout: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(s) = std::fs::read_to_string(self.status_file())
                && s.contains("\"ready\":true")
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "agent not ready after {timeout:?}; status {:?}; log:\n{}",
            std::fs::read_to_string(self.status_file()).ok(),
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
    }

    /// GET a path of the health endpoint inside the node namespace.
    pub fn http_get(&self, path: &str) -> String {
        // A plain HTTP/1.0 request from a thread that enters the node's namespace.
        let ns_path = self.node.path();
        let port = self.health_port;
        let path = path.to_string();
        std::thread::spawn(move || {
            use std::io::Read;
            let ns = std::fs::File::open(&ns_path).expect("open netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut s =
                std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect health port");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read response");
            out
        })
        .join()
        .expect("http thread")
    }

    pub fn iptables_save(&self) -> String {
        self.node.exec("iptables-nft-save")
    }

    /// Every table of the node's nftables ruleset but sluice's and iptables-nft's,
    /// counters zeroed: what the nftables dataplane must never touch.
    pub fn foreign_nft(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut in_ours = false;
        for l in self.node.exec("nft list ruleset").lines() {
            // iptables-nft's tables are compared through iptables-save.
            if l.starts_with("table ") {
                in_ours = l.starts_with("table ip sluice ")
                    || ["filter", "nat", "mangle", "raw", "security"]
                        .iter()
                        .any(|t| l == format!("table ip {t} {{"));
            }
            if !in_ours {
                out.push(zero_counters(l));
            }
            if l == "}" {
                in_ours = false;
            }
        }
        out
    }
}

/// `counter packets 3 bytes 180` → `counter`: real traffic moves counters.
fn zero_counters(line: &str) -> String {
    let mut words: Vec<&str> = Vec::new();
    let mut it = line.split(' ').peekable();
    while let Some(w) = it.next() {
        words.push(w);
        if w == "counter" && it.peek() == Some(&"packets") {
            it.nth(3); // packets N bytes N
        }
    }
    words.join(" ")
}

/// The policy dataplane of an agent test: each case that is about policy runs on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    Nftables,
    Iptables,
}

impl Dataplane {
    pub fn as_str(self) -> &'static str {
        match self {
            Dataplane::Nftables => "nftables",
            Dataplane::Iptables => "iptables",
        }
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn path_display(p: &Path) -> String {
    p.display().to_string()
}
