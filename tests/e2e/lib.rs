//! Support for the end-to-end suites: a [`Lab`] handle that drives the real
//! `sluicectl lab` binary (which drives the real `sluice`, `sluice-ipam` and
//! `sluice-agent`), and helpers to compare its real-packet matrices with what
//! `sluicectl policy check` predicts.
//!
//! Every lab is torn down on drop (`lab down`), also when the test panics, so a
//! failing test leaves nothing behind either.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_json::Value;

pub mod fixture;
pub mod layout;
pub mod scenario;

/// Where scenario files live: the policy engine's test data (shared with its own
/// table tests) and this crate's own.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn policy_data(rel: &str) -> PathBuf {
    workspace_root().join("policy/tests/data").join(rel)
}

pub fn e2e_data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("e2e/data")
        .join(rel)
}

/// How long a probe waits before it counts as blocked: `SLUICE_E2E_TIMEOUT_MS`, or
/// 1000. Under QEMU's emulation everything is slower, so the VM suite raises it.
pub fn timeout_ms() -> String {
    std::env::var("SLUICE_E2E_TIMEOUT_MS").unwrap_or_else(|_| "1000".into())
}

fn sluicectl() -> PathBuf {
    sluice_testkit::bin_path("sluicectl")
}

/// Environment that points `sluicectl lab` at this build's binaries.
fn bin_env(cmd: &mut Command) {
    for b in ["sluice", "sluice-ipam", "sluice-agent"] {
        let var = format!("SLUICE_BIN_{}", b.to_uppercase().replace('-', "_"));
        if std::env::var_os(&var).is_none() {
            cmd.env(var, sluice_testkit::bin_path(b));
        }
    }
}

fn run(args: &[&str]) -> Output {
    let mut cmd = Command::new(sluicectl());
    cmd.args(args);
    bin_env(&mut cmd);
    cmd.output().expect("spawn sluicectl")
}

fn must(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "sluicectl {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sluicectl ARGS` that must succeed; its stdout.
pub fn sluicectl_out(args: &[&str]) -> String {
    must(args)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ProbeOutcome {
    pub result: String,
    pub latency_ms: f64,
    #[serde(default)]
    pub source_seen: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

impl ProbeOutcome {
    pub fn connected(&self) -> bool {
        self.result == "connected"
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Matrix {
    pub pods: Vec<String>,
    pub probes: Vec<Cell>,
}

/// (from, to, port, protocol) → allowed?
pub type Truth = BTreeMap<(String, String, u16, String), bool>;

impl Matrix {
    pub fn truth(&self) -> Truth {
        self.probes
            .iter()
            .map(|c| {
                assert!(
                    c.error.is_none(),
                    "probe {} -> {} {}/{} could not be sent: {:?}",
                    c.from,
                    c.to,
                    c.protocol,
                    c.port,
                    c.error
                );
                (
                    (c.from.clone(), c.to.clone(), c.port, c.protocol.clone()),
                    c.result.as_deref() == Some("connected"),
                )
            })
            .collect()
    }
}

/// Cells where two truth tables disagree, formatted for a failure message.
pub fn differences(want: &Truth, got: &Truth) -> Vec<String> {
    let mut d = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            Some(g) if g == w => {}
            Some(g) => d.push(format!(
                "{} -> {} {}/{}: expected {}, lab says {}",
                k.0,
                k.1,
                k.3,
                k.2,
                verdict(*w),
                verdict(*g)
            )),
            None => d.push(format!("{} -> {} {}/{}: not probed", k.0, k.1, k.3, k.2)),
        }
    }
    d
}

fn verdict(b: bool) -> &'static str {
    if b { "allowed" } else { "denied" }
}

/// The policy dataplane a lab's agents run (`sluicectl lab up --dataplane`). Every
/// lab suite runs each case on both (issue 11: both dataplanes are first-class);
/// `SLUICE_E2E_DATAPLANES=nftables` (or `iptables`, comma-separated) narrows a run,
/// which is how the QEMU suite keeps to a representative subset on one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    Nftables,
    Iptables,
}

impl Dataplane {
    pub const BOTH: [Dataplane; 2] = [Dataplane::Nftables, Dataplane::Iptables];

    pub fn as_str(self) -> &'static str {
        match self {
            Dataplane::Nftables => "nftables",
            Dataplane::Iptables => "iptables",
        }
    }

    /// Whether this run covers the dataplane (`SLUICE_E2E_DATAPLANES`, default both).
    pub fn selected(self) -> bool {
        match std::env::var("SLUICE_E2E_DATAPLANES") {
            Ok(v) if !v.trim().is_empty() => v.split(',').any(|d| d.trim() == self.as_str()),
            _ => true,
        }
    }

    /// The lab name for a case on this dataplane (lab names are at most 24 characters).
    pub fn lab_name(self, base: &str) -> String {
        let suffix = match self {
            Dataplane::Nftables => "-nf",
            Dataplane::Iptables => "-ip",
        };
        format!("{base}{suffix}")
    }

    /// `require_root` for a privileged case on this dataplane, and whether this run
    /// covers it (a dataplane left out is a skip with a line saying so, not a pass).
    pub fn runs(self, test: &str) -> bool {
        if !sluice_testkit::require_root(test) {
            return false;
        }
        if !self.selected() {
            eprintln!(
                "{test}: {} not in SLUICE_E2E_DATAPLANES, skipped",
                self.as_str()
            );
            return false;
        }
        true
    }
}

/// A running lab; `lab down` on drop.
pub struct Lab {
    pub name: String,
}

impl Lab {
    /// `lab up` after removing any leftover lab of the same name.
    pub fn up(name: &str, nodes: usize, encap: &str) -> Lab {
        let _ = run(&["lab", "down", "--name", name]);
        let n = nodes.to_string();
        must(&["lab", "up", "--name", name, "--nodes", &n, "--encap", encap]);
        Lab {
            name: name.to_string(),
        }
    }

    /// `lab up` with the agents on `dataplane`, named for it (two dataplanes' labs of
    /// one case never collide), after checking that every agent chose it.
    pub fn up_on(base: &str, nodes: usize, encap: &str, dataplane: Dataplane) -> Lab {
        let n = nodes.to_string();
        Lab::up_laid_out(base, &["--nodes", &n], encap, dataplane)
    }

    /// [`Lab::up_on`] with the nodes given by `layout` (`--nodes N`, or `--node-ips`
    /// and maybe `--underlay`).
    pub fn up_laid_out(base: &str, layout: &[&str], encap: &str, dataplane: Dataplane) -> Lab {
        let name = dataplane.lab_name(base);
        let mut args = layout.to_vec();
        args.extend(["--encap", encap, "--dataplane", dataplane.as_str()]);
        let lab = Lab::up_with(&name, &args);
        lab.assert_dataplane(dataplane);
        lab
    }

    /// Every node's agent reports running `dataplane`.
    pub fn assert_dataplane(&self, dataplane: Dataplane) {
        let st = self.status();
        for n in st["nodes"].as_array().expect("nodes") {
            let d = n["agent"]["dataplane"].as_str().unwrap_or("");
            assert!(
                d.starts_with(&format!("dataplane {}", dataplane.as_str())),
                "{}: agent reports {d:?}, wanted {}",
                n["name"],
                dataplane.as_str()
            );
        }
    }

    /// `lab up --name NAME EXTRA…`; `SLUICE_E2E_LAB_PREFIX` goes before the name, so
    /// runs sharing a machine never take each other's labs down.
    pub fn up_with(name: &str, extra: &[&str]) -> Lab {
        let name = format!(
            "{}{name}",
            std::env::var("SLUICE_E2E_LAB_PREFIX").unwrap_or_default()
        );
        let name = name.as_str();
        let _ = run(&["lab", "down", "--name", name]);
        let mut args = vec!["lab", "up", "--name", name];
        args.extend(extra);
        must(&args);
        Lab {
            name: name.to_string(),
        }
    }

    pub fn apply(&self, files: &[&Path]) -> String {
        let mut args = vec!["lab", "apply", "--name", &self.name];
        let fs: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        for f in &fs {
            args.extend(["-f", f.as_str()]);
        }
        must(&args)
    }

    pub fn apply_prune(&self, file: &Path) -> String {
        let f = file.display().to_string();
        must(&["lab", "apply", "--name", &self.name, "-f", &f, "--prune"])
    }

    /// Apply YAML text (written to a temp file).
    pub fn apply_yaml(&self, yaml: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("objects.yaml");
        std::fs::write(&p, yaml).expect("write yaml");
        self.apply(&[&p])
    }

    /// Apply YAML text that must fail; returns stderr.
    pub fn apply_yaml_fails(&self, yaml: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("objects.yaml");
        std::fs::write(&p, yaml).expect("write yaml");
        let f = p.display().to_string();
        let out = run(&["lab", "apply", "--name", &self.name, "-f", &f]);
        assert!(
            !out.status.success(),
            "apply should fail, got: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn delete(&self, files: &[&Path]) -> String {
        let mut args = vec!["lab", "delete", "--name", &self.name];
        let fs: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        for f in &fs {
            args.extend(["-f", f.as_str()]);
        }
        must(&args)
    }

    pub fn delete_yaml(&self, yaml: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("objects.yaml");
        std::fs::write(&p, yaml).expect("write yaml");
        self.delete(&[&p])
    }

    /// `sluicectl lab probe … -o json` for one connection.
    fn probe_args<'a>(
        &'a self,
        from: &'a str,
        to: &'a str,
        port: &'a str,
        protocol: &'a str,
    ) -> Vec<&'a str> {
        vec![
            "lab",
            "probe",
            "--name",
            &self.name,
            "--from",
            from,
            "--to",
            to,
            "--port",
            port,
            "--protocol",
            protocol,
            "-o",
            "json",
        ]
    }

    pub fn probe(&self, from: &str, to: &str, port: u16, protocol: &str) -> ProbeOutcome {
        let p = port.to_string();
        let out = must(&self.probe_args(from, to, &p, protocol));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("probe output {out:?}: {e}"))
    }

    /// Many probes at once through `lab probe --probes FILE -o json`, which sends them
    /// in parallel (a blocked probe waits out its whole timeout, so one at a time
    /// would cost a second each). Outcomes in input order; a probe that could not
    /// be sent is a panic naming it, never a verdict.
    pub fn probe_all(&self, probes: &[(String, String, u16, String)]) -> Vec<ProbeOutcome> {
        if probes.is_empty() {
            return Vec::new();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("probes.jsonl");
        let lines: Vec<String> = probes
            .iter()
            .map(|(from, to, port, protocol)| {
                serde_json::json!({"from": from, "to": to, "port": port, "protocol": protocol})
                    .to_string()
            })
            .collect();
        std::fs::write(&file, lines.join("\n") + "\n").expect("write probes");
        let f = file.display().to_string();
        let t = timeout_ms();
        let out = run(&[
            "lab",
            "probe",
            "--name",
            &self.name,
            "--probes",
            &f,
            "--timeout-ms",
            &t,
            "-o",
            "json",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let values: Vec<Value> = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "lab probe --probes: {e}\nstdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(values.len(), probes.len(), "one outcome per probe");
        values
            .into_iter()
            .zip(probes)
            .map(|(v, (from, to, port, protocol))| {
                assert!(
                    v.get("error").is_none(),
                    "probe {from} -> {to} {protocol}/{port} could not be sent: {}",
                    v["error"]
                );
                serde_json::from_value(v).expect("probe outcome")
            })
            .collect()
    }

    /// A probe that must be refused as an error (never a verdict); returns stderr.
    pub fn probe_error(&self, from: &str, to: &str, port: u16, protocol: &str) -> String {
        let p = port.to_string();
        let out = run(&self.probe_args(from, to, &p, protocol));
        assert!(
            !out.status.success(),
            "probe {from} -> {to} {protocol}/{port} should be an error, got {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn matrix(&self) -> Matrix {
        let t = timeout_ms();
        let out = must(&[
            "lab",
            "matrix",
            "--name",
            &self.name,
            "-o",
            "json",
            "--timeout-ms",
            &t,
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("matrix output: {e}"))
    }

    pub fn matrix_text(&self) -> String {
        must(&["lab", "matrix", "--name", &self.name])
    }

    pub fn status(&self) -> Value {
        let out = must(&["lab", "status", "--name", &self.name, "-o", "json"]);
        serde_json::from_str(&out).expect("status json")
    }

    /// The pod's address as the lab reports it.
    pub fn pod_ip(&self, key: &str) -> String {
        let st = self.status();
        st["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| {
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                ) == key
            })
            .and_then(|p| p["ip"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("no pod {key} in {st}"))
    }

    /// The directory datastore the agents read (and `policy check` can read too).
    pub fn manifests_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/sluice-lab/{}/manifests", self.name))
    }

    /// Whether pods in this lab can serve SCTP (the kernel has SCTP sockets).
    pub fn serves_sctp(&self) -> bool {
        self.status()["sctp"]
            .as_bool()
            .expect("status reports sctp")
    }

    pub fn down(self) {
        must(&["lab", "down", "--name", &self.name]);
        std::mem::forget(self);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SLUICE_E2E_KEEP=1 keeps a failed lab for `ip netns exec` and its logs.
        if std::thread::panicking() && std::env::var_os("SLUICE_E2E_KEEP").is_some() {
            eprintln!("keeping lab {} (SLUICE_E2E_KEEP)", self.name);
            return;
        }
        let out = run(&["lab", "down", "--name", &self.name]);
        if !out.status.success() {
            eprintln!(
                "lab down --name {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// What `sluicectl policy check --probes` predicts for every cell of `m`.
pub fn predicted(files: &[&Path], m: &Matrix) -> Truth {
    let dir = tempfile::tempdir().expect("tempdir");
    let probes = dir.path().join("probes.jsonl");
    let lines: Vec<String> = m
        .probes
        .iter()
        .map(|c| {
            serde_json::json!({"from": c.from, "to": c.to, "port": c.port, "protocol": c.protocol})
                .to_string()
        })
        .collect();
    std::fs::write(&probes, lines.join("\n") + "\n").expect("write probes");
    let mut args: Vec<String> = vec!["policy".into(), "check".into()];
    for f in files {
        args.push("-f".into());
        args.push(f.display().to_string());
    }
    args.extend([
        "--probes".into(),
        probes.display().to_string(),
        "-o".into(),
        "json".into(),
    ]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = must(&a);
    let verdicts: Vec<Value> = serde_json::from_str(&out).expect("policy check json array");
    assert_eq!(verdicts.len(), m.probes.len());
    m.probes
        .iter()
        .zip(verdicts)
        .map(|(c, v)| {
            (
                (c.from.clone(), c.to.clone(), c.port, c.protocol.clone()),
                v["verdict"].as_str() == Some("allow"),
            )
        })
        .collect()
}
