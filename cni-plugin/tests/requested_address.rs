//! Root: addresses a runtime asks for (the `ips` capability's `runtimeConfig.ips`,
//! what podman `--ip` sends, and `IP=` in CNI_ARGS), through the built `sluice`
//! with its IPAM in-process and exec'd: the pod gets exactly that address, and
//! each bad request fails with its registry code and leaves nothing behind (no
//! link, no address, no state entry, no block claim). Also: in-process and exec'd
//! IPAM adding at once over one state directory never share an address.

mod support;

use std::path::Path;

use serde_json::{Value, json};
use sluice_cni::protocol::ErrorCode;
use sluice_testkit::{NetnsHolder, in_new_netns, require_root};
use support::*;

/// The two ways the plugin runs sluice-ipam: in-process, and exec'd.
fn both_ipams(dir: &Path) -> [(&'static str, Value); 2] {
    let in_process = conf("1.0.0", Ipam::SluiceIpam, dir);
    [
        ("exec'd", exec_ipam(&in_process)),
        ("in-process", in_process),
    ]
}

fn asking(conf: &Value, ips: &[&str]) -> Value {
    let mut c = conf.clone();
    c["runtimeConfig"] = json!({ "ips": ips });
    c
}

fn state(dir: &Path) -> Value {
    let bytes = std::fs::read(dir.join("sluice-ipam/allocations.json")).unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

fn held(dir: &Path, ip: &str) -> Option<Value> {
    state(dir)["blocks"]
        .as_array()?
        .iter()
        .flat_map(|b| b["allocations"].as_array().cloned().unwrap_or_default())
        .find(|a| a["ip"] == ip)
}

fn block_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("blocks"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn an_address_asked_for_by_the_ips_capability_or_cni_args_ip_is_the_pods() {
    if !require_root("requested_address") || !require_sluice_ipam("requested_address") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    in_new_netns(|| {
        setup_node();
        for (i, (how, conf)) in both_ipams(dir).into_iter().enumerate() {
            // podman sends the address with its prefix; CNI_ARGS without.
            let cap = format!("10.98.7.{}", 50 + i * 10);
            let arg = format!("10.98.7.{}", 51 + i * 10);
            let pod1 = NetnsHolder::new();
            let pod2 = NetnsHolder::new();
            let c1 = format!("req-cap-{i}");
            let c2 = format!("req-arg-{i}");
            let r1 = Call::new(
                "ADD",
                &c1,
                Some(pod1.path()),
                &asking(&conf, &[&format!("{cap}/24")]),
            )
            .run(&bins)
            .result();
            assert_eq!(result_ip(&r1), cap, "{how}");
            let mut add2 = Call::new("ADD", &c2, Some(pod2.path()), &conf);
            add2.args = format!("IgnoreUnknown=1;IP={arg}");
            assert_eq!(result_ip(&add2.run(&bins).result()), arg, "{how}");
            assert!(
                pod1.exec("ip -4 -o addr show dev eth0")
                    .contains(&format!("inet {cap}/32"))
            );
            assert!(
                pod2.exec("ip -4 -o addr show dev eth0")
                    .contains(&format!("inet {arg}/32"))
            );
            // The free block was claimed for this node, and IPAM state marks both.
            assert_eq!(block_files(dir), ["10-98-7-0-24"], "{how}");
            for (ip, cid) in [(&cap, &c1), (&arg, &c2)] {
                let a = held(dir, ip).unwrap_or_else(|| panic!("{how}: {ip} not held"));
                assert_eq!(a["containerId"], cid.as_str());
                assert_eq!(a["requested"], true, "{a}");
            }
            // A pod that asks for nothing gets the block's next free address.
            let pod3 = NetnsHolder::new();
            let c3 = format!("req-none-{i}");
            let r3 = Call::new("ADD", &c3, Some(pod3.path()), &conf)
                .run(&bins)
                .result();
            assert!(result_ip(&r3).starts_with("10.98.7."), "{r3}");
            assert!(
                held(dir, &result_ip(&r3))
                    .unwrap()
                    .get("requested")
                    .is_none()
            );
            for (cid, pod) in [(&c1, &pod1), (&c2, &pod2), (&c3, &pod3)] {
                Call::new("DEL", cid, Some(pod.path()), &conf)
                    .run(&bins)
                    .assert_silent_ok();
                assert_pod_empty(pod);
            }
            assert!(
                held(dir, &cap).is_none() && held(dir, &arg).is_none(),
                "{how}"
            );
        }
        assert_no_node_leftovers();
    });
}

#[test]
fn each_bad_request_fails_with_its_code_and_leaves_nothing_behind() {
    if !require_root("requested_address") || !require_sluice_ipam("requested_address") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    in_new_netns(|| {
        setup_node();
        let [(_, exec_conf), (_, conf)] = both_ipams(dir);
        // Another node, sharing the block store, owns 10.98.9.0/24.
        let mut other = conf.clone();
        other["ipam"]["nodeName"] = "node-2".into();
        other["ipam"]["stateDir"] = dir.join("node-2-ipam").to_str().into();
        let other_pod = NetnsHolder::new();
        let mut o = Call::new("ADD", "other-0", Some(other_pod.path()), &other);
        o.args = "IP=10.98.9.5".into();
        o.run(&bins).result();
        // Its pod ends; the block stays node-2's.
        Call::new("DEL", "other-0", Some(other_pod.path()), &other)
            .run(&bins)
            .assert_silent_ok();
        // This node holds 10.98.7.50.
        let holder = NetnsHolder::new();
        Call::new(
            "ADD",
            "holder",
            Some(holder.path()),
            &asking(&conf, &["10.98.7.50"]),
        )
        .run(&bins)
        .result();
        let links_before = sluice_links();
        let state_before = state(dir);
        let blocks_before = block_files(dir);

        let invalid = ErrorCode::RequestedAddressInvalid;
        let unavailable = ErrorCode::RequestedAddressUnavailable;
        // (what, runtimeConfig.ips, CNI_ARGS IP, code, the message says)
        let cases: [(&str, &[&str], &str, ErrorCode, &str); 8] = [
            (
                "outside the pool",
                &[],
                "10.1.2.3",
                invalid,
                "outside the pool",
            ),
            (
                "another node's block",
                &["10.98.9.77"],
                "",
                unavailable,
                "node node-2 owns",
            ),
            (
                "already held",
                &[],
                "10.98.7.50",
                unavailable,
                "held by container holder",
            ),
            (
                "a block's tunnel address",
                &["10.98.8.1"],
                "",
                invalid,
                "tunnel",
            ),
            (
                "malformed (CNI_ARGS)",
                &[],
                "10.98.7",
                invalid,
                "not an IPv4 address",
            ),
            (
                "malformed (runtimeConfig)",
                &["ten/24"],
                "",
                invalid,
                "not an IPv4 address",
            ),
            ("IPv6", &["fd00::5"], "", invalid, "IPv6"),
            (
                "two addresses",
                &["10.98.7.60"],
                "10.98.7.61",
                invalid,
                "2 addresses",
            ),
        ];
        for (how, conf) in [("in-process", &conf), ("exec'd", &exec_conf)] {
            for (what, ips, arg, code, says) in cases {
                let pod = NetnsHolder::new();
                let c = if ips.is_empty() {
                    conf.clone()
                } else {
                    asking(conf, ips)
                };
                let mut add = Call::new("ADD", "bad", Some(pod.path()), &c);
                if !arg.is_empty() {
                    add.args = format!("IgnoreUnknown=1;IP={arg}");
                }
                let out = add.run(&bins);
                let e = out.error();
                assert_eq!(e["code"], code.code(), "{how} {what}: {e}");
                let msg = e["msg"].as_str().unwrap();
                assert!(msg.contains(says), "{how} {what}: {msg}");
                assert_pod_empty(&pod);
                assert_eq!(
                    sluice_links(),
                    links_before,
                    "{how} {what}: a link was left"
                );
                assert_eq!(state(dir), state_before, "{how} {what}: IPAM state changed");
                assert_eq!(
                    block_files(dir),
                    blocks_before,
                    "{how} {what}: a block was claimed"
                );
                // The runtime's DEL after a failed ADD is harmless.
                Call::new("DEL", "bad", Some(pod.path()), &c)
                    .run(&bins)
                    .assert_silent_ok();
            }
        }
        Call::new("DEL", "holder", Some(holder.path()), &conf)
            .run(&bins)
            .assert_silent_ok();
        assert_no_node_leftovers();
    });
}

#[test]
fn in_process_and_exec_d_ipam_adding_at_once_never_share_an_address() {
    if !require_root("requested_address") || !require_sluice_ipam("requested_address") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    in_new_netns(|| {
        setup_node();
        let [(_, exec_conf), (_, conf)] = both_ipams(dir);
        let pods: Vec<NetnsHolder> = (0..24).map(|_| NetnsHolder::new()).collect();
        let children: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let c = if i % 2 == 0 { &conf } else { &exec_conf };
                Call::new("ADD", &format!("mix-{i:02}"), Some(p.path()), c).spawn(&bins)
            })
            .collect();
        let mut ips = std::collections::BTreeSet::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            let r: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(
                ips.insert(result_ip(&r)),
                "an address was handed out twice: {r}"
            );
        }
        assert_eq!(ips.len(), 24);
        for (i, p) in pods.iter().enumerate() {
            let c = if i % 2 == 1 { &conf } else { &exec_conf };
            Call::new("DEL", &format!("mix-{i:02}"), Some(p.path()), c)
                .run(&bins)
                .assert_silent_ok();
        }
        assert!(!Ipam::SluiceIpam.allocations(dir).contains("mix-"));
        assert_no_node_leftovers();
    });
}
