//! Root: containerd 1.6's `ctr run --cni` starts containers on a sluice network.
//! Kept hermetic by `sluice_testkit::containerd` (a private mount namespace with a
//! tmpfs on /run, our own containerd with a private root, state and socket, in a
//! throwaway node network namespace); our conflist and plugins are bind-mounted
//! over /etc/cni/net.d, /usr/lib/cni and /opt/cni/bin, the only places ctr looks.
//! ctr sends DEL with an empty CNI_NETNS when a foreground task exits.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice_testkit::{in_new_netns, require_root, require_tool};
use support::*;

/// The hermetic daemon of `sluice_testkit::containerd`, with our conflist and
/// plugins bind-mounted where ctr looks, and the `ctr run` clients in flight.
struct Containerd {
    daemon: sluice_testkit::containerd::Containerd,
    dir: PathBuf,
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
        let opts = sluice_testkit::containerd::Options {
            extra_config: "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]".into(),
            bind: vec![
                (netd, "/etc/cni/net.d".into()),
                (bins.dir.clone(), "/usr/lib/cni".into()),
                (bins.dir.clone(), "/opt/cni/bin".into()),
            ],
        };
        Containerd {
            daemon: sluice_testkit::containerd::Containerd::start(dir, &opts),
            dir: dir.to_owned(),
            clients: vec![],
        }
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        self.daemon.ctr_cmd("sluice", args)
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
    /// Tasks first, so the foreground `ctr run` clients return; the daemon and the
    /// mount namespace go with `self.daemon` after this.
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
