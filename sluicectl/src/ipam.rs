//! `sluicectl ipam show`: the operator's view of IPAM: which node owns which block,
//! which attachment holds which address, and how much is free. Reads the state under
//! a shared lock (never blocks an ADD for long, never sees half a change).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::Serialize;
use sluice_ipam::{Allocator, BlockStore, DirStore, StateDir, block_capacity, tunnel_address};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Blocks per node, allocations with container id and interface, free counts.
    Show(ShowArgs),
}

#[derive(clap::Args)]
struct ShowArgs {
    /// An IPAM state directory (ipam.stateDir); repeat for several nodes (the lab).
    #[arg(long = "state-dir", default_value = sluice_node_files::paths::IPAM_STATE_DIR)]
    state_dirs: Vec<PathBuf>,
    /// The directory block store (ipam.blockStore.path), to show every node's blocks.
    #[arg(long = "blocks-dir")]
    blocks_dir: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

pub fn exec(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Show(a) => show(a),
    }
}

fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let mut states = Vec::new();
    for dir in &args.state_dirs {
        let snapshot = StateDir::new(dir)
            .snapshot()
            .with_context(|| format!("reading IPAM state in {}", dir.display()))?;
        // In a cluster the agent's node-blocks file (default: in the state dir)
        // names the node.
        let published = sluice_ipam::node_blocks::read(&dir.join("node-blocks.json"))
            .ok()
            .flatten();
        states.push((dir.clone(), snapshot, published));
    }
    let claims = match &args.blocks_dir {
        Some(d) => sluice_ipam::block_on::block_on(DirStore::new(d).list())
            .with_context(|| format!("reading the block store {}", d.display()))?,
        None => Vec::new(),
    };
    let view = IpamView::build(&states, &claims);
    let mut out = std::io::stdout().lock();
    match args.output {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &view)?;
            writeln!(out)?;
        }
        Format::Text => out.write_all(view.render_text().as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// What `show` prints, in both formats.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct IpamView {
    blocks: Vec<BlockView>,
    allocations: Vec<AllocationView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct BlockView {
    cidr: Ipv4Net,
    /// The owner per the block store or node-blocks file; `None` when unknown.
    node: Option<String>,
    tunnel_address: Ipv4Addr,
    capacity: u32,
    /// Held and free counts are known only for blocks of a state directory shown.
    held: Option<u32>,
    free: Option<u32>,
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AllocationView {
    ip: Ipv4Addr,
    block: Ipv4Net,
    node: Option<String>,
    container_id: String,
    ifname: String,
    network: String,
    allocated_unix: u64,
    /// The runtime asked for this address (`runtimeConfig.ips`, `IP=`, an annotation).
    requested: bool,
}

type StateInput = (
    PathBuf,
    Allocator,
    Option<sluice_ipam::node_blocks::NodeBlocks>,
);

impl IpamView {
    fn build(states: &[StateInput], claims: &[sluice_ipam::BlockClaim]) -> IpamView {
        let mut blocks: BTreeMap<Ipv4Net, BlockView> = BTreeMap::new();
        let mut owner: BTreeMap<Ipv4Net, String> = BTreeMap::new();
        for (_, _, published) in states {
            if let Some(p) = published {
                for b in &p.blocks {
                    owner.insert(*b, p.node.clone());
                }
            }
        }
        for c in claims {
            owner.insert(c.cidr, c.node.clone());
        }
        let new_block = |cidr: Ipv4Net, owner: &BTreeMap<Ipv4Net, String>| BlockView {
            cidr,
            node: owner.get(&cidr).cloned(),
            tunnel_address: tunnel_address(cidr),
            capacity: block_capacity(cidr),
            held: None,
            free: None,
            state_dir: None,
        };
        for cidr in owner.keys() {
            blocks.insert(*cidr, new_block(*cidr, &owner));
        }
        let mut allocations = Vec::new();
        for (dir, snapshot, _) in states {
            for b in snapshot.blocks() {
                let view = blocks
                    .entry(b.cidr)
                    .or_insert_with(|| new_block(b.cidr, &owner));
                let held = b.allocations().len() as u32;
                view.held = Some(view.held.unwrap_or(0) + held);
                view.free = Some(view.capacity.saturating_sub(view.held.unwrap_or(0)));
                view.state_dir = Some(dir.clone());
                for a in b.allocations() {
                    allocations.push(AllocationView {
                        ip: a.ip,
                        block: b.cidr,
                        node: owner.get(&b.cidr).cloned(),
                        container_id: a.key.container_id.clone(),
                        ifname: a.key.ifname.clone(),
                        network: a.network.clone(),
                        allocated_unix: a.allocated_unix,
                        requested: a.requested,
                    });
                }
            }
        }
        allocations.sort_by_key(|a| a.ip);
        IpamView {
            blocks: blocks.into_values().collect(),
            allocations,
        }
    }

    fn render_text(&self) -> String {
        let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        let mut rows = vec![[
            "BLOCK".to_string(),
            "NODE".into(),
            "TUNNEL".into(),
            "CAPACITY".into(),
            "HELD".into(),
            "FREE".into(),
        ]];
        for b in &self.blocks {
            rows.push([
                b.cidr.to_string(),
                dash(b.node.clone()),
                b.tunnel_address.to_string(),
                b.capacity.to_string(),
                dash(b.held.map(|h| h.to_string())),
                dash(b.free.map(|f| f.to_string())),
            ]);
        }
        let mut out = table(&rows);
        out.push('\n');
        let mut rows = vec![[
            "ADDRESS".to_string(),
            "BLOCK".into(),
            "NODE".into(),
            "CONTAINER".into(),
            "IFNAME".into(),
            "NETWORK".into(),
            "REQUESTED".into(),
        ]];
        for a in &self.allocations {
            rows.push([
                a.ip.to_string(),
                a.block.to_string(),
                dash(a.node.clone()),
                a.container_id.clone(),
                a.ifname.clone(),
                a.network.clone(),
                if a.requested { "yes" } else { "" }.into(),
            ]);
        }
        out.push_str(&table(&rows));
        out.push_str(&format!(
            "\n{} blocks, {} allocations\n",
            self.blocks.len(),
            self.allocations.len()
        ));
        out
    }
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_ipam::{AttachmentKey, BlockClaim};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_requested_address_is_marked_in_both_formats() {
        let mut a = Allocator::new();
        let block = net("10.244.3.0/24");
        a.allocate(&AttachmentKey::new("auto", "eth0"), &[block], 1)
            .unwrap();
        a.allocate_requested(
            &AttachmentKey::new("asked", "eth0"),
            "",
            "10.244.3.77".parse().unwrap(),
            block,
            2,
        )
        .unwrap();
        let view = IpamView::build(&[("/s".into(), a, None)], &[]);
        let text = view.render_text();
        let line = |ip: &str| text.lines().find(|l| l.starts_with(ip)).unwrap().to_owned();
        assert!(line("10.244.3.77 ").ends_with("yes"), "{text}");
        assert!(!line("10.244.3.2 ").ends_with("yes"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["allocations"][1]["requested"], true);
        assert_eq!(json["allocations"][0]["requested"], false);
    }

    #[test]
    fn view_joins_store_owners_with_allocations_and_counts_free() {
        let mut a = Allocator::new();
        let owned = [net("10.244.3.0/24")];
        a.allocate(&AttachmentKey::new("abc", "eth0"), &owned, 1)
            .unwrap();
        a.allocate(&AttachmentKey::new("def", "eth0"), &owned, 2)
            .unwrap();
        let claims = [
            BlockClaim {
                cidr: net("10.244.3.0/24"),
                node: "node-a".into(),
            },
            BlockClaim {
                cidr: net("10.244.9.0/24"),
                node: "node-b".into(),
            },
        ];
        let view = IpamView::build(&[("/s".into(), a, None)], &claims);
        let text = view.render_text();
        assert!(
            text.contains("10.244.3.0/24  node-a  10.244.3.1  253       2     251"),
            "{text}"
        );
        assert!(
            text.contains("10.244.9.0/24  node-b  10.244.9.1  253       -     -"),
            "{text}"
        );
        assert!(
            text.contains("10.244.3.2  10.244.3.0/24  node-a  abc        eth0"),
            "{text}"
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["blocks"][0]["free"], 251);
        assert_eq!(json["allocations"][0]["requested"], false);
        assert_eq!(json["allocations"][1]["containerId"], "def");
        assert_eq!(json["allocations"][1]["ip"], "10.244.3.3");
    }
}
