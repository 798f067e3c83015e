//! `sluicectl policy render --node NODE` prints exactly what the agent programs: in a
//! lab with policies applied, the rendered chains, jumps and sets equal what
//! `iptables-save` and `ipset save` read back from each node's namespace (counters
//! and ipset's own create parameters aside), on both iptables backends; and with
//! `--dataplane nftables` the rendered `nft -f` text, loaded into a throwaway
//! namespace, lists exactly what the agent's table lists.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_e2e::{Dataplane, Lab, e2e_data, sluicectl_out};

/// Policies beyond the basic ones: an ipBlock with an except (hash:net, nomatch), a
/// named port (hash:ip,port), an egress policy (fail-closed namespace prefix) and a
/// malformed policy (held pods).
const EXTRA: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: front-mixed, namespace: web}
spec:
  podSelector: {matchLabels: {app: front}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {cidr: 172.16.0.0/16, except: [172.16.8.0/24]}
    - ipBlock: {cidr: 10.2.3.4/32}
    ports: [{port: 80}, {port: 81, protocol: TCP}]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {team: web}}
    ports: [{port: 53, protocol: UDP}, {port: 80}]
---
# Malformed (the except lies outside its cidr): the agent holds the pods it selects
# fail-closed, and `policy render` must print that hold exactly as programmed.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: web}
spec:
  podSelector: {matchLabels: {app: front}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}
"#;

/// One node's sluice state, normalised the same way from either side: per chain its
/// `-A` lines in order (owned chains, and our jumps in built-in chains), per set its
/// type and members.
#[derive(Debug, PartialEq, Eq)]
struct Programmed {
    chains: BTreeMap<String, Vec<String>>,
    sets: BTreeMap<String, (String, BTreeSet<String>)>,
}

fn is_sluice_rule(line: &str) -> bool {
    let chain = line.split_whitespace().nth(1).unwrap_or("");
    chain.starts_with("SLUICE-") || line.contains("--comment \"sluice:")
}

fn add_rule(chains: &mut BTreeMap<String, Vec<String>>, line: &str) {
    let chain = line.split_whitespace().nth(1).unwrap_or("").to_string();
    chains.entry(chain).or_default().push(line.to_string());
}

/// `ipset save` prints a hash:net member of /32 as the bare address.
fn member(text: &str) -> String {
    let mut words = text.split_whitespace();
    let first = words.next().unwrap_or("");
    let first = first.strip_suffix("/32").unwrap_or(first);
    std::iter::once(first)
        .chain(words)
        .collect::<Vec<_>>()
        .join(" ")
}

/// From `sluicectl policy render`'s default output: the iptables text, the jumps
/// (comment lines `# iptables -t T -I CHAIN 1 SPEC`) and the ipset text (each set is
/// filled through a scratch set swapped in under its name).
fn from_render(text: &str) -> Programmed {
    let mut chains = BTreeMap::new();
    let mut sets: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    let mut scratch: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("-A ") {
            add_rule(&mut chains, line);
        } else if let Some(jump) = line.strip_prefix("# iptables -t ") {
            let mut words = jump.splitn(5, ' ');
            let (_table, _i, chain, _one, spec) = (
                words.next(),
                words.next(),
                words.next().unwrap(),
                words.next(),
                words.next().unwrap(),
            );
            add_rule(&mut chains, &format!("-A {chain} {spec}"));
        } else if let Some(rest) = line.strip_prefix("create ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            if !w[0].starts_with("SLUICE-T-") {
                sets.entry(w[0].to_string()).or_default().0 = w[1].to_string();
            }
        } else if let Some(rest) = line.strip_prefix("add ") {
            let (set, m) = rest.split_once(' ').unwrap();
            scratch
                .entry(set.to_string())
                .or_default()
                .push_str(&format!("{}\n", member(m)));
        } else if let Some(rest) = line.strip_prefix("swap ") {
            let (tmp, set) = rest.split_once(' ').unwrap();
            let members = scratch.remove(tmp).unwrap_or_default();
            sets.entry(set.to_string())
                .or_default()
                .1
                .extend(members.lines().map(str::to_string));
        }
    }
    Programmed { chains, sets }
}

fn from_kernel(iptables_save: &str, ipset_save: &str) -> Programmed {
    let mut chains = BTreeMap::new();
    for line in iptables_save.lines() {
        if line.starts_with("-A ") && is_sluice_rule(line) {
            add_rule(&mut chains, line);
        }
    }
    let mut sets: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in ipset_save.lines() {
        let mut w = line.splitn(3, ' ');
        match (w.next(), w.next(), w.next()) {
            (Some("create"), Some(name), Some(rest)) if name.starts_with("SLUICE-") => {
                let kind = rest.split_whitespace().next().unwrap_or("");
                sets.entry(name.to_string()).or_default().0 = kind.to_string();
            }
            (Some("add"), Some(name), Some(m)) if name.starts_with("SLUICE-") => {
                sets.entry(name.to_string())
                    .or_default()
                    .1
                    .insert(member(m));
            }
            _ => {}
        }
    }
    Programmed { chains, sets }
}

fn in_netns(netns: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{program} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rendered_equals_programmed(lab_name: &str, backend: &str) {
    let lab = Lab::up_with(
        lab_name,
        &[
            "--nodes",
            "2",
            "--nat-outgoing",
            "true",
            "--iptables-backend",
            backend,
            "--dataplane",
            "iptables",
        ],
    );
    lab.apply(&[
        &e2e_data("basic/pods.yaml"),
        &e2e_data("basic/deny-back.yaml"),
    ]);
    lab.apply_yaml(EXTRA);
    let status = lab.status();
    let manifests = lab.manifests_dir().display().to_string();
    let encap = status["encap"].as_str().unwrap().to_string();
    let pool = status["pool"].as_str().unwrap().to_string();
    let save = format!("iptables-{backend}-save");
    let mut held_somewhere = false;
    for node in status["nodes"].as_array().unwrap() {
        let name = node["name"].as_str().unwrap();
        let netns = node["netns"].as_str().unwrap();
        let node_ip = node["uplinkIP"].as_str().unwrap();
        let rendered = sluicectl_out(&[
            "policy",
            "render",
            "-f",
            &manifests,
            "--node",
            name,
            "--pool",
            &pool,
            "--encapsulation",
            &encap,
            "--nat-outgoing",
            "true",
            "--node-ip",
            node_ip,
        ]);
        let want = from_render(&rendered);
        assert!(
            want.chains.contains_key("SLUICE-TUNNEL-IN") || encap == "none",
            "{rendered}"
        );
        assert!(
            want.chains.contains_key("SLUICE-NAT-OUTGOING"),
            "{rendered}"
        );
        held_somewhere |= want.chains.contains_key("SLUICE-HELD");
        eprintln!(
            "{name} on {backend}: {} chains, {} sets rendered",
            want.chains.len(),
            want.sets.len()
        );
        // The agent reacts to the applied manifests within its poll interval; give it
        // a moment, then the kernel must hold exactly the rendered state.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = from_kernel(
                &in_netns(netns, &save, &[]),
                &in_netns(netns, "ipset", &["save"]),
            );
            if got == want {
                break;
            }
            if Instant::now() > deadline {
                assert_eq!(
                    got, want,
                    "{name} on {backend}: kernel vs render\n{rendered}"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // And the other backend holds nothing of ours.
        let other = if backend == "nft" { "legacy" } else { "nft" };
        let other_save = in_netns(netns, &format!("iptables-{other}-save"), &[]);
        assert!(
            !other_save.contains("SLUICE"),
            "{name}: {other} holds sluice rules:\n{other_save}"
        );
    }
    assert!(
        held_somewhere,
        "the malformed policy's pods are held on their node"
    );
    lab.down();
}

#[test]
fn policy_render_equals_what_the_agent_programs_with_iptables_nft() {
    if !sluice_testkit::require_root("policy_render_nft") {
        return;
    }
    rendered_equals_programmed("e2e-rnd-nft", "nft");
}

#[test]
fn policy_render_equals_what_the_agent_programs_with_iptables_legacy() {
    if !sluice_testkit::require_root("policy_render_legacy") {
        return;
    }
    rendered_equals_programmed("e2e-rnd-leg", "legacy");
}

/// `nft -j list table ip sluice` as a comparable value: handles dropped (the kernel
/// numbers objects in creation order), objects ordered by kind and name, and set
/// elements sorted (a hash set lists its elements in bucket order, which depends on a
/// per-set random seed).
fn normalised_listing(json: &str) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                for (k, x) in m.iter_mut() {
                    walk(x);
                    if k == "elem"
                        && let serde_json::Value::Array(a) = x
                    {
                        a.sort_by_key(|e| e.to_string());
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("nft -j output: {e}\n{json}"));
    walk(&mut v);
    // The metainfo entry names nft's version, the same on both sides but not policy.
    // Objects list in creation order, and the agent created some later than others:
    // order them by kind and name, stably, so each chain's rules keep their order.
    if let Some(a) = v["nftables"].as_array_mut() {
        a.retain(|o| o.get("metainfo").is_none());
        let key = |o: &serde_json::Value| {
            let (kind, body) = o.as_object().and_then(|m| m.iter().next()).unwrap();
            let name = body.get("name").or_else(|| body.get("chain"));
            (
                kind.clone(),
                name.map(|n| n.to_string()).unwrap_or_default(),
            )
        };
        a.sort_by_key(key);
    }
    v
}

/// Load `script` into a fresh network namespace and list sluice's table there.
fn listing_of_rendered(script: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("unshare")
        .args(["-n", "sh", "-c", "nft -f - && nft -j list table ip sluice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the rendered text does not load: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn policy_render_equals_what_the_agent_programs_with_nftables() {
    let dataplane = Dataplane::Nftables;
    if !dataplane.runs("policy_render_nftables") {
        return;
    }
    let lab = Lab::up_with(
        "e2e-rnd-nftables",
        &[
            "--nodes",
            "2",
            "--nat-outgoing",
            "true",
            "--dataplane",
            "nftables",
        ],
    );
    lab.assert_dataplane(dataplane);
    lab.apply(&[
        &e2e_data("basic/pods.yaml"),
        &e2e_data("basic/deny-back.yaml"),
    ]);
    lab.apply_yaml(EXTRA);
    let status = lab.status();
    let manifests = lab.manifests_dir().display().to_string();
    let encap = status["encap"].as_str().unwrap().to_string();
    let pool = status["pool"].as_str().unwrap().to_string();
    for node in status["nodes"].as_array().unwrap() {
        let name = node["name"].as_str().unwrap();
        let netns = node["netns"].as_str().unwrap();
        let node_ip = node["uplinkIP"].as_str().unwrap();
        let rendered = sluicectl_out(&[
            "policy",
            "render",
            "-f",
            &manifests,
            "--node",
            name,
            "--pool",
            &pool,
            "--encapsulation",
            &encap,
            "--nat-outgoing",
            "true",
            "--node-ip",
            node_ip,
            "--dataplane",
            "nftables",
        ]);
        let want = normalised_listing(&listing_of_rendered(&rendered));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = normalised_listing(&in_netns(
                netns,
                "nft",
                &["-j", "list", "table", "ip", "sluice"],
            ));
            if got == want {
                break;
            }
            if Instant::now() > deadline {
                assert_eq!(
                    serde_json::to_string_pretty(&got).unwrap(),
                    serde_json::to_string_pretty(&want).unwrap(),
                    "{name}: kernel vs render\n{rendered}"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // Nothing of sluice's in iptables or ipset on an nftables node.
        for save in ["iptables-nft-save", "iptables-legacy-save"] {
            let text = in_netns(netns, save, &[]);
            assert!(!text.contains("SLUICE"), "{name}: {save}:\n{text}");
        }
        let sets = in_netns(netns, "ipset", &["save"]);
        assert!(!sets.contains("SLUICE"), "{name}: ipset:\n{sets}");
    }
    lab.down();
}
