//! Shared fixtures for the plugin's root integration tests: exec the built `sluice`
//! binary exactly as a runtime does (env + stdin, result or error on stdout), a
//! "node" namespace with an uplink and a default route via a fake gateway, pods as
//! `NetnsHolder`s, both IPAM plugins, and the no-leftover check.
#![allow(dead_code)] // each test file uses a different part

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use sluice_testkit::{NetnsHolder, bin_path, sh, try_sh};

#[allow(unused_imports)] // each test file uses a different part
pub use sluice_testkit::node::{
    GATEWAY_IP, NODE_IP, UPLINK, assert_no_node_leftovers, links, setup_node, sluice_links,
};

pub fn links_in(pod: Option<&NetnsHolder>) -> Vec<String> {
    let cmd = "ip -o link show";
    let out = match pod {
        Some(p) => p.exec(cmd),
        None => sh(cmd),
    };
    sluice_testkit::node::link_names(&out)
}

/// A pod namespace holds nothing but `lo`.
pub fn assert_pod_empty(pod: &NetnsHolder) {
    assert_eq!(links_in(Some(pod)), ["lo"], "leftover links in the pod");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipam {
    HostLocal,
    SluiceIpam,
}

impl Ipam {
    /// The `ipam` section for this plugin, state under `dir`.
    pub fn section(self, dir: &Path) -> Value {
        match self {
            Ipam::HostLocal => json!({
                "type": "host-local",
                "dataDir": dir.join("host-local"),
                "ranges": [[{"subnet": "10.99.0.0/24"}]]
            }),
            Ipam::SluiceIpam => json!({
                "type": "sluice-ipam",
                "nodeName": "node-1",
                "pool": "10.98.0.0/16",
                "blockSize": 24,
                "stateDir": dir.join("sluice-ipam"),
                "blockStore": {"type": "dir", "path": dir.join("blocks")}
            }),
        }
    }

    /// Everything the IPAM plugin has recorded, as one string: a container id
    /// that appears here still holds an address.
    pub fn allocations(self, dir: &Path) -> String {
        let root = match self {
            Ipam::HostLocal => dir.join("host-local"),
            Ipam::SluiceIpam => dir.join("sluice-ipam"),
        };
        let mut all = String::new();
        for f in sluice_testkit::files_under(&root) {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            // A writer killed before its rename leaves its temporary file: not state.
            if name == "lock"
                || name.starts_with("last_reserved")
                || (name.starts_with('.') && name.ends_with(".tmp"))
            {
                continue;
            }
            all += &std::fs::read_to_string(&f).unwrap_or_default();
            all.push('\n');
        }
        all
    }
}

/// A private CNI bin directory: the built `sluice` and `sluice-ipam` plus the
/// reference plugins, as a runtime's CNI_PATH would hold them.
pub struct CniBin {
    pub dir: PathBuf,
}

impl CniBin {
    pub fn new(root: &Path) -> CniBin {
        let dir = root.join("bin");
        std::fs::create_dir_all(&dir).unwrap();
        // Cargo builds this package's binary for its own integration tests.
        symlink(env!("CARGO_BIN_EXE_sluice"), dir.join("sluice")).unwrap();
        if let Some(ipam) = sluice_ipam_bin() {
            symlink(&ipam, dir.join("sluice-ipam")).unwrap();
            symlink(ipam, dir.join(SLUICE_IPAM_EXEC)).unwrap();
        }
        for p in ["host-local", "portmap", "bridge", "loopback"] {
            let src = Path::new("/usr/lib/cni").join(p);
            if src.exists() {
                symlink(src, dir.join(p)).unwrap();
            }
        }
        CniBin { dir }
    }

    /// Like [`CniBin::new`], but the reference plugins are copies: a runtime that
    /// finds plugins only in /usr/lib/cni gets this directory bind-mounted there,
    /// where a symlink into /usr/lib/cni would point at itself.
    pub fn new_copied(root: &Path) -> CniBin {
        let bins = CniBin::new(root);
        for p in ["host-local", "portmap", "bridge", "loopback"] {
            let link = bins.dir.join(p);
            if let Ok(target) = std::fs::read_link(&link) {
                std::fs::remove_file(&link).unwrap();
                std::fs::copy(target, &link).unwrap();
            }
        }
        bins
    }

    pub fn sluice(&self) -> PathBuf {
        self.dir.join("sluice")
    }
}

/// The `sluice-ipam` binary under another name: a config naming it makes the plugin
/// exec it, as it execs any IPAM plugin, where `sluice-ipam` itself runs in-process.
pub const SLUICE_IPAM_EXEC: &str = "sluice-ipam-exec";

/// `conf` with its IPAM exec'd ([`SLUICE_IPAM_EXEC`]) instead of in-process: same
/// state directory, same block store.
pub fn exec_ipam(conf: &Value) -> Value {
    let mut c = conf.clone();
    assert_eq!(c["ipam"]["type"], "sluice-ipam");
    c["ipam"]["type"] = SLUICE_IPAM_EXEC.into();
    c
}

/// The built `sluice-ipam`, if it exists (tests/run.sh builds every binary).
pub fn sluice_ipam_bin() -> Option<PathBuf> {
    std::panic::catch_unwind(|| bin_path("sluice-ipam")).ok()
}

/// A sluice network config with `ipam`, state and log under `dir`.
pub fn conf(version: &str, ipam: Ipam, dir: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "sluice-test",
        "type": "sluice",
        "mtu": 0,
        "mtuFile": dir.join("mtu"),
        "logFile": dir.join("cni.log"),
        "ipam": ipam.section(dir)
    })
}

/// One plugin invocation, as a runtime makes it.
pub struct Call {
    pub command: &'static str,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
    pub cni_path: Option<String>,
    pub stdin: Vec<u8>,
    pub unset: Vec<&'static str>,
}

impl Call {
    pub fn new(
        command: &'static str,
        container_id: &str,
        netns: Option<&Path>,
        conf: &Value,
    ) -> Call {
        Call {
            command,
            container_id: container_id.to_owned(),
            netns: netns.map(Path::to_owned),
            ifname: "eth0".into(),
            args: String::new(),
            cni_path: None,
            stdin: conf.to_string().into_bytes(),
            unset: vec![],
        }
    }

    pub fn k8s(mut self, namespace: &str, pod: &str) -> Call {
        self.args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={}",
            self.container_id
        );
        self
    }

    /// Run `plugin` in the calling thread's namespace (the node).
    pub fn run(&self, bins: &CniBin) -> Outcome {
        let out = self.spawn(bins).wait_with_output().unwrap();
        Outcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Start `plugin` in the calling thread's namespace with its stdin written and
    /// closed; the caller waits for it (or kills it).
    pub fn spawn(&self, bins: &CniBin) -> std::process::Child {
        let mut cmd = Command::new(bins.sluice());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", self.netns.as_deref().unwrap_or(Path::new("")))
            .env("CNI_IFNAME", &self.ifname)
            .env("CNI_ARGS", &self.args)
            .env(
                "CNI_PATH",
                self.cni_path
                    .clone()
                    .unwrap_or_else(|| bins.dir.display().to_string()),
            );
        for v in &self.unset {
            cmd.env_remove(v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice");
        {
            use std::io::Write;
            let _ = child.stdin.take().unwrap().write_all(&self.stdin);
        }
        child
    }
}

#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The result JSON of a successful call.
    pub fn result(&self) -> Value {
        assert!(
            self.success,
            "plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// A successful call that prints nothing (DEL, CHECK, GC, STATUS).
    pub fn assert_silent_ok(&self) {
        assert!(
            self.success,
            "plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert_eq!(self.stdout.trim(), "", "success must print nothing");
    }

    /// The error object of a failed call; checks it is exactly one JSON object.
    pub fn error(&self) -> Value {
        assert!(!self.success, "expected failure, got: {}", self.stdout);
        let v: Value = serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "error output is not one JSON object ({e}): {:?}",
                self.stdout
            )
        });
        assert!(v["code"].is_u64() && v["msg"].is_string(), "{v}");
        v
    }

    pub fn code(&self) -> u64 {
        self.error()["code"].as_u64().unwrap()
    }
}

/// `busybox ping` one packet, true when answered.
pub fn ping_from(pod: Option<&NetnsHolder>, dst: &str) -> bool {
    let cmd = format!("busybox ping -c 1 -W 2 {dst}");
    match pod {
        Some(p) => p.try_exec(&cmd).status.success(),
        None => try_sh(&cmd).status.success(),
    }
}

pub fn sysctl(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/{key}"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The pod's IPv4 address from a result (without prefix).
pub fn result_ip(result: &Value) -> String {
    let a = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    a.split('/').next().unwrap().to_owned()
}

/// Which IPAM plugins to run a scenario with: host-local always, sluice-ipam once
/// it is built (tests/run.sh builds it; in CI it must be).
pub fn ipams() -> Vec<Ipam> {
    let mut v = vec![Ipam::HostLocal];
    if sluice_ipam_bin().is_some() {
        v.push(Ipam::SluiceIpam);
    } else if sluice_testkit::privileged_required() {
        panic!("sluice-ipam is not built; tests/run.sh builds every binary first");
    } else {
        eprintln!("NOTE: sluice-ipam not built; running with host-local only");
    }
    v
}

/// A busybox-static root filesystem (`/bin/busybox` plus the applets the tests
/// use) under `dir/rootfs`, and a tarball of it for `podman import`.
pub fn busybox_rootfs(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    for a in ["sh", "ping", "ip", "sleep", "cat", "ifconfig"] {
        symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let tar = dir.join("rootfs.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        root.display(),
        tar.display()
    ));
    (root, tar)
}

/// A conflist for real runtimes: sluice with `ipam`, chained with `portmap`.
/// With sluice-ipam it is `examples/sluice-standalone.conflist` itself, only its
/// paths moved under `dir` and its name changed, so the example is proven to work.
pub fn conflist(name: &str, ipam: Ipam, dir: &Path) -> Value {
    if ipam == Ipam::SluiceIpam {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sluice-standalone.conflist");
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
        v["name"] = name.into();
        let p = &mut v["plugins"][0];
        assert_eq!(p["type"], "sluice");
        p["logFile"] = dir.join("cni.log").to_str().into();
        p["mtuFile"] = dir.join("mtu").to_str().into();
        p["ipam"]["stateDir"] = dir.join("sluice-ipam").to_str().into();
        p["ipam"]["blockStore"]["path"] = dir.join("blocks").to_str().into();
        return v;
    }
    let mut plugin = conf("1.0.0", ipam, dir);
    plugin.as_object_mut().unwrap().remove("cniVersion");
    plugin.as_object_mut().unwrap().remove("name");
    plugin["ipam"]["ranges"][0][0]["subnet"] = "10.95.0.0/24".into();
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [plugin, {"type": "portmap", "capabilities": {"portMappings": true}}]
    })
}

/// Whether the built `sluice-ipam` is there for a test that needs it; in CI its
/// absence fails the test instead of skipping it.
pub fn require_sluice_ipam(test: &str) -> bool {
    if sluice_ipam_bin().is_some() {
        return true;
    }
    assert!(
        !sluice_testkit::privileged_required(),
        "{test}: sluice-ipam is not built; tests/run.sh builds every binary first"
    );
    eprintln!("SKIP {test}: sluice-ipam is not built");
    false
}

/// xorshift64*: random choices a failing run can replay from its printed seed,
/// without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `var` when set (to replay a run), else from the clock; the seed
    /// is returned so the test can print it.
    pub fn from_env(var: &str) -> (Rng, u64) {
        let seed = std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        (Rng(seed), seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}
