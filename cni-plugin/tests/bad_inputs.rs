//! Root: a table of bad inputs, each answered with one JSON error carrying the
//! expected code and a non-zero exit, and after each, nothing left behind: no link
//! or route on the node, no link in the pod, no address held by the IPAM plugin.
//! The last rows fail *after* IPAM allocated and the veth exists, so they prove
//! ADD's rollback.

mod support;

use std::path::Path;

use serde_json::Value;
use sluice_testkit::{NetnsHolder, in_new_netns, require_root};
use support::*;

struct Case {
    name: &'static str,
    code: u64,
    /// Break the call (and maybe the pod) before it runs.
    make: fn(&mut Call, &mut Value, &NetnsHolder, &Path),
}

fn unset(c: &mut Call, var: &'static str) {
    c.unset.push(var);
}

const CASES: &[Case] = &[
    Case {
        name: "malformed JSON",
        code: 6,
        make: |c, _, _, _| c.stdin = b"{\"cniVersion\": \"1.0.0\", ".to_vec(),
    },
    Case {
        name: "empty stdin",
        code: 6,
        make: |c, _, _, _| c.stdin = vec![],
    },
    Case {
        name: "missing CNI_COMMAND",
        code: 4,
        make: |c, _, _, _| unset(c, "CNI_COMMAND"),
    },
    Case {
        name: "unknown CNI_COMMAND",
        code: 4,
        make: |c, _, _, _| c.command = "UP",
    },
    Case {
        name: "missing CNI_CONTAINERID",
        code: 4,
        make: |c, _, _, _| unset(c, "CNI_CONTAINERID"),
    },
    Case {
        name: "missing CNI_NETNS",
        code: 4,
        make: |c, _, _, _| unset(c, "CNI_NETNS"),
    },
    Case {
        name: "missing CNI_IFNAME",
        code: 4,
        make: |c, _, _, _| unset(c, "CNI_IFNAME"),
    },
    Case {
        name: "invalid CNI_IFNAME",
        code: 4,
        make: |c, _, _, _| c.ifname = "eth/0".into(),
    },
    Case {
        name: "missing CNI_PATH",
        code: 4,
        make: |c, _, _, _| unset(c, "CNI_PATH"),
    },
    Case {
        name: "malformed CNI_ARGS",
        code: 4,
        make: |c, _, _, _| c.args = "K8S_POD_NAME".into(),
    },
    Case {
        name: "unknown cniVersion",
        code: 1,
        make: |_, v, _, _| v["cniVersion"] = "9.9.9".into(),
    },
    Case {
        name: "no cniVersion",
        code: 1,
        make: |_, v, _, _| {
            v.as_object_mut().unwrap().remove("cniVersion");
        },
    },
    Case {
        name: "no name",
        code: 7,
        make: |_, v, _, _| {
            v.as_object_mut().unwrap().remove("name");
        },
    },
    Case {
        name: "mtu out of range",
        code: 7,
        make: |_, v, _, _| v["mtu"] = (-5).into(),
    },
    Case {
        name: "no ipam section",
        code: 7,
        make: |_, v, _, _| {
            v.as_object_mut().unwrap().remove("ipam");
        },
    },
    Case {
        name: "invalid CIDR (host-local)",
        code: 999,
        make: |_, v, _, _| v["ipam"]["ranges"][0][0]["subnet"] = "10.99.0.0/33".into(),
    },
    Case {
        name: "invalid CIDR (sluice-ipam)",
        code: 7,
        make: |_, v, _, d| {
            v["ipam"] = Ipam::SluiceIpam.section(d);
            v["ipam"]["pool"] = "10.98.0.0/33".into();
        },
    },
    Case {
        name: "missing IPAM plugin",
        code: 101,
        make: |_, v, _, _| v["ipam"]["type"] = "no-such-ipam".into(),
    },
    Case {
        name: "netns does not exist",
        code: 3,
        make: |c, _, _, _| c.netns = Some("/run/netns/sluice-no-such-ns".into()),
    },
    Case {
        name: "netns is not a namespace",
        code: 104,
        make: |c, _, _, _| c.netns = Some("/proc/self/status".into()),
    },
    Case {
        name: "garbage MTU file",
        code: 108,
        make: |_, _, _, d| std::fs::write(d.join("mtu"), "lots\n").unwrap(),
    },
    Case {
        name: "agent required but absent",
        code: 11,
        make: |_, v, _, d| {
            v["requireAgent"] = true.into();
            v["agentStatusFile"] = d.join("no-agent.json").to_str().into();
        },
    },
    Case {
        name: "interface name already taken in the pod",
        code: 105,
        make: |_, _, p, _| {
            p.exec("ip link add eth0 type veth peer name eth0peer");
        },
    },
    // Fails in the kernel's veth creation, after IPAM allocated: rollback must
    // release the address.
    Case {
        name: "invalid requested MAC (after IPAM)",
        code: 103,
        make: |c, _, _, _| c.args = "IgnoreUnknown=1;MAC=01:00:5e:00:00:01".into(),
    },
    // Fails adding the pod's link route, after the veth exists: rollback must
    // delete the pair and release the address.
    Case {
        name: "pod route already taken (after veth)",
        code: 103,
        make: |_, _, p, _| {
            p.exec("ip link add x0 type veth peer name x1 && ip link set x0 up && ip link set x1 up && ip route add 169.254.1.1/32 dev x0");
        },
    },
    // Another pod already holds the address (two IPAM stores over one range):
    // the host route exists, and ADD must not steal it.
    Case {
        name: "address already routed to another pod (after veth)",
        code: 103,
        make: |_, v, _, _| {
            // A /30 leaves host-local exactly one address to give: 10.96.0.2.
            v["ipam"]["ranges"][0][0]["subnet"] = "10.96.0.0/30".into();
            sluice_testkit::sh(
                "ip link add taken0 type veth peer name taken1 && ip link set taken0 up && ip route add 10.96.0.2/32 dev taken0",
            );
        },
    },
];

#[test]
fn every_bad_input_gets_its_code_and_leaves_nothing_behind() {
    if !require_root("bad_inputs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    let have_sluice_ipam = sluice_ipam_bin().is_some();
    in_new_netns(|| {
        setup_node();
        let mut failures = Vec::new();
        for (i, case) in CASES.iter().enumerate() {
            if case.name.contains("sluice-ipam") && !have_sluice_ipam {
                assert!(
                    !sluice_testkit::privileged_required(),
                    "sluice-ipam not built"
                );
                continue;
            }
            std::fs::write(dir.join("mtu"), "1440\n").unwrap();
            let pod = NetnsHolder::new();
            let cid = format!("ctr-bad-{i:02}");
            let mut conf = conf("1.0.0", Ipam::HostLocal, dir);
            let mut call = Call::new("ADD", &cid, Some(pod.path()), &conf);
            let pristine = call.stdin.clone();
            (case.make)(&mut call, &mut conf, &pod, dir);
            // Cases that break the config edit `conf`; cases that break stdin
            // itself replace the bytes, which then stay as they are.
            if call.stdin == pristine {
                call.stdin = conf.to_string().into_bytes();
            }
            eprintln!("case: {}", case.name);
            let before = links_in(Some(&pod));
            let out = call.run(&bins);
            let got = if out.success {
                None
            } else {
                serde_json::from_str::<Value>(&out.stdout).ok()
            };
            match got {
                Some(e)
                    if e["code"] == case.code
                        && e["msg"].as_str().is_some_and(|m| !m.is_empty()) => {}
                _ => failures.push(format!(
                    "{}: want code {}, got success={} stdout={:?}",
                    case.name, case.code, out.success, out.stdout
                )),
            }
            if case.name.contains("(after") {
                // The failure really came after IPAM allocated: ADD rolled back.
                let log = std::fs::read_to_string(dir.join("cni.log")).unwrap_or_default();
                assert!(
                    log.lines()
                        .any(|l| l.contains(&cid) && l.contains("rolling back")),
                    "{}: no rollback logged:\n{log}",
                    case.name
                );
            }
            // The fixture of the "already routed" case is not a leftover.
            let _ = sluice_testkit::try_sh("ip link del taken0");
            // Nothing left behind, whatever the outcome.
            assert_no_node_leftovers();
            assert_eq!(
                links_in(Some(&pod)),
                before,
                "{}: pod links changed",
                case.name
            );
            let held = Ipam::HostLocal.allocations(dir) + &Ipam::SluiceIpam.allocations(dir);
            assert!(
                !held.contains(&cid),
                "{}: address still allocated: {held}",
                case.name
            );
            assert!(
                !out.stdout.contains('\n') || out.stdout.trim_end().lines().count() == 1,
                "{}: one JSON line",
                case.name
            );
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}
