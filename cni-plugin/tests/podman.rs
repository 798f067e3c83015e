//! Root: podman 4.3 (Debian) with `network_backend = "cni"` runs containers on a
//! sluice network — with host-local and with sluice-ipam, chained with portmap —
//! inside a throwaway node namespace and with private storage. The containers get
//! their address, reach each other and the node, and `podman rm` leaves no veth
//! and no allocation.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sluice_testkit::{in_new_netns, require_root, require_tool, sh};
use support::*;

struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn setup(dir: &Path, bins: &CniBin, ipam: Ipam) -> Podman {
        let netd = dir.join("net.d");
        std::fs::create_dir_all(&netd).unwrap();
        std::fs::write(
            netd.join("sluice-test.conflist"),
            conflist("sluice-test", ipam, dir).to_string(),
        )
        .unwrap();
        // crun 1.8 refuses this host's cgroup layout, hence runc; root here lacks
        // CAP_SYS_RESOURCE, hence explicit ulimits (TESTBED.md).
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
                bins.dir.display(),
                netd.display()
            ),
        )
        .unwrap();
        Podman {
            dir: dir.to_owned(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let d = &self.dir;
        Command::new("podman")
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .expect("spawn podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}\ncni.log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("cni.log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Podman {
    /// Containers (and their conmon processes and /run/netns entries) go even when
    /// an assertion failed half-way.
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "--all", "--force", "--time", "0"]);
    }
}

fn run_with(ipam: Ipam) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    let (_, tar) = busybox_rootfs(dir);
    in_new_netns(|| {
        setup_node();
        let podman = Podman::setup(dir, &bins, ipam);
        podman.ok(&[
            "import",
            tar.to_str().unwrap(),
            "localhost/sluice-busybox:latest",
        ]);
        let net = "{{(index .NetworkSettings.Networks \"sluice-test\").IPAddress}}";
        let mut ids = Vec::new();
        let mut ips = Vec::new();
        for name in ["c1", "c2"] {
            let mut args = vec!["run", "-d", "--name", name, "--network", "sluice-test"];
            if name == "c1" {
                args.extend(["-p", "18080:80"]);
            }
            args.extend(["localhost/sluice-busybox", "sleep", "1000"]);
            podman.ok(&args);
            ids.push(podman.ok(&["inspect", name, "--format", "{{.Id}}"]));
            ips.push(podman.ok(&["inspect", name, "--format", net]));
        }
        assert_ne!(ips[0], ips[1]);
        for ip in &ips {
            assert!(!ip.is_empty(), "podman shows no address");
        }
        let addr = podman.ok(&["exec", "c1", "ip", "-4", "addr", "show", "eth0"]);
        assert!(addr.contains(&format!("inet {}/32", ips[0])), "{addr}");
        let routes = podman.ok(&["exec", "c1", "ip", "route"]);
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        assert_eq!(sluice_links().len(), 2, "{:?}", links());
        podman.ok(&["exec", "c1", "ping", "-c", "1", "-W", "2", &ips[1]]);
        podman.ok(&["exec", "c2", "ping", "-c", "1", "-W", "2", NODE_IP]);
        assert!(ping_from(None, &ips[0]), "node cannot reach c1");
        // portmap ran after sluice with our prevResult: its DNAT names c1's address.
        let nat = sh("iptables-save -t nat");
        assert!(nat.contains(&format!("{}:80", ips[0])), "{nat}");

        podman.ok(&["rm", "--force", "--time", "0", "c1", "c2"]);
        assert_eq!(sluice_links(), Vec::<String>::new());
        assert_no_node_leftovers();
        let held = ipam.allocations(dir);
        for id in &ids {
            assert!(
                !held.contains(id.as_str()),
                "allocation of {id} left: {held}"
            );
        }
    });
}

#[test]
fn podman_runs_containers_on_a_sluice_network_and_rm_leaves_nothing() {
    if !require_root("podman")
        || !require_tool("podman", "podman")
        || !require_tool("podman", "runc")
    {
        return;
    }
    for ipam in ipams() {
        eprintln!("--- {ipam:?}");
        run_with(ipam);
    }
}

#[test]
fn podman_ip_gives_a_container_that_address_and_a_held_one_is_refused_cleanly() {
    if !require_root("podman")
        || !require_tool("podman", "podman")
        || !require_tool("podman", "runc")
        || !require_sluice_ipam("podman")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    let (_, tar) = busybox_rootfs(dir);
    in_new_netns(|| {
        setup_node();
        // The example conflist: sluice-ipam in-process, the `ips` capability declared.
        let podman = Podman::setup(dir, &bins, Ipam::SluiceIpam);
        podman.ok(&[
            "import",
            tar.to_str().unwrap(),
            "localhost/sluice-busybox:latest",
        ]);
        let want = "10.244.200.9";
        let run = |name: &str| {
            podman.cmd(&[
                "run",
                "-d",
                "--name",
                name,
                "--network",
                "sluice-test",
                "--ip",
                want,
                "localhost/sluice-busybox",
                "sleep",
                "1000",
            ])
        };
        let out = run("pinned");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let net = "{{(index .NetworkSettings.Networks \"sluice-test\").IPAddress}}";
        assert_eq!(podman.ok(&["inspect", "pinned", "--format", net]), want);
        let id = podman.ok(&["inspect", "pinned", "--format", "{{.Id}}"]);
        let addr = podman.ok(&["exec", "pinned", "ip", "-4", "addr", "show", "eth0"]);
        assert!(addr.contains(&format!("inet {want}/32")), "{addr}");
        let state = Ipam::SluiceIpam.allocations(dir);
        assert!(state.contains("\"requested\":true"), "{state}");

        // The same address again: refused with code 116, nothing left behind.
        let links_before = sluice_links();
        let out = run("second");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is held by container"), "{err}");
        assert_eq!(sluice_links(), links_before, "a link was left");
        let _ = podman.cmd(&["rm", "--force", "--time", "0", "second"]);
        assert_eq!(
            Ipam::SluiceIpam.allocations(dir),
            state,
            "IPAM state changed"
        );

        podman.ok(&["rm", "--force", "--time", "0", "pinned"]);
        assert_eq!(sluice_links(), Vec::<String>::new());
        assert_no_node_leftovers();
        assert!(!Ipam::SluiceIpam.allocations(dir).contains(id.as_str()));
    });
}
