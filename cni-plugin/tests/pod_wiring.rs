//! Root: the built `sluice` binary exec'd as a runtime does, in a throwaway "node"
//! namespace; the kernel is then inspected (links, addresses, routes, sysctls) and
//! real packets prove host↔pod and pod↔pod reachability. Run with host-local and
//! with sluice-ipam.

mod support;

use serde_json::Value;
use sluice_cni::veth::{PodIdentity, host_veth_name};
use sluice_testkit::{NetnsHolder, in_new_netns, require_root, require_tool, sh};
use support::*;

fn lifecycle(ipam: Ipam) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    in_new_netns(|| {
        setup_node();
        let conf = conf("1.0.0", ipam, dir);
        let pod1 = NetnsHolder::new();
        let pod2 = NetnsHolder::new();

        // ADD pod 1 as a Kubernetes pod.
        let add1 =
            Call::new("ADD", "ctr-wire-0001", Some(pod1.path()), &conf).k8s("default", "web-0");
        let r1 = add1.run(&bins).result();
        let veth1 = host_veth_name(PodIdentity::Kubernetes {
            namespace: "default",
            pod: "web-0",
        });
        let ip1 = result_ip(&r1);
        assert_eq!(r1["cniVersion"], "1.0.0");
        assert_eq!(r1["interfaces"][0]["name"], veth1.as_str());
        assert_eq!(r1["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
        assert_eq!(r1["interfaces"][1]["name"], "eth0");
        assert_eq!(
            r1["interfaces"][1]["sandbox"],
            pod1.path().to_str().unwrap()
        );
        let pod_mac = r1["interfaces"][1]["mac"].as_str().unwrap();
        assert_eq!(pod_mac.len(), 17, "{pod_mac}");
        assert!(pod_mac != "00:00:00:00:00:00");
        assert_eq!(r1["ips"][0]["interface"], 1);
        assert!(r1["ips"][0]["address"].as_str().unwrap().ends_with("/32"));
        assert_eq!(r1["routes"][0]["gw"], "169.254.1.1");
        assert!(
            r1["ips"][0].get("version").is_none(),
            "1.0.0 has no ips[].version"
        );

        // Host side: veth, MAC, MTU from the agent's file, no address, sysctls, route.
        let link = sh(&format!("ip -d link show {veth1}"));
        assert!(link.contains("link/ether ee:ee:ee:ee:ee:ee"), "{link}");
        assert!(link.contains("mtu 1440"), "{link}");
        assert!(link.contains("veth"), "{link}");
        assert!(link.contains("state UP") || link.contains(",UP"), "{link}");
        assert!(!sh(&format!("ip -4 addr show dev {veth1}")).contains("inet "));
        assert_eq!(sysctl(&format!("ipv4/conf/{veth1}/proxy_arp")), "1");
        assert_eq!(sysctl(&format!("ipv4/neigh/{veth1}/proxy_delay")), "0");
        assert_eq!(sysctl(&format!("ipv4/conf/{veth1}/route_localnet")), "1");
        assert_eq!(sysctl(&format!("ipv4/conf/{veth1}/forwarding")), "1");
        let route = sh(&format!("ip route show {ip1}/32"));
        assert!(
            route.contains(&format!("dev {veth1} scope link")),
            "{route}"
        );
        // Pod side: /32, link route to the gateway, default route, MTU.
        let addr = pod1.exec("ip -4 addr show dev eth0");
        assert!(addr.contains(&format!("inet {ip1}/32")), "{addr}");
        assert!(pod1.exec("ip link show eth0").contains("mtu 1440"));
        let routes = pod1.exec("ip route show");
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        assert!(
            routes.contains("169.254.1.1 dev eth0 scope link"),
            "{routes}"
        );

        // Real packets: pod -> node, node -> pod.
        assert!(
            ping_from(Some(&pod1), NODE_IP),
            "pod1 cannot reach the node"
        );
        assert!(ping_from(None, &ip1), "node cannot reach pod1");

        // A second pod outside Kubernetes naming; pod <-> pod through the node.
        let r2 = Call::new("ADD", "ctr-wire-0002", Some(pod2.path()), &conf)
            .run(&bins)
            .result();
        let ip2 = result_ip(&r2);
        let veth2 = host_veth_name(PodIdentity::Container {
            id: "ctr-wire-0002",
        });
        assert_eq!(r2["interfaces"][0]["name"], veth2.as_str());
        assert_ne!(ip1, ip2);
        assert!(ping_from(Some(&pod1), &ip2), "pod1 cannot reach pod2");
        assert!(ping_from(Some(&pod2), &ip1), "pod2 cannot reach pod1");

        // CHECK passes on what ADD made, and fails once the pod is tampered with.
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = r1.clone();
        let check = Call::new("CHECK", "ctr-wire-0001", Some(pod1.path()), &check_conf)
            .k8s("default", "web-0");
        check.run(&bins).assert_silent_ok();
        pod1.exec("ip route del default");
        let failed = check.run(&bins);
        assert_eq!(failed.code(), 114, "{}", failed.stdout);
        assert!(
            failed.stdout.contains("via 169.254.1.1"),
            "{}",
            failed.stdout
        );
        pod1.exec("ip route add default via 169.254.1.1 dev eth0");
        sh(&format!(
            "echo 0 > /proc/sys/net/ipv4/conf/{veth1}/proxy_arp"
        ));
        assert!(
            check.run(&bins).error()["msg"]
                .as_str()
                .unwrap()
                .contains("proxy_arp")
        );

        // DEL pod 1: link, route and allocation gone; DEL is repeatable and works
        // without netns and prevResult (containerd's CRI sends three).
        assert!(ipam.allocations(dir).contains("ctr-wire-0001"));
        let del1 = Call::new("DEL", "ctr-wire-0001", Some(pod1.path()), &check_conf)
            .k8s("default", "web-0");
        del1.run(&bins).assert_silent_ok();
        assert!(!links().contains(&veth1));
        assert!(!links_in(Some(&pod1)).contains(&"eth0".to_string()));
        assert_eq!(sh(&format!("ip route show {ip1}/32")).trim(), "");
        assert!(
            !ipam.allocations(dir).contains("ctr-wire-0001"),
            "{}",
            ipam.allocations(dir)
        );
        del1.run(&bins).assert_silent_ok();
        Call::new("DEL", "ctr-wire-0001", None, &conf)
            .k8s("default", "web-0")
            .run(&bins)
            .assert_silent_ok();
        Call::new("DEL", "ctr-wire-0001", None, &conf)
            .run(&bins)
            .assert_silent_ok();

        // DEL pod 2 after its namespace died (the runtime removed the sandbox
        // first): still success, still releases the address.
        let pod2_path = pod2.path().to_owned();
        drop(pod2);
        Call::new("DEL", "ctr-wire-0002", Some(&pod2_path), &conf)
            .run(&bins)
            .assert_silent_ok();
        assert!(!links().contains(&veth2));
        assert!(!ipam.allocations(dir).contains("ctr-wire-0002"));
        assert_no_node_leftovers();
    });
}

#[test]
fn add_wires_a_pod_calico_style_and_del_removes_it_with_host_local_and_sluice_ipam() {
    if !require_root("pod_wiring") || !require_tool("pod_wiring", "busybox") {
        return;
    }
    for ipam in ipams() {
        eprintln!("--- {ipam:?}");
        lifecycle(ipam);
    }
}

/// The result is rendered in the version the runtime asked for.
#[test]
fn results_come_back_in_the_requested_version() {
    if !require_root("result_versions") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    in_new_netns(|| {
        setup_node();
        for (i, v) in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
            let pod = NetnsHolder::new();
            let conf = conf(v, Ipam::HostLocal, dir);
            let cid = format!("ctr-ver-{i}");
            let r: Value = Call::new("ADD", &cid, Some(pod.path()), &conf)
                .run(&bins)
                .result();
            assert_eq!(r["cniVersion"], v);
            let has_family = r["ips"][0].get("version").is_some();
            assert_eq!(has_family, v.starts_with("0."), "{v}: {r}");
            assert_eq!(
                r["interfaces"][1].get("mtu").is_some(),
                v == "1.1.0",
                "{v}: {r}"
            );
            Call::new("DEL", &cid, Some(pod.path()), &conf)
                .run(&bins)
                .assert_silent_ok();
        }
    });
}

/// The node has no MTU file (no agent yet): the uplink's MTU minus 20.
#[test]
fn without_an_mtu_file_the_pod_gets_the_uplink_mtu_minus_20() {
    if !require_root("mtu_fallback") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    in_new_netns(|| {
        setup_node();
        sh(&format!("ip link set {UPLINK} mtu 9000"));
        let pod = NetnsHolder::new();
        let conf = conf("1.0.0", Ipam::HostLocal, dir);
        Call::new("ADD", "ctr-mtu-1", Some(pod.path()), &conf)
            .run(&bins)
            .result();
        assert!(pod.exec("ip link show eth0").contains("mtu 8980"));
        let log = std::fs::read_to_string(dir.join("cni.log")).unwrap();
        assert!(log.contains("8980") && log.contains("MTU file"), "{log}");
        Call::new("DEL", "ctr-mtu-1", Some(pod.path()), &conf)
            .run(&bins)
            .assert_silent_ok();
        // The config's own mtu wins over everything.
        let mut fixed = conf.clone();
        fixed["mtu"] = 1300.into();
        Call::new("ADD", "ctr-mtu-2", Some(pod.path()), &fixed)
            .run(&bins)
            .result();
        assert!(pod.exec("ip link show eth0").contains("mtu 1300"));
        Call::new("DEL", "ctr-mtu-2", Some(pod.path()), &fixed)
            .run(&bins)
            .assert_silent_ok();
    });
}

/// Runtime input variants the issue lists: unknown keys, capabilities,
/// runtimeConfig in both spellings, MAC in CNI_ARGS, /proc and /run/netns paths.
#[test]
fn tolerant_of_what_real_runtimes_send() {
    if !require_root("tolerant_input") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    in_new_netns(|| {
        setup_node();
        let mut c = conf("1.0.0", Ipam::HostLocal, dir);
        c["someFutureKey"] = serde_json::json!({"x": [1, 2]});
        c["capabilities"] = serde_json::json!({"portMappings": true});
        c["runtimeConfig"] = serde_json::json!({"PortMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
        let named = sluice_testkit::NamedNetns::new("sluice-tol");
        for (i, path) in [
            named.path(),
            std::path::PathBuf::from(format!("/var/run/netns/{}", named.name())),
        ]
        .into_iter()
        .enumerate()
        {
            let cid = format!("ctr-tol-{i}");
            let mut call = Call::new("ADD", &cid, Some(&path), &c).k8s("kube-system", "coredns-x");
            call.args += ";K8S_POD_UID=0b1c;MAC=0a:58:0a:63:00:07;SomethingNew=1";
            let r = call.run(&bins).result();
            assert_eq!(r["interfaces"][1]["mac"], "0a:58:0a:63:00:07");
            assert!(
                named
                    .exec("ip link show eth0")
                    .contains("0a:58:0a:63:00:07")
            );
            c["runtimeConfig"] = serde_json::json!({"portMappings": []});
            let mut del = Call::new("DEL", &cid, Some(&path), &c).k8s("kube-system", "coredns-x");
            del.args = call.args.clone();
            del.run(&bins).assert_silent_ok();
        }
    });
}

/// One pod on two sluice networks (Multus-style `net1`, or two podman networks):
/// two host interfaces, neither ADD disturbs the other, and a host name held by
/// a non-sluice interface is refused, never deleted.
#[test]
fn a_pod_can_hold_two_attachments_and_foreign_interfaces_are_never_replaced() {
    if !require_root("two_attachments") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    in_new_netns(|| {
        setup_node();
        let pod = NetnsHolder::new();
        let a = conf("1.0.0", Ipam::HostLocal, dir);
        let mut b = conf("1.0.0", Ipam::HostLocal, &dir.join("b"));
        b["name"] = "second".into();
        b["ipam"]["ranges"][0][0]["subnet"] = "10.94.0.0/24".into();
        b["ipam"]["routes"] = serde_json::json!([{"dst": "0.0.0.0/0"}, {"dst": "10.200.0.0/16"}]);
        let ra = Call::new("ADD", "ctr-two", Some(pod.path()), &a)
            .k8s("default", "multi")
            .run(&bins)
            .result();
        let mut call_b = Call::new("ADD", "ctr-two", Some(pod.path()), &b).k8s("default", "multi");
        call_b.ifname = "net1".into();
        let rb = call_b.run(&bins).result();
        let (ha, hb) = (
            ra["interfaces"][0]["name"].as_str().unwrap(),
            rb["interfaces"][0]["name"].as_str().unwrap(),
        );
        assert_ne!(ha, hb);
        assert_eq!(&ha[..7], &hb[..7], "same namespace prefix");
        assert!(pod.exec("ip -4 addr show net1").contains("10.94.0."));
        // The primary keeps the default route; the secondary routes only what
        // its IPAM asked for (less the default), via the same link-local gateway.
        let routes = pod.exec("ip route show");
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        assert!(
            routes.contains("10.200.0.0/16 via 169.254.1.1 dev net1 onlink"),
            "{routes}"
        );
        assert_eq!(routes.matches("default").count(), 1, "{routes}");
        assert!(ping_from(Some(&pod), NODE_IP));
        let mut check_b = b.clone();
        check_b["prevResult"] = rb.clone();
        let mut check =
            Call::new("CHECK", "ctr-two", Some(pod.path()), &check_b).k8s("default", "multi");
        check.ifname = "net1".into();
        check.run(&bins).assert_silent_ok();
        let mut del_b = Call::new("DEL", "ctr-two", Some(pod.path()), &b).k8s("default", "multi");
        del_b.ifname = "net1".into();
        del_b.run(&bins).assert_silent_ok();
        assert!(
            links().contains(&ha.to_string()),
            "DEL of net1 removed eth0's veth"
        );
        Call::new("DEL", "ctr-two", Some(pod.path()), &a)
            .k8s("default", "multi")
            .run(&bins)
            .assert_silent_ok();

        // A veth by the pod's host name that is not a sluice attachment.
        let squatter = host_veth_name(PodIdentity::Kubernetes {
            namespace: "default",
            pod: "squat",
        });
        sh(&format!(
            "ip link add {squatter} type veth peer name sq-peer"
        ));
        let out = Call::new("ADD", "ctr-squat", Some(pod.path()), &a)
            .k8s("default", "squat")
            .run(&bins);
        assert_eq!(out.code(), 106, "{}", out.stdout);
        assert!(
            links().contains(&squatter),
            "a foreign interface was deleted"
        );
        sh(&format!("ip link del {squatter}"));
        assert_no_node_leftovers();
        assert_pod_empty(&pod);

        // DEL given a namespace whose eth0 is not this attachment's (a reused
        // /proc/<pid>/ns/net path): that eth0 is left alone.
        pod.exec("ip link add eth0 type veth peer name other0");
        Call::new("DEL", "ctr-gone", Some(pod.path()), &a)
            .run(&bins)
            .assert_silent_ok();
        assert!(
            links_in(Some(&pod)).contains(&"eth0".to_string()),
            "DEL deleted a foreign eth0"
        );
    });
}
