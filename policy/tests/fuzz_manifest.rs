//! Fuzzing of the one manifest reader (`policy::manifest`): multi-document YAML and
//! JSON split into objects, Lists expanded, objects converted to the model. A
//! proptest-driven stand-in for `cargo fuzz` (which needs nightly): the manifests of
//! `tests/corpus/manifest/` damaged by the shared mutator (fields removed, retyped,
//! duplicated, nested deep, truncated, odd bytes inserted) and written back as YAML
//! or JSON, and raw YAML-ish text. Every input must be answered without a panic: an
//! error naming the source and document, or objects, warnings and rejections.
//!
//! The corpus is replayed on every run. CI runs the default case count; the long run
//! is `PROPTEST_CASES=1000000 cargo test --release -p sluice-policy --test fuzz_manifest`.

#[path = "../../cni-protocol/tests/fuzz/mutate.rs"]
mod mutate;

use mutate::{Op, apply_as, cases, corpus, odd_values};
use proptest::prelude::*;
use serde_json::Value;
use sluice_policy::manifest::{
    ManifestError, convert_objects, parse_documents, read_documents, split_documents,
};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/manifest");

/// Read `text` every way the callers do; an error must name the source.
fn exercise(text: &str) {
    match split_documents("fuzz.yaml", text) {
        Ok(objects) => {
            let parsed = convert_objects(&objects);
            for r in &parsed.rejected {
                assert!(r.to_string().contains("fuzz.yaml"), "{r}");
            }
            let _ = parsed.into_cluster();
        }
        Err(e) => assert_names_source(&e),
    }
    match read_documents("fuzz.yaml", text) {
        Ok(p) => {
            let _ = p.into_cluster();
        }
        Err(e) => assert_names_source(&e),
    }
    if let Err(e) = parse_documents("fuzz.yaml", text) {
        assert_names_source(&e);
    }
}

fn assert_names_source(e: &ManifestError) {
    assert!(e.to_string().contains("fuzz.yaml"), "{e}");
}

/// Every object of the corpus, and each corpus file whole as a List.
/// Read once: every case picks from them.
static SEEDS: std::sync::LazyLock<Vec<Value>> = std::sync::LazyLock::new(read_seeds);

fn read_seeds() -> Vec<Value> {
    let mut out = Vec::new();
    for (_, bytes) in corpus(CORPUS) {
        let Ok(objects) = split_documents("seed", &String::from_utf8_lossy(&bytes)) else {
            continue;
        };
        let values: Vec<Value> = objects.into_iter().map(|o| o.value).collect();
        out.push(serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values}));
        out.extend(values);
    }
    out
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<usize>().prop_map(Op::Remove),
        (any::<usize>(), prop::sample::select(odd_values())).prop_map(|(i, v)| Op::Retype(i, v)),
        any::<usize>().prop_map(Op::Duplicate),
        (any::<usize>(), 1usize..200, any::<bool>()).prop_map(|(i, d, a)| Op::Nest(i, d, a)),
        any::<usize>().prop_map(Op::Truncate),
        (
            any::<usize>(),
            prop::collection::vec(
                prop::sample::select(vec![
                    b"\n---\n".to_vec(),
                    b": ".to_vec(),
                    b"- ".to_vec(),
                    b"&a ".to_vec(),
                    b"*a".to_vec(),
                    b"\t".to_vec(),
                    b"{".to_vec(),
                    b"]".to_vec(),
                    vec![0xff, 0xfe],
                    vec![0],
                ]),
                1..4
            )
        )
            .prop_map(|(i, b)| Op::Insert(i, b.concat())),
    ]
}

#[test]
fn every_corpus_manifest_is_answered_without_a_panic() {
    for (name, bytes) in corpus(CORPUS) {
        eprintln!("manifest corpus: {name}");
        exercise(&String::from_utf8_lossy(&bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(3_000)))]

    #[test]
    fn mutated_manifests_are_answered_without_a_panic(
        seed in any::<prop::sample::Index>(),
        ops in prop::collection::vec(op(), 1..6),
        as_yaml in any::<bool>(),
    ) {
        let seeds = &*SEEDS;
        let doc = seed.get(seeds);
        let bytes = if as_yaml {
            apply_as(doc, &ops, |v| serde_yaml_ng::to_string(v).expect("YAML").into_bytes())
        } else {
            apply_as(doc, &ops, |v| serde_json::to_vec(v).expect("JSON"))
        };
        exercise(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn yaml_shaped_text_is_answered_without_a_panic(
        text in r"((---\n|- |: |\{|\}|\[|\]|, |&a |\*a|!!str |!!binary |kind: (List|Pod|NetworkPolicy|Namespace|Node)\n|items:\n|metadata:\n|spec:\n|  |\n|[a-z0-9./]{1,6}|'|\x22|#|\?|\|)){0,60}",
    ) {
        exercise(&text);
    }

    #[test]
    fn raw_bytes_are_answered_without_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        exercise(&String::from_utf8_lossy(&bytes));
    }
}
