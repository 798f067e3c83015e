//! `sluice-agent run`: wire the configured datastore, the dataplane, the health
//! endpoint and the status file into the loop of [`crate::agent`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_ipam::blocks::{Pool, PoolError};

use crate::agent::{self, AgentError, Loop};
use crate::config::{DatastoreKind, RunConfig};
use crate::datastore::block_lifecycle::BlockSettings;
use crate::datastore::dir::DirDatastore;
use crate::datastore::kube::KubeDatastore;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::node_network::{KernelNetwork, Network};
use crate::reconcile::{NodeSettings, TunnelFilter};
use crate::tunnel::{Encapsulation, VxlanSettings};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("pool {pool} with /{block_size} blocks: {source}")]
    Pool {
        pool: ipnet::Ipv4Net,
        block_size: u8,
        #[source]
        source: PoolError,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("detecting the iptables backend: {0}")]
    Backend(#[from] crate::dataplane::runner::RunError),
    #[error(transparent)]
    Datastore(#[from] crate::datastore::DatastoreError),
    #[error("opening route netlink: {0}")]
    Netlink(#[source] crate::kernel::KernelError),
    #[error(transparent)]
    LocalApi(#[from] crate::local_api::LocalApiError),
    #[error("--node-ip must be IPv4 (sluice's tunnels are IPv4), got {0}")]
    NodeIpV6(IpAddr),
}

pub fn node_settings(cfg: &RunConfig) -> Result<NodeSettings, RunError> {
    let node_ip = match cfg.node_ip {
        None => None,
        Some(IpAddr::V4(v)) => Some(v),
        Some(v6) => return Err(RunError::NodeIpV6(v6)),
    };
    Ok(NodeSettings {
        node: cfg.node_name.clone(),
        pool: cfg.pool,
        tunnel: match cfg.encapsulation {
            Encapsulation::Ipip => TunnelFilter::Ipip,
            Encapsulation::Vxlan => TunnelFilter::Vxlan {
                port: cfg.vxlan_port,
            },
            Encapsulation::None => TunnelFilter::None,
        },
        nat_outgoing: cfg.nat_outgoing,
        node_ip,
        dataplane: sluice_policy::dataplane::DataplaneKind::Iptables,
    })
}

/// Run until a termination signal. Never flushes what it programmed.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    let pool = Pool::new(cfg.pool, cfg.block_size).map_err(|source| RunError::Pool {
        pool: cfg.pool,
        block_size: cfg.block_size,
        source,
    })?;
    let mut settings = node_settings(&cfg)?;
    let datastore_health = Arc::new(crate::datastore::DatastoreHealth::default());
    let health = Arc::new(
        Health::new(cfg.resync_interval() * 3 + Duration::from_secs(30))
            .with_datastore(datastore_health.clone()),
    );
    let metrics = Arc::new(Metrics::new());
    let flows = crate::flows::FlowStore::new(
        &cfg.node_name,
        crate::flows::RECENT_RECORDS,
        metrics.clone(),
    );
    // Its own thread: a blocking netlink socket and blocking file writes, and a
    // lock it may have to wait for (an earlier agent draining on its way out).
    let stop_reader = crate::flows::StopReader::default();
    let reader = cfg.record_flows.then(|| {
        let (store, path, stop) = (
            flows.clone(),
            cfg.flow_log_file.clone(),
            stop_reader.clone(),
        );
        std::thread::Builder::new()
            .name("flow-records".into())
            .spawn(move || crate::flows::read_loop(store, path, stop))
            .expect("spawning a thread")
    });

    let listener = tokio::net::TcpListener::bind(cfg.health_addr)
        .await
        .map_err(|source| AgentError::Bind {
            addr: cfg.health_addr,
            source,
        })?;
    tracing::info!(addr = %cfg.health_addr, "serving /healthz /readyz /metrics /flows");
    {
        let (h, m, f) = (health.clone(), metrics.clone(), flows.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::health::serve_with_flows(listener, h, m, Some(f)).await {
                tracing::error!(error = %e, "health endpoint stopped");
            }
        });
    }
    tokio::spawn(agent::status_writer(
        cfg.files.status_file.clone(),
        cfg.node_name.clone(),
        health.clone(),
    ));

    std::fs::create_dir_all(&cfg.files.ipam_state_dir).map_err(|source| AgentError::Write {
        path: cfg.files.ipam_state_dir.clone(),
        source: crate::status::StatusError {
            path: cfg.files.ipam_state_dir.clone(),
            source,
        },
    })?;
    if cfg.mtu != 0 {
        crate::status::write_atomic(
            &cfg.files.mtu_file,
            format!("{}\n", cfg.mtu).as_bytes(),
            0o644,
        )
        .map_err(|source| AgentError::Write {
            path: cfg.files.mtu_file.clone(),
            source,
        })?;
    }

    let dataplane = {
        let (choice, kind) = (cfg.iptables_backend, cfg.dataplane);
        tokio::task::spawn_blocking(move || agent::exec_dataplane(choice, kind))
            .await
            .expect("backend detection does not panic")?
    };
    settings.dataplane = dataplane.kind();
    health.set_dataplane(dataplane.selection().detail());

    let (tx, rx) = tokio::sync::watch::channel(None);
    // The datastore publishes to the node-local API's overlay, which lays the CNI
    // plugin's reports over each snapshot and feeds the loop.
    let (ds_tx, ds_rx) = tokio::sync::watch::channel(None);
    let api =
        crate::local_api::LocalApi::new(ds_rx.clone(), metrics.clone()).with_flows(flows.clone());
    {
        let listener = crate::local_api::bind(&cfg.files.agent_socket)?;
        tracing::info!(socket = %cfg.files.agent_socket.display(), "serving the node-local API");
        tokio::spawn(crate::local_api::serve(listener, api.clone()));
        tokio::spawn(crate::local_api::overlay(
            api.clone(),
            ds_rx,
            tx,
            cfg.node_name.clone(),
            cfg.report_grace(),
        ));
    }
    match cfg.datastore {
        DatastoreKind::Directory => {
            let manifests = cfg.manifests_dir.clone().expect("clap requires it");
            let blocks = cfg.block_store_dir.clone().expect("clap requires it");
            let (node, poll) = (cfg.node_name.clone(), cfg.poll_interval());
            tokio::spawn(agent::supervise(
                move || {
                    DirDatastore::new(manifests.clone(), blocks.clone(), pool, node.clone(), poll)
                },
                ds_tx,
            ));
        }
        DatastoreKind::Kubernetes => {
            let client = crate::datastore::kube::client().await?;
            let store = sluice_ipam::store::kube::KubeStore::new(client.clone());
            let (node, file, coalesce) = (
                cfg.node_name.clone(),
                cfg.files.node_blocks_file.clone(),
                cfg.coalesce(),
            );
            let block_settings = BlockSettings {
                state_dir: cfg.files.ipam_state_dir.clone(),
                low_water: cfg.block_low_water,
                orphan_grace: cfg.orphan_block_grace(),
                publish_lock: Default::default(),
            };
            let block_metrics = metrics.clone();
            api.set_block_claims(crate::local_api::claims::block_claims(
                store.clone(),
                pool,
                node.clone(),
                file.clone(),
                block_settings.clone(),
                metrics.clone(),
            ));
            tokio::spawn(agent::supervise(
                move || {
                    KubeDatastore::new(
                        client.clone(),
                        store.clone(),
                        pool,
                        node.clone(),
                        file.clone(),
                        coalesce,
                    )
                    .with_block_settings(block_settings.clone(), block_metrics.clone())
                    .with_health(datastore_health.clone())
                },
                ds_tx,
            ));
        }
    }

    let network = {
        let netlink = crate::kernel::Netlink::open().map_err(RunError::Netlink)?;
        Network::Kernel(Box::new(KernelNetwork {
            netlink,
            node: cfg.node_name.clone(),
            encap: cfg.encapsulation,
            vxlan: VxlanSettings {
                vni: cfg.vxlan_vni,
                port: cfg.vxlan_port,
            },
            mtu: cfg.mtu,
            mtu_file: cfg.files.mtu_file.clone(),
            manage_routes: cfg.manage_routes,
        }))
    };
    let lp = Loop {
        settings,
        dataplane: Arc::new(dataplane),
        network,
        health,
        metrics,
        resync: cfg.resync_interval(),
        coalesce: cfg.coalesce(),
        flows: Some(flows),
    };
    tokio::select! {
        _ = lp.run(rx) => {}
        _ = shutdown_signal() => tracing::info!("terminating; programmed state stays in place"),
    }
    // Records the kernel queued before we unbind are written, not lost.
    stop_reader.stop();
    if let Some(r) = reader {
        let _ = tokio::task::spawn_blocking(move || r.join()).await;
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
