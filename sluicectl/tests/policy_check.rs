//! `sluicectl policy check`, run as the built binary: the exact interface other tools
//! rely on (flags, JSON shapes, exit codes, warnings on stderr).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policy/tests/data")
        .join(path)
}

fn sluicectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluicectl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // The binary may exit (bad flags) before reading: a broken pipe is not a failure.
    let _ = input.write_all(stdin.unwrap_or("").as_bytes());
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch directory unique to one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sluicectl-policy-check-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn seed3() -> String {
    data("seed-003-linuxea-ipblock-except")
        .to_string_lossy()
        .into_owned()
}

fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn one_probe_json_is_verdict_and_reason_and_exit_zero_either_way() {
    let seed = seed3();
    for (port, verdict) in [("80", "allow"), ("82", "deny")] {
        let o = sluicectl(
            &[
                "policy",
                "check",
                "-f",
                &seed,
                "--from",
                "default/client",
                "--to",
                "dev-linuxea/pod-linuxea-1",
                "--port",
                port,
                "-o",
                "json",
            ],
            None,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v = json_of(&o);
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 2, "{v}");
        assert_eq!(obj["verdict"], verdict);
        assert!(
            obj["reason"].as_str().unwrap().contains("allow-ingress"),
            "{v}"
        );
    }
}

#[test]
fn text_names_the_verdict_the_isolating_policies_and_the_rule() {
    let seed = seed3();
    let o = sluicectl(
        &[
            "policy",
            "check",
            "-f",
            &seed,
            "--from",
            "ip:172.16.5.11",
            "--to",
            "dev-linuxea/pod-linuxea-1",
            "--port",
            "81",
            "--protocol",
            "tcp",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("ALLOW: pod default/client (172.16.5.11)"),
        "{out}"
    );
    assert!(
        out.contains("isolated by dev-linuxea/allow-ingress, dev-linuxea/deny-ingress"),
        "{out}"
    );
    assert!(
        out.contains("allowed by dev-linuxea/allow-ingress ingress[0]"),
        "{out}"
    );

    let o = sluicectl(
        &[
            "policy",
            "check",
            "-f",
            &seed,
            "--from",
            "ip:172.16.8.1",
            "--to",
            "dev-linuxea/pod-linuxea-1",
            "--port",
            "80",
        ],
        None,
    );
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("DENY: 172.16.8.1"), "{}", stdout(&o));
}

#[test]
fn probes_file_gives_an_array_in_input_order() {
    let cluster = data("upstream-cluster").to_string_lossy().into_owned();
    let policy = data("upstream-14-ports").to_string_lossy().into_owned();
    let probes = concat!(
        r#"{"from":"y/b","to":"x/a","port":81}"#,
        "\n\n",
        r#"{"from":"y/b","to":"x/a","port":81,"protocol":"UDP"}"#,
        "\n",
        r#"{"from":"x/b","to":"x/a","port":81,"protocol":"TCP"}"#,
        "\n",
        r#"{"from":"x/a","to":"ip:203.0.113.9","port":443,"protocol":"SCTP"}"#,
        "\n",
    );
    let scratch = Scratch::new("probes");
    let file = scratch.write("probes.jsonl", probes);
    let file = file.to_str().unwrap();
    for source in [file, "-"] {
        let o = sluicectl(
            &[
                "policy", "check", "-f", &cluster, "-f", &policy, "--probes", source, "-o", "json",
            ],
            Some(probes),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let verdicts: Vec<String> = json_of(&o)
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["verdict"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(verdicts, ["allow", "deny", "deny", "allow"]);
    }
}

#[test]
fn seed_probes_agree_with_their_truth_tables() {
    // The same expectation files the policy crate's table tests use, through the CLI.
    #[derive(serde::Deserialize)]
    struct Expect {
        manifests: Vec<String>,
        #[serde(default)]
        probes: Vec<serde_json::Value>,
    }
    for name in [
        "seed-000-egress-dns",
        "seed-000-egress-dns-kube-dns-only",
        "seed-001-foo-ipblock-region",
        "seed-003-linuxea-ipblock-except",
    ] {
        let text = std::fs::read_to_string(data(&format!("{name}.expect.yaml"))).unwrap();
        let exp: Expect = serde_yaml_ng::from_str(&text).unwrap();
        assert!(!exp.probes.is_empty());
        let lines: String = exp
            .probes
            .iter()
            .map(|p| {
                let mut p = p.clone();
                let obj = p.as_object_mut().unwrap();
                obj.remove("verdict");
                format!("{p}\n")
            })
            .collect();
        let mut args = vec!["policy".to_string(), "check".to_string()];
        for m in &exp.manifests {
            args.push("-f".into());
            args.push(data(m).to_string_lossy().into_owned());
        }
        args.extend(["--probes", "-", "-o", "json"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = sluicectl(&args, Some(&lines));
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let got = json_of(&o);
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), exp.probes.len());
        for (want, got) in exp.probes.iter().zip(got) {
            assert_eq!(want["verdict"], got["verdict"], "{name}: {want} -> {got}");
        }
    }
}

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","namespace":"x"},"spec":{"nodeName":"n"},"status":{"podIP":"10.0.0.1"}}"#;

#[test]
fn directories_are_read_recursively_and_unknown_kinds_only_warn() {
    let s = Scratch::new("dirs");
    s.write("ns.yaml", NS);
    s.write("deep/er/pod.json", POD);
    s.write(
        "deep/svc.yml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\n",
    );
    s.write("notes.txt", "not a manifest, not read");
    let o = sluicectl(
        &[
            "policy",
            "check",
            "-f",
            s.path(),
            "--from",
            "ip:1.2.3.4",
            "--to",
            "x/a",
            "--port",
            "80",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("ALLOW"), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("warning:") && err.contains("Service") && err.contains("svc.yml"),
        "{err}"
    );
}

const BROKEN: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}\n";

/// What the agent does with the same file: the pods the malformed policy selects are
/// held fail-closed. So check answers deny, naming the policy, instead of aborting.
#[test]
fn a_malformed_policy_denies_the_pods_it_selects_naming_file_and_object() {
    let s = Scratch::new("malformed");
    s.write("pod.json", POD);
    let bad = s.write("bad.yaml", BROKEN);
    let args = |output: &'static str| {
        [
            "policy",
            "check",
            "-f",
            s.path(),
            "--from",
            "ip:1.2.3.4",
            "--to",
            "x/a",
            "--port",
            "80",
            "-o",
            output,
        ]
    };
    let o = sluicectl(&args("json"), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(bad.to_str().unwrap()), "{err}");
    assert!(err.contains("NetworkPolicy x/broken"), "{err}");
    let v = json_of(&o);
    assert_eq!(v["verdict"], "deny", "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("held fail-closed by rejected NetworkPolicy x/broken")
            && reason.contains("except"),
        "{reason}"
    );
    let o = sluicectl(&args("text"), None);
    let out = stdout(&o);
    assert!(out.starts_with("DENY"), "{out}");
    assert!(out.contains("NetworkPolicy x/broken"), "{out}");
}

#[test]
fn a_document_that_is_not_yaml_fails_naming_file_and_document() {
    let s = Scratch::new("syntax");
    s.write("pod.json", POD);
    let bad = s.write("bad.yaml", &format!("{BROKEN}---\nkind: [unclosed\n"));
    let o = sluicectl(
        &[
            "policy",
            "check",
            "-f",
            s.path(),
            "--from",
            "ip:1.2.3.4",
            "--to",
            "x/a",
            "--port",
            "80",
        ],
        None,
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}: document 2:", bad.to_str().unwrap())),
        "{err}"
    );
    assert!(stdout(&o).is_empty());
}

#[test]
fn bad_probes_are_errors_not_verdicts() {
    let s = Scratch::new("errors");
    s.write("pod.json", POD);
    let run = |args: &[&str]| {
        let mut all = vec!["policy", "check", "-f", s.path()];
        all.extend_from_slice(args);
        sluicectl(
            &all,
            Some("{\"from\":\"x/a\",\"to\":\"x/nope\",\"port\":80}\n"),
        )
    };
    for args in [
        &["--from", "x/nope", "--to", "x/a", "--port", "80"][..],
        &["--from", "x", "--to", "x/a", "--port", "80"],
        &[
            "--from",
            "x/a",
            "--to",
            "x/a",
            "--port",
            "80",
            "--protocol",
            "ICMP",
        ],
        &["--from", "x/a", "--to", "x/a"],
        &["--probes", "-"],
    ] {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} succeeded: {}", stdout(&o));
        assert!(!stderr(&o).is_empty());
    }
}

fn cnp_case(name: &str) -> [String; 2] {
    [
        data("cnp-cluster").to_string_lossy().into_owned(),
        data(name).to_string_lossy().into_owned(),
    ]
}

const HARRY: &str = "network-policy-conformance-gryffindor/harry-potter-0";
const DRACO: &str = "network-policy-conformance-slytherin/draco-malfoy-0";

#[test]
fn a_cluster_network_policy_decision_names_tier_policy_priority_and_rule() {
    let [cluster, case] = cnp_case("cnp-integration-1-admin-deny");
    let args = [
        "policy", "check", "-f", &cluster, "-f", &case, "--from", DRACO, "--to", HARRY, "--port",
        "80",
    ];
    let o = sluicectl(&args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("DENY: "), "{text}");
    assert!(
        text.contains("ingress: DENIED by Admin ClusterNetworkPolicy pass-example (priority 10) ingress[0] \"deny-all-ingress-from-slytherin\": Deny"),
        "{text}"
    );
    let mut json_args = args.to_vec();
    json_args.extend(["-o", "json"]);
    let j = json_of(&sluicectl(&json_args, None));
    assert_eq!(j["verdict"], "deny");
    let by = &j["ingress_cluster_policy"]["decided_by"];
    assert_eq!(
        (
            by["tier"].as_str(),
            by["policy"].as_str(),
            by["rule"].as_u64(),
            by["action"].as_str()
        ),
        (Some("Admin"), Some("pass-example"), Some(0), Some("Deny"))
    );
    assert_eq!(by["rule_name"], "deny-all-ingress-from-slytherin");
    assert!(
        j.get("egress_cluster_policy").is_none(),
        "draco's egress is not a subject: {j}"
    );
}

#[test]
fn a_pass_is_shown_on_the_way_to_the_networkpolicy_that_decided() {
    let [cluster, case] = cnp_case("cnp-integration-2-admin-pass-to-networkpolicy");
    let o = sluicectl(
        &[
            "policy", "check", "-f", &cluster, "-f", &case, "--from", DRACO, "--to", HARRY,
            "--port", "80",
        ],
        None,
    );
    let text = stdout(&o);
    assert!(text.starts_with("ALLOW: "), "{text}");
    assert!(text.contains("allowed by network-policy-conformance-gryffindor/allow-gress-from-to-slytherin-to-gryffindor ingress[0]"), "{text}");
    assert!(
        text.contains(
            "passed on by Admin ClusterNetworkPolicy pass-example (priority 10) ingress[0]"
        ),
        "{text}"
    );
}

#[test]
fn a_broken_cluster_network_policy_is_a_named_warning_and_holds_its_subject() {
    let s = Scratch::new("cnp-broken");
    let [cluster, _] = cnp_case("cnp-integration-1-admin-deny");
    s.write(
        "bad.yaml",
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: bad}\nspec:\n  tier: Admin\n  priority: 1001\n  subject: {namespaces: {matchLabels: {conformance-house: gryffindor}}}\n",
    );
    let o = sluicectl(
        &[
            "policy",
            "check",
            "-f",
            &cluster,
            "-f",
            s.path(),
            "--from",
            DRACO,
            "--to",
            HARRY,
            "--port",
            "80",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("ClusterNetworkPolicy bad: spec.priority: priority 1001 is outside 0..=1000"),
        "{err}"
    );
    assert!(err.contains("held fail-closed"), "{err}");
    let text = stdout(&o);
    assert!(
        text.contains("DENIED: held fail-closed by rejected ClusterNetworkPolicy bad ("),
        "{text}"
    );
}
