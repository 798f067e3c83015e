//! Route sync at cluster scale, in a throwaway namespace: 1,000 peer nodes over VXLAN
//! (1,000 routes, 2,000 neighbour/FDB entries) and `none`. Asserts the kernel's table is
//! exactly what was asked for after each step; prints the time each step took (numbers
//! to compare, never asserted). Run with `--nocapture` to see them.

use std::net::Ipv4Addr;
use std::time::Instant;

use ipnet::Ipv4Net;
use sluice_agent::kernel::{Netlink, RouteTable};
use sluice_agent::mtu;
use sluice_agent::routes::{self, BlockOwner};
use sluice_agent::tunnel::{self, Encapsulation, TunnelSpec};
use sluice_testkit::{in_new_netns, require_root, sh};

const PEERS: u16 = 1000;

fn cluster(peers: u16) -> Vec<BlockOwner> {
    (0..=peers)
        .map(|i| BlockOwner {
            node: format!("node-{i}"),
            // underlay 172.20.0.0/16, blocks 10.(96 + i/256).(i%256).0/24
            node_ip: Ipv4Addr::new(172, 20, (i / 250) as u8, (i % 250 + 1) as u8),
            block: Ipv4Net::new(
                Ipv4Addr::new(10, 96 + (i / 256) as u8, (i % 256) as u8, 0),
                24,
            )
            .unwrap(),
        })
        .collect()
}

fn owned_count() -> usize {
    sh(&format!(
        "ip route show proto {} | wc -l",
        routes::ROUTE_PROTOCOL
    ))
    .trim()
    .parse()
    .unwrap()
}

fn run(encap: Encapsulation) {
    in_new_netns(|| {
        sh(
            "ip link add eth0 type veth peer name peer0 && ip link set eth0 up && \
            ip link set peer0 up && ip addr add 172.20.0.1/16 dev eth0",
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let nl = Netlink::open().unwrap();
            let all = cluster(PEERS);
            let me = &all[0];
            let uplink = mtu::detect_uplink(&nl, Some(me.node_ip)).await.unwrap();
            let spec = TunnelSpec::new(
                encap,
                me.node_ip,
                sluice_ipam::tunnel_address(me.block),
                &uplink,
            );
            let state = tunnel::ensure(&nl, &spec).await.unwrap();
            let enc = state.route_encap();

            let t = Instant::now();
            let r = routes::sync(&nl, &routes::desired("node-0", &all, &enc))
                .await
                .unwrap();
            let first = t.elapsed();
            assert!(r.failures.is_empty(), "{:?}", r.failures);
            assert_eq!(r.added.len(), PEERS as usize + 1);
            assert_eq!(owned_count(), PEERS as usize + 1);

            let t = Instant::now();
            let r = routes::sync(&nl, &routes::desired("node-0", &all, &enc))
                .await
                .unwrap();
            let resync = t.elapsed();
            assert_eq!(r.programmed(), PEERS as usize + 1);
            assert!(r.added.is_empty() && r.removed.is_empty() && r.l2_added == 0);

            // 10% of the nodes leave.
            let stay: Vec<BlockOwner> = all
                .iter()
                .filter(|b| b.node_ip.octets()[3] % 10 != 0)
                .cloned()
                .collect();
            let t = Instant::now();
            let r = routes::sync(&nl, &routes::desired("node-0", &stay, &enc))
                .await
                .unwrap();
            let churn = t.elapsed();
            assert!(r.failures.is_empty());
            assert_eq!(r.removed.len(), all.len() - stay.len());
            assert_eq!(owned_count(), stay.len());

            let t = Instant::now();
            let listed = nl.routes().await.unwrap().len();
            let list = t.elapsed();
            eprintln!(
                "net_scale {encap}: {PEERS} peers: first sync {:.0} ms ({} routes, {} L2 entries), \
                 no-op resync {:.0} ms, {} leave {:.0} ms, list {listed} routes {:.1} ms",
                first.as_secs_f64() * 1e3,
                PEERS + 1,
                if encap == Encapsulation::Vxlan {
                    2 * PEERS
                } else {
                    0
                },
                resync.as_secs_f64() * 1e3,
                all.len() - stay.len(),
                churn.as_secs_f64() * 1e3,
                list.as_secs_f64() * 1e3,
            );
        });
    });
}

#[test]
fn vxlan_sync_of_a_thousand_peers_converges_exactly() {
    if !require_root("vxlan_sync_of_a_thousand_peers_converges_exactly") {
        return;
    }
    run(Encapsulation::Vxlan);
}

#[test]
fn none_sync_of_a_thousand_peers_converges_exactly() {
    if !require_root("none_sync_of_a_thousand_peers_converges_exactly") {
        return;
    }
    run(Encapsulation::None);
}
