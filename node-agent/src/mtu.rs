//! The node's uplink and the pod MTU the CNI plugin reads (docs/node-files.md, `mtuFile`).
//!
//! ```ignore
//! let uplink = mtu::detect_uplink(&netlink, Some(node_ip)).await?;   // name, index, MTU
//! let pod_mtu = mtu::pod_mtu(uplink.mtu, encap);                     // also TunnelState::mtu
//! mtu::write_mtu_file(Path::new("/var/lib/sluice/mtu"), pod_mtu)?;   // atomic
//! ```
//!
//! The uplink is the device holding the node IP (the one tunnel packets leave by); when
//! the node IP is unknown, the device of the default route with the lowest metric.
//! The choice is the pure [`choose_uplink`]; [`detect_uplink`] feeds it from netlink.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::kernel::{DefaultRoute, KernelError, LinkSummary, Uplink, UplinkSource};
use crate::tunnel::Encapsulation;

#[derive(Debug, thiserror::Error)]
pub enum MtuError {
    #[error("no interface holds the node address {0}")]
    NodeIpNotFound(Ipv4Addr),
    #[error("no default route and no node address: cannot tell the uplink")]
    NoUplink,
    #[error("default route points to interface index {0}, which does not exist")]
    DanglingDefaultRoute(u32),
    #[error("reading links and routes: {0}")]
    Netlink(#[from] KernelError),
    #[error("writing MTU file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Pick the uplink. Pure.
pub fn choose_uplink(
    links: &[LinkSummary],
    defaults: &[DefaultRoute],
    node_ip: Option<Ipv4Addr>,
) -> Result<Uplink, MtuError> {
    let pick = |l: &LinkSummary| Uplink {
        name: l.name.clone(),
        index: l.index,
        mtu: l.mtu,
    };
    if let Some(ip) = node_ip {
        return links
            .iter()
            .find(|l| l.ipv4.contains(&ip))
            .map(pick)
            .ok_or(MtuError::NodeIpNotFound(ip));
    }
    let best = defaults
        .iter()
        .min_by_key(|d| (d.metric, d.oif))
        .ok_or(MtuError::NoUplink)?;
    links
        .iter()
        .find(|l| l.index == best.oif)
        .map(pick)
        .ok_or(MtuError::DanglingDefaultRoute(best.oif))
}

/// Find the uplink in the namespace `netlink` talks to.
pub async fn detect_uplink(
    netlink: &impl UplinkSource,
    node_ip: Option<Ipv4Addr>,
) -> Result<Uplink, MtuError> {
    let links = netlink.link_summaries().await?;
    let defaults = netlink.default_routes().await?;
    choose_uplink(&links, &defaults, node_ip)
}

/// The uplink's MTU.
pub async fn detect_uplink_mtu(
    netlink: &impl UplinkSource,
    node_ip: Option<Ipv4Addr>,
) -> Result<u32, MtuError> {
    Ok(detect_uplink(netlink, node_ip).await?.mtu)
}

/// The MTU for pod interfaces and the tunnel device.
pub fn pod_mtu(uplink_mtu: u32, encap: Encapsulation) -> u32 {
    uplink_mtu.saturating_sub(encap.overhead())
}

/// Write `mtu` as one decimal number and a newline, atomically (temp file in the same
/// directory, fsync, rename), so the plugin never reads a half-written number.
/// Creates the directory if needed; unchanged content is not rewritten.
pub fn write_mtu_file(path: &Path, mtu: u32) -> Result<(), MtuError> {
    let err = |source| MtuError::Write {
        path: path.to_path_buf(),
        source,
    };
    let content = format!("{mtu}\n");
    if std::fs::read_to_string(path).is_ok_and(|c| c == content) {
        return Ok(());
    }
    sluice_node_files::atomic::write_atomic(path, content.as_bytes(), None).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mtu: u32, ips: &[&str]) -> LinkSummary {
        LinkSummary {
            index,
            name: name.into(),
            mtu,
            ipv4: ips.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn links() -> Vec<LinkSummary> {
        vec![
            link(1, "lo", 65536, &["127.0.0.1"]),
            link(2, "eth0", 9001, &["192.168.0.10"]),
            link(3, "eth1", 1500, &["10.0.0.5"]),
        ]
    }

    #[test]
    fn node_ip_holder_wins_over_default_route() {
        let d = [DefaultRoute { oif: 3, metric: 0 }];
        let u = choose_uplink(&links(), &d, Some("192.168.0.10".parse().unwrap())).unwrap();
        assert_eq!((u.name.as_str(), u.mtu), ("eth0", 9001));
    }

    #[test]
    fn without_node_ip_the_lowest_metric_default_route_decides() {
        let d = [
            DefaultRoute {
                oif: 2,
                metric: 200,
            },
            DefaultRoute {
                oif: 3,
                metric: 100,
            },
        ];
        assert_eq!(choose_uplink(&links(), &d, None).unwrap().name, "eth1");
    }

    #[test]
    fn unknown_node_ip_and_missing_default_route_are_errors() {
        assert!(matches!(
            choose_uplink(&links(), &[], Some("1.2.3.4".parse().unwrap())),
            Err(MtuError::NodeIpNotFound(_))
        ));
        assert!(matches!(
            choose_uplink(&links(), &[], None),
            Err(MtuError::NoUplink)
        ));
        assert!(matches!(
            choose_uplink(&links(), &[DefaultRoute { oif: 9, metric: 0 }], None),
            Err(MtuError::DanglingDefaultRoute(9))
        ));
    }

    #[test]
    fn detection_reads_links_and_default_routes_through_the_seam() {
        use crate::kernel::{FakeKernel, LinkKind, LinkState};
        let fake = FakeKernel::default();
        fake.links.lock().unwrap().push(LinkState {
            index: 2,
            name: "eth0".into(),
            kind: LinkKind::Other("veth".into()),
            mtu: 9001,
            up: true,
            mac: None,
            ipv4: vec!["192.168.0.10/24".parse().unwrap()],
        });
        fake.default_routes
            .lock()
            .unwrap()
            .push(DefaultRoute { oif: 2, metric: 0 });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let by_ip = rt
            .block_on(detect_uplink(&fake, Some("192.168.0.10".parse().unwrap())))
            .unwrap();
        let by_route = rt.block_on(detect_uplink_mtu(&fake, None)).unwrap();
        assert_eq!((by_ip.name.as_str(), by_route), ("eth0", 9001));
    }

    #[test]
    fn pod_mtu_per_encapsulation() {
        assert_eq!(pod_mtu(1500, Encapsulation::Ipip), 1480);
        assert_eq!(pod_mtu(1500, Encapsulation::Vxlan), 1450);
        assert_eq!(pod_mtu(9001, Encapsulation::None), 9001);
    }

    #[test]
    fn mtu_file_is_one_number_and_a_newline_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/mtu");
        write_mtu_file(&path, 1480).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1480\n");
        write_mtu_file(&path, 1450).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1450\n");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("mtu")]);
    }
}
