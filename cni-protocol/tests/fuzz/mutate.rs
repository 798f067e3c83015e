//! The fuzzers' one mutator, shared by every `fuzz_*` test in the workspace (they
//! include this file with `#[path]`): a valid JSON document is damaged the ways a
//! broken runtime, a hand-edited file or a half-written disk would damage it. Pure
//! data in, bytes out, no randomness of its own: proptest (or the binary fuzzer's
//! seeded generator) picks the [`Op`]s, so every failure replays from its ops.
#![allow(dead_code)] // each fuzz test uses a different part

use serde_json::{Map, Value};

/// One damage. Indices pick a node (preorder over the document) or a byte offset,
/// modulo what exists, so any number is valid.
#[derive(Debug, Clone)]
pub enum Op {
    /// Remove the node (an object member or an array element).
    Remove(usize),
    /// Replace the node with another value of any type.
    Retype(usize, Value),
    /// Repeat an object's first member (textually: JSON objects may carry a key
    /// twice, and parsers disagree on which wins).
    Duplicate(usize),
    /// Wrap the node in `depth` arrays or objects.
    Nest(usize, usize, bool),
    /// Cut the serialized bytes at an offset.
    Truncate(usize),
    /// Insert raw bytes (invalid UTF-8 among them) at an offset.
    Insert(usize, Vec<u8>),
}

/// Values a retyped field may become: each type, and the edges of each.
pub fn odd_values() -> Vec<Value> {
    vec![
        Value::Null,
        Value::Bool(true),
        Value::from(0),
        Value::from(-1),
        Value::from(u64::MAX),
        Value::from(i64::MIN),
        serde_json::json!(1e308),
        serde_json::json!(-0.5),
        Value::from(""),
        Value::from("x".repeat(70_000)),
        Value::from("\u{0}\u{fffd}/../;=,:"),
        Value::from("10.0.0.0/33"),
        Value::from("999.1.1.1"),
        Value::from("1.1.0"),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!([null, 1, "a", {}]),
        serde_json::json!({"": null}),
    ]
}

/// Apply `ops` to `doc`: structural ops first (in order), then byte ops.
pub fn apply(doc: &Value, ops: &[Op]) -> Vec<u8> {
    apply_as(doc, ops, |v| {
        serde_json::to_vec(v).expect("a Value serializes")
    })
}

/// [`apply`], serializing with `write` (e.g. as YAML) before the byte ops.
pub fn apply_as(doc: &Value, ops: &[Op], write: impl Fn(&Value) -> Vec<u8>) -> Vec<u8> {
    let mut v = doc.clone();
    let mut dup_at = Vec::new();
    for op in ops {
        match op {
            Op::Remove(i) => {
                let n = count(&v);
                if n > 1 {
                    remove_nth(&mut v, 1 + i % (n - 1));
                }
            }
            Op::Retype(i, new) => {
                let n = count(&v);
                *nth(&mut v, i % n) = new.clone();
            }
            Op::Nest(i, depth, arrays) => {
                let n = count(&v);
                let node = nth(&mut v, i % n);
                let mut inner = node.take();
                for _ in 0..*depth {
                    inner = if *arrays {
                        Value::Array(vec![inner])
                    } else {
                        let mut m = Map::new();
                        m.insert("a".into(), inner);
                        Value::Object(m)
                    };
                }
                *node = inner;
            }
            Op::Duplicate(i) => dup_at.push(*i),
            Op::Truncate(_) | Op::Insert(..) => {}
        }
    }
    let mut bytes = write(&v);
    for i in dup_at {
        duplicate_member(&mut bytes, i);
    }
    for op in ops {
        match op {
            Op::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
            Op::Insert(at, b) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            _ => {}
        }
    }
    bytes
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// The `n`th node in preorder (0 is the root).
fn nth(v: &mut Value, n: usize) -> &mut Value {
    if n == 0 {
        return v;
    }
    let mut n = n - 1;
    let children: Vec<&mut Value> = match v {
        Value::Array(a) => a.iter_mut().collect(),
        Value::Object(o) => o.values_mut().collect(),
        _ => unreachable!("n is below count"),
    };
    for c in children {
        let size = count(c);
        if n < size {
            return nth(c, n);
        }
        n -= size;
    }
    unreachable!("n is below count")
}

/// Remove the `n`th node (n ≥ 1) from its parent.
fn remove_nth(v: &mut Value, n: usize) {
    let mut n = n - 1;
    match v {
        Value::Array(a) => {
            for i in 0..a.len() {
                let size = count(&a[i]);
                if n == 0 {
                    a.remove(i);
                    return;
                }
                if n < size {
                    return remove_nth(&mut a[i], n);
                }
                n -= size;
            }
        }
        Value::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in keys {
                let size = count(&o[&k]);
                if n == 0 {
                    o.remove(&k);
                    return;
                }
                if n < size {
                    return remove_nth(o.get_mut(&k).unwrap(), n);
                }
                n -= size;
            }
        }
        _ => {}
    }
}

/// Textually repeat the first member of the `i`th object (`{"a":1` → `{"a":1,"a":1`).
fn duplicate_member(bytes: &mut Vec<u8>, i: usize) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let opens: Vec<usize> = text.match_indices("{\"").map(|(p, _)| p).collect();
    if opens.is_empty() {
        return;
    }
    let start = opens[i % opens.len()] + 1;
    // The member ends at the first `,` or `}` outside strings at depth 0.
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    for (off, c) in text[start..].char_indices() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => depth += 1,
            '}' | ']' if depth > 0 => depth -= 1,
            ',' | '}' if depth == 0 => {
                let member = text[start..start + off].to_owned();
                let at = start + off;
                bytes.splice(at..at, format!(",{member}").into_bytes());
                return;
            }
            _ => {}
        }
    }
}

/// The corpus files of `dir` (sorted, so a failure names a stable file).
pub fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

/// `PROPTEST_CASES`, or `default` (sized so each fuzz test stays within ~20 s in CI).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
