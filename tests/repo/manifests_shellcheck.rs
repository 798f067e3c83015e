//! Every shell script in the repository is shellcheck-clean: files ending in `.sh`
//! and files whose first line is a sh/bash shebang (`.ci/run`). The scripts an
//! operator runs (tests/kind/e2e.sh) cannot be run here, so this is the check they
//! get. `scripts/check-shell.sh` is the same check for a shell.

mod manifests_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use manifests_common::repo_root;

fn is_shell_script(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "sh") {
        return true;
    }
    let Ok(text) = std::fs::read(path) else {
        return false;
    };
    let first = text.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    first.starts_with("#!")
        && first
            .split(|c: char| c == '/' || c.is_whitespace())
            .any(|w| w == "sh" || w == "bash")
}

fn shell_scripts() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                // Build output, history and caches are not ours to lint.
                if name == ".git" || name.starts_with("target") || name == ".sluice-cache" {
                    continue;
                }
                walk(&path, out);
            } else if is_shell_script(&path) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo_root(), &mut out);
    out.sort();
    out
}

fn shellcheck(files: &[PathBuf]) -> std::process::Output {
    Command::new("shellcheck")
        .arg("--external-sources")
        .args(files)
        .current_dir(repo_root())
        .output()
        .expect("run shellcheck")
}

#[test]
fn every_shell_script_is_shellcheck_clean() {
    if !sluice_testkit::require_tool("every_shell_script_is_shellcheck_clean", "shellcheck") {
        return;
    }
    let scripts = shell_scripts();
    let root = repo_root();
    let names: Vec<String> = scripts
        .iter()
        .map(|p| {
            p.strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // The discovery itself: these must be found, or the check below proves nothing.
    for known in [
        ".ci/run",
        "tests/run.sh",
        "tests/kind/e2e.sh",
        "scripts/check-shell.sh",
    ] {
        assert!(
            names.iter().any(|n| n == known),
            "{known} not found among {names:?}"
        );
    }
    let out = shellcheck(&scripts);
    assert!(
        out.status.success(),
        "shellcheck found problems in {names:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// shellcheck really runs and really fails: an unquoted expansion is reported.
#[test]
fn shellcheck_rejects_a_script_with_a_classic_mistake() {
    if !sluice_testkit::require_tool(
        "shellcheck_rejects_a_script_with_a_classic_mistake",
        "shellcheck",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.sh");
    std::fs::write(&bad, "#!/bin/sh\nrm -rf $1/tmp\n").unwrap();
    assert!(is_shell_script(&bad));
    let out = shellcheck(std::slice::from_ref(&bad));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("SC2086"));
}

#[test]
fn shebang_detection_finds_sh_and_bash_but_not_other_interpreters() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("a", "#!/usr/bin/env bash\n", true),
        ("b", "#!/bin/sh -e\n", true),
        ("c", "#!/usr/bin/env python3\n", false),
        ("d", "no shebang\n", false),
    ];
    for (name, text, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        assert_eq!(is_shell_script(&p), want, "{text:?}");
    }
}
