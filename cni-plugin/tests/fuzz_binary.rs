//! Root: the fuzzed inputs of `cni-protocol/tests/fuzz_cni_input.rs`, through the real
//! `sluice` binary (delegating to `sluice-ipam`), end to end: whatever the runtime
//! sends on stdin and in the `CNI_*` environment, the plugin exits 0 with a result
//! (or nothing), or exits 1 with exactly one JSON error object carrying a registry
//! code on stdout; it never panics (code 100 would be the panic catcher at work) and
//! is never killed by a signal. The parsers are fuzzed in-process at full speed by the
//! per-crate `fuzz_*` tests; this test proves the catcher and the error output on a
//! smaller number of execs.
//!
//! Inputs: the corpus of `cni-protocol/tests/corpus/config/` (its absolute paths moved
//! under a temporary directory, so nothing on the host is read or written), then
//! configs whose paths are all temporary, damaged by the shared mutator with a
//! seeded generator (`SLUICE_FUZZ_SEED` replays a run; the seed is printed). Runs in a
//! throwaway network namespace with a current directory of its own, so a config
//! mutated into relative paths writes only there. The long run:
//! `PROPTEST_CASES=20000 cargo test -p sluice-cni --test fuzz_binary -- --nocapture`.

mod support;

#[path = "../../cni-protocol/tests/fuzz/mutate.rs"]
mod mutate;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use mutate::{Op, apply, cases, corpus, odd_values};
use serde_json::{Value, json};
use sluice_cni_protocol::ErrorCode;
use sluice_testkit::{NetnsHolder, in_new_netns, require_root};
use support::*;

const CORPUS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../cni-protocol/tests/corpus/config"
);

/// One random mutation of a seed document.
fn op(rng: &mut Rng, values: &[Value]) -> Op {
    let i = rng.next() as usize;
    match rng.below(6) {
        0 => Op::Remove(i),
        1 => Op::Retype(i, values[rng.below(values.len())].clone()),
        2 => Op::Duplicate(i),
        3 => Op::Nest(i, 1 + rng.below(200), rng.next().is_multiple_of(2)),
        4 => Op::Truncate(i),
        _ => Op::Insert(i, vec![0xff, rng.next() as u8]),
    }
}

/// One exec of `sluice` as a runtime makes it; checks the output contract and
/// returns whether it succeeded.
fn exec(bins: &str, cwd: &Path, call: (&str, &str, &str), netns: &Path, stdin: &[u8]) -> bool {
    let (command, container_id, args) = call;
    let mut child = Command::new(Path::new(bins).join("sluice"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", bins)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    let input = String::from_utf8_lossy(stdin);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = || {
        format!(
            "{command} of {:.80} with {input:.2000}\nstdout: {stdout:.2000}\nstderr: {stderr:.2000}",
            container_id
        )
    };
    assert!(
        out.status.signal().is_none(),
        "killed by a signal: {}",
        context()
    );
    assert!(!stderr.contains("panicked"), "panic: {}", context());
    if out.status.success() {
        if !stdout.trim().is_empty() {
            serde_json::from_str::<Value>(&stdout)
                .unwrap_or_else(|e| panic!("success output is not JSON ({e}): {}", context()));
        }
        return true;
    }
    assert_eq!(out.status.code(), Some(1), "{}", context());
    let e: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not exactly one JSON object ({e}): {}", context()));
    let code = e["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code: {}", context()));
    assert!(e["msg"].is_string(), "no msg: {}", context());
    assert_ne!(
        code,
        u64::from(ErrorCode::Internal.code()),
        "a panic: {}",
        context()
    );
    let ours = ErrorCode::from_code(code as u32).is_some();
    // A third-party IPAM plugin (host-local) speaks with its own codes, named.
    let theirs = e["msg"].as_str().unwrap().starts_with("host-local");
    assert!(
        ours || theirs,
        "code {code} not in the registry: {}",
        context()
    );
    false
}

fn seeds(dir: &Path) -> Vec<Value> {
    let mut add = conf("1.0.0", Ipam::SluiceIpam, dir);
    add["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
    add["dns"] = json!({"nameservers": ["10.96.0.10"], "search": ["svc"]});
    let mut chained = conf("0.4.0", Ipam::HostLocal, dir);
    chained["prevResult"] = json!({
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/proc/self/ns/net"}],
        "ips": [{"version": "4", "address": "10.99.0.5/24", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}]
    });
    let mut gc = conf("1.1.0", Ipam::SluiceIpam, dir);
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "fuzz-ctr", "ifname": "eth0"}]);
    vec![add, chained, gc]
}

#[test]
fn fuzzed_input_through_the_sluice_binary_gets_a_result_or_one_registry_error() {
    if !require_root("fuzz_binary") {
        return;
    }
    if !require_sluice_ipam("fuzz_binary") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    let bins_path = bins.dir.display().to_string();
    let cwd = dir.join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let (mut rng, seed) = Rng::from_env("SLUICE_FUZZ_SEED");
    eprintln!("fuzz_binary: SLUICE_FUZZ_SEED={seed}");
    let n = cases(2_000);
    let started = Instant::now();
    let (runs, successes) = in_new_netns(|| {
        setup_node();
        std::fs::write(dir.join("mtu"), "1440\n").unwrap();
        let pod = NetnsHolder::new();
        let (mut runs, mut successes) = (0u32, 0u32);

        // The corpus, as ADD and DEL, with its host paths moved under the temporary directory.
        let under_tmp = format!("\"{}/", dir.display());
        for (name, bytes) in corpus(CORPUS) {
            let text = String::from_utf8_lossy(&bytes).replace("\"/", &under_tmp);
            eprintln!("fuzz_binary corpus: {name}");
            for command in ["ADD", "DEL"] {
                let call = (command, "fuzz-ctr", "");
                successes += u32::from(exec(&bins_path, &cwd, call, pod.path(), text.as_bytes()));
                runs += 1;
            }
        }

        let seeds = seeds(dir);
        let values = odd_values();
        let commands = ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "add", ""];
        // The longest id sluice accepts, one over, and one the netlink encoder
        // cannot write as part of the host link's alias (it used to panic).
        let ids = [
            "fuzz-ctr".to_string(),
            "c".repeat(128),
            "c".repeat(129),
            "c".repeat(70_000),
        ];
        let args = [
            "",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=fuzz",
            "novalue",
            ";;=;K8S_POD_NAME=",
        ];
        for _ in 0..n {
            let doc = &seeds[rng.below(seeds.len())];
            let ops: Vec<Op> = (0..1 + rng.below(4))
                .map(|_| op(&mut rng, &values))
                .collect();
            let stdin = apply(doc, &ops);
            let command = commands[rng.below(commands.len())];
            let a = args[rng.below(args.len())];
            let id = &ids[rng.below(ids.len())];
            let ok = exec(&bins_path, &cwd, (command, id, a), pod.path(), &stdin);
            runs += 1;
            successes += u32::from(ok);
            if ok && command == "ADD" {
                // Undo it, so the next ADD meets a clean pod.
                exec(&bins_path, &cwd, ("DEL", id, a), pod.path(), &stdin);
                runs += 1;
            }
        }
        (runs, successes)
    });
    eprintln!(
        "fuzz_binary: {runs} execs ({successes} succeeded), 0 panics, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
