//! Fuzzing of what a runtime hands a CNI plugin: the network config on stdin (with
//! its `ipam`, `dns`, `runtimeConfig`, `prevResult` and GC attachment list), the
//! `CNI_*` environment and `CNI_ARGS`. A proptest-driven stand-in for `cargo fuzz`
//! (which needs nightly): valid configs from `tests/corpus/config/` damaged by the
//! shared mutator (fields removed, retyped, duplicated, nested deep, truncated,
//! invalid UTF-8 inserted), and raw bytes. Every input must be answered without a
//! panic, and every rejection must be a registry code printed as one JSON object.
//!
//! The corpus is replayed on every run. CI runs the default case count (a few
//! seconds each); the long run is
//! `PROPTEST_CASES=1000000 cargo test --release -p sluice-cni-protocol --test fuzz_cni_input`.

#[path = "fuzz/mutate.rs"]
mod mutate;

use std::collections::HashMap;

use mutate::{Op, apply, cases, corpus, odd_values};
use proptest::prelude::*;
use serde_json::Value;
use sluice_cni_protocol::{CniArgs, CniError, CniResult, Env, ErrorCode, NetConf, Version};

const CONFIGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/config");
const ARGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/env");

/// A rejection the runtime can read: a registry code, printed as one JSON object
/// under every version we speak.
fn assert_reportable(e: &CniError) {
    assert!(
        ErrorCode::from_code(e.code).is_some(),
        "code {} is not in the registry: {e:?}",
        e.code
    );
    for v in [Version::parse("0.3.1").unwrap(), Version::LATEST] {
        let mut out = Vec::new();
        e.write_to(v, &mut out).unwrap();
        let printed: Value = serde_json::from_slice(&out).expect("one JSON error object");
        assert_eq!(printed["code"], e.code);
        assert!(printed["msg"].is_string());
    }
}

/// Everything a plugin reads from stdin, as the `sluice` plugin reads it.
fn exercise_config(bytes: &[u8]) {
    let _ = sluice_cni_protocol::peek_version(bytes);
    let conf = match NetConf::parse(bytes) {
        Ok(c) => c,
        Err(e) => return assert_reportable(&e),
    };
    if let Err(e) = conf.valid_attachments() {
        assert_reportable(&e);
    }
    let _ = conf.runtime_config_key("portMappings");
    if let Some(prev) = &conf.prev_result {
        exercise_result(prev);
    }
    if let Err(e) = conf.plugin_keys::<HashMap<String, Value>>() {
        assert_reportable(&e);
    }
}

fn exercise_result(v: &Value) {
    match CniResult::parse(v) {
        Ok(r) => {
            for ver in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
                let rendered = r.render(Version::parse(ver).unwrap());
                // What we print must read back as what we meant.
                let back = CniResult::parse(&rendered).expect("a rendered result parses");
                assert_eq!(back.ips, r.ips);
            }
        }
        Err(e) => assert_reportable(&e),
    }
}

fn exercise_env(vars: &HashMap<String, String>) {
    match Env::from_lookup(|k| vars.get(k).cloned()) {
        Ok(env) => {
            let _ = env.args.k8s_pod();
        }
        Err(e) => assert_reportable(&e),
    }
}

/// Read once: every case picks from them.
static SEEDS: std::sync::LazyLock<Vec<Value>> = std::sync::LazyLock::new(read_seeds);

fn read_seeds() -> Vec<Value> {
    corpus(CONFIGS)
        .into_iter()
        .filter_map(|(_, b)| serde_json::from_slice::<Value>(&b).ok())
        .filter(Value::is_object)
        .collect()
}

pub fn op() -> impl Strategy<Value = Op> {
    let values = odd_values();
    prop_oneof![
        any::<usize>().prop_map(Op::Remove),
        (any::<usize>(), prop::sample::select(values)).prop_map(|(i, v)| Op::Retype(i, v)),
        any::<usize>().prop_map(Op::Duplicate),
        (any::<usize>(), 1usize..300, any::<bool>()).prop_map(|(i, d, a)| Op::Nest(i, d, a)),
        any::<usize>().prop_map(Op::Truncate),
        (
            any::<usize>(),
            prop::collection::vec(
                prop_oneof![Just(0xffu8), Just(0xc3), Just(0), any::<u8>()],
                1..8
            )
        )
            .prop_map(|(i, b)| Op::Insert(i, b)),
    ]
}

#[test]
fn every_corpus_input_is_answered_without_a_panic() {
    for (name, bytes) in corpus(CONFIGS) {
        eprintln!("config corpus: {name}");
        exercise_config(&bytes);
    }
    for (name, bytes) in corpus(ARGS) {
        eprintln!("CNI_ARGS corpus: {name}");
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = CniArgs::parse(&text) {
            assert_reportable(&e);
        }
    }
}

fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("ADD".to_string()),
        Just("DEL".to_string()),
        Just("/proc/self/ns/net".to_string()),
        Just("eth0".to_string()),
        Just("a".repeat(300)),
        Just(":::".to_string()),
        "[A-Za-z0-9_.;=:/-]{0,40}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(4_000)))]

    #[test]
    fn mutated_configs_are_answered_without_a_panic(
        seed in any::<prop::sample::Index>(),
        ops in prop::collection::vec(op(), 1..6),
    ) {
        let seeds = &*SEEDS;
        let bytes = apply(seed.get(seeds), &ops);
        exercise_config(&bytes);
    }

    #[test]
    fn mutated_prev_results_are_answered_without_a_panic(
        seed in any::<prop::sample::Index>(),
        ops in prop::collection::vec(op(), 1..4),
    ) {
        let seeds: Vec<&Value> = SEEDS.iter().filter_map(|s| s.get("prevResult")).collect();
        let doc: &&Value = seed.get(&seeds);
        let bytes = apply(doc, &ops);
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            exercise_result(&v);
        }
    }

    #[test]
    fn raw_bytes_on_stdin_are_answered_without_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        exercise_config(&bytes);
    }

    #[test]
    fn any_cni_environment_is_answered_without_a_panic(
        vars in prop::collection::hash_map(
            prop::sample::select(vec![
                "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
            ]).prop_map(str::to_string),
            env_value(),
            0..7,
        ),
        args in "[A-Za-z0-9_=;]{0,60}",
    ) {
        exercise_env(&vars);
        let mut with_args = vars.clone();
        with_args.insert("CNI_ARGS".into(), args);
        exercise_env(&with_args);
    }
}
