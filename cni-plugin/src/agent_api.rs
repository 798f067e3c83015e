//! The plugin's side of the node-local API (`sluice_node_files::local_api`): ask the
//! agent for the pod's address annotations before IPAM, report the attachment after
//! ADD and its removal after DEL. Every call is bounded; an agent that is down or slow
//! never fails ADD or DEL (the pod then stays fail-closed until the agent learns of
//! it from its datastore).

use std::net::Ipv4Addr;
use std::time::Duration;

use sluice_netlink::Netlink;
use sluice_node_files::local_api::{
    self, AddressAnnotations, Attachment, Detachment, POD_ANNOTATIONS_CAPABILITY, Request,
    RequestedAddress, Response,
};

use crate::commands::Ctx;
use crate::error::PluginError;
use crate::log::log;

/// The deadline of a report (connect + write + read).
pub const REPORT_TIMEOUT: Duration = local_api::DEFAULT_TIMEOUT;
/// The deadline of the annotation lookup: longer than a report's, because a missed
/// answer gives the pod an address it did not ask for, and longer than the agent's
/// own wait for a pod its datastore has not delivered yet (1 s,
/// `sluice_agent::local_api::POD_LOOKUP_WAIT`): a runtime may start the sandbox a
/// moment before the agent's watch sees the pod. An agent that is down answers at
/// once (connection refused); one that hangs holds ADD up this long at most.
pub const ANNOTATIONS_TIMEOUT: Duration = Duration::from_millis(1500);

/// The pod's namespace and name from `CNI_ARGS` (Kubernetes runtimes send them).
fn pod(ctx: &Ctx<'_>) -> Option<(String, String)> {
    Some((
        ctx.env.args.k8s_pod_namespace.clone()?,
        ctx.env.args.k8s_pod_name.clone()?,
    ))
}

/// The address the pod's annotations ask for. The runtime's copy of the annotations
/// (`runtimeConfig["io.kubernetes.cri.pod-annotations"]`, from containerd's and
/// CRI-O's CRI) decides when it is there; otherwise the agent is asked. Without
/// Kubernetes pod arguments, or when the agent cannot answer, nothing is requested
/// (logged): the plugin holds no API credentials of its own.
pub fn requested_address(ctx: &Ctx<'_>) -> Result<Option<RequestedAddress>, PluginError> {
    if let Some(annotations) = ctx.conf.runtime_config.get(POD_ANNOTATIONS_CAPABILITY) {
        return from_runtime(annotations);
    }
    let Some((namespace, name)) = pod(ctx) else {
        return Ok(None);
    };
    let req = Request::PodAnnotations {
        namespace: namespace.clone(),
        name: name.clone(),
    };
    match local_api::call(&ctx.plugin.agent_socket, &req, ANNOTATIONS_TIMEOUT) {
        Ok(Response::Annotations {
            known: true,
            ip_addrs,
            ip_addrs_no_ipam,
        }) => Ok(AddressAnnotations {
            ip_addrs,
            ip_addrs_no_ipam,
        }
        .requested()?),
        Ok(Response::Annotations { known: false, .. }) => {
            log!(
                "the agent does not know pod {namespace}/{name} yet; no address annotation applied"
            );
            Ok(None)
        }
        Ok(other) => {
            log!("agent answered {other:?} to an annotation lookup; no address annotation applied");
            Ok(None)
        }
        Err(e) => {
            log!("{e}; no address annotation applied");
            Ok(None)
        }
    }
}

/// The address the runtime's copy of the pod's annotations asks for (pure). It is
/// the pod's own as the sandbox is created, so it is taken as it stands: no
/// annotation there means none asked for, and the agent is not asked again.
/// containerd 1.6 sends `null` for a sandbox without annotations.
fn from_runtime(annotations: &serde_json::Value) -> Result<Option<RequestedAddress>, PluginError> {
    if annotations.is_null() {
        return Ok(None);
    }
    if !annotations.is_object() {
        return Err(PluginError::Config(format!(
            "runtimeConfig[\"{POD_ANNOTATIONS_CAPABILITY}\"] must be an object of pod annotations, not {annotations}"
        )));
    }
    Ok(AddressAnnotations::from_metadata(annotations)
        .map(|a| a.requested())
        .transpose()?
        .flatten())
}

/// Refuse a no-IPAM address this node already uses: a host address (the tunnel
/// device's, the node's own) or a /32 already routed to a pod, which is what every
/// wired IPAM allocation and every other pod has.
pub fn check_no_ipam(host: &mut Netlink, address: Ipv4Addr) -> Result<(), PluginError> {
    let held_by_host = host
        .all_addresses()?
        .iter()
        .any(|a| a.net.addr() == std::net::IpAddr::V4(address));
    if held_by_host {
        return Err(PluginError::NoIpamCollides {
            address,
            holder: "an address of this node (its tunnel device or an interface)".into(),
        });
    }
    let routed = host
        .routes4()?
        .iter()
        .any(|r| r.dst.prefix_len() == 32 && r.dst.addr() == address && r.oif.is_some());
    if routed {
        return Err(PluginError::NoIpamCollides {
            address,
            holder: "another pod on this node (IPAM or no-IPAM); its /32 route exists".into(),
        });
    }
    Ok(())
}

/// Refuse a no-IPAM address that this node's in-process IPAM has handed out (to a
/// pod not wired yet, or wired under another network). A delegated IPAM plugin
/// keeps its own books; only the route check above covers it.
pub fn check_no_ipam_allocations(
    ipam: Option<&crate::ipam::Ipam>,
    address: Ipv4Addr,
) -> Result<(), PluginError> {
    let Some(crate::ipam::Ipam::InProcess(node)) = ipam else {
        return Ok(());
    };
    let held = node
        .snapshot()
        .map_err(|e| PluginError::Cni(sluice_ipam::cni::cni_error(e)))?;
    match held.allocations().find(|a| a.ip == address) {
        Some(a) => Err(PluginError::NoIpamCollides {
            address,
            holder: format!(
                "an IPAM allocation on this node (container {}, interface {})",
                a.key.container_id, a.key.ifname
            ),
        }),
        None => Ok(()),
    }
}

/// ADD wired the pod: tell the agent, best effort.
pub fn report_attachment(ctx: &Ctx<'_>, host_ifname: &str, address: Ipv4Addr, no_ipam: bool) {
    let Some((namespace, name)) = pod(ctx) else {
        return;
    };
    let req = Request::ReportAttachment(Attachment {
        namespace,
        name,
        container_id: ctx.env.container_id().to_owned(),
        ifname: ctx.env.ifname().to_owned(),
        host_ifname: host_ifname.to_owned(),
        address,
        no_ipam,
    });
    send(ctx, &req);
}

/// DEL removed the attachment: tell the agent, best effort.
pub fn report_detachment(ctx: &Ctx<'_>) {
    let Some((namespace, name)) = pod(ctx) else {
        return;
    };
    let req = Request::ReportDetachment(Detachment {
        namespace,
        name,
        container_id: ctx.env.container_id().to_owned(),
        ifname: ctx.env.ifname().to_owned(),
    });
    send(ctx, &req);
}

fn send(ctx: &Ctx<'_>, req: &Request) {
    match local_api::call(&ctx.plugin.agent_socket, req, REPORT_TIMEOUT) {
        Ok(Response::Ok) => {}
        Ok(other) => log!("agent answered {other:?} to a report"),
        Err(e) => log!("{e}; the agent learns of this pod from its datastore"),
    }
}

/// What IPAM would have returned for a no-IPAM address: the address alone, as /32.
pub fn no_ipam_result(address: Ipv4Addr) -> sluice_cni::protocol::CniResult {
    let v =
        serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{address}/32")}]});
    sluice_cni::protocol::CniResult::parse(&v).expect("a one-address result parses")
}

/// A no-IPAM address is the attachment's only address: a runtime request for
/// another one (`runtimeConfig.ips`, `IP=`) cannot also be honoured (code 115).
pub fn no_ipam_alone(address: Ipv4Addr, requested: &[Ipv4Addr]) -> Result<(), PluginError> {
    if requested.iter().all(|r| *r == address) {
        return Ok(());
    }
    Err(PluginError::Cni(sluice_cni::protocol::CniError::new(
        sluice_cni::protocol::ErrorCode::RequestedAddressInvalid,
        format!(
            "the pod's {} annotation asks for {address}, the runtime for {}; an attachment has one address",
            sluice_node_files::local_api::ANNOTATION_IP_ADDRS_NO_IPAM,
            requested
                .iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtimes_copy_of_the_annotations_decides_what_is_requested() {
        let ask = |v: serde_json::Value| from_runtime(&v);
        assert_eq!(ask(serde_json::json!({})).unwrap(), None);
        // containerd 1.6, for a sandbox without annotations (the CRI suite saw it).
        assert_eq!(ask(serde_json::Value::Null).unwrap(), None);
        assert_eq!(
            ask(serde_json::json!({"kubernetes.io/config.seen": "x"})).unwrap(),
            None
        );
        assert_eq!(
            ask(serde_json::json!({"sluice.dev/ip-addrs": "[\"10.244.1.9\"]"})).unwrap(),
            Some(RequestedAddress::Ipam("10.244.1.9".parse().unwrap()))
        );
        assert_eq!(
            ask(serde_json::json!({"sluice.dev/ip-addrs-no-ipam": "[\"192.0.2.7\"]"})).unwrap(),
            Some(RequestedAddress::NoIpam("192.0.2.7".parse().unwrap()))
        );
        let code = |v: serde_json::Value| {
            ask(v)
                .map(|_| ())
                .map_err(|e| sluice_cni::protocol::CniError::from(e).code)
                .unwrap_err()
        };
        assert_eq!(
            code(serde_json::json!({"sluice.dev/ip-addrs": "10.244.1.9"})),
            sluice_cni::protocol::ErrorCode::AddressAnnotationInvalid.code()
        );
        assert_eq!(
            code(serde_json::json!({
                "sluice.dev/ip-addrs": "[\"10.244.1.9\"]",
                "sluice.dev/ip-addrs-no-ipam": "[\"192.0.2.7\"]"
            })),
            sluice_cni::protocol::ErrorCode::AddressAnnotationInvalid.code()
        );
        assert_eq!(
            code(serde_json::json!(["sluice.dev/ip-addrs"])),
            sluice_cni::protocol::ErrorCode::InvalidNetworkConfig.code()
        );
    }

    #[test]
    fn a_no_ipam_address_and_another_runtime_request_are_refused() {
        let a: Ipv4Addr = "192.0.2.7".parse().unwrap();
        assert!(no_ipam_alone(a, &[]).is_ok());
        assert!(no_ipam_alone(a, &[a]).is_ok());
        let e: sluice_cni::protocol::CniError = no_ipam_alone(a, &["10.0.0.1".parse().unwrap()])
            .unwrap_err()
            .into();
        assert_eq!(e.code, 115);
    }

    #[test]
    fn a_no_ipam_address_is_a_result_with_that_address_alone() {
        let r = no_ipam_result("192.0.2.9".parse().unwrap());
        assert_eq!(
            crate::wiring::pod_address(&r),
            Some("192.0.2.9/32".parse().unwrap())
        );
        assert!(r.routes.is_empty());
    }
}
