//! Fuzzing of the IPAM state file reader (`sluice_ipam::state`): whatever
//! `allocations.json` holds, sluice-ipam must either refuse it as corrupt (code 112,
//! the file left byte for byte alone) or accept a state its allocator can work on:
//! allocating, releasing and committing from an accepted state must not panic, and
//! what is committed must read back as valid. A proptest-driven stand-in for
//! `cargo fuzz` (which needs nightly): the valid states of `tests/corpus/state/`
//! damaged by the shared mutator (fields removed, retyped, duplicated, nested deep,
//! truncated, invalid UTF-8 inserted), and raw bytes.
//!
//! The corpus is replayed on every run. CI runs the default case count; the long run
//! is `PROPTEST_CASES=1000000 cargo test --release -p sluice-ipam --test fuzz_state`.

#[path = "../../cni-protocol/tests/fuzz/mutate.rs"]
mod mutate;

use std::path::Path;

use ipnet::Ipv4Net;
use mutate::{Op, apply, cases, corpus, odd_values};
use proptest::prelude::*;
use serde_json::{Value, json};
use sluice_ipam::state::{STATE_FILE, StateError};
use sluice_ipam::{AttachmentKey, StateDir};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/state");

/// Put `bytes` in `dir`'s state file and read it the way ADD does.
fn exercise(dir: &Path, bytes: &[u8]) {
    let state = StateDir::new(dir);
    let path = dir.join(STATE_FILE);
    std::fs::write(&path, bytes).unwrap();
    let mut locked = match state.lock() {
        Ok(l) => l,
        Err(StateError::Corrupt { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(!reason.is_empty());
            assert_eq!(
                std::fs::read(&path).unwrap(),
                bytes,
                "a refused file was changed"
            );
            return;
        }
        Err(e) => panic!("a readable file must be accepted or refused as corrupt: {e}"),
    };
    // Accepted: the allocator works on it, in the blocks it has and a new one.
    let mut owned: Vec<Ipv4Net> = locked.allocator.blocks().iter().map(|b| b.cidr).collect();
    owned.push("10.250.0.0/30".parse().unwrap());
    let held: Vec<AttachmentKey> = locked
        .allocator
        .allocations()
        .map(|a| a.key.clone())
        .collect();
    let _ = locked.allocator.free_in(&owned);
    for k in held.iter().take(2) {
        assert!(locked.allocator.release(k).is_some());
    }
    for i in 0..3 {
        let _ =
            locked
                .allocator
                .allocate(&AttachmentKey::new(format!("fuzz-{i}"), "eth0"), &owned, 0);
    }
    let _ = locked.allocator.retain(|a| a.key.container_id != "fuzz-0");
    locked.commit().expect("commit");
    let after = locked.allocator.clone();
    drop(locked);
    let back = state
        .snapshot()
        .expect("what sluice-ipam writes reads back");
    assert_eq!(back, after);
}

/// Read once: every case picks from them.
static SEEDS: std::sync::LazyLock<Vec<Value>> = std::sync::LazyLock::new(read_seeds);

fn read_seeds() -> Vec<Value> {
    let mut s: Vec<Value> = corpus(CORPUS)
        .into_iter()
        .filter_map(|(_, b)| serde_json::from_slice::<Value>(&b).ok())
        .filter(Value::is_object)
        .collect();
    s.push(json!({"version": 1, "blocks": [], "nextReleaseSeq": 0}));
    s
}

fn op() -> impl Strategy<Value = Op> {
    let mut values = odd_values();
    values.extend([
        json!("10.244.1.2"),
        json!("10.244.1.255"),
        json!("0.0.0.0/0"),
        json!("10.244.1.0/30"),
        json!(u32::MAX),
        json!(2),
        json!(3),
    ]);
    prop_oneof![
        1 => any::<usize>().prop_map(Op::Remove),
        3 => (any::<usize>(), prop::sample::select(values)).prop_map(|(i, v)| Op::Retype(i, v)),
        1 => any::<usize>().prop_map(Op::Duplicate),
        1 => (any::<usize>(), 1usize..200, any::<bool>()).prop_map(|(i, d, a)| Op::Nest(i, d, a)),
        1 => any::<usize>().prop_map(Op::Truncate),
        1 => (
            any::<usize>(),
            prop::collection::vec(prop_oneof![Just(0xffu8), Just(0), any::<u8>()], 1..6)
        )
            .prop_map(|(i, b)| Op::Insert(i, b)),
    ]
}

#[test]
fn every_corpus_state_is_refused_or_usable() {
    let d = tempfile::tempdir().unwrap();
    for (name, bytes) in corpus(CORPUS) {
        eprintln!("state corpus: {name}");
        exercise(d.path(), &bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(6_000)))]

    #[test]
    fn mutated_state_files_are_refused_or_usable(
        seed in any::<prop::sample::Index>(),
        ops in prop::collection::vec(op(), 1..5),
    ) {
        let d = tempfile::tempdir().unwrap();
        let seeds = &*SEEDS;
        exercise(d.path(), &apply(seed.get(seeds), &ops));
    }

    #[test]
    fn raw_bytes_as_state_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let d = tempfile::tempdir().unwrap();
        exercise(d.path(), &bytes);
    }
}
