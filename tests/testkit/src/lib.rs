//! Test support shared by every sluice crate.
//!
//! - [`require_root`] gates privileged tests: on a laptop they skip with a line on
//!   stderr; in CI (`CI` set, or `SLUICE_REQUIRE_PRIVILEGED=1`) a skip is a failure,
//!   so a privileged test can never pass by not running.
//! - [`in_new_netns`] runs a closure on a fresh thread that has its own network
//!   namespace; the namespace vanishes with the thread, so nothing needs cleaning.
//! - [`NetnsHolder`] keeps a namespace alive in a `unshare -n sleep` process and names
//!   it by `/proc/<pid>/ns/net`, the form runtimes pass as `CNI_NETNS`.
//! - [`NamedNetns`] is an `ip netns add` namespace, removed on drop.
//! - [`bin_path`] finds a binary built by `cargo build --workspace --bins`.
//! - [`yaml_blocks`] reads a docs page's ```yaml blocks, so tests run what the docs show.
//! - [`containerd::Containerd`] is a hermetic containerd (private mounts, own state).
//! - [`node`] makes a namespace look like a node and checks nothing was left on it.
//! - `fake_kube` (feature `fake-kube`): a fake Kubernetes API server.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

#[cfg(feature = "fake-kube")]
pub mod fake_kube;

/// True when privileged tests must run (CI): skipping is then an error.
pub fn privileged_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
        || std::env::var_os("SLUICE_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Call first in a test that needs root and the kernel. Returns `false` when the test
/// should return early (not root on a developer machine). Panics when not root in CI.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if privileged_required() {
        panic!("{test}: needs root, and privileged tests may not skip in CI");
    }
    eprintln!("SKIP {test}: needs root (set CI=1 to make this a failure)");
    false
}

/// Fail (in CI) or skip (elsewhere) when a tool the test needs is missing.
pub fn require_tool(test: &str, tool: &str) -> bool {
    if which(tool).is_some() {
        return true;
    }
    if privileged_required() {
        panic!("{test}: needs `{tool}` on PATH; .ci/run must install it");
    }
    eprintln!("SKIP {test}: `{tool}` not installed");
    false
}

/// Find an executable on PATH (plus /usr/sbin and /sbin, which a non-login PATH lacks).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Run `f` on a new thread inside a brand-new network namespace with `lo` up.
/// Children spawned from inside `f` inherit the namespace.
pub fn in_new_netns<F, R>(f: F) -> R
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            sh("ip link set lo up");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Run `f` on a new thread that has joined the network namespace at `netns` (a
/// `/proc/<pid>/ns/net` or `/run/netns/<name>` path). Sockets `f` opens belong to that
/// namespace; the caller's thread is untouched.
pub fn in_netns<F, R>(netns: &Path, f: F) -> R
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(netns)
                .unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A network namespace held open by `unshare -n sleep infinity`, addressed as
/// `/proc/<pid>/ns/net`. Killed on drop, which destroys the namespace once nothing
/// else holds it.
pub struct NetnsHolder {
    child: Child,
    path: PathBuf,
}

impl NetnsHolder {
    pub fn new() -> NetnsHolder {
        let child = Command::new("unshare")
            .args(["-n", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare -n sleep infinity");
        let path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        // unshare(1) execs sleep after unsharing; wait until the namespace differs.
        let own = std::fs::read_link("/proc/thread-self/ns/net").ok();
        for _ in 0..500 {
            if std::fs::read_link(&path)
                .ok()
                .is_some_and(|l| Some(l) != own)
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let holder = NetnsHolder { child, path };
        holder.exec("ip link set lo up");
        holder
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run a shell command inside the namespace (nsenter --net), panicking on failure.
    pub fn exec(&self, cmd: &str) -> String {
        let out = self.try_exec(cmd);
        assert!(
            out.status.success(),
            "in netns {}: `{cmd}` failed: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_exec(&self, cmd: &str) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.path.display()))
            .args(["sh", "-c", cmd])
            .output()
            .expect("spawn nsenter")
    }
}

impl Default for NetnsHolder {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A named namespace (`ip netns add`), visible to `ip netns`; deleted on drop.
pub struct NamedNetns {
    name: String,
}

impl NamedNetns {
    pub fn new(prefix: &str) -> NamedNetns {
        let name = format!("{prefix}-{}-{}", std::process::id(), unique());
        sh(&format!("ip netns add {name}"));
        let ns = NamedNetns { name };
        ns.exec("ip link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn exec(&self, cmd: &str) -> String {
        let out = self.try_exec(cmd);
        assert!(
            out.status.success(),
            "in netns {}: `{cmd}` failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_exec(&self, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .expect("spawn ip netns exec")
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A process-unique small number, for names that must not collide between tests.
pub fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Run a shell command in the calling thread's namespaces, panicking on failure.
pub fn sh(cmd: &str) -> String {
    let out = try_sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn try_sh(cmd: &str) -> Output {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("spawn sh")
}

/// Every file below `dir`, recursively (nothing when it does not exist): what a
/// plugin's state directory holds, for leak checks.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The workspace's target directory as seen from a running test binary
/// (`target/<profile>/deps/<test>` → `target/<profile>`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent dir");
    if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of a workspace binary (`sluice`, `sluice-ipam`, `sluice-agent`, `sluicectl`).
/// Panics with the command to run when it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!(
        "SLUICE_BIN_{}",
        name.to_uppercase().replace('-', "_")
    )) {
        return PathBuf::from(p);
    }
    let p = target_profile_dir().join(name);
    assert!(
        p.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (tests/run.sh does)",
        p.display()
    );
    p
}

pub mod containerd;
pub mod node;

/// The ```yaml blocks of the Markdown file at `path`, in order: docs pages whose
/// examples are also tests are read through this one reader, so the page and every
/// test of it see the same text.
pub fn yaml_blocks(path: &Path) -> Vec<String> {
    let page =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in page.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                out.push(std::mem::take(block));
                current = None;
            }
            (Some(block), l) => {
                block.push_str(l);
                block.push('\n');
            }
            _ => {}
        }
    }
    out
}
