//! docs/cni-errors.md is the registry: the same codes, names, meanings and binaries,
//! in the same order, and nothing else (its "what to do" column is free text).

use sluice_cni_protocol::ErrorCode;

#[test]
fn the_doc_table_is_the_registry() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cni-errors.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let table = doc.split("## Registry").nth(1).expect("a Registry section");
    let documented: Vec<Vec<String>> = table
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| code"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .take(4) // the fifth, "what to do", is free text
                .collect()
        })
        .collect();
    let registry: Vec<Vec<String>> = ErrorCode::ALL
        .iter()
        .map(|c| {
            vec![
                c.code().to_string(),
                format!("`{c:?}`"),
                c.meaning().to_string(),
                c.source().as_str().to_string(),
            ]
        })
        .collect();
    assert_eq!(
        documented, registry,
        "docs/cni-errors.md (left) vs the registry"
    );
}
