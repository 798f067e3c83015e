//! Which iptables the host uses: legacy (x_tables) or nft (nf_tables).
//!
//! Two backends can hold rules at once, and only one of them is what kube-proxy and
//! the operator look at. Like kube-proxy's iptables-wrapper we pick the one that
//! already holds the host's rules: first a kubelet/kube-proxy hint chain, else the
//! backend with more rules; an empty host gets nft, Debian's default.

use super::runner::{CommandRunner, RunError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Use whichever backend already holds the host's rules.
    Auto,
    Legacy,
    Nft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub fn save_cmd(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-save",
            Backend::Nft => "iptables-nft-save",
        }
    }

    pub fn restore_cmd(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-restore",
            Backend::Nft => "iptables-nft-restore",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }
}

/// Chains kubelet and kube-proxy create to mark the backend they chose.
const HINT_CHAINS: [&str; 2] = [":KUBE-IPTABLES-HINT", ":KUBE-KUBELET-CANARY"];

/// Pure decision from the two `*-save` outputs (either may be empty when the tool
/// is missing or the kernel lacks that backend).
pub fn choose_backend(legacy_save: &str, nft_save: &str) -> Backend {
    let has_hint = |s: &str| {
        s.lines()
            .any(|l| HINT_CHAINS.iter().any(|h| l.starts_with(h)))
    };
    if has_hint(nft_save) {
        return Backend::Nft;
    }
    if has_hint(legacy_save) {
        return Backend::Legacy;
    }
    let rules = |s: &str| s.lines().filter(|l| l.starts_with("-A ")).count();
    if rules(legacy_save) > rules(nft_save) {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// Resolve the configured choice, reading both backends when it is `auto`.
pub fn detect_backend(
    runner: &dyn CommandRunner,
    choice: BackendChoice,
) -> Result<Backend, RunError> {
    match choice {
        BackendChoice::Legacy => Ok(Backend::Legacy),
        BackendChoice::Nft => Ok(Backend::Nft),
        BackendChoice::Auto => {
            // A missing tool or a kernel without that backend just counts as empty.
            let read = |b: Backend| {
                runner
                    .run(b.save_cmd(), &[], None)
                    .ok()
                    .filter(|o| o.success())
                    .map(|o| o.stdout)
                    .unwrap_or_default()
            };
            Ok(choose_backend(&read(Backend::Legacy), &read(Backend::Nft)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE_NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-X\nCOMMIT\n";

    #[test]
    fn empty_host_gets_nft() {
        assert_eq!(choose_backend("", ""), Backend::Nft);
    }

    #[test]
    fn rules_in_legacy_only_pick_legacy() {
        assert_eq!(choose_backend(KUBE_NAT, ""), Backend::Legacy);
    }

    #[test]
    fn more_rules_wins() {
        assert_eq!(choose_backend("-A X -j Y\n", KUBE_NAT), Backend::Nft);
    }

    #[test]
    fn hint_chain_beats_rule_count() {
        let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        assert_eq!(choose_backend(hint, KUBE_NAT), Backend::Legacy);
        assert_eq!(choose_backend(KUBE_NAT, hint), Backend::Nft);
    }
}
