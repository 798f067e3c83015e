//! The manifests against the agent's code: the environment each container sets is
//! what its subcommand reads and parses; the init container and the agent agree on
//! every shared setting and file; the probes hit the health server's real port and
//! paths; the ClusterRole grants exactly the API access the code uses; the image
//! layout is where install-cni looks; and install-cni, run with the DaemonSet's own
//! environment against a temporary root, leaves a node the plugin can use.

mod manifests_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec};
use manifests_common::{Bundle, read, repo_root};
use sluice_agent::config::{Cli, Command, InstallCniConfig, RunConfig};

/// The node name the downward API would give, for resolving `spec.nodeName`.
const NODE: &str = "node-1";

fn pod_spec(bundle: &Bundle) -> PodSpec {
    manifests_common::pod_spec(bundle.daemonset())
}

fn init_container(spec: &PodSpec) -> Container {
    spec.init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "install-cni")
        .cloned()
        .expect("install-cni init container")
}

fn agent_container(spec: &PodSpec) -> Container {
    spec.containers
        .iter()
        .find(|c| c.name == "sluice-agent")
        .cloned()
        .expect("sluice-agent container")
}

/// The subcommand a container runs: `[<binary>, <subcommand>, ...]`.
fn subcommand(c: &Container) -> String {
    let command = c.command.clone().unwrap_or_default();
    assert!(
        command.len() >= 2,
        "{}: command is binary and subcommand",
        c.name
    );
    assert!(
        c.args.is_none(),
        "{}: settings go through env, not args",
        c.name
    );
    command[1].clone()
}

/// A container's environment with ConfigMap references and the downward API resolved,
/// the way kubelet would.
fn resolved_env(c: &Container, bundle: &Bundle, namespace: &str) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let value = if let Some(v) = &e.value {
                v.clone()
            } else {
                let from = e.value_from.as_ref().expect("value or valueFrom");
                if let Some(r) = &from.config_map_key_ref {
                    let cm: &ConfigMap = bundle
                        .config_map(namespace, &r.name)
                        .unwrap_or_else(|| panic!("ConfigMap {}", r.name));
                    cm.data
                        .as_ref()
                        .and_then(|d| d.get(&r.key))
                        .cloned()
                        .unwrap_or_else(|| {
                            panic!("{}: ConfigMap {} has no key {}", e.name, r.name, r.key)
                        })
                } else if let Some(f) = &from.field_ref {
                    assert_eq!(f.field_path, "spec.nodeName", "{}", e.name);
                    NODE.to_string()
                } else {
                    panic!("{}: unsupported valueFrom", e.name)
                }
            };
            (e.name.clone(), value)
        })
        .collect()
}

/// Map each environment variable to the long flag that reads it, so the container's
/// settings can be parsed by the agent's own clap definition (value parsers, enums)
/// without touching this process's environment.
fn argv_for(sub: &str, env: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let cmd = Cli::command();
    let subcmd = cmd
        .find_subcommand(sub)
        .ok_or_else(|| format!("sluice-agent has no subcommand {sub}"))?;
    let mut argv = vec!["sluice-agent".to_string(), sub.to_string()];
    for (name, value) in env {
        let arg = subcmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .ok_or_else(|| format!("`sluice-agent {sub}` reads no environment variable {name}"))?;
        let long = arg.get_long().expect("env-backed args have a long flag");
        argv.push(format!("--{long}"));
        argv.push(value.clone());
    }
    Ok(argv)
}

fn parse(argv: &[String]) -> Result<Command, String> {
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .map_err(|e| e.to_string())?;
    Cli::from_arg_matches(&matches)
        .map(|c| c.command)
        .map_err(|e| e.to_string())
}

struct Configs {
    install: InstallCniConfig,
    run: RunConfig,
    install_files: Files,
    run_files: Files,
}

/// The node files a subcommand is configured with (docs/node-files.md), read from
/// clap's matches by argument id so the test does not depend on how the config
/// structs group them.
#[derive(Debug, PartialEq)]
struct Files {
    mtu_file: PathBuf,
    status_file: PathBuf,
    ipam_state_dir: PathBuf,
    node_blocks_file: PathBuf,
}

fn files_of(argv: &[String]) -> Files {
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .expect("the settings parse");
    let (_, sub) = matches.subcommand().expect("a subcommand");
    let get = |id: &str| {
        sub.get_one::<PathBuf>(id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {argv:?}"))
    };
    Files {
        mtu_file: get("mtu_file"),
        status_file: get("status_file"),
        ipam_state_dir: get("ipam_state_dir"),
        node_blocks_file: get("node_blocks_file"),
    }
}

fn configs_from_manifests() -> Configs {
    let bundle = Bundle::load();
    let ns = bundle.daemonset().metadata.namespace.clone().unwrap();
    let spec = pod_spec(&bundle);
    let init = init_container(&spec);
    let agent = agent_container(&spec);
    let install_argv = argv_for(&subcommand(&init), &resolved_env(&init, &bundle, &ns)).unwrap();
    let run_argv = argv_for(&subcommand(&agent), &resolved_env(&agent, &bundle, &ns)).unwrap();
    let install = match parse(&install_argv) {
        Ok(Command::InstallCni(c)) => c,
        other => panic!("install-cni container: {other:?}"),
    };
    let run = match parse(&run_argv) {
        Ok(Command::Run(c)) => *c,
        other => panic!("agent container: {other:?}"),
    };
    Configs {
        install,
        run,
        install_files: files_of(&install_argv),
        run_files: files_of(&run_argv),
    }
}

#[test]
fn every_env_var_the_daemonset_sets_is_read_and_parsed_by_its_subcommand() {
    let bundle = Bundle::load();
    let ns = bundle.daemonset().metadata.namespace.clone().unwrap();
    let spec = pod_spec(&bundle);
    let mut subs = BTreeSet::new();
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let sub = subcommand(c);
        let argv = argv_for(&sub, &resolved_env(c, &bundle, &ns))
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        parse(&argv).unwrap_or_else(|e| panic!("{}: the agent rejects its settings: {e}", c.name));
        subs.insert(sub);
    }
    assert_eq!(
        subs,
        BTreeSet::from(["install-cni".to_string(), "run".to_string()])
    );
}

/// The checks above can fail: an unknown variable and a value the agent rejects.
#[test]
fn an_unread_variable_or_a_bad_value_is_caught() {
    let env = BTreeMap::from([("SLUICE_ENCAPSULATOIN".to_string(), "ipip".to_string())]);
    assert!(argv_for("run", &env).is_err());
    let env_of = |long: &str| {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .unwrap();
        arg.get_env().unwrap().to_string_lossy().into_owned()
    };
    let mut env = BTreeMap::from([(env_of("node-name"), NODE.to_string())]);
    assert!(parse(&argv_for("run", &env).unwrap()).is_ok());
    env.insert(env_of("encapsulation"), "gre".to_string());
    assert!(parse(&argv_for("run", &env).unwrap()).is_err());
}

#[test]
fn the_agent_runs_against_the_kubernetes_api() {
    use sluice_agent::config::DatastoreKind;
    let c = configs_from_manifests();
    assert_eq!(c.run.datastore, DatastoreKind::Kubernetes);
    assert_eq!(c.run.node_name, NODE);
}

/// install-cni writes the conflist the plugin reads; the agent writes the files that
/// conflist names. Both come from the manifests; they must agree.
#[test]
fn init_container_and_agent_agree_on_settings_and_files() {
    let Configs {
        install,
        run,
        install_files,
        run_files,
    } = configs_from_manifests();
    assert_eq!(install.pool, run.pool, "pool");
    assert_eq!(install.block_size, run.block_size, "block size");
    assert_eq!(install.mtu, run.mtu, "MTU");
    assert_eq!(install.node_name, run.node_name, "node name");
    assert_eq!(
        install_files, run_files,
        "mtuFile, agentStatusFile, ipam.stateDir, ipam.nodeBlocksFile"
    );

    // Files the agent writes for the host's CNI binaries must be on a hostPath
    // mounted at the same path, or the plugin on the host would not see them.
    let bundle = Bundle::load();
    let spec = pod_spec(&bundle);
    let host_path_of = |volume: &str| {
        spec.volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| PathBuf::from(&h.path))
    };
    let shared = |c: &Container, file: &Path| {
        c.volume_mounts.iter().flatten().any(|m| {
            file.starts_with(&m.mount_path)
                && m.read_only != Some(true)
                && host_path_of(&m.name).as_deref() == Some(Path::new(&m.mount_path))
        })
    };
    let agent = agent_container(&spec);
    for file in [
        &run_files.mtu_file,
        &run_files.status_file,
        &run_files.node_blocks_file,
        &run_files.ipam_state_dir,
    ] {
        assert!(
            shared(&agent, file),
            "agent: {} is not on a same-path hostPath",
            file.display()
        );
    }
    // install-cni writes where the host's runtime looks.
    let init = init_container(&spec);
    let host_of_mount = |c: &Container, dir: &Path| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| Path::new(&m.mount_path) == dir)
            .and_then(|m| host_path_of(&m.name))
    };
    assert_eq!(
        host_of_mount(&init, &install.cni_bin_dir),
        Some(PathBuf::from("/opt/cni/bin"))
    );
    assert_eq!(
        host_of_mount(&init, &install.cni_conf_dir),
        Some(PathBuf::from("/etc/cni/net.d"))
    );
}

/// The probes' port is the health server's port, and the paths answer the way kubelet
/// needs: liveness 200 while the loop runs, readiness 503 until the first apply.
#[tokio::test]
async fn probes_hit_the_health_servers_port_and_paths() {
    use sluice_agent::health::{Health, serve};
    use sluice_agent::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Configs { run, .. } = configs_from_manifests();
    let bundle = Bundle::load();
    let agent = agent_container(&pod_spec(&bundle));
    let probe_port =
        |p: &Option<k8s_openapi::api::core::v1::Probe>, which: &str| -> (i32, String) {
            let get = p
                .as_ref()
                .and_then(|p| p.http_get.clone())
                .unwrap_or_else(|| panic!("{which}: httpGet probe"));
            let port = match get.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => agent
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port)
                    .unwrap_or_else(|| panic!("{which}: no port named {name}")),
            };
            assert!(
                get.host.is_none(),
                "{which}: the probe goes to the node address"
            );
            (port, get.path.unwrap_or_default())
        };
    let (live_port, live_path) = probe_port(&agent.liveness_probe, "livenessProbe");
    let (ready_port, ready_path) = probe_port(&agent.readiness_probe, "readinessProbe");
    let health_port = i32::from(run.health_addr.port());
    assert_eq!(live_port, health_port);
    assert_eq!(ready_port, health_port);
    assert!(
        run.health_addr.ip().is_unspecified(),
        "kubelet probes the node address, not loopback"
    );
    assert!(
        agent
            .ports
            .iter()
            .flatten()
            .any(|p| p.container_port == health_port),
        "the health port is declared (hostNetwork makes it a host port the scheduler checks)"
    );

    let health = Arc::new(Health::new(Duration::from_secs(3600)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, health.clone(), Arc::new(Metrics::new())));
    let status = |path: String| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        status(live_path.clone()).await,
        "200",
        "{live_path} while the loop runs"
    );
    assert_eq!(
        status(ready_path.clone()).await,
        "503",
        "{ready_path} before the first apply"
    );
    health.applied();
    assert_eq!(
        status(ready_path.clone()).await,
        "200",
        "{ready_path} after an apply"
    );
    assert_eq!(
        status("/no-such-path".into()).await,
        "404",
        "the server is path-sensitive"
    );
    server.abort();
}

/// (API group, resource) → verbs.
type Access = BTreeMap<(String, String), BTreeSet<String>>;

/// What in the code needs which API access. The agent has no exported table of its
/// API calls yet (asked for in the packaging report), so the code is scanned for
/// the calls that need access; anything kube-shaped the scan does not recognise
/// fails the test below, so a new call cannot slip past unreviewed.
///
/// Kinds the agent builds an `Api::<K>` for, always to run a kube-runtime
/// reflector on them: an initial list, then a watch.
const WATCHED_KINDS: &[(&str, &str, &str)] = &[
    ("Node", "", "nodes"),
    ("Pod", "", "pods"),
    ("Namespace", "", "namespaces"),
    ("NetworkPolicy", "networking.k8s.io", "networkpolicies"),
    (
        "ClusterNetworkPolicy",
        "policy.networking.k8s.io",
        "clusternetworkpolicies",
    ),
    ("IPAMBlock", "sluice.dev", "ipamblocks"),
];

/// Calls into sluice_ipam's Kubernetes block store (ipam/src/store/kube.rs):
/// BlockStore::list → list, ::claim → create, ::release → get + delete.
const BLOCK_CALLS: &[(&str, &[&str])] = &[
    ("blocks_of(", &["list"]),
    ("claim_block(", &["list", "create"]),
    ("release_orphan_blocks(", &["list", "get", "delete"]),
    (".release(", &["get", "delete"]),
];

/// Kinds whose `status` subresource the agent writes: `.patch_status(` in a file
/// whose only `Api<K>` types are these (server-side apply: `patch` on
/// `<resource>/status`).
const STATUS_WRITES: &[(&str, &str, &str)] = &[(
    "ClusterNetworkPolicy",
    "policy.networking.k8s.io",
    "clusternetworkpolicies/status",
)];

/// Kubernetes-client calls the tables above must account for if they ever appear.
const UNRECOGNISED_IF_PRESENT: &[&str] = &[
    ".patch(",
    ".replace(",
    ".create(",
    ".delete(",
    "Recorder",
    "Api::<Event",
];

fn rust_sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                out.push((p, text));
            }
        }
    }
    out
}

/// The code with `#[cfg(test)]` modules cut off (they sit at the end of a file).
fn non_test(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

fn access_used_by_the_code() -> Access {
    let src = repo_root().join("node-agent/src");
    let mut access = Access::new();
    for (path, text) in rust_sources(&src) {
        // The directory datastore claims blocks through the same functions but in a
        // directory block store, not the API.
        if path.ends_with("datastore/dir.rs") {
            continue;
        }
        let code = non_test(&text);
        for (needle, verbs) in BLOCK_CALLS {
            if code.contains(needle) {
                access
                    .entry(("sluice.dev".to_string(), "ipamblocks".to_string()))
                    .or_default()
                    .extend(verbs.iter().map(|v| v.to_string()));
            }
        }
        for needle in UNRECOGNISED_IF_PRESENT {
            assert!(
                !(code.contains(needle) && code.contains("kube::")),
                "{}: `{needle}` is an API call this test does not know; add its access to \
                 this test's tables and to manifests/rbac.yaml",
                path.display()
            );
        }
        if code.contains(".patch_status(") {
            let mut kinds = code
                .match_indices("Api<")
                .map(|(i, _)| {
                    code[i + 4..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect::<String>()
                })
                .filter(|ty| ty != "K")
                .peekable();
            assert!(
                kinds.peek().is_some(),
                "{}: `.patch_status(` on an Api whose kind the scan cannot see",
                path.display()
            );
            for ty in kinds {
                let kind = ty.rsplit("::").next().unwrap_or_default();
                let (_, group, resource) = STATUS_WRITES
                    .iter()
                    .find(|(k, ..)| *k == kind)
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: `.patch_status(` beside Api<{ty}>, which has no access \
                             recorded in STATUS_WRITES",
                            path.display()
                        )
                    });
                access
                    .entry((group.to_string(), resource.to_string()))
                    .or_default()
                    .insert("patch".to_string());
            }
        }
        // Every API type the agent builds a client for is watched, and known.
        for (i, _) in code.match_indices("Api::<") {
            let ty: String = code[i + 6..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let kind = ty.rsplit("::").next().unwrap_or_default();
            let (_, group, resource) = WATCHED_KINDS
                .iter()
                .find(|(k, ..)| *k == kind)
                .unwrap_or_else(|| {
                    panic!(
                        "{}: Api::<{ty}> has no access recorded in WATCHED_KINDS",
                        path.display()
                    )
                });
            let before = &code[i.saturating_sub(40)..i];
            assert!(
                before.contains("reflect("),
                "{}: Api::<{kind}> is used for more than a reflector; record its access",
                path.display()
            );
            access
                .entry((group.to_string(), resource.to_string()))
                .or_default()
                .extend(["list".to_string(), "watch".to_string()]);
        }
    }
    // The agent claims blocks through the ipam crate's Kubernetes store; make sure
    // that is still the store it constructs.
    let run_rs = read("node-agent/src/run.rs");
    assert!(
        run_rs.contains("KubeStore::new"),
        "the agent no longer uses ipam's KubeStore"
    );
    access
}

fn access_granted(bundle: &Bundle) -> Access {
    let binding = bundle.cluster_role_bindings().next().expect("a binding");
    let role = bundle
        .cluster_roles()
        .find(|r| r.metadata.name.as_deref() == Some(binding.role_ref.name.as_str()))
        .expect("the bound ClusterRole");
    let mut access = Access::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                assert_ne!(resource, "*", "no wildcard resources");
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    access
                        .entry((group.clone(), resource.clone()))
                        .or_default()
                        .insert(verb.clone());
                }
            }
        }
    }
    access
}

#[test]
fn cluster_role_grants_exactly_the_access_the_code_uses() {
    let used = access_used_by_the_code();
    assert!(
        used.contains_key(&("".to_string(), "pods".to_string())),
        "the scan found the reflectors: {used:?}"
    );
    let granted = access_granted(&Bundle::load());
    assert_eq!(
        granted, used,
        "manifests/rbac.yaml (left) must grant exactly what the code uses (right)"
    );
}

/// The CRD the bundle installs is the one the ipam crate's client speaks.
#[test]
fn the_crd_matches_the_ipam_block_type() {
    use kube::{CustomResourceExt, Resource};
    use sluice_ipam::store::kube::IPAMBlock;
    let bundle = Bundle::load();
    let crd = bundle
        .crds()
        .find(|c| c.spec.names.kind == IPAMBlock::kind(&()))
        .expect("the bundle installs the IPAMBlock CRD");
    let generated = IPAMBlock::crd();
    assert_eq!(crd.spec.group, IPAMBlock::group(&()));
    assert_eq!(crd.spec.names.plural, IPAMBlock::plural(&()));
    assert_eq!(crd.spec.scope, generated.spec.scope);
    let served: Vec<_> = crd
        .spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| &v.name)
        .collect();
    assert!(
        served.contains(&&IPAMBlock::version(&()).to_string()),
        "the client's version {} is served ({served:?})",
        IPAMBlock::version(&())
    );
    // The fields the client writes are in the schema, so the API server keeps them.
    let schema = |c: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        let v = c
            .spec
            .versions
            .iter()
            .find(|v| v.name == IPAMBlock::version(&()))
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| s.properties.as_ref())
            .and_then(|p| p.get("spec"))
            .and_then(|s| s.properties.as_ref())
            .map(|p| p.keys().cloned().collect::<BTreeSet<_>>());
        v.unwrap_or_default()
    };
    assert_eq!(
        schema(crd),
        schema(&generated),
        "spec fields of the YAML CRD vs the Rust type"
    );
}

/// The bundle installs the ClusterNetworkPolicy CRD the agent watches, as its type
/// generates it (node-agent/tests/cnp_kube_datastore.rs checks the file itself).
#[test]
fn the_crd_matches_the_cluster_network_policy_type() {
    use kube::{CustomResourceExt, Resource};
    use sluice_agent::datastore::cluster_network_policy::ClusterNetworkPolicy;
    let bundle = Bundle::load();
    let crd = bundle
        .crds()
        .find(|c| c.spec.group == ClusterNetworkPolicy::group(&()))
        .expect("the bundle installs the ClusterNetworkPolicy CRD");
    assert_eq!(
        serde_json::to_value(crd).unwrap(),
        serde_json::to_value(ClusterNetworkPolicy::crd()).unwrap(),
        "run SLUICE_WRITE_CRD=1 cargo test -p sluice-agent --test cnp_kube_datastore, then make manifests"
    );
}

/// The DaemonSet runs the binary from the image's /opt/sluice/bin, which is where
/// install-cni copies from, and the Dockerfile puts every binary there.
#[test]
fn image_layout_matches_install_cni() {
    let defaults = match parse(&[
        "sluice-agent".into(),
        "install-cni".into(),
        "--node-name".into(),
        NODE.into(),
    ]) {
        Ok(Command::InstallCni(c)) => c,
        other => panic!("{other:?}"),
    };
    let bundle = Bundle::load();
    let spec = pod_spec(&bundle);
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let binary = PathBuf::from(&c.command.as_ref().unwrap()[0]);
        assert_eq!(
            binary.parent(),
            Some(defaults.source_bin_dir.as_path()),
            "{}",
            c.name
        );
    }
    let dockerfile = read("Dockerfile");
    let dest = format!(
        "COPY --from=build /out/ {}/",
        defaults.source_bin_dir.display()
    );
    assert!(dockerfile.contains(&dest), "the Dockerfile has `{dest}`");
    let built = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("&& for bin in "))
        .and_then(|l| l.split("; do").next())
        .expect("the Dockerfile's list of binaries");
    let built: BTreeSet<&str> = built.split_whitespace().collect();
    for bin in defaults
        .binaries
        .iter()
        .map(String::as_str)
        .chain(["sluice-agent"])
    {
        assert!(
            built.contains(bin),
            "the image does not build {bin}: {built:?}"
        );
    }
}

/// Run the real `sluice-agent install-cni` with exactly the environment the
/// DaemonSet gives its init container, its host mounts mapped into a temporary
/// root, then again: the node ends up with executable binaries and a conflist
/// whose every plugin is installed (or is the documented portmap), and the second
/// run changes nothing.
#[test]
fn install_cni_with_the_daemonsets_environment_leaves_a_usable_node() {
    let bundle = Bundle::load();
    let ns = bundle.daemonset().metadata.namespace.clone().unwrap();
    let spec = pod_spec(&bundle);
    let init = init_container(&spec);
    let mut env = resolved_env(&init, &bundle, &ns);
    let root = tempfile::tempdir().unwrap();
    let image = root.path().join("image/opt/sluice/bin");
    std::fs::create_dir_all(&image).unwrap();
    for bin in ["sluice", "sluice-ipam"] {
        std::fs::write(image.join(bin), format!("#!/bin/sh\necho {bin}\n")).unwrap();
    }
    // The one override: the image's directory lives in the temporary root.
    env.insert("SLUICE_SOURCE_BIN_DIR".into(), image.display().to_string());
    for key in ["SLUICE_CNI_BIN_DIR", "SLUICE_CNI_CONF_DIR"] {
        let inside = env
            .get(key)
            .unwrap_or_else(|| panic!("the init container sets {key}"));
        let mapped = root.path().join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(&mapped).unwrap();
        env.insert(key.into(), mapped.display().to_string());
    }
    let run = || {
        let out = Process::new(sluice_testkit::bin_path("sluice-agent"))
            .arg("install-cni")
            .env_clear()
            .envs(&env)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install-cni failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run();
    let bin_dir = PathBuf::from(&env["SLUICE_CNI_BIN_DIR"]);
    let conf_dir = PathBuf::from(&env["SLUICE_CNI_CONF_DIR"]);
    let conflists: Vec<_> = std::fs::read_dir(&conf_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(conflists.len(), 1, "{conflists:?}");
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conflists[0]).unwrap()).unwrap();
    let cm = bundle
        .config_map(&ns, "sluice-config")
        .unwrap()
        .data
        .clone()
        .unwrap();
    let sluice = &conflist["plugins"][0];
    assert_eq!(sluice["type"], "sluice");
    assert_eq!(sluice["ipam"]["nodeName"], NODE);
    assert_eq!(sluice["ipam"]["pool"], cm["pool"].as_str());
    assert_eq!(sluice["ipam"]["blockSize"].to_string(), cm["block-size"]);
    assert_eq!(sluice["mtu"].to_string(), cm["mtu"]);
    assert_eq!(
        sluice["requireAgent"], true,
        "pods wait for the agent in a cluster"
    );
    // The files the conflist points the plugins at are the ones the agent container
    // (configured by the same manifests) writes, as the IPAM plugin's own config
    // code resolves them.
    let Configs {
        run: agent,
        run_files: files,
        ..
    } = configs_from_manifests();
    assert_eq!(sluice["mtuFile"], files.mtu_file.display().to_string());
    assert_eq!(
        sluice["agentStatusFile"],
        files.status_file.display().to_string()
    );
    let ipam: sluice_ipam::IpamConfig = serde_json::from_value(sluice["ipam"].clone()).unwrap();
    let ipam = ipam
        .resolve(None, || None)
        .expect("the ipam section resolves");
    assert_eq!(ipam.node, agent.node_name);
    assert_eq!(ipam.state_dir, files.ipam_state_dir);
    assert_eq!(
        ipam.source,
        sluice_ipam::config::BlockSource::NodeBlocksFile(files.node_blocks_file.clone()),
        "in a cluster the IPAM plugin reads the blocks the agent publishes"
    );
    assert_eq!(ipam.pool.cidr(), agent.pool);
    assert_eq!(ipam.pool.block_prefix(), agent.block_size);
    use std::os::unix::fs::PermissionsExt;
    let mut plugin_types: Vec<String> = conflist["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect();
    plugin_types.push(sluice["ipam"]["type"].as_str().unwrap().to_string());
    for t in plugin_types.iter().filter(|t| *t != "portmap") {
        let meta =
            std::fs::metadata(bin_dir.join(t)).unwrap_or_else(|_| panic!("{t} not installed"));
        assert_eq!(
            meta.permissions().mode() & 0o111,
            0o111,
            "{t} is executable"
        );
    }
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before: Vec<_> = [
        &conflists[0],
        &bin_dir.join("sluice"),
        &bin_dir.join("sluice-ipam"),
    ]
    .iter()
    .map(|p| stamp(p))
    .collect();
    std::thread::sleep(Duration::from_millis(20));
    run();
    let after: Vec<_> = [
        &conflists[0],
        &bin_dir.join("sluice"),
        &bin_dir.join("sluice-ipam"),
    ]
    .iter()
    .map(|p| stamp(p))
    .collect();
    assert_eq!(before, after, "a second run rewrites nothing");
}

/// Every program the agent executes is in the runtime image: both iptables
/// backends' save/restore tools (the agent picks one per host) and every literal
/// program the code hands to its command runner.
#[test]
fn the_image_carries_every_tool_the_agent_executes() {
    use sluice_agent::dataplane::Backend;
    let mut programs: BTreeSet<String> = [Backend::Legacy, Backend::Nft]
        .iter()
        .flat_map(|b| [b.save_cmd(), b.restore_cmd()])
        .map(String::from)
        .collect();
    for (path, text) in rust_sources(&repo_root().join("node-agent/src")) {
        let code = non_test(&text);
        for call in ["run_ok(\"", ".run(\""] {
            for (i, _) in code.match_indices(call) {
                let program: String = code[i + call.len()..]
                    .chars()
                    .take_while(|c| *c != '"')
                    .collect();
                assert!(!program.is_empty(), "{}", path.display());
                programs.insert(program);
            }
        }
    }
    assert!(
        programs.contains("ipset"),
        "the scan found the ipset calls: {programs:?}"
    );
    // Which Debian package provides each program.
    let package_of = |program: &str| match program {
        p if p.starts_with("iptables") || p.starts_with("ip6tables") => "iptables",
        "ipset" => "ipset",
        "nft" => "nftables",
        "ip" | "bridge" | "tc" => "iproute2",
        "modprobe" => "kmod",
        "conntrack" => "conntrack",
        other => {
            panic!("the agent runs `{other}`: add its Debian package here and to the Dockerfile")
        }
    };
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile.split("\nFROM ").last().expect("a runtime stage");
    let installed: BTreeSet<&str> = runtime
        .lines()
        .skip_while(|l| !l.contains("apt-get install"))
        .take_while(|l| l.trim_end().ends_with('\\') || l.contains("apt-get install"))
        .flat_map(|l| l.split_whitespace())
        .filter(|w| {
            w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
        .collect();
    for program in &programs {
        let package = package_of(program);
        assert!(
            installed.contains(package),
            "the runtime image lacks {package} (for `{program}`); it installs {installed:?}"
        );
    }
}
