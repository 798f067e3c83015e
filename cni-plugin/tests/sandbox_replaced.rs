//! Root: a pod whose sandbox is recreated (the old one died; kubelet starts attempt 1
//! and removes the dead sandbox later) keeps the new sandbox's network when the old
//! sandbox's DEL finally comes. The host veth name is derived from the pod, so both
//! sandboxes share it; only the owner recorded in the link's alias may decide what a
//! DEL removes (issue 16). Both DEL forms runtimes send are covered: with the old
//! netns, and with an empty `CNI_NETNS` (containerd's RemovePodSandbox).

mod support;

use sluice_cni::veth::{PodIdentity, host_veth_name};
use sluice_testkit::{NetnsHolder, in_new_netns, require_root, sh};
use support::*;

#[derive(Debug, Clone, Copy)]
enum OldDel {
    /// DEL of the old sandbox names its (still existing) network namespace.
    WithOldNetns,
    /// DEL without a namespace, as containerd sends after the sandbox is gone.
    EmptyNetns,
}

fn old_sandbox_del_leaves_new_sandbox_wired(ipam: Ipam, form: OldDel) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    in_new_netns(|| {
        setup_node();
        let conf = conf("1.0.0", ipam, dir);
        let veth = host_veth_name(PodIdentity::Kubernetes {
            namespace: "default",
            pod: "web",
        });
        let p1 = NetnsHolder::new();
        let p2 = NetnsHolder::new();

        let ip1 = result_ip(
            &Call::new("ADD", "c1", Some(p1.path()), &conf)
                .k8s("default", "web")
                .run(&bins)
                .result(),
        );
        // The second sandbox of the same pod: ADD takes the name over from c1.
        let ip2 = result_ip(
            &Call::new("ADD", "c2", Some(p2.path()), &conf)
                .k8s("default", "web")
                .run(&bins)
                .result(),
        );
        assert_ne!(ip1, ip2, "c1 still holds its address until its DEL");
        assert!(
            sh(&format!("ip -d link show {veth}")).contains("alias sluice:sluice-test:c2:eth0")
        );

        let netns = match form {
            OldDel::WithOldNetns => Some(p1.path()),
            OldDel::EmptyNetns => None,
        };
        Call::new("DEL", "c1", netns, &conf)
            .k8s("default", "web")
            .run(&bins)
            .assert_silent_ok();

        // c2 keeps its link, address, routes and connectivity.
        let link = sh(&format!("ip -d link show {veth}"));
        assert!(link.contains("alias sluice:sluice-test:c2:eth0"), "{link}");
        assert!(
            p2.exec("ip -4 addr show dev eth0")
                .contains(&format!("inet {ip2}/32")),
            "c2 lost its eth0 or address"
        );
        let route = sh(&format!("ip route show {ip2}/32"));
        assert!(route.contains(&format!("dev {veth} scope link")), "{route}");
        assert!(
            p2.exec("ip route show")
                .contains("default via 169.254.1.1 dev eth0")
        );
        assert!(ping_from(None, &ip2), "the node cannot reach c2 any more");
        assert!(ping_from(Some(&p2), NODE_IP), "c2 cannot reach the node");

        // IPAM: c1 released, c2 kept.
        let held = ipam.allocations(dir);
        assert!(!held.contains("c1"), "c1 still holds an address: {held}");
        assert!(held.contains("c2"), "c2 lost its address: {held}");

        // A repeated DEL of c1 changes nothing either.
        Call::new("DEL", "c1", None, &conf)
            .k8s("default", "web")
            .run(&bins)
            .assert_silent_ok();
        assert!(ping_from(None, &ip2));

        Call::new("DEL", "c2", Some(p2.path()), &conf)
            .k8s("default", "web")
            .run(&bins)
            .assert_silent_ok();
        assert_no_node_leftovers();
        assert_pod_empty(&p1);
        assert_pod_empty(&p2);
        assert!(!ipam.allocations(dir).contains("c2"));
    });
}

#[test]
fn old_sandbox_del_with_its_netns_leaves_the_new_sandbox_wired() {
    if !require_root("sandbox_replaced") {
        return;
    }
    for ipam in ipams() {
        old_sandbox_del_leaves_new_sandbox_wired(ipam, OldDel::WithOldNetns);
    }
}

#[test]
fn old_sandbox_del_without_netns_leaves_the_new_sandbox_wired() {
    if !require_root("sandbox_replaced") {
        return;
    }
    for ipam in ipams() {
        old_sandbox_del_leaves_new_sandbox_wired(ipam, OldDel::EmptyNetns);
    }
}
