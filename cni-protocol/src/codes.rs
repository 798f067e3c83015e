//! The one registry of CNI error codes for every sluice CNI binary (`sluice` and
//! `sluice-ipam`). A code means one thing whichever binary prints it: the plugin
//! passes its IPAM delegate's error through unchanged, so a runtime (and an
//! operator) reads one meaning per number. 1–99 are the spec's (only those sluice
//! prints are listed); 100 and up are sluice's. `docs/cni-errors.md` prints this
//! table; a test keeps the two equal.

/// Which sluice binary can print a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `sluice` plugin.
    Plugin,
    /// `sluice-ipam` (and so also the `sluice` plugin's ADD/DEL/CHECK, which pass
    /// its errors through).
    Ipam,
    /// Both binaries, on their own.
    Both,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Plugin => "sluice",
            Source::Ipam => "sluice-ipam",
            Source::Both => "sluice, sluice-ipam",
        }
    }
}

macro_rules! registry {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $source:ident, $meaning:literal; )*) => {
        /// Every error code a sluice CNI binary prints.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// The registry, in code order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The number printed as the error object's `code`.
            pub fn code(self) -> u32 {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// What the code means, in one sentence (the table of docs/cni-errors.md).
            pub fn meaning(self) -> &'static str {
                match self { $(ErrorCode::$variant => $meaning,)* }
            }

            /// Which binary prints it.
            pub fn source(self) -> Source {
                match self { $(ErrorCode::$variant => Source::$source,)* }
            }
        }
    };
}

registry! {
    /// Spec: the config's `cniVersion` is not one we speak.
    IncompatibleVersion = 1, Both, "incompatible CNI version";
    /// Spec: the container is unknown or does not exist.
    UnknownContainer = 3, Plugin, "container unknown or does not exist";
    /// Spec: a required `CNI_*` environment variable is missing or invalid.
    InvalidEnvironment = 4, Both, "invalid necessary environment variables";
    /// Spec: an I/O failure (e.g. reading stdin).
    IoFailure = 5, Both, "I/O failure";
    /// Spec: stdin or a result could not be decoded.
    DecodingFailure = 6, Both, "failed to decode content";
    /// Spec: the network config is invalid.
    InvalidNetworkConfig = 7, Both, "invalid network config";
    /// Spec: a transient condition; the runtime should retry later.
    TryAgainLater = 11, Both, "try again later";
    /// Spec (STATUS): the plugin is not ready to service ADD.
    PluginNotAvailable = 50, Both, "the plugin is not available";
    /// Spec (STATUS): the plugin is not available; existing containers may lose
    /// connectivity.
    PluginNotAvailableLimitedConnectivity = 51, Plugin, "the plugin is not available; existing containers in the network may have limited connectivity";
    /// A caught panic or any other bug-shaped failure.
    Internal = 100, Both, "internal error (a bug): report it with the plugin log";
    /// The IPAM plugin named by `ipam.type` is in no `CNI_PATH` directory.
    IpamPluginNotFound = 101, Plugin, "the IPAM plugin is not installed in any CNI_PATH directory";
    /// The IPAM plugin could not be run, or printed something that is neither a
    /// result nor a CNI error.
    IpamPluginFailed = 102, Plugin, "the IPAM plugin could not be run, or failed without printing a CNI error";
    /// A netlink request (link, address, route) failed.
    Netlink = 103, Plugin, "a netlink request (link, address, route) failed";
    /// A network namespace could not be opened or entered.
    Netns = 104, Plugin, "the network namespace could not be opened or entered";
    /// `CNI_IFNAME` already exists inside the pod.
    IfnameTaken = 105, Plugin, "CNI_IFNAME already exists in the pod's network namespace";
    /// The host-side name is held by an interface that is not this attachment's.
    HostNameTaken = 106, Plugin, "the host-side interface name is held by an interface that is not this attachment's";
    /// A sysctl could not be written.
    Sysctl = 107, Plugin, "a sysctl could not be written";
    /// The agent's MTU file exists but cannot be used.
    MtuFile = 108, Plugin, "the agent's MTU file exists but cannot be used";
    /// The IPAM plugin returned no IPv4 address.
    NoIpv4 = 109, Plugin, "the IPAM plugin returned no IPv4 address";
    /// Every block of the pool is claimed by some node.
    PoolExhausted = 110, Ipam, "every block of the pool is claimed by some node";
    /// The IPAM state directory cannot be written.
    StateNotWritable = 111, Ipam, "the IPAM state directory cannot be written";
    /// The IPAM state file is corrupt (and was left alone).
    StateCorrupt = 112, Ipam, "the IPAM state file is corrupt (left alone)";
    /// The block store failed or holds a damaged entry.
    BlockStore = 113, Ipam, "the IPAM block store failed or holds a damaged entry";
    /// CHECK found the attachment is not what ADD made (interfaces, routes, or the
    /// address IPAM holds for it).
    CheckFailed = 114, Both, "CHECK found the attachment differs from what ADD made";
    /// The requested address (`runtimeConfig.ips`, `IP=` in CNI_ARGS) is malformed,
    /// more than one, IPv6, or not a pod address of the pool.
    RequestedAddressInvalid = 115, Both, "the requested address is malformed, not exactly one IPv4 address, or not a pod address of the pool";
    /// The requested address is held by another attachment, or its block belongs to
    /// another node (or, in a cluster, is not published for this node).
    RequestedAddressUnavailable = 116, Ipam, "the requested address is held by another attachment, or its block is not this node's";
    /// The pod's address annotation (`sluice.dev/ip-addrs` or
    /// `sluice.dev/ip-addrs-no-ipam`) is not a JSON list of one IPv4 address, or
    /// both are set.
    AddressAnnotationInvalid = 130, Plugin, "the pod's address annotation is malformed, names more than one address, or both address annotations are set";
    /// A `sluice.dev/ip-addrs-no-ipam` address is a node's tunnel (or other host)
    /// address, or held by IPAM or another pod on this node.
    NoIpamAddressCollides = 131, Plugin, "the no-IPAM address is already a host address or held by IPAM or another pod on this node";
}

impl ErrorCode {
    /// The registry entry for a number, if sluice defines it.
    pub fn from_code(code: u32) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.code() == code)
    }

    /// True for the spec's well-known codes (1–99), which every CNI plugin shares.
    pub fn is_spec(code: u32) -> bool {
        (1..100).contains(&code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn no_two_meanings_share_a_code() {
        let mut seen: BTreeMap<u32, ErrorCode> = BTreeMap::new();
        for &c in ErrorCode::ALL {
            if let Some(other) = seen.insert(c.code(), c) {
                panic!("code {} means both {other:?} and {c:?}", c.code());
            }
        }
        let meanings: std::collections::BTreeSet<_> =
            ErrorCode::ALL.iter().map(|c| c.meaning()).collect();
        assert_eq!(
            meanings.len(),
            ErrorCode::ALL.len(),
            "a meaning is listed twice"
        );
    }

    #[test]
    fn spec_codes_are_the_spec_numbers() {
        let table = [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::UnknownContainer, 3),
            (ErrorCode::InvalidEnvironment, 4),
            (ErrorCode::IoFailure, 5),
            (ErrorCode::DecodingFailure, 6),
            (ErrorCode::InvalidNetworkConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::PluginNotAvailable, 50),
            (ErrorCode::PluginNotAvailableLimitedConnectivity, 51),
        ];
        for (c, n) in table {
            assert_eq!(c.code(), n, "{c:?}");
            assert!(ErrorCode::is_spec(n));
        }
        for &c in ErrorCode::ALL {
            let spec = table.iter().any(|(s, _)| *s == c);
            assert_eq!(
                ErrorCode::is_spec(c.code()),
                spec,
                "{c:?}: only the spec's codes are below 100"
            );
        }
    }

    #[test]
    fn the_registry_is_in_code_order_and_round_trips() {
        let codes: Vec<u32> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
        let mut sorted = codes.clone();
        sorted.sort_unstable();
        assert_eq!(codes, sorted);
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ErrorCode::from_code(99), None);
    }
}
