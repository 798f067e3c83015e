//! Root: the plugin and the node-local API. ADD succeeds with no agent and with an
//! agent that never answers; with an agent, ADD reports the attachment and DEL its
//! removal; the pod's `sluice.dev/ip-addrs-no-ipam` address is used as given; a bad
//! annotation (malformed, two addresses, both annotations) is code 130 and a no-IPAM
//! address the node already uses is code 131, each leaving nothing behind.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_node_files::local_api::{self, Request, Response};
use sluice_testkit::{NetnsHolder, in_new_netns, require_root, sh};
use support::*;

/// A stand-in agent: answers annotation lookups from a table and records reports.
struct FakeAgent {
    reports: Arc<Mutex<Vec<Request>>>,
}

impl FakeAgent {
    fn start(
        path: &Path,
        annotations: BTreeMap<String, (Option<String>, Option<String>)>,
    ) -> FakeAgent {
        let listener = UnixListener::bind(path).unwrap();
        let reports = Arc::new(Mutex::new(Vec::new()));
        let r = reports.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                let resp = match local_api::decode_request(&buf) {
                    Ok(Request::PodAnnotations { name, .. }) => {
                        let (ip_addrs, ip_addrs_no_ipam) =
                            annotations.get(&name).cloned().unwrap_or_default();
                        Response::Annotations {
                            known: true,
                            ip_addrs,
                            ip_addrs_no_ipam,
                        }
                    }
                    Ok(other) => {
                        r.lock().unwrap().push(other);
                        Response::Ok
                    }
                    Err(message) => Response::Error { message },
                };
                let _ = s.write_all(&local_api::encode_response(&resp));
            }
        });
        FakeAgent { reports }
    }

    fn reports(&self) -> Vec<Request> {
        self.reports.lock().unwrap().clone()
    }
}

fn conf_with_socket(dir: &Path, socket: &Path) -> Value {
    let mut c = conf("1.0.0", Ipam::HostLocal, dir);
    c["agentSocket"] = socket.to_str().unwrap().into();
    c
}

#[test]
fn add_succeeds_without_an_agent_and_with_an_agent_that_never_answers() {
    if !require_root("add_succeeds_without_an_agent") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    in_new_netns(|| {
        setup_node();
        let socket = dir.join("agent.sock");
        let conf = conf_with_socket(dir, &socket);
        let pod = NetnsHolder::new();

        // No agent at all: nothing listens on the socket.
        let add = Call::new("ADD", "ctr-noagent-1", Some(pod.path()), &conf).k8s("prod", "web");
        add.run(&bins).result();
        Call::new("DEL", "ctr-noagent-1", Some(pod.path()), &conf)
            .k8s("prod", "web")
            .run(&bins)
            .assert_silent_ok();

        // An agent that accepts (the backlog does) and never answers: ADD waits no
        // longer than the annotation lookup's and the report's deadlines.
        let _silent = UnixListener::bind(&socket).unwrap();
        let t = Instant::now();
        let add = Call::new("ADD", "ctr-noagent-2", Some(pod.path()), &conf).k8s("prod", "web");
        let ip = result_ip(&add.run(&bins).result());
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "ADD took {took:?}");
        assert!(pod.exec("ip -4 addr show dev eth0").contains(&ip));
        Call::new("DEL", "ctr-noagent-2", Some(pod.path()), &conf)
            .k8s("prod", "web")
            .run(&bins)
            .assert_silent_ok();
        assert_no_node_leftovers();
    });
}

#[test]
fn annotations_through_the_agent_give_the_no_ipam_address_and_bad_ones_leave_nothing() {
    if !require_root("annotations_through_the_agent") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    in_new_netns(|| {
        setup_node();
        let socket = dir.join("agent.sock");
        let no_ipam = |v: &str| (None, Some(v.to_owned()));
        let table: BTreeMap<String, (Option<String>, Option<String>)> = [
            ("pinned".to_string(), no_ipam(r#"["192.0.2.7"]"#)),
            ("malformed".to_string(), (Some("10.99.0.9".into()), None)),
            ("two".to_string(), no_ipam(r#"["192.0.2.8","192.0.2.9"]"#)),
            (
                "both".to_string(),
                (
                    Some(r#"["10.99.0.9"]"#.into()),
                    Some(r#"["192.0.2.8"]"#.into()),
                ),
            ),
            ("on-node".to_string(), no_ipam(&format!("[\"{NODE_IP}\"]"))),
        ]
        .into();
        let agent = FakeAgent::start(&socket, table);
        let conf = conf_with_socket(dir, &socket);

        // An ordinary pod through IPAM, reported after ADD.
        let plain = NetnsHolder::new();
        let r = Call::new("ADD", "ctr-plain", Some(plain.path()), &conf)
            .k8s("prod", "plain")
            .run(&bins)
            .result();
        let plain_ip = result_ip(&r);
        match agent.reports().as_slice() {
            [Request::ReportAttachment(a)] => {
                assert_eq!((a.namespace.as_str(), a.name.as_str()), ("prod", "plain"));
                assert_eq!(a.address.to_string(), plain_ip);
                assert!(!a.no_ipam);
                assert_eq!(a.container_id, "ctr-plain");
            }
            other => panic!("one attachment report expected, got {other:?}"),
        }

        // The no-IPAM pod: its address as given, outside the IPAM range, and IPAM
        // holds nothing for it.
        let pinned = NetnsHolder::new();
        let r = Call::new("ADD", "ctr-pinned", Some(pinned.path()), &conf)
            .k8s("prod", "pinned")
            .run(&bins)
            .result();
        assert_eq!(result_ip(&r), "192.0.2.7");
        assert!(
            pinned
                .exec("ip -4 addr show dev eth0")
                .contains("192.0.2.7/32")
        );
        assert!(sh("ip route show 192.0.2.7/32").contains("scope link"));
        assert!(!Ipam::HostLocal.allocations(dir).contains("ctr-pinned"));
        assert!(matches!(
            agent.reports().last(),
            Some(Request::ReportAttachment(a)) if a.no_ipam && a.address.to_string() == "192.0.2.7"
        ));

        // Bad requests: their code, and nothing left (no link, no route, no address).
        let before_links = links();
        let before_alloc = Ipam::HostLocal.allocations(dir);
        let taken = format!("[\"{plain_ip}\"]");
        let mut cases: Vec<(&str, u64)> = vec![
            ("malformed", 130),
            ("two", 130),
            ("both", 130),
            ("on-node", 131),
        ];
        // A no-IPAM address already held by a pod on this node (an IPAM allocation).
        let agent2_socket = dir.join("agent2.sock");
        let _agent2 = FakeAgent::start(
            &agent2_socket,
            [("taken".to_string(), (None, Some(taken)))].into(),
        );
        for (name, code) in cases.drain(..) {
            let pod = NetnsHolder::new();
            let out = Call::new("ADD", &format!("ctr-{name}"), Some(pod.path()), &conf)
                .k8s("prod", name)
                .run(&bins);
            assert_eq!(out.code(), code, "{name}: {}", out.stdout);
            assert_pod_empty(&pod);
        }
        let pod = NetnsHolder::new();
        let out = Call::new(
            "ADD",
            "ctr-taken",
            Some(pod.path()),
            &conf_with_socket(dir, &agent2_socket),
        )
        .k8s("prod", "taken")
        .run(&bins);
        assert_eq!(out.code(), 131, "{}", out.stdout);
        assert!(out.stdout.contains(&plain_ip), "{}", out.stdout);
        assert_pod_empty(&pod);
        assert_eq!(links(), before_links, "a refused ADD left a link");
        assert_eq!(
            Ipam::HostLocal.allocations(dir),
            before_alloc,
            "a refused ADD left an allocation"
        );

        // DEL reports the detachment of that very sandbox.
        for (cid, pod, name) in [
            ("ctr-pinned", &pinned, "pinned"),
            ("ctr-plain", &plain, "plain"),
        ] {
            Call::new("DEL", cid, Some(pod.path()), &conf)
                .k8s("prod", name)
                .run(&bins)
                .assert_silent_ok();
        }
        assert!(matches!(
            agent.reports().last(),
            Some(Request::ReportDetachment(d)) if d.container_id == "ctr-plain" && d.name == "plain"
        ));
        assert_no_node_leftovers();
    });
}

#[test]
fn a_no_ipam_address_held_by_in_process_ipam_but_not_wired_is_refused() {
    if !require_root("a_no_ipam_address_held_by_ipam")
        || !require_sluice_ipam("a_no_ipam_address_held_by_ipam")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    std::fs::write(dir.join("mtu"), "1440\n").unwrap();
    in_new_netns(|| {
        setup_node();
        let socket = dir.join("agent.sock");
        let mut conf = conf("1.0.0", Ipam::SluiceIpam, dir);
        conf["agentSocket"] = socket.to_str().unwrap().into();
        let plain = NetnsHolder::new();
        let ip = result_ip(
            &Call::new("ADD", "ctr-held", Some(plain.path()), &conf)
                .k8s("prod", "plain")
                .run(&bins)
                .result(),
        );
        // Only IPAM's books hold it now (as between allocation and wiring).
        sh(&format!("ip route del {ip}/32"));
        let _agent = FakeAgent::start(
            &socket,
            [("pinned".to_string(), (None, Some(format!("[\"{ip}\"]"))))].into(),
        );
        let pod = NetnsHolder::new();
        let out = Call::new("ADD", "ctr-pinned", Some(pod.path()), &conf)
            .k8s("prod", "pinned")
            .run(&bins);
        assert_eq!(out.code(), 131, "{}", out.stdout);
        assert!(out.stdout.contains("ctr-held"), "{}", out.stdout);
        assert_pod_empty(&pod);
        Call::new("DEL", "ctr-held", Some(plain.path()), &conf)
            .k8s("prod", "plain")
            .run(&bins)
            .assert_silent_ok();
        assert_no_node_leftovers();
    });
}
