//! The install manifests (`manifests/`), parsed strictly into k8s-openapi types and
//! cross-checked against each other: the bundle is its parts, the DaemonSet's
//! ServiceAccount exists and is bound, every ConfigMap key is read and every key
//! read exists, the DaemonSet has the shape a node network plugin needs.
//! What the manifests must agree on with the agent's code (flags, env, ports,
//! API access) is checked in `manifests_agent.rs`.

mod manifests_common;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use manifests_common::{
    Bundle, Document, Object, daemonset_spec, documents, documents_of_file, parse_object, read,
    strict, yaml_files_under,
};

/// The parts `make manifests` concatenates into `manifests/sluice.yaml`, in apply
/// order (the Makefile's `MANIFEST_PARTS`): CRDs first, then identity, settings, and
/// the DaemonSet that names them.
fn bundle_parts() -> Vec<String> {
    let mut parts = yaml_files_under("manifests/crds");
    parts.extend(
        [
            "manifests/rbac.yaml",
            "manifests/config.yaml",
            "manifests/daemonset.yaml",
        ]
        .map(String::from),
    );
    parts
}

fn pod_spec(bundle: &Bundle) -> PodSpec {
    manifests_common::pod_spec(bundle.daemonset())
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

#[test]
fn every_manifest_parses_strictly_into_kubernetes_types() {
    let mut files = yaml_files_under("manifests");
    files.extend(yaml_files_under("tests/kind"));
    let mut errors = Vec::new();
    let mut parsed = 0;
    for file in &files {
        for doc in documents_of_file(file) {
            // kind's own cluster config is not a Kubernetes object; manifests_kind.rs
            // checks it.
            if doc.value["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("kind.x-k8s.io/"))
            {
                continue;
            }
            match parse_object(&doc) {
                Ok(_) => parsed += 1,
                Err(e) => errors.push(e),
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(parsed >= 6, "only {parsed} objects found in {files:?}");
}

/// The detector itself: a misspelt field, a field one level too deep and a value of
/// the wrong type must each be reported, or the test above proves nothing.
#[test]
fn strict_parsing_rejects_unknown_misplaced_and_mistyped_fields() {
    let good = documents_of_file("manifests/daemonset.yaml").remove(0);
    let ok: Result<k8s_openapi::api::apps::v1::DaemonSet, _> = strict(&good);
    ok.expect("the real DaemonSet parses");

    let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut doc = good.clone();
        f(&mut doc.value);
        strict::<k8s_openapi::api::apps::v1::DaemonSet>(&Document {
            origin: "mutated".into(),
            value: doc.value,
        })
    };
    let misspelt = mutate(&|v| {
        v["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = serde_json::json!({});
    });
    assert!(
        misspelt
            .as_ref()
            .is_err_and(|e| e.contains("readinesProbe")),
        "{misspelt:?}"
    );
    let misplaced = mutate(&|v| {
        v["spec"]["tolerations"] = serde_json::json!([{"operator": "Exists"}]);
    });
    assert!(
        misplaced
            .as_ref()
            .is_err_and(|e| e.contains(".spec.tolerations")),
        "{misplaced:?}"
    );
    let mistyped = mutate(&|v| {
        v["spec"]["template"]["spec"]["hostNetwork"] = serde_json::json!("yes");
    });
    assert!(mistyped.is_err(), "{mistyped:?}");
}

#[test]
fn sluice_yaml_is_its_parts_in_apply_order() {
    let bundle: Vec<_> = documents_of_file("manifests/sluice.yaml")
        .into_iter()
        .map(|d| d.value)
        .collect();
    let parts: Vec<_> = bundle_parts()
        .iter()
        .flat_map(|p| documents(p, &read(p)))
        .map(|d| d.value)
        .collect();
    assert!(
        bundle == parts,
        "manifests/sluice.yaml is out of date with {:?}: run `make manifests`",
        bundle_parts()
    );
}

#[test]
fn the_bundle_installs_the_ipam_block_crd() {
    let bundle = Bundle::load();
    let crd = bundle
        .crds()
        .find(|c| c.spec.names.kind == "IPAMBlock")
        .expect("sluice.yaml installs the IPAMBlock CRD (manifests/crds/)");
    assert_eq!(crd.spec.group, "sluice.dev");
    assert_eq!(
        crd.spec.scope, "Cluster",
        "blocks belong to nodes, not namespaces"
    );
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some(format!("{}.{}", crd.spec.names.plural, crd.spec.group).as_str()),
        "a CRD's name must be <plural>.<group> or the API server rejects it"
    );
    assert!(
        crd.spec.versions.iter().filter(|v| v.storage).count() == 1,
        "exactly one storage version"
    );
}

#[test]
fn daemonset_service_account_exists_and_is_bound_to_its_cluster_role() {
    let bundle = Bundle::load();
    let ds = bundle.daemonset();
    let namespace = ds.metadata.namespace.as_deref().expect("namespaced");
    let sa_name = pod_spec(&bundle)
        .service_account_name
        .expect("the DaemonSet names its ServiceAccount");
    let sa_name = sa_name.as_str();
    assert!(
        bundle.service_accounts().any(|sa| {
            sa.metadata.name.as_deref() == Some(sa_name)
                && sa.metadata.namespace.as_deref() == Some(namespace)
        }),
        "ServiceAccount {namespace}/{sa_name} is not in the bundle"
    );
    let binding = bundle
        .cluster_role_bindings()
        .find(|b| {
            b.subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == sa_name
                    && s.namespace.as_deref() == Some(namespace)
            })
        })
        .expect("a ClusterRoleBinding binds the agent's ServiceAccount");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    // Through JSON: RoleRef.apiGroup is required in some k8s-openapi versions only.
    assert_eq!(
        serde_json::to_value(&binding.role_ref).unwrap()["apiGroup"],
        "rbac.authorization.k8s.io"
    );
    assert!(
        bundle
            .cluster_roles()
            .any(|r| r.metadata.name.as_deref() == Some(binding.role_ref.name.as_str())),
        "ClusterRole {} is not in the bundle",
        binding.role_ref.name
    );
}

#[test]
fn configmap_keys_are_exactly_the_keys_the_containers_read() {
    let bundle = Bundle::load();
    let namespace = bundle.daemonset().metadata.namespace.clone().unwrap();
    let mut read_keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for container in all_containers(&pod_spec(&bundle)) {
        for env in container.env.iter().flatten() {
            if let Some(r) = env
                .value_from
                .as_ref()
                .and_then(|v| v.config_map_key_ref.as_ref())
            {
                assert_ne!(
                    r.optional,
                    Some(true),
                    "{}: settings are not optional",
                    env.name
                );
                read_keys
                    .entry(r.name.clone())
                    .or_default()
                    .insert(r.key.clone());
            }
        }
        assert!(
            container.env_from.is_none(),
            "{}: envFrom hides which keys are read; name each variable",
            container.name
        );
    }
    assert!(
        !read_keys.is_empty(),
        "the agent reads its settings from a ConfigMap"
    );
    for (name, keys) in &read_keys {
        let cm = bundle
            .config_map(&namespace, name)
            .unwrap_or_else(|| panic!("ConfigMap {namespace}/{name} is not in the bundle"));
        let present: BTreeSet<String> = cm.data.iter().flatten().map(|(k, _)| k.clone()).collect();
        let missing: Vec<_> = keys.difference(&present).collect();
        let unread: Vec<_> = present.difference(keys).collect();
        assert!(
            missing.is_empty(),
            "{name}: keys read but missing: {missing:?}"
        );
        assert!(unread.is_empty(), "{name}: keys nobody reads: {unread:?}");
    }
}

#[test]
fn daemonset_runs_on_every_node_before_the_network_exists() {
    let bundle = Bundle::load();
    let spec = pod_spec(&bundle);
    assert_eq!(
        spec.host_network,
        Some(true),
        "the agent programs the node's network"
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // Control planes carry NoSchedule taints and NotReady nodes NoExecute ones; the
    // agent is what makes a node Ready, so it must tolerate both, whatever the key.
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            tolerations
                .iter()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && t.key.is_none()
                    && t.effect.as_deref() == Some(effect)),
            "no toleration of every {effect} taint"
        );
    }
    assert!(
        spec.node_selector.is_none() && spec.affinity.is_none(),
        "runs on every node"
    );
    let ds_spec = daemonset_spec(bundle.daemonset());
    let selector = ds_spec.selector.match_labels.clone().unwrap_or_default();
    let labels = ds_spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the selector {selector:?} must match the template labels {labels:?}"
    );
}

/// Named capabilities, never `privileged`, and each capability with a reason.
#[test]
fn containers_get_named_capabilities_not_privileged() {
    // Why each is needed (keep in step with the comment at the top of daemonset.yaml).
    let allowed: BTreeMap<&str, &str> = BTreeMap::from([
        ("NET_ADMIN", "links, addresses, routes, iptables and ipset"),
        ("NET_RAW", "iptables opens raw sockets"),
    ]);
    let bundle = Bundle::load();
    for c in all_containers(&pod_spec(&bundle)) {
        let sc = c.security_context.clone().unwrap_or_default();
        assert_ne!(sc.privileged, Some(true), "{}: privileged", c.name);
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{}: no setuid escalation needed",
            c.name
        );
        for cap in sc.capabilities.iter().flat_map(|c| c.add.iter().flatten()) {
            assert!(
                allowed.contains_key(cap.as_str()),
                "{}: capability {cap} has no recorded reason",
                c.name
            );
        }
    }
    let agent = &pod_spec(&bundle).containers[0];
    let caps: BTreeSet<&str> = agent
        .security_context
        .iter()
        .flat_map(|s| s.capabilities.iter())
        .flat_map(|c| c.add.iter().flatten())
        .map(String::as_str)
        .collect();
    assert!(
        caps.contains("NET_ADMIN") && caps.contains("NET_RAW"),
        "{caps:?}"
    );
}

/// The host paths the issue and docs/node-files.md name are mounted, and shared
/// files are mounted at the same path inside the container, so the agent's
/// defaults and the conflist's defaults name the same file.
#[test]
fn host_mounts_cover_the_node_files() {
    let bundle = Bundle::load();
    let spec = pod_spec(&bundle);
    let host_paths: BTreeMap<String, String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    let mounts = |c: &Container| -> BTreeMap<String, (String, bool)> {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| {
                let host = host_paths
                    .get(&m.name)
                    .unwrap_or_else(|| panic!("{}: volume {} is not a hostPath", c.name, m.name));
                (
                    host.clone(),
                    (m.mount_path.clone(), m.read_only == Some(true)),
                )
            })
            .collect()
    };
    let agent = mounts(&spec.containers[0]);
    for same_path in ["/var/lib/sluice", "/run/sluice", "/run/xtables.lock"] {
        let (inside, ro) = agent
            .get(same_path)
            .unwrap_or_else(|| panic!("agent: host {same_path} is not mounted"));
        assert_eq!(inside, same_path, "agent: {same_path} mounted elsewhere");
        assert!(!ro, "agent writes {same_path}");
    }
    assert_eq!(
        agent.get("/lib/modules"),
        Some(&("/lib/modules".to_string(), true)),
        "/lib/modules read-only"
    );
    let install = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "install-cni")
        .expect("an install-cni init container");
    let install_mounts = mounts(install);
    for host in ["/opt/cni/bin", "/etc/cni/net.d"] {
        assert!(
            install_mounts.get(host).is_some_and(|(_, ro)| !ro),
            "install-cni writes host {host}"
        );
    }
}

#[test]
fn node_name_comes_from_the_downward_api() {
    let bundle = Bundle::load();
    for c in all_containers(&pod_spec(&bundle)) {
        let from_node_name = c.env.iter().flatten().any(|e| {
            e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .is_some_and(|f| f.field_path == "spec.nodeName")
        });
        assert!(
            from_node_name,
            "{}: node name not from spec.nodeName",
            c.name
        );
    }
}

#[test]
fn every_container_runs_the_image_make_builds() {
    let makefile = read("Makefile");
    let default_image = makefile
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE ?= "))
        .expect("the Makefile sets a default IMAGE")
        .trim();
    assert_eq!(
        default_image,
        format!("sluice:{}", env!("CARGO_PKG_VERSION")),
        "the image tag follows the workspace version"
    );
    let bundle = Bundle::load();
    for c in all_containers(&pod_spec(&bundle)) {
        assert_eq!(c.image.as_deref(), Some(default_image), "{}", c.name);
        // A locally built image (kind load, or a node's own registry mirror) must
        // not be looked up in a registry first.
        assert_eq!(
            c.image_pull_policy.as_deref(),
            Some("IfNotPresent"),
            "{}",
            c.name
        );
    }
}

#[test]
fn the_agent_has_resource_requests_and_probes() {
    let bundle = Bundle::load();
    let agent = &pod_spec(&bundle).containers[0];
    let requests = agent
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    // A CPU limit would throttle the agent exactly when churn needs it.
    let limits = agent
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert!(
        !limits.contains_key("cpu"),
        "no CPU limit on the node agent"
    );
    assert!(
        agent
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .is_some()
    );
    assert!(
        agent
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .is_some()
    );
}

/// Keeps `Object` exhaustively used so a new kind gets a conscious decision here.
#[test]
fn the_bundle_holds_only_install_objects() {
    for o in Bundle::load().objects {
        match o {
            Object::CustomResourceDefinition(_)
            | Object::ServiceAccount(_)
            | Object::ClusterRole(_)
            | Object::ClusterRoleBinding(_)
            | Object::ConfigMap(_)
            | Object::DaemonSet(_) => {}
            Object::Namespace(_)
            | Object::Pod(_)
            | Object::Deployment(_)
            | Object::Service(_)
            | Object::NetworkPolicy(_) => panic!("workload objects belong in tests/kind"),
        }
    }
}
