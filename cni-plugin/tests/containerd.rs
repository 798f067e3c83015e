//! Root: containerd 1.6's `ctr run --cni` starts containers on a sluice network.
//! Kept hermetic: a private mount namespace (held by an `unshare -m` process) where
//! our conflist and plugins are bind-mounted over /etc/cni/net.d, /usr/lib/cni and
//! /opt/cni/bin (the only places ctr looks) and a tmpfs hides /run (the shim and
//! runc keep state under /run/containerd whatever the config says), our own
//! containerd with a private root, state and socket, and a throwaway node network
//! namespace. ctr sends DEL
//! with an empty CNI_NETNS when a foreground task exits.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice_testkit::{in_new_netns, require_root, require_tool};
use support::*;

struct Containerd {
    dir: PathBuf,
    mount_ns: Child,
    daemon: Option<Child>,
    clients: Vec<Child>,
}

impl Containerd {
    fn start(dir: &Path, bins: &CniBin, ipam: Ipam) -> Containerd {
        let netd = dir.join("net.d");
        std::fs::create_dir_all(&netd).unwrap();
        std::fs::write(
            netd.join("10-sluice.conflist"),
            conflist("sluice-test", ipam, dir).to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{0}/containerd.sock\"\n",
                dir.display()
            ),
        )
        .unwrap();
        // The bind targets must exist; /etc/cni/net.d usually does (podman's
        // package makes it). Creating an empty directory is the only trace left.
        std::fs::create_dir_all("/etc/cni/net.d").unwrap();
        let mount_ns = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare -m");
        let mut c = Containerd {
            dir: dir.to_owned(),
            mount_ns,
            daemon: None,
            clients: vec![],
        };
        c.wait_for_mount_ns();
        let script = format!(
            "mount --bind {netd} /etc/cni/net.d && mount --bind {bin} /usr/lib/cni && \
             mount -t tmpfs tmpfs /opt && mkdir -p /opt/cni/bin && mount --bind {bin} /opt/cni/bin && \
             mount -t tmpfs tmpfs /run",
            netd = netd.display(),
            bin = bins.dir.display()
        );
        let out = c.ns(&["sh", "-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "bind mounts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        c.daemon = Some(
            c.ns(&[
                "containerd",
                "--config",
                dir.join("containerd.toml").to_str().unwrap(),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start; see {}/containerd.log",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
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

    /// A command inside the private mount namespace (network: the caller's).
    fn ns(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{}/ns/mnt", self.mount_ns.id()))
            .arg("--")
            .args(argv);
        cmd
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let sock = self.dir.join("containerd.sock");
        let mut argv = vec!["ctr", "-a", sock.to_str().unwrap(), "-n", "sluice"];
        argv.extend_from_slice(args);
        let mut cmd = self.ns(&argv);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("spawn ctr")
    }

    fn run_args<'a>(rootfs: &'a str, id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "run",
            "--cni",
            "--rm",
            "--null-io",
            "--env",
            "PATH=/bin",
            "--rootfs",
            rootfs,
            id,
        ];
        v.extend_from_slice(cmd);
        v
    }

    fn cni_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cni.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    /// Tasks first (their shims outlive containerd otherwise), then the daemon,
    /// then the mount namespace with every bind mount in it.
    fn drop(&mut self) {
        for id in ["c1", "c2"] {
            let _ = self.ctr(&["task", "kill", "-s", "KILL", id]);
        }
        for c in &mut self.clients {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for id in ["c1", "c2"] {
            let _ = self.ctr(&["task", "delete", "--force", id]);
            let _ = self.ctr(&["container", "delete", id]);
        }
        if let Some(d) = &mut self.daemon {
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
        let _ = self.mount_ns.kill();
        let _ = self.mount_ns.wait();
    }
}

fn run_with(ipam: Ipam) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new_copied(dir);
    let (rootfs, _) = busybox_rootfs(dir);
    let rootfs = rootfs.to_str().unwrap().to_owned();
    in_new_netns(|| {
        setup_node();
        let mut ctd = Containerd::start(dir, &bins, ipam);

        // c1 in the foreground (so ctr removes its network when it exits), in
        // the background of this test.
        let c1 = ctd
            .ctr_cmd(&Containerd::run_args(&rootfs, "c1", &["/bin/sleep", "120"]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        ctd.clients.push(c1);
        let deadline = Instant::now() + Duration::from_secs(20);
        let ip1 = loop {
            let out = ctd.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "probe",
                "c1",
                "/bin/ip",
                "-4",
                "-o",
                "addr",
                "show",
                "eth0",
            ]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(ip) = text.split_whitespace().skip_while(|w| *w != "inet").nth(1) {
                break ip.trim_end_matches("/32").to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "c1 got no address; cni.log:\n{}",
                ctd.cni_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(sluice_links().len(), 1);
        assert!(ping_from(None, &ip1), "node cannot reach c1");

        // c2 pings c1 and exits; ctr then DELs it with an empty CNI_NETNS.
        let out = ctd.ctr(&Containerd::run_args(
            &rootfs,
            "c2",
            &["/bin/ping", "-c", "1", "-W", "2", &ip1],
        ));
        assert!(
            out.status.success(),
            "c2 could not ping c1 ({}); cni.log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            ctd.cni_log()
        );
        assert_eq!(
            sluice_links().len(),
            1,
            "c2's veth survived its DEL: {:?}",
            links()
        );
        assert!(
            ctd.cni_log()
                .lines()
                .any(|l| l.contains("DEL sluice-c2/eth0")),
            "{}",
            ctd.cni_log()
        );
        assert!(!ipam.allocations(dir).contains("sluice-c2"));

        // Stop c1: its network goes the same way.
        assert!(
            ctd.ctr(&["task", "kill", "-s", "KILL", "c1"])
                .status
                .success()
        );
        let mut c1 = ctd.clients.pop().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while c1.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "ctr run c1 did not return");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            sluice_links(),
            Vec::<String>::new(),
            "cni.log:\n{}",
            ctd.cni_log()
        );
        assert_no_node_leftovers();
        assert!(
            !ipam.allocations(dir).contains("sluice-c1"),
            "{}",
            ipam.allocations(dir)
        );
        drop(ctd);
    });
}

#[test]
fn containerd_ctr_run_cni_wires_containers_and_removes_them() {
    if !require_root("containerd")
        || !require_tool("containerd", "containerd")
        || !require_tool("containerd", "ctr")
    {
        return;
    }
    for ipam in ipams() {
        eprintln!("--- {ipam:?}");
        run_with(ipam);
    }
}
