//! Root: an IPAM failure reaches the runtime through the `sluice` plugin's ADD with
//! the code of the one registry (`sluice_cni_protocol::codes`) and sluice-ipam's own
//! message, so a code means the same whichever binary printed it.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use sluice_cni_protocol::ErrorCode;
use sluice_testkit::{NetnsHolder, in_new_netns, require_root};
use support::*;

/// A sluice-ipam config of one /24 block: the pool holds exactly one block.
fn one_block_conf(dir: &Path, node: &str) -> Value {
    let mut c = conf("1.0.0", Ipam::SluiceIpam, dir);
    c["ipam"]["nodeName"] = node.into();
    c["ipam"]["pool"] = "10.98.7.0/24".into();
    c["ipam"]["stateDir"] = dir.join(node).join("ipam").to_str().into();
    c
}

/// Run sluice-ipam directly (as a runtime would run an IPAM plugin): its stdout.
fn ipam_add(bin: &Path, cid: &str, conf: &Value) -> (bool, Value) {
    let mut child = Command::new(bin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

/// The plugin's error equals the registry's code and sluice-ipam's message, named.
fn assert_passed_through(plugin: &Value, ipam: &Value, want: ErrorCode) {
    assert_eq!(plugin["code"], want.code(), "{plugin}");
    assert_eq!(ipam["code"], want.code(), "{ipam}");
    assert_eq!(
        plugin["msg"].as_str().unwrap(),
        format!("sluice-ipam: {}", ipam["msg"].as_str().unwrap()),
    );
    assert_eq!(plugin["details"], ipam["details"]);
}

#[test]
fn an_ipam_failure_on_add_carries_the_registrys_code_and_sluice_ipams_message() {
    if !require_root("ipam_errors") {
        return;
    }
    let Some(ipam_bin) = sluice_ipam_bin() else {
        assert!(
            !sluice_testkit::privileged_required(),
            "sluice-ipam not built"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    in_new_netns(|| {
        setup_node();
        std::fs::write(dir.join("mtu"), "1440\n").unwrap();

        // node-0 claims the pool's only block; node-1 then finds it exhausted.
        let (ok, _) = ipam_add(&ipam_bin, "ctr-other", &one_block_conf(dir, "node-0"));
        assert!(ok, "node-0 claims the block");
        let conf = one_block_conf(dir, "node-1");
        let pod = NetnsHolder::new();
        let out = Call::new("ADD", "ctr-exhausted", Some(pod.path()), &conf).run(&bins);
        let (ok, direct) = ipam_add(&ipam_bin, "ctr-exhausted-direct", &conf);
        assert!(!ok);
        assert_passed_through(&out.error(), &direct, ErrorCode::PoolExhausted);
        assert!(out.error()["msg"].as_str().unwrap().contains("exhausted"));
        assert_pod_empty(&pod);

        // A corrupt state file: sluice-ipam leaves it alone and says so.
        let state = dir.join("node-0/ipam/allocations.json");
        std::fs::write(&state, "{ not json").unwrap();
        let conf = one_block_conf(dir, "node-0");
        let out = Call::new("ADD", "ctr-corrupt", Some(pod.path()), &conf).run(&bins);
        let (_, direct) = ipam_add(&ipam_bin, "ctr-corrupt-direct", &conf);
        assert_passed_through(&out.error(), &direct, ErrorCode::StateCorrupt);
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "{ not json");
        assert_pod_empty(&pod);
        assert_no_node_leftovers();
    });
}
