//! The node's tunnel device: `tunl0` (IPIP), `sluice.vxlan` (VXLAN) or none.
//!
//! Reconcile calls, once the node's own block and uplink are known:
//! ```ignore
//! let uplink = mtu::detect_uplink(&netlink, Some(node_ip)).await?;
//! let spec = TunnelSpec::new(encap, node_ip, routes::tunnel_address(&own_blocks)?, &uplink);
//! let state = tunnel::ensure(&netlink, &spec).await?;   // TunnelError::Unsupported: not fatal,
//!                                                      // report unready, retry later
//! mtu::write_mtu_file(mtu_file, state.mtu)?;
//! routes::sync(&netlink, &routes::desired(node, &blocks, &state.route_encap())).await?;
//! ```
//!
//! - `ipip` (default): the kernel's fallback device `tunl0`, which exists in every
//!   namespace once the `ipip` module is loaded. If it is missing we ask for it with
//!   `ip link add tunl0 type ipip` (the kernel autoloads the module where it can); a kernel
//!   without IPIP yields [`TunnelError::Unsupported`], a clear and retryable error rather
//!   than a crash loop. Address: the tunnel address /32; MTU: uplink − 20; up.
//! - `vxlan`: a device [`VXLAN_DEVICE`] with VNI [`DEFAULT_VXLAN_VNI`] on UDP port
//!   [`DEFAULT_VXLAN_PORT`] (both configurable; 4789 is avoided because Flannel, Cilium,
//!   Calico and VMware's overlays all default to it and one port can hold one VXLAN
//!   socket per VNI space), `local <node IP>`, bound to the uplink, learning off; MAC
//!   [`vtep_mac`]`(node IP)`, so peers compute each other's MACs and nothing is published;
//!   address: the tunnel address /32; MTU: uplink − 50; up.
//! - `none`: no device; routes point at the other nodes directly (same L2 segment).
//!
//! The device-level decisions ([`link_actions`]) are pure; the kernel sits behind
//! [`LinkTable`], implemented by [`crate::kernel::Netlink`].

use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use crate::kernel::IPIP_DEVICE;
use crate::kernel::{KernelError, LinkKind, LinkState, LinkTable, Uplink, VxlanParams};
/// sluice's VXLAN device (a name no other CNI uses: Flannel `flannel.1`, Calico
/// `vxlan.calico`, Cilium `cilium_vxlan`).
pub const VXLAN_DEVICE: &str = "sluice.vxlan";
/// Default VNI: any fixed value works; every node of a cluster must agree.
pub const DEFAULT_VXLAN_VNI: u32 = 4181;
/// Default VXLAN UDP port (not 4789, see the module docs; IANA-unassigned).
pub const DEFAULT_VXLAN_PORT: u16 = 4799;

/// How pod traffic crosses between nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encapsulation {
    #[default]
    Ipip,
    Vxlan,
    None,
}

impl Encapsulation {
    /// Bytes of outer headers: IPv4 (20) for IPIP; IPv4 + UDP + VXLAN + inner Ethernet
    /// (20 + 8 + 8 + 14 = 50) for VXLAN.
    pub fn overhead(self) -> u32 {
        match self {
            Encapsulation::Ipip => 20,
            Encapsulation::Vxlan => 50,
            Encapsulation::None => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encapsulation::Ipip => "ipip",
            Encapsulation::Vxlan => "vxlan",
            Encapsulation::None => "none",
        }
    }
}

impl std::fmt::Display for Encapsulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown encapsulation {0:?} (expected ipip, vxlan or none)")]
pub struct UnknownEncapsulation(pub String);

impl FromStr for Encapsulation {
    type Err = UnknownEncapsulation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ipip" | "IPIP" => Ok(Encapsulation::Ipip),
            "vxlan" | "VXLAN" => Ok(Encapsulation::Vxlan),
            "none" | "None" => Ok(Encapsulation::None),
            other => Err(UnknownEncapsulation(other.to_string())),
        }
    }
}

/// VXLAN parameters (cluster-wide: every node must use the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanSettings {
    pub vni: u32,
    pub port: u16,
}

impl Default for VxlanSettings {
    fn default() -> Self {
        VxlanSettings {
            vni: DEFAULT_VXLAN_VNI,
            port: DEFAULT_VXLAN_PORT,
        }
    }
}

/// The VTEP MAC of a node: locally administered, unicast (`0e:5c` — the low two bits
/// of the first octet are 1 and 0) followed by the node's IPv4 address. Every node
/// derives its peers' MACs from their addresses, so no MAC is published anywhere.
pub fn vtep_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let o = node_ip.octets();
    [0x0e, 0x5c, o[0], o[1], o[2], o[3]]
}

/// Everything [`ensure`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelSpec {
    pub encap: Encapsulation,
    /// The node's underlay address (VXLAN `local`).
    pub node_ip: Ipv4Addr,
    /// The tunnel address, `routes::tunnel_address` of the node's blocks.
    pub address: Ipv4Addr,
    pub uplink: Uplink,
    pub vxlan: VxlanSettings,
}

impl TunnelSpec {
    pub fn new(
        encap: Encapsulation,
        node_ip: Ipv4Addr,
        address: Ipv4Addr,
        uplink: &Uplink,
    ) -> TunnelSpec {
        TunnelSpec {
            encap,
            node_ip,
            address,
            uplink: uplink.clone(),
            vxlan: VxlanSettings::default(),
        }
    }

    /// MTU of the tunnel device and of every pod interface.
    pub fn mtu(&self) -> u32 {
        self.uplink.mtu.saturating_sub(self.encap.overhead())
    }
}

/// What routes need to know about the tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteEncap {
    Ipip { device: String },
    Vxlan { device: String },
    None,
}

/// The tunnel after [`ensure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelState {
    pub encap: Encapsulation,
    /// `tunl0`, `sluice.vxlan`, or `None` for encapsulation `none`.
    pub device: Option<String>,
    /// The pod MTU to write to the MTU file (= tunnel device MTU).
    pub mtu: u32,
    /// Whether this call changed anything in the kernel.
    pub changed: bool,
}

impl TunnelState {
    pub fn route_encap(&self) -> RouteEncap {
        match (self.encap, &self.device) {
            (Encapsulation::Ipip, Some(d)) => RouteEncap::Ipip { device: d.clone() },
            (Encapsulation::Vxlan, Some(d)) => RouteEncap::Vxlan { device: d.clone() },
            _ => RouteEncap::None,
        }
    }
}

/// One change to the tunnel device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkAction {
    CreateIpip,
    CreateVxlan {
        params: VxlanParams,
        mac: [u8; 6],
        mtu: u32,
    },
    /// A device of ours whose immutable attributes (VNI, port, local, MAC) are wrong.
    Delete {
        index: u32,
    },
    SetMtuUp {
        mtu: u32,
    },
    AddAddress(Ipv4Net),
    DeleteAddress(Ipv4Net),
}

fn want_vxlan(spec: &TunnelSpec) -> VxlanParams {
    VxlanParams {
        vni: spec.vxlan.vni,
        port: spec.vxlan.port,
        local: Some(spec.node_ip),
        uplink: Some(spec.uplink.index),
        learning: false,
    }
}

/// What to do to the device `have` (the current state of the device named for
/// `spec.encap`) to match `spec`. Pure. For a device that must be (re)created the
/// address and MTU actions follow the creation.
pub fn link_actions(spec: &TunnelSpec, have: Option<&LinkState>) -> Vec<LinkAction> {
    let mtu = spec.mtu();
    let addr = Ipv4Net::new(spec.address, 32).expect("/32 is valid");
    let mut out = Vec::new();
    let mut fresh = false;
    match spec.encap {
        Encapsulation::None => return out,
        Encapsulation::Ipip => {
            if have.is_none() {
                out.push(LinkAction::CreateIpip);
                fresh = true;
            }
        }
        Encapsulation::Vxlan => {
            let params = want_vxlan(spec);
            let mac = vtep_mac(spec.node_ip);
            let ok = have
                .is_some_and(|l| l.kind == LinkKind::Vxlan(params.clone()) && l.mac == Some(mac));
            if !ok {
                if let Some(l) = have {
                    out.push(LinkAction::Delete { index: l.index });
                }
                out.push(LinkAction::CreateVxlan { params, mac, mtu });
                fresh = true;
            }
        }
    }
    let current = if fresh { None } else { have };
    if current.is_none_or(|l| l.mtu != mtu || !l.up) {
        out.push(LinkAction::SetMtuUp { mtu });
    }
    let addrs = current.map(|l| l.ipv4.clone()).unwrap_or_default();
    if !addrs.contains(&addr) {
        out.push(LinkAction::AddAddress(addr));
    }
    // The device is ours while this encapsulation is chosen: any other IPv4 address on
    // it (an old block's) would answer for a block now owned elsewhere.
    for a in addrs.into_iter().filter(|a| *a != addr) {
        out.push(LinkAction::DeleteAddress(a));
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The kernel cannot do this encapsulation (no module, or modules cannot be loaded
    /// here). Not transient: the operator must load the module or choose another
    /// encapsulation; the agent reports not-ready and retries slowly.
    #[error(
        "encapsulation {encap} is not available in this kernel ({detail}); load the module \
         (modprobe {module}) or choose another encapsulation"
    )]
    Unsupported {
        encap: Encapsulation,
        module: &'static str,
        detail: String,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: KernelError,
    },
}

fn nl(what: impl Into<String>) -> impl FnOnce(KernelError) -> TunnelError {
    let what = what.into();
    move |source| TunnelError::Netlink { what, source }
}

/// Make the tunnel device match `spec` (idempotent) and remove sluice's VXLAN device
/// when another encapsulation is chosen. `tunl0` is the kernel's and is never deleted.
pub async fn ensure(links: &impl LinkTable, spec: &TunnelSpec) -> Result<TunnelState, TunnelError> {
    let mut changed = false;
    if spec.encap != Encapsulation::Vxlan
        && let Some(old) = links
            .link(VXLAN_DEVICE)
            .await
            .map_err(nl("looking up the VXLAN device"))?
    {
        links
            .delete_link(old.index)
            .await
            .map_err(nl("deleting the unused VXLAN device"))?;
        changed = true;
    }
    // tunl0 is the kernel's and stays, but without IPIP chosen it must not keep the
    // tunnel address: that address moves to the VXLAN device (or nowhere).
    if spec.encap != Encapsulation::Ipip
        && let Some(t) = links
            .link(IPIP_DEVICE)
            .await
            .map_err(nl("looking up tunl0"))?
    {
        for a in &t.ipv4 {
            links
                .delete_address(t.index, *a)
                .await
                .map_err(nl(format!("removing {a} from the unused tunl0")))?;
            changed = true;
        }
    }
    let device = match spec.encap {
        Encapsulation::None => {
            return Ok(TunnelState {
                encap: spec.encap,
                device: None,
                mtu: spec.mtu(),
                changed,
            });
        }
        Encapsulation::Ipip => IPIP_DEVICE,
        Encapsulation::Vxlan => VXLAN_DEVICE,
    };
    let what = |a: &str| format!("{a} {device}");
    let mut have = links.link(device).await.map_err(nl(what("looking up")))?;
    for action in link_actions(spec, have.as_ref()) {
        changed = true;
        match action {
            LinkAction::CreateIpip => {
                if let Err(e) = links.create_ipip_fallback().await {
                    return Err(match e.errno() {
                        // "Unknown device type": no ipip.ko, or no module loading here.
                        Some(libc::EOPNOTSUPP)
                        | Some(libc::ENOENT)
                        | Some(libc::EPROTONOSUPPORT) => TunnelError::Unsupported {
                            encap: spec.encap,
                            module: "ipip",
                            detail: e.to_string(),
                        },
                        _ => TunnelError::Netlink {
                            what: what("creating"),
                            source: e,
                        },
                    });
                }
                have = links.link(device).await.map_err(nl(what("looking up")))?;
                if have.is_none() {
                    // Some kernels (fb_tunnels_only_for_init_net=2) keep the fallback
                    // device out of child namespaces.
                    return Err(TunnelError::Unsupported {
                        encap: spec.encap,
                        module: "ipip",
                        detail: "no tunl0 after `ip link add tunl0 type ipip`".into(),
                    });
                }
            }
            LinkAction::CreateVxlan { params, mac, mtu } => {
                if let Err(e) = links.create_vxlan(device, &params, mac, mtu).await {
                    return Err(match e.errno() {
                        Some(libc::EOPNOTSUPP) => TunnelError::Unsupported {
                            encap: spec.encap,
                            module: "vxlan",
                            detail: e.to_string(),
                        },
                        _ => TunnelError::Netlink {
                            what: what("creating"),
                            source: e,
                        },
                    });
                }
                have = links.link(device).await.map_err(nl(what("looking up")))?;
            }
            LinkAction::Delete { index } => {
                links
                    .delete_link(index)
                    .await
                    .map_err(nl(what("deleting")))?;
            }
            LinkAction::SetMtuUp { mtu } => {
                let index = have.as_ref().map(|l| l.index).ok_or_else(|| gone(device))?;
                links
                    .set_mtu_up(index, mtu)
                    .await
                    .map_err(nl(format!("setting MTU {mtu} and up on {device}")))?;
            }
            LinkAction::AddAddress(a) => {
                let index = have.as_ref().map(|l| l.index).ok_or_else(|| gone(device))?;
                links
                    .add_address(index, a)
                    .await
                    .map_err(nl(format!("adding {a} to {device}")))?;
            }
            LinkAction::DeleteAddress(a) => {
                let index = have.as_ref().map(|l| l.index).ok_or_else(|| gone(device))?;
                links
                    .delete_address(index, a)
                    .await
                    .map_err(nl(format!("removing {a} from {device}")))?;
            }
        }
    }
    Ok(TunnelState {
        encap: spec.encap,
        device: Some(device.to_string()),
        mtu: spec.mtu(),
        changed,
    })
}

fn gone(device: &str) -> TunnelError {
    TunnelError::Netlink {
        what: format!("{device} vanished while being configured"),
        source: KernelError::NoSuchLink(device.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::FakeKernel;
    use std::future::Future;

    fn uplink() -> Uplink {
        Uplink {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
        }
    }
    fn spec(encap: Encapsulation) -> TunnelSpec {
        TunnelSpec::new(
            encap,
            "192.168.0.1".parse().unwrap(),
            "10.244.1.0".parse().unwrap(),
            &uplink(),
        )
    }
    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn mtu_subtracts_the_encapsulation_overhead() {
        assert_eq!(spec(Encapsulation::Ipip).mtu(), 1480);
        assert_eq!(spec(Encapsulation::Vxlan).mtu(), 1450);
        assert_eq!(spec(Encapsulation::None).mtu(), 1500);
    }

    #[test]
    fn vtep_mac_is_local_unicast_and_embeds_the_node_ip() {
        let mac = vtep_mac("10.1.2.3".parse().unwrap());
        assert_eq!(mac, [0x0e, 0x5c, 10, 1, 2, 3]);
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn encapsulation_parses_and_prints() {
        for e in [
            Encapsulation::Ipip,
            Encapsulation::Vxlan,
            Encapsulation::None,
        ] {
            assert_eq!(e.as_str().parse::<Encapsulation>().unwrap(), e);
        }
        assert!("gre".parse::<Encapsulation>().is_err());
    }

    #[test]
    fn missing_tunl0_is_created_configured_and_addressed() {
        let a = link_actions(&spec(Encapsulation::Ipip), None);
        assert_eq!(
            a,
            vec![
                LinkAction::CreateIpip,
                LinkAction::SetMtuUp { mtu: 1480 },
                LinkAction::AddAddress(net("10.244.1.0/32")),
            ]
        );
    }

    fn tunl0(mtu: u32, up: bool, ipv4: &[&str]) -> LinkState {
        LinkState {
            index: 7,
            name: "tunl0".into(),
            kind: LinkKind::Ipip,
            mtu,
            up,
            mac: None,
            ipv4: ipv4.iter().map(|s| net(s)).collect(),
        }
    }

    #[test]
    fn configured_tunl0_needs_nothing() {
        let have = tunl0(1480, true, &["10.244.1.0/32"]);
        assert!(link_actions(&spec(Encapsulation::Ipip), Some(&have)).is_empty());
    }

    #[test]
    fn tunl0_with_an_old_address_and_wrong_mtu_is_corrected() {
        let have = tunl0(1480 + 20, false, &["10.244.9.0/32"]);
        assert_eq!(
            link_actions(&spec(Encapsulation::Ipip), Some(&have)),
            vec![
                LinkAction::SetMtuUp { mtu: 1480 },
                LinkAction::AddAddress(net("10.244.1.0/32")),
                LinkAction::DeleteAddress(net("10.244.9.0/32")),
            ]
        );
    }

    #[test]
    fn vxlan_device_with_another_vni_is_recreated() {
        let s = spec(Encapsulation::Vxlan);
        let mut params = want_vxlan(&s);
        let good = LinkState {
            index: 9,
            name: VXLAN_DEVICE.into(),
            kind: LinkKind::Vxlan(params.clone()),
            mtu: 1450,
            up: true,
            mac: Some(vtep_mac(s.node_ip)),
            ipv4: vec![net("10.244.1.0/32")],
        };
        assert!(link_actions(&s, Some(&good)).is_empty());
        params.vni = 1;
        let bad = LinkState {
            kind: LinkKind::Vxlan(params),
            ..good
        };
        let a = link_actions(&s, Some(&bad));
        assert_eq!(a[0], LinkAction::Delete { index: 9 });
        assert!(matches!(a[1], LinkAction::CreateVxlan { mtu: 1450, .. }));
        assert_eq!(a[3], LinkAction::AddAddress(net("10.244.1.0/32")));
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn ensure_without_ipip_in_the_kernel_is_unsupported_not_a_crash() {
        let fake = FakeKernel {
            ipip_errno: Some(libc::EOPNOTSUPP),
            ..Default::default()
        };
        let err = block_on(ensure(&fake, &spec(Encapsulation::Ipip))).unwrap_err();
        assert!(matches!(
            err,
            TunnelError::Unsupported {
                encap: Encapsulation::Ipip,
                module: "ipip",
                ..
            }
        ));
        // any other kernel error is not "unsupported": it is worth retrying
        let fake = FakeKernel {
            ipip_errno: Some(libc::EPERM),
            ..Default::default()
        };
        let err = block_on(ensure(&fake, &spec(Encapsulation::Ipip))).unwrap_err();
        assert!(matches!(err, TunnelError::Netlink { .. }), "{err:?}");
    }

    #[test]
    fn ensure_is_idempotent() {
        let fake = FakeKernel::default();
        let first = block_on(ensure(&fake, &spec(Encapsulation::Ipip))).unwrap();
        assert!(first.changed);
        let t = fake.get("tunl0").unwrap();
        assert_eq!(
            (t.mtu, t.up, t.ipv4.clone()),
            (1480, true, vec![net("10.244.1.0/32")])
        );
        let n = fake.calls.lock().unwrap().len();
        let again = block_on(ensure(&fake, &spec(Encapsulation::Ipip))).unwrap();
        assert!(!again.changed);
        assert_eq!(
            fake.calls.lock().unwrap().len(),
            n,
            "no kernel call on a converged node"
        );
    }

    #[test]
    fn switching_encapsulation_moves_the_tunnel_address_and_retires_the_vxlan_device() {
        let fake = FakeKernel::default();
        block_on(ensure(&fake, &spec(Encapsulation::Ipip))).unwrap();
        let st = block_on(ensure(&fake, &spec(Encapsulation::Vxlan))).unwrap();
        assert_eq!(st.mtu, 1450);
        assert!(
            fake.get("tunl0").unwrap().ipv4.is_empty(),
            "tunl0 keeps no address"
        );
        assert_eq!(
            fake.get(VXLAN_DEVICE).unwrap().ipv4,
            vec![net("10.244.1.0/32")]
        );
        let st = block_on(ensure(&fake, &spec(Encapsulation::None))).unwrap();
        assert_eq!((st.device, st.mtu), (None, 1500));
        assert!(fake.get(VXLAN_DEVICE).is_none(), "VXLAN device deleted");
        assert!(
            fake.get("tunl0").is_some(),
            "tunl0 is the kernel's: never deleted"
        );
    }

    #[test]
    fn route_encap_follows_the_device() {
        let st = TunnelState {
            encap: Encapsulation::Ipip,
            device: Some("tunl0".into()),
            mtu: 1480,
            changed: false,
        };
        assert_eq!(
            st.route_encap(),
            RouteEncap::Ipip {
                device: "tunl0".into()
            }
        );
    }
}
