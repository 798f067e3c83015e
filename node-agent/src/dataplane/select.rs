//! Which policy dataplane a node runs (`--dataplane auto|nftables|iptables`), and the
//! one writer the agent's loop holds for either: [`SelectedDataplane`].
//!
//! `auto` picks nftables where `nft` exists and the kernel accepts, in a transaction
//! `nft --check` never commits, a table using every feature the renderer emits
//! ([`sluice_policy::render::nft::probe_script`]) and no other table drops forwarded
//! packets by policy ([`forward_drop_policies`]); else iptables. The choice and the
//! reason are logged and shown in `/readyz`, the status file and `lab status`.
//!
//! Switching a node from one dataplane to the other removes the other's sluice objects
//! and nothing else, once the chosen one has been written in full: until then the old
//! rules keep enforcing (a packet passes only if both let it, and both are built from
//! the same snapshot), so a switch opens nothing. On a node that never ran the other
//! dataplane the removal reads and writes nothing, so a restart still changes nothing
//! before its first full sync.

use std::sync::atomic::{AtomicBool, Ordering};

use sluice_policy::dataplane::{DataplaneKind, Ruleset, Table};
use sluice_policy::render::nft;

use super::nft::{NFT, NftDataplane};
use super::runner::{CommandRunner, RunError};
use super::{Backend, Dataplane, DataplaneError, SyncMode, SyncReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneChoice {
    /// nftables when `nft` and the kernel support what sluice uses, else iptables.
    Auto,
    Nftables,
    Iptables,
}

/// The dataplane a node runs and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub kind: DataplaneKind,
    pub reason: String,
}

impl Selection {
    /// `dataplane nftables (auto: …)`: the line of `/readyz` and the status file.
    pub fn detail(&self) -> String {
        format!("dataplane {} ({})", self.kind.as_str(), self.reason)
    }
}

/// Pure decision: the configured choice and, for `auto`, what `nft --check` of the
/// probe table said (`Err` carries why nftables cannot be used).
pub fn decide(choice: DataplaneChoice, probe: impl FnOnce() -> Result<(), String>) -> Selection {
    match choice {
        DataplaneChoice::Nftables => Selection {
            kind: DataplaneKind::Nftables,
            reason: "configured".into(),
        },
        DataplaneChoice::Iptables => Selection {
            kind: DataplaneKind::Iptables,
            reason: "configured".into(),
        },
        DataplaneChoice::Auto => match probe() {
            Ok(()) => Selection {
                kind: DataplaneKind::Nftables,
                reason: "auto: nft and the kernel accept every feature sluice uses".into(),
            },
            Err(why) => Selection {
                kind: DataplaneKind::Iptables,
                reason: format!("auto: {why}"),
            },
        },
    }
}

/// Whether this host can run the nftables dataplane: `nft --check -f -` of the probe.
pub fn probe_nftables(runner: &dyn CommandRunner) -> Result<(), String> {
    match runner.run(NFT, &["--check", "-f", "-"], Some(&nft::probe_script())) {
        Err(RunError::Spawn { source, .. }) => Err(format!("no usable `nft` binary ({source})")),
        Err(e) => Err(e.to_string()),
        Ok(out) if out.success() => Ok(()),
        Ok(out) => Err(format!(
            "`nft --check` rejected the probe table: {}",
            out.stderr
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
        )),
    }
}

/// Base chains of other tables that drop forwarded packets by policy, from `nft -j
/// list chains` and `iptables-legacy-save -t filter` (either may be empty). Docker
/// sets iptables' `FORWARD` policy to `DROP`: an `accept` in sluice's own nftables
/// table does not override another table's verdict, so pod traffic would die there,
/// while the iptables dataplane's `ACCEPT` sits in that same `FORWARD` chain ahead of
/// the policy. `auto` must not pick a dataplane that black-holes the node's pods.
pub fn forward_drop_policies(nft_chains_json: &str, legacy_filter_save: &str) -> Vec<String> {
    let mut out = Vec::new();
    let listing: serde_json::Value = serde_json::from_str(nft_chains_json).unwrap_or_default();
    for item in listing["nftables"].as_array().into_iter().flatten() {
        let c = &item["chain"];
        let text = |k: &str| c[k].as_str().unwrap_or_default();
        let ours = text("family") == nft::FAMILY && text("table") == nft::TABLE;
        if text("hook") == "forward" && text("policy") == "drop" && !ours {
            out.push(format!(
                "nft chain {} {} {}",
                text("family"),
                text("table"),
                text("name")
            ));
        }
    }
    if legacy_filter_save
        .lines()
        .any(|l| l.starts_with(":FORWARD DROP"))
    {
        out.push("iptables-legacy filter FORWARD".into());
    }
    out
}

/// Resolve `choice` on this host: for `auto`, nftables only where the probe passes
/// and no other table drops forwarded traffic by policy.
pub fn select(runner: &dyn CommandRunner, choice: DataplaneChoice) -> Selection {
    decide(choice, || {
        probe_nftables(runner)?;
        let read = |cmd: &str, args: &[&str]| {
            runner
                .run(cmd, args, None)
                .ok()
                .filter(|o| o.success())
                .map(|o| o.stdout)
                .unwrap_or_default()
        };
        let drops = forward_drop_policies(
            &read(NFT, &["-j", "list", "chains"]),
            &read("iptables-legacy-save", &["-t", "filter"]),
        );
        if drops.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} drop(s) forwarded packets by policy, which an accept in sluice's nftables \
                 table cannot override; the iptables dataplane accepts pod traffic ahead of it",
                drops.join(", ")
            ))
        }
    })
}

/// An empty model with the tables sluice writes (filter and nat; the model has no raw
/// or mangle rules, and reading those fails where their modules are absent): syncing
/// it removes every chain, jump and set of sluice's and nothing else (the planner
/// deletes only owned objects).
fn no_iptables_objects() -> Ruleset {
    let mut rs = Ruleset::default();
    for t in [Table::Nat, Table::Filter] {
        rs.tables.insert(t, Default::default());
    }
    rs
}

/// Remove sluice's iptables chains, jumps and ipsets. A host without the tools has
/// none; returns whether anything was removed.
pub fn remove_iptables_objects<R: CommandRunner>(
    iptables: &Dataplane<R>,
) -> Result<bool, DataplaneError> {
    match iptables.sync(&no_iptables_objects()) {
        Ok(r) => Ok(r.changed_anything()),
        Err(DataplaneError::Run(RunError::Spawn { .. })) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The policy dataplane the agent's loop holds: the selected writer, and the removal
/// of the other one's objects after the first complete write.
pub struct SelectedDataplane<R: CommandRunner> {
    selection: Selection,
    iptables: Dataplane<R>,
    nftables: NftDataplane<R>,
    other_removed: AtomicBool,
}

impl<R: CommandRunner + Clone> SelectedDataplane<R> {
    /// `backend` is the iptables backend: written with on iptables, cleaned on nftables.
    pub fn new(runner: R, backend: Backend, selection: Selection) -> Self {
        SelectedDataplane {
            selection,
            iptables: Dataplane::new(runner.clone(), backend),
            nftables: NftDataplane::new(runner),
            other_removed: AtomicBool::new(false),
        }
    }
}

impl<R: CommandRunner> SelectedDataplane<R> {
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    pub fn kind(&self) -> DataplaneKind {
        self.selection.kind
    }

    /// Sync the selected dataplane; after a success, remove the other's objects until
    /// that has succeeded once. A failure there is logged and retried at the next full
    /// sync, never the sync's error: the chosen dataplane enforces either way, and a
    /// host whose kernel lacks the other's machinery (no ip_set, no nf_tables) must
    /// still become ready.
    pub fn sync_with(
        &self,
        desired: &Ruleset,
        mode: SyncMode,
    ) -> Result<SyncReport, DataplaneError> {
        let report = match self.selection.kind {
            DataplaneKind::Iptables => self.iptables.sync_with(desired, mode)?,
            DataplaneKind::Nftables => self.nftables.sync_with(desired, mode)?,
        };
        if mode == SyncMode::Full && !self.other_removed.load(Ordering::SeqCst) {
            let (other, removed) = match self.selection.kind {
                DataplaneKind::Iptables => {
                    ("nftables", super::nft::remove_table(self.iptables.runner()))
                }
                DataplaneKind::Nftables => ("iptables", remove_iptables_objects(&self.iptables)),
            };
            match removed {
                Ok(removed) => {
                    if removed {
                        tracing::info!(
                            dataplane = self.selection.kind.as_str(),
                            "switched dataplane: removed sluice's {other} objects"
                        );
                    }
                    self.other_removed.store(true, Ordering::SeqCst);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot remove sluice's {other} objects yet; retrying at the next full sync"
                ),
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::super::runner::{CommandOutput, RecordedCall, RecordingRunner};
    use super::*;

    #[test]
    fn a_forward_drop_policy_in_another_table_is_found_and_ours_is_not() {
        let chains = r#"{"nftables": [{"metainfo": {"json_schema_version": 1}},
            {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 2,
                       "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "handle": 1,
                       "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "inet", "table": "fw", "name": "fwd_in", "handle": 3,
                       "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
            {"chain": {"family": "ip", "table": "sluice", "name": "FORWARD", "handle": 4,
                       "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 5}}]}"#;
        assert_eq!(
            forward_drop_policies(chains, ""),
            ["nft chain ip filter FORWARD"]
        );
        let legacy = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\nCOMMIT\n";
        assert_eq!(
            forward_drop_policies("", legacy),
            ["iptables-legacy filter FORWARD"]
        );
        assert!(forward_drop_policies("", "*filter\n:FORWARD ACCEPT [0:0]\n").is_empty());
        assert!(forward_drop_policies("not json", "").is_empty());
    }

    #[test]
    fn auto_picks_nftables_only_when_the_probe_passes() {
        let s = decide(DataplaneChoice::Auto, || Ok(()));
        assert_eq!(s.kind, DataplaneKind::Nftables);
        let s = decide(DataplaneChoice::Auto, || {
            Err("no usable `nft` binary".into())
        });
        assert_eq!(s.kind, DataplaneKind::Iptables);
        assert_eq!(
            s.detail(),
            "dataplane iptables (auto: no usable `nft` binary)"
        );
    }

    #[test]
    fn a_configured_dataplane_is_not_probed() {
        for (c, k) in [
            (DataplaneChoice::Nftables, DataplaneKind::Nftables),
            (DataplaneChoice::Iptables, DataplaneKind::Iptables),
        ] {
            let s = decide(c, || panic!("probed"));
            assert_eq!((s.kind, s.reason.as_str()), (k, "configured"));
        }
    }

    #[test]
    fn the_probe_is_nft_check_of_the_probe_script_and_its_error_is_the_reason() {
        let rec = RecordingRunner::new(|_| CommandOutput {
            status: 1,
            stdout: String::new(),
            stderr: "\n/dev/stdin:2:3: Error: Could not process rule: No such file or directory\n"
                .into(),
        });
        let s = select(&rec, DataplaneChoice::Auto);
        assert_eq!(s.kind, DataplaneKind::Iptables);
        assert!(s.reason.contains("Could not process rule"), "{}", s.reason);
        let calls = rec.calls();
        assert_eq!(calls[0].command_line(), "nft --check -f -");
        assert_eq!(
            calls[0].stdin.as_deref(),
            Some(nft::probe_script().as_str())
        );
        let ok = RecordingRunner::default();
        assert_eq!(
            select(&ok, DataplaneChoice::Auto).kind,
            DataplaneKind::Nftables
        );
    }

    #[test]
    fn auto_keeps_iptables_where_another_table_drops_forwarded_traffic() {
        let docker = RecordingRunner::new(|c: &RecordedCall| {
            if c.program == "iptables-legacy-save" {
                CommandOutput::ok("*filter\n:FORWARD DROP [0:0]\nCOMMIT\n")
            } else {
                CommandOutput::ok("")
            }
        });
        let s = select(&docker, DataplaneChoice::Auto);
        assert_eq!(s.kind, DataplaneKind::Iptables);
        assert!(
            s.reason.contains("iptables-legacy filter FORWARD"),
            "{}",
            s.reason
        );
        // Configured, it is the operator's call (docs/known-gaps.md says what to add).
        assert_eq!(
            select(&docker, DataplaneChoice::Nftables).kind,
            DataplaneKind::Nftables
        );
    }

    fn no_table(c: &RecordedCall) -> CommandOutput {
        if c.program == "nft" && c.args.first().map(String::as_str) == Some("-j") {
            CommandOutput {
                status: 1,
                stdout: String::new(),
                stderr: "Error: No such file or directory".into(),
            }
        } else {
            CommandOutput::ok("")
        }
    }

    #[test]
    fn on_iptables_the_first_sync_looks_for_sluices_nft_table_once() {
        let rec = RecordingRunner::new(no_table);
        let dp = SelectedDataplane::new(
            rec.clone(),
            Backend::Nft,
            decide(DataplaneChoice::Iptables, || Ok(())),
        );
        let d = Ruleset::default();
        dp.sync_with(&d, SyncMode::Full).unwrap();
        let nft: Vec<String> = rec
            .calls()
            .iter()
            .filter(|c| c.program == "nft")
            .map(RecordedCall::command_line)
            .collect();
        assert_eq!(
            nft,
            ["nft -j list table ip sluice"],
            "read, no table: no write"
        );
        rec.clear();
        dp.sync_with(&d, SyncMode::Full).unwrap();
        assert!(rec.calls().iter().all(|c| c.program != "nft"), "once");
    }

    #[test]
    fn a_failing_removal_of_the_other_dataplane_does_not_fail_the_sync_and_is_retried() {
        let rec = RecordingRunner::new(|c: &RecordedCall| match c.program.as_str() {
            "ipset" => CommandOutput {
                status: 1,
                stdout: String::new(),
                stderr: "Kernel error received: Protocol not supported".into(),
            },
            _ => no_table(c),
        });
        let dp = SelectedDataplane::new(
            rec.clone(),
            Backend::Nft,
            decide(DataplaneChoice::Nftables, || Ok(())),
        );
        let d = Ruleset::default();
        dp.sync_with(&d, SyncMode::Full).unwrap();
        rec.clear();
        dp.sync_with(&d, SyncMode::Incremental).unwrap();
        assert!(
            rec.calls().iter().all(|c| c.program != "ipset"),
            "not on incremental"
        );
        dp.sync_with(&d, SyncMode::Full).unwrap();
        assert!(
            rec.calls().iter().any(|c| c.program == "ipset"),
            "retried on full"
        );
    }

    #[test]
    fn on_nftables_the_first_sync_removes_sluices_iptables_objects_after_writing() {
        // The kernel holds one owned chain with a jump, and an owned set.
        let rec = RecordingRunner::new(|c: &RecordedCall| match c.program.as_str() {
            "ipset" if c.args == ["save"] => {
                CommandOutput::ok("create SLUICE-NODES hash:ip family inet\n")
            }
            "iptables-nft-save" if c.args == ["-t", "filter"] => CommandOutput::ok(
                "*filter\n:FORWARD ACCEPT [0:0]\n:KUBE-FORWARD - [0:0]\n:SLUICE-FORWARD - [0:0]\n\
                 -A FORWARD -m comment --comment \"sluice:abc\" -j SLUICE-FORWARD\n\
                 -A FORWARD -j KUBE-FORWARD\n-A SLUICE-FORWARD -j ACCEPT\nCOMMIT\n",
            ),
            _ => no_table(c),
        });
        let dp = SelectedDataplane::new(
            rec.clone(),
            Backend::Nft,
            decide(DataplaneChoice::Nftables, || Ok(())),
        );
        dp.sync_with(&Ruleset::default(), SyncMode::Full).unwrap();
        let writes: Vec<(String, String)> = rec
            .calls()
            .iter()
            .filter_map(|c| Some((c.command_line(), c.stdin.clone()?)))
            .collect();
        let first_iptables = writes
            .iter()
            .position(|w| w.0.starts_with("iptables"))
            .expect("iptables objects removed");
        assert!(
            writes[..first_iptables].iter().any(|w| w.0 == "nft -f -"),
            "nftables written first: {writes:?}"
        );
        let restore = &writes[first_iptables].1;
        assert!(restore.contains("-X SLUICE-FORWARD"), "{restore}");
        assert!(!restore.contains("KUBE"), "nothing foreign: {restore}");
        assert!(
            rec.calls()
                .iter()
                .any(|c| c.command_line() == "ipset destroy SLUICE-NODES"),
            "{writes:?}"
        );
    }
}
