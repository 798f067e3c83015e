//! Exec'ing the node's CNI plugin chain the way kubelet's runtime (libcni) does: each
//! plugin of the conflist gets its entry with `name` and `cniVersion` injected, ADD
//! passes each result on as the next plugin's `prevResult`, DEL runs the chain in
//! reverse with the cached result, and the environment carries kubelet's CNI_ARGS.
//! The plugins run inside the node's namespace, as they would on a real node.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use serde_json::{Value, json};

use super::state::NodeState;
use super::topology::{cni_bin_dir, conflist_path};
use super::{LabError, netns};

/// What the runtime knows about a pod sandbox.
pub struct Sandbox<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub container_id: &'a str,
    pub netns_path: &'a Path,
}

/// kubelet's (dockershim/CRI) CNI_ARGS.
pub fn cni_args(sb: &Sandbox<'_>) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        sb.namespace, sb.name, sb.container_id, sb.uid
    )
}

fn cache_file(node: &NodeState, container_id: &str) -> std::path::PathBuf {
    node.root
        .join("var/lib/cni/results")
        .join(format!("k8s-pod-network-{container_id}-eth0"))
}

fn load_conflist(node: &NodeState) -> Result<Value, LabError> {
    let p = conflist_path(&node.root);
    let text = std::fs::read_to_string(&p).map_err(|e| LabError::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| LabError::CorruptState(p, e.to_string()))
}

/// One plugin exec; returns its stdout (the result, or nothing for DEL).
fn exec_plugin(
    node: &NodeState,
    command: &str,
    sb: &Sandbox<'_>,
    conf: &Value,
) -> Result<Value, LabError> {
    let ty = conf["type"].as_str().unwrap_or_default();
    let bin_dir = cni_bin_dir(&node.root);
    let pod = format!("{}/{}", sb.namespace, sb.name);
    let cni_err = |message: String| LabError::Cni {
        command: command.to_string(),
        pod: pod.clone(),
        message,
    };
    let mut child = netns::command_in(&node.netns, bin_dir.join(ty))?
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sb.container_id)
        .env("CNI_NETNS", sb.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", cni_args(sb))
        .env("CNI_PATH", &bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Spawn(format!("CNI plugin {ty}"), e))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(conf.to_string().as_bytes())
        .map_err(|e| LabError::Spawn(format!("CNI plugin {ty}"), e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::Spawn(format!("CNI plugin {ty}"), e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let msg = serde_json::from_str::<Value>(&stdout)
            .ok()
            .map(|v| {
                format!(
                    "{ty}: code {} {} {}",
                    v["code"],
                    v["msg"].as_str().unwrap_or_default(),
                    v["details"].as_str().unwrap_or_default()
                )
            })
            .unwrap_or_else(|| {
                format!(
                    "{ty} exited {}: {}{}",
                    out.status,
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            });
        return Err(cni_err(msg));
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).map_err(|e| cni_err(format!("{ty} printed invalid JSON: {e}")))
}

fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    if let Some(prev) = prev.filter(|p| !p.is_null()) {
        conf["prevResult"] = prev.clone();
    }
    conf
}

/// CNI ADD through the whole chain; returns the final result and caches it for DEL.
pub fn add(node: &NodeState, sb: &Sandbox<'_>) -> Result<Value, LabError> {
    let list = load_conflist(node)?;
    let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
    let mut prev: Option<Value> = None;
    for (i, p) in plugins.iter().enumerate() {
        match exec_plugin(node, "ADD", sb, &plugin_conf(&list, p, prev.as_ref())) {
            Ok(r) => prev = Some(r),
            Err(e) => {
                // libcni: a failed ADD is followed by DEL of what already ran.
                for q in plugins[..=i].iter().rev() {
                    let _ = exec_plugin(node, "DEL", sb, &plugin_conf(&list, q, prev.as_ref()));
                }
                return Err(e);
            }
        }
    }
    let result = prev.unwrap_or(Value::Null);
    let cache = cache_file(node, sb.container_id);
    if let Some(d) = cache.parent() {
        std::fs::create_dir_all(d).map_err(|e| LabError::io(d, e))?;
    }
    super::state::write_atomic(
        &cache,
        json!({"kind": "cniCacheV1", "result": result})
            .to_string()
            .as_bytes(),
    )?;
    Ok(result)
}

/// CNI DEL through the chain in reverse, with the cached result as prevResult.
/// Every plugin is called even when one fails; the first error is returned.
pub fn del(node: &NodeState, sb: &Sandbox<'_>) -> Result<(), LabError> {
    let list = load_conflist(node)?;
    let cache = cache_file(node, sb.container_id);
    let prev = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map(|v| v["result"].clone());
    let mut first_err = None;
    for p in list["plugins"].as_array().into_iter().flatten().rev() {
        if let Err(e) = exec_plugin(node, "DEL", sb, &plugin_conf(&list, p, prev.as_ref())) {
            first_err.get_or_insert(e);
        }
    }
    let _ = std::fs::remove_file(&cache);
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The pod's IPv4 address from a CNI result (`ips[].address`, e.g. `10.244.1.2/32`).
pub fn result_ipv4(result: &Value) -> Option<std::net::Ipv4Addr> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_carry_kubelets_keys() {
        let p = Path::new("/run/netns/x");
        let sb = Sandbox {
            namespace: "x",
            name: "a",
            uid: "u-1",
            container_id: "c0ffee",
            netns_path: p,
        };
        assert_eq!(
            cni_args(&sb),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u-1"
        );
    }

    #[test]
    fn chained_plugins_get_name_version_and_the_previous_result() {
        let list = json!({"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "a"}, {"type": "b"}]});
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.0.5/32"}]});
        let c = plugin_conf(&list, &list["plugins"][1], Some(&prev));
        assert_eq!(c["name"], "net");
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["type"], "b");
        assert_eq!(
            result_ipv4(&c["prevResult"]),
            Some("10.244.0.5".parse().unwrap())
        );
        assert!(
            plugin_conf(&list, &list["plugins"][0], None)
                .get("prevResult")
                .is_none()
        );
    }
}
