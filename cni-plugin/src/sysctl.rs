//! Per-interface IPv4 sysctls under /proc/sys/net, in the calling thread's current
//! network namespace (procfs resolves /proc/sys/net against the opener's namespace).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("sysctl {path}: {source}")]
pub struct SysctlError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The host-side veth settings of docs/architecture.md ("A pod is wired"), as (key, value) with
/// `{if}` standing for the interface name. proxy_arp answers the pod's ARP for
/// 169.254.1.1; proxy_delay=0 makes that answer immediate (default 0.8 s jitter);
/// route_localnet lets the node DNAT pod traffic to 127.0.0.0/8 (NodePort on
/// localhost); forwarding lets the node route for the pod.
pub const HOST_VETH: [(&str, &str); 4] = [
    ("ipv4/conf/{if}/proxy_arp", "1"),
    ("ipv4/neigh/{if}/proxy_delay", "0"),
    ("ipv4/conf/{if}/route_localnet", "1"),
    ("ipv4/conf/{if}/forwarding", "1"),
];

fn path(key: &str, ifname: &str) -> PathBuf {
    PathBuf::from("/proc/sys/net").join(key.replace("{if}", ifname))
}

pub fn write(key: &str, ifname: &str, value: &str) -> Result<(), SysctlError> {
    let p = path(key, ifname);
    std::fs::write(&p, value).map_err(|source| SysctlError { path: p, source })
}

pub fn read(key: &str, ifname: &str) -> Result<String, SysctlError> {
    let p = path(key, ifname);
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SysctlError { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_expand_the_interface_name() {
        assert_eq!(
            path(HOST_VETH[1].0, "slc0000aaaaaaaa"),
            PathBuf::from("/proc/sys/net/ipv4/neigh/slc0000aaaaaaaa/proxy_delay")
        );
    }

    #[test]
    fn write_then_read_in_a_throwaway_namespace() {
        if !sluice_testkit::require_root("sysctl_write_read") {
            return;
        }
        sluice_testkit::in_new_netns(|| {
            write("ipv4/conf/{if}/route_localnet", "lo", "1").unwrap();
            assert_eq!(read("ipv4/conf/{if}/route_localnet", "lo").unwrap(), "1");
            assert!(read("ipv4/conf/{if}/proxy_arp", "nope0").is_err());
        });
    }
}
