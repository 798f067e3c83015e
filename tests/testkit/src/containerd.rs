//! A hermetic containerd for tests: its own root, state, socket and config under a
//! temp dir, run inside a private mount namespace (held by an `unshare -m` process)
//! where a tmpfs hides /run, because the shim and runc keep state under
//! /run/containerd whatever the config says and the CRI plugin mounts pod network
//! namespaces under /run/netns. The daemon inherits the network namespace of the
//! thread that starts it (a throwaway one, from [`crate::in_new_netns`]), so every
//! link its CNI plugins make lands there, never on the host.
//!
//! Two callers: `ctr run --cni` (which only looks in /etc/cni/net.d and
//! /opt/cni/bin or /usr/lib/cni, hence [`Options::bind`]) and the CRI suite (whose
//! plugin takes its CNI directories from the config).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How to start a [`Containerd`].
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// TOML put after the top-level keys of the generated config (root, state and
    /// the socket are ours): top-level keys first, then tables.
    pub extra_config: String,
    /// Directories bind-mounted over paths inside the private mount namespace,
    /// `(source, target)`. A target under /opt gets a tmpfs on /opt first.
    pub bind: Vec<(PathBuf, String)>,
}

pub struct Containerd {
    dir: PathBuf,
    mount_ns: Child,
    daemon: Option<Child>,
}

impl Containerd {
    /// Start containerd with state under `dir`; panics (with its log) when it does
    /// not answer within 20 s.
    pub fn start(dir: &Path, opts: &Options) -> Containerd {
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n{1}\n\
                 [grpc]\n  address = \"{0}/containerd.sock\"\n",
                dir.display(),
                opts.extra_config
            ),
        )
        .unwrap();
        let mount_ns = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare -m");
        let mut c = Containerd {
            dir: dir.to_owned(),
            mount_ns,
            daemon: None,
        };
        c.wait_for_mount_ns();
        let mut script = String::from("set -e; mount -t tmpfs tmpfs /run");
        if opts.bind.iter().any(|(_, t)| t.starts_with("/opt/")) {
            script += "; mount -t tmpfs tmpfs /opt";
        }
        for (src, target) in &opts.bind {
            // The bind targets must exist; /etc/cni/net.d usually does (podman's
            // package makes it). An empty directory is the only trace left.
            script += &format!(
                "; mkdir -p {target} && mount --bind {} {target}",
                src.display()
            );
        }
        let out = c.ns(&["sh", "-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "private mounts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.start_daemon();
        c
    }

    fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .unwrap();
        let config = self.dir.join("containerd.toml");
        self.daemon = Some(
            self.ns(&["containerd", "--config", config.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start containerd"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ctr("default", &["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop the daemon (SIGTERM, as systemd does) and start it again with the same
    /// config; shims and the tasks they hold keep running in between.
    pub fn restart(&mut self) {
        self.stop_daemon();
        self.start_daemon();
    }

    fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    fn wait_for_mount_ns(&self) {
        let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let theirs = format!("/proc/{}/ns/mnt", self.mount_ns.id());
        for _ in 0..500 {
            if std::fs::read_link(&theirs).is_ok_and(|l| l != own) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("unshare -m did not take effect");
    }

    /// The gRPC socket (containerd's own API and the CRI).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// A command inside the private mount namespace (network: the caller's).
    pub fn ns(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{}/ns/mnt", self.mount_ns.id()))
            .arg("--")
            .args(argv);
        cmd
    }

    /// `ctr` against this daemon in containerd namespace `namespace`.
    pub fn ctr_cmd(&self, namespace: &str, args: &[&str]) -> Command {
        let sock = self.socket();
        let mut argv = vec!["ctr", "-a", sock.to_str().unwrap(), "-n", namespace];
        argv.extend_from_slice(args);
        let mut cmd = self.ns(&argv);
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        self.ctr_cmd(namespace, args).output().expect("spawn ctr")
    }

    /// Kill every task in every containerd namespace and delete it, so no shim or
    /// container process outlives the test.
    pub fn kill_all_tasks(&self) {
        let namespaces = self.ctr("default", &["namespaces", "ls", "-q"]);
        for ns in String::from_utf8_lossy(&namespaces.stdout).lines() {
            let tasks = self.ctr(ns, &["tasks", "ls", "-q"]);
            for id in String::from_utf8_lossy(&tasks.stdout).lines() {
                let _ = self.ctr(ns, &["tasks", "kill", "-s", "KILL", id]);
                let _ = self.ctr(ns, &["tasks", "delete", "--force", id]);
            }
        }
    }
}

impl Drop for Containerd {
    /// Tasks first (their shims outlive containerd otherwise), then the daemon,
    /// then the mount namespace with every mount in it.
    fn drop(&mut self) {
        if self.daemon.is_some() {
            self.kill_all_tasks();
        }
        self.stop_daemon();
        let _ = self.mount_ns.kill();
        let _ = self.mount_ns.wait();
    }
}
