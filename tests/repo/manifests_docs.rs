//! The operator docs cannot drift from the code: every flag, environment variable
//! and default of `sluice-agent run` and `install-cni`, every ConfigMap key, every
//! conflist key and every metric is documented (and nothing documented is gone);
//! the sample conflist is what install-cni writes; chain names and the route
//! protocol the docs mention exist; relative links resolve.

mod manifests_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::CommandFactory;
use manifests_common::{Bundle, read, repo_root};
use sluice_agent::config::{Cli, Command, InstallCniConfig};

/// The rows of the markdown tables in the `#`/`##` section of `doc` whose heading
/// contains `heading`, up to the next such heading; header rows left out. Each row
/// is its cells, trimmed.
fn table_rows(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut rows = Vec::new();
    let mut inside = false;
    for (i, line) in lines.iter().enumerate() {
        if let Some(h) = line.strip_prefix("## ").or_else(|| line.strip_prefix("# ")) {
            inside = h.contains(heading);
            continue;
        }
        let is_header = lines
            .get(i + 1)
            .is_some_and(|next| next.starts_with("|---"));
        if !inside || !line.starts_with('|') || line.starts_with("|---") || is_header {
            continue;
        }
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        rows.push(cells);
    }
    assert!(
        !rows.is_empty(),
        "no table under a heading containing {heading:?}"
    );
    rows
}

fn unquote(cell: &str) -> &str {
    cell.trim()
        .trim_start_matches('`')
        .split('`')
        .next()
        .unwrap_or_default()
}

#[test]
fn configuration_doc_lists_every_flag_with_its_env_and_default() {
    let doc = read("docs/configuration.md");
    let cli = Cli::command();
    for sub in ["run", "install-cni"] {
        let rows = table_rows(&doc, &format!("`sluice-agent {sub}`"));
        let by_flag: BTreeMap<&str, &Vec<String>> =
            rows.iter().map(|r| (unquote(&r[0]), r)).collect();
        let cmd = cli.find_subcommand(sub).unwrap();
        let mut in_code = BTreeSet::new();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let flag = format!("--{long}");
            in_code.insert(flag.clone());
            let row = by_flag
                .get(flag.as_str())
                .unwrap_or_else(|| panic!("docs/configuration.md: `{sub}` table lacks {flag}"));
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            match &env {
                Some(e) => assert_eq!(unquote(&row[1]), e, "{sub} {flag}: environment variable"),
                None => assert!(
                    row[1].starts_with('—'),
                    "{sub} {flag}: no environment variable"
                ),
            }
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            if defaults.is_empty() {
                assert!(
                    row[2].starts_with('—'),
                    "{sub} {flag}: no default in code, doc says {}",
                    row[2]
                );
            } else {
                assert_eq!(
                    unquote(&row[2]),
                    defaults.join(","),
                    "{sub} {flag}: default"
                );
            }
        }
        let documented: BTreeSet<String> = by_flag.keys().map(|k| k.to_string()).collect();
        let stale: Vec<_> = documented.difference(&in_code).collect();
        assert!(
            stale.is_empty(),
            "`{sub}` flags documented but not in code: {stale:?}"
        );
    }
}

#[test]
fn configuration_doc_lists_every_configmap_key_with_its_env_and_value() {
    let doc = read("docs/configuration.md");
    let rows = table_rows(&doc, "The ConfigMap");
    let bundle = Bundle::load();
    let ns = bundle.daemonset().metadata.namespace.clone().unwrap();
    let data = bundle
        .config_map(&ns, "sluice-config")
        .unwrap()
        .data
        .clone()
        .unwrap();
    // key → the environment variable(s) the DaemonSet puts it in.
    let mut env_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let spec = manifests_common::pod_spec(bundle.daemonset());
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        for e in c.env.iter().flatten() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.config_map_key_ref.as_ref())
            {
                env_of
                    .entry(r.key.clone())
                    .or_default()
                    .insert(e.name.clone());
            }
        }
    }
    let documented: BTreeSet<&str> = rows.iter().map(|r| unquote(&r[0])).collect();
    for (key, value) in &data {
        let row = rows
            .iter()
            .find(|r| unquote(&r[0]) == key)
            .unwrap_or_else(|| panic!("docs/configuration.md: ConfigMap key {key} undocumented"));
        let envs = &env_of[key];
        assert_eq!(envs.len(), 1, "{key} goes to one variable: {envs:?}");
        assert_eq!(
            unquote(&row[1]),
            envs.first().unwrap(),
            "{key}: environment variable"
        );
        assert_eq!(
            unquote(&row[2]),
            value,
            "{key}: value in manifests/config.yaml"
        );
    }
    let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        documented, keys,
        "documented ConfigMap keys vs manifests/config.yaml"
    );
}

fn default_install_config() -> InstallCniConfig {
    use clap::Parser;
    match Cli::try_parse_from(["sluice-agent", "install-cni", "--node-name", "node-1"])
        .expect("install-cni with only a node name parses")
        .command
    {
        Command::InstallCni(c) => c,
        other => panic!("{other:?}"),
    }
}

fn keys_of(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                out.insert(k.clone());
                keys_of(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| keys_of(v, out)),
        _ => {}
    }
}

#[test]
fn the_sample_conflist_is_what_install_cni_writes_and_every_key_is_documented() {
    use sluice_agent::install_cni::render_conflist;
    let doc = read("docs/configuration.md");
    let section = doc
        .split("## The conflist")
        .nth(1)
        .expect("a conflist section");
    let sample = section
        .split("```json")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a json block in the conflist section");
    let sample: serde_json::Value = serde_json::from_str(sample).expect("the sample is JSON");
    let written: serde_json::Value =
        serde_json::from_str(&render_conflist(None, &default_install_config()).unwrap()).unwrap();
    assert_eq!(
        sample, written,
        "docs/configuration.md's conflist vs install-cni's"
    );

    // The sluice plugin's and the ipam section's keys, each in its table.
    let sluice = &written["plugins"][0];
    let mut top: BTreeSet<String> = sluice.as_object().unwrap().keys().cloned().collect();
    top.extend(written.as_object().unwrap().keys().cloned());
    let mut ipam = BTreeSet::new();
    keys_of(&sluice["ipam"], &mut ipam);
    let plugin_rows: BTreeSet<String> = table_rows(&doc, "The conflist")
        .iter()
        .map(|r| unquote(&r[0]).to_string())
        .collect();
    for k in &top {
        assert!(plugin_rows.contains(k), "conflist key {k} undocumented");
    }
    let ipam_doc = doc
        .split("### Keys of the `ipam` section")
        .nth(1)
        .expect("ipam keys table");
    for k in &ipam {
        assert!(
            ipam_doc.contains(&format!("| `{k}` |")),
            "ipam key {k} undocumented"
        );
    }
    // node-files.md is the contract; its sample must be the same file (placeholder
    // node name aside).
    let contract = read("docs/node-files.md");
    let contract_sample = contract
        .split("```json")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .unwrap()
        .replace("__NODENAME__", "node-1");
    let contract_sample: serde_json::Value = serde_json::from_str(&contract_sample).unwrap();
    assert_eq!(
        contract_sample, written,
        "docs/node-files.md's conflist vs install-cni's"
    );
}

#[test]
fn metrics_doc_lists_exactly_the_registered_metrics() {
    let metrics = sluice_agent::metrics::Metrics::new();
    // A labelled family is exposed only once it has a series.
    for family in [&metrics.denied_connections, &metrics.allowed_connections] {
        family
            .get_or_create(&vec![
                ("namespace".into(), "ns".into()),
                ("policy".into(), "-".into()),
                ("direction".into(), "ingress".into()),
            ])
            .inc();
    }
    let text = metrics.encode();
    let mut in_code = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        // OpenMetrics names a counter family without `_total`; its samples have it.
        let exposed = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_string()
        };
        in_code.insert(exposed, kind.to_string());
    }
    assert!(in_code.len() >= 5, "registry scraped: {in_code:?}");
    let doc = read("docs/metrics.md");
    let documented: BTreeMap<String, String> = table_rows(&doc, "Metrics reference")
        .into_iter()
        .filter(|r| r[0].starts_with("`sluice_"))
        .map(|r| (unquote(&r[0]).to_string(), r[1].clone()))
        .collect();
    assert_eq!(
        documented, in_code,
        "docs/metrics.md (left) vs the agent's registry (right)"
    );
}

#[test]
fn chain_and_set_names_in_the_docs_exist_in_the_code() {
    let mut code = String::new();
    for dir in ["node-agent/src", "policy/src"] {
        let mut stack = vec![repo_root().join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    code.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
    }
    let mut checked = 0;
    for doc in docs() {
        let text = read(&doc);
        for (i, _) in text.match_indices("SLUICE-") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| {
                    c.is_ascii_uppercase() || c.is_ascii_digit() || matches!(c, '-' | 'a'..='f')
                })
                .collect();
            // A hashed name (`SLUICE-GI-2a28409c41396343`, as `nft list` shows one) is
            // checked by its prefix, which is what the code spells.
            let name = match name.rsplit_once('-') {
                Some((prefix, hash))
                    if hash.len() >= 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    prefix
                }
                _ => name.trim_end_matches('-'),
            };
            if name == "SLUICE" {
                continue; // the prefix itself (`SLUICE-*`)
            }
            assert!(
                code.contains(name),
                "{doc}: {name} is not a chain or set in the code"
            );
            checked += 1;
        }
    }
    assert!(checked > 5, "only {checked} names found in the docs");
}

#[test]
fn route_protocol_and_tunnel_device_in_the_docs_are_the_agents() {
    let proto = sluice_agent::routes::ROUTE_PROTOCOL;
    for doc in [
        "docs/configuration.md",
        "docs/architecture.md",
        "docs/kubeadm.md",
    ] {
        let text = read(doc);
        assert!(
            text.contains(&format!("proto {proto}")) || text.contains(&format!("protocol {proto}")),
            "{doc}: route protocol {proto}"
        );
        for other in (0..=255u16).filter(|p| *p != u16::from(proto)) {
            assert!(
                !text.contains(&format!("proto {other}`")),
                "{doc}: stale route protocol {other}"
            );
        }
    }
    let arch = read("docs/architecture.md");
    assert!(arch.contains(sluice_agent::tunnel::IPIP_DEVICE));
    assert!(arch.contains(sluice_agent::tunnel::VXLAN_DEVICE));
    // Every "UDP <port>" the docs give for VXLAN is the agent's default.
    let port = sluice_agent::tunnel::DEFAULT_VXLAN_PORT;
    let mut seen = 0;
    for doc in docs() {
        let text = read(&doc);
        for (i, _) in text.match_indices("UDP ") {
            let n: String = text[i + 4..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if n.len() == 4 && n != "9099" {
                assert_eq!(n, port.to_string(), "{doc}: VXLAN port");
                seen += 1;
            }
        }
    }
    assert!(seen >= 2, "the docs name the VXLAN port");
}

fn docs() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(repo_root().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    out.sort();
    out
}

/// GitHub's heading anchors: lower case, spaces to dashes, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn relative_links_in_the_docs_resolve() {
    let mut files = docs();
    files.push("README.md".into());
    let mut checked = 0;
    for file in files {
        let text = read(&file);
        let base = repo_root().join(&file);
        let dir = base.parent().unwrap();
        for (i, _) in text.match_indices("](") {
            let target: String = text[i + 2..].chars().take_while(|c| *c != ')').collect();
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p.to_string(), Some(a.to_string())),
                None => (target.clone(), None),
            };
            let resolved = if path.is_empty() {
                base.clone()
            } else {
                dir.join(&path)
            };
            assert!(resolved.exists(), "{file}: link {target} points nowhere");
            if let Some(anchor) = anchor {
                let target_text = std::fs::read_to_string(&resolved).unwrap();
                let anchors: BTreeSet<String> = target_text
                    .lines()
                    .filter(|l| l.starts_with('#'))
                    .map(|l| slug(l.trim_start_matches('#')))
                    .collect();
                assert!(
                    anchors.contains(&anchor),
                    "{file}: no heading #{anchor} in {} (have {anchors:?})",
                    Path::new(&path).display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 5, "only {checked} links checked");
}

#[test]
fn slugs_follow_githubs_rule() {
    assert_eq!(slug(" MTU black holes"), "mtu-black-holes");
    assert_eq!(
        slug(" NodePort with `externalTrafficPolicy: Cluster`"),
        "nodeport-with-externaltrafficpolicy-cluster"
    );
}

/// The messages troubleshooting.md tells operators to look for are the ones the
/// plugin and sluice-ipam really print (pieces between `…` must each occur in
/// their source); libcni's own "failed to find plugin" is the runtime's.
#[test]
fn troubleshooting_quotes_real_error_messages() {
    let mut source = String::new();
    for dir in [
        "cni-plugin/src",
        "ipam/src",
        "cni-protocol/src",
        "node-files/src",
    ] {
        let mut stack = vec![repo_root().join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    source.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
    }
    let doc = read("docs/troubleshooting.md");
    let rows = table_rows(&doc, "A pod has no address");
    let mut checked = 0;
    for row in &rows {
        for quoted in row[0].split('`').skip(1).step_by(2) {
            if quoted.starts_with("failed to find plugin") {
                continue;
            }
            for piece in quoted.split('…').map(str::trim).filter(|p| !p.is_empty()) {
                assert!(
                    source.contains(piece),
                    "docs/troubleshooting.md quotes `{quoted}`, but `{piece}` is in no message"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "only {checked} pieces checked");
}

/// The example nodes of architecture.md give each block's tunnel address as IPAM
/// computes it, and the example pods are ordinary pod addresses of those blocks.
#[test]
fn architecture_examples_use_ipams_tunnel_addresses() {
    let doc = read("docs/architecture.md");
    let rows = table_rows(&doc, "Architecture");
    let mut checked = 0;
    for row in rows
        .iter()
        .filter(|r| r.len() == 4 && r[0].starts_with("node-"))
    {
        let block: ipnet::Ipv4Net = row[2].parse().expect("a block");
        let tunnel: std::net::Ipv4Addr = row[3].parse().expect("a tunnel address");
        assert_eq!(tunnel, sluice_ipam::tunnel_address(block), "{row:?}");
        checked += 1;
    }
    assert!(checked >= 2, "the example node table was not found");
}
