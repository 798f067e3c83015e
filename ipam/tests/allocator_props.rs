//! Property tests of the allocator's invariants, over random sequences of ADD, DEL
//! and GC (and ADDs of a requested address) on one or two small blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proptest::prelude::*;
use sluice_ipam::allocator::{AllocError, Allocator, AttachmentKey, RequestError, block_capacity};

#[derive(Debug, Clone)]
enum Op {
    Add(u8),
    Del(u8),
    /// GC keeping the keys whose bit is set.
    Gc(u64),
    /// ADD asking for the address at this offset of this owned block.
    Request(u8, u8, u8),
}

/// [`op`] plus requested addresses.
fn op_with_requests() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => op(),
        2 => (0u8..48, any::<u8>(), any::<u8>()).prop_map(|(k, b, o)| Op::Request(k, b, o)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..48).prop_map(Op::Add),
        2 => (0u8..48).prop_map(Op::Del),
        1 => any::<u64>().prop_map(Op::Gc),
    ]
}

fn key(i: u8) -> AttachmentKey {
    AttachmentKey::new(
        format!("ctr{i}"),
        if i.is_multiple_of(5) { "net1" } else { "eth0" },
    )
}

fn owned_blocks() -> impl Strategy<Value = Vec<Ipv4Net>> {
    prop_oneof![
        (26u8..=30).prop_map(|p| vec![Ipv4Net::new(Ipv4Addr::new(10, 244, 7, 0), p).unwrap()]),
        (27u8..=30).prop_map(|p| {
            vec![
                Ipv4Net::new(Ipv4Addr::new(10, 244, 9, 0), p).unwrap(),
                Ipv4Net::new(Ipv4Addr::new(10, 244, 3, 0), p).unwrap(),
            ]
        }),
    ]
}

fn is_pod_address(ip: Ipv4Addr, owned: &[Ipv4Net]) -> bool {
    owned.iter().any(|b| {
        b.contains(&ip)
            && ip != b.network()
            && ip != b.broadcast()
            && ip != sluice_ipam::tunnel_address(*b)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No address is ever held twice; a repeated ADD returns the held address; every
    /// address is a pod address of an owned block; the state always validates and
    /// survives a serialization round trip.
    #[test]
    fn no_address_is_ever_held_twice(owned in owned_blocks(), ops in prop::collection::vec(op_with_requests(), 1..200)) {
        let mut a = Allocator::new();
        let mut model: BTreeMap<AttachmentKey, Ipv4Addr> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Add(i) => {
                    let k = key(i);
                    match a.allocate(&k, &owned, 0) {
                        Ok((ip, block)) => {
                            prop_assert!(block.contains(&ip));
                            prop_assert!(is_pod_address(ip, &owned), "{ip} is reserved");
                            if let Some(prev) = model.get(&k) {
                                prop_assert_eq!(*prev, ip, "repeated ADD changed the address");
                            } else {
                                prop_assert!(!model.values().any(|v| *v == ip), "{ip} handed out twice");
                            }
                            model.insert(k, ip);
                        }
                        Err(AllocError::BlocksFull { capacity, .. }) => {
                            prop_assert!(!model.contains_key(&k));
                            let cap: u32 = owned.iter().map(|b| block_capacity(*b)).sum();
                            prop_assert_eq!(capacity, cap);
                            prop_assert_eq!(model.len() as u32, cap, "full while addresses were free");
                        }
                    }
                }
                Op::Request(i, b, o) => {
                    let k = key(i);
                    let block = owned[b as usize % owned.len()];
                    let size = 1u32 << (32 - u32::from(block.prefix_len()));
                    let ip = Ipv4Addr::from(u32::from(block.network()) + u32::from(o) % size);
                    let holder = model.iter().find(|(_, v)| **v == ip).map(|(k, _)| k.clone());
                    match a.allocate_requested(&k, "", ip, block, 0) {
                        Ok((got, _)) => {
                            prop_assert_eq!(got, ip);
                            prop_assert!(is_pod_address(ip, &owned), "{ip} is reserved");
                            prop_assert!(holder.is_none() || holder.as_ref() == Some(&k), "{ip} held by {holder:?}");
                            prop_assert!(model.get(&k).is_none_or(|p| *p == ip));
                            model.insert(k, ip);
                        }
                        Err(RequestError::NotAPodAddress { .. }) => prop_assert!(!is_pod_address(ip, &owned)),
                        Err(RequestError::Held { holder: h, .. }) => prop_assert_eq!(Some(h), holder),
                        Err(RequestError::HoldsAnother { held, .. }) => prop_assert_eq!(model.get(&k), Some(&held)),
                    }
                }
                Op::Del(i) => {
                    let k = key(i);
                    let released = a.release(&k).map(|x| x.ip);
                    prop_assert_eq!(released, model.remove(&k));
                }
                Op::Gc(mask) => {
                    let live = |k: &AttachmentKey| {
                        let i: u8 = k.container_id[3..].parse().unwrap();
                        mask & (1 << i) != 0
                    };
                    let released: BTreeSet<AttachmentKey> = a.retain(|x| live(&x.key)).into_iter().map(|x| x.key).collect();
                    let expected: BTreeSet<AttachmentKey> = model.keys().filter(|k| !live(k)).cloned().collect();
                    prop_assert_eq!(&released, &expected);
                    model.retain(|k, _| live(k));
                }
            }
            let held: BTreeMap<AttachmentKey, Ipv4Addr> = a.allocations().map(|x| (x.key.clone(), x.ip)).collect();
            prop_assert_eq!(&held, &model);
            let ips: BTreeSet<Ipv4Addr> = held.values().copied().collect();
            prop_assert_eq!(ips.len(), held.len());
            prop_assert!(a.validate().is_ok(), "{:?}", a.validate());
        }
        let json = serde_json::to_string(&a).unwrap();
        let back: Allocator = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, a);
    }

    /// Release then allocate never returns an address still held, and a released
    /// address comes back only when no never-used address is left, oldest release
    /// first.
    #[test]
    fn released_addresses_come_back_last_and_oldest_first(owned in owned_blocks(), ops in prop::collection::vec(op(), 1..300)) {
        let mut a = Allocator::new();
        let mut ever_used: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let mut released_order: Vec<Ipv4Addr> = Vec::new();
        let cap: usize = owned.iter().map(|b| block_capacity(*b) as usize).sum();
        for op in ops {
            match op {
                Op::Add(i) => {
                    let k = key(i);
                    let had = a.lookup(&k).map(|x| x.0.ip);
                    let held_before: BTreeSet<Ipv4Addr> = a.allocations().map(|x| x.ip).collect();
                    if let Ok((ip, _)) = a.allocate(&k, &owned, 0) {
                        if had.is_some() { continue; }
                        prop_assert!(!held_before.contains(&ip), "{ip} was still held");
                        if ever_used.contains(&ip) {
                            prop_assert_eq!(ever_used.len(), cap, "reused {} while fresh addresses remained", ip);
                            prop_assert_eq!(released_order.first().copied(), Some(ip), "not the oldest release");
                            released_order.remove(0);
                        }
                        ever_used.insert(ip);
                    }
                }
                Op::Del(i) => {
                    if let Some(x) = a.release(&key(i)) {
                        released_order.push(x.ip);
                    }
                }
                Op::Request(..) => unreachable!("op() makes no requests"),
                Op::Gc(mask) => {
                    let live = |k: &AttachmentKey| {
                        let i: u8 = k.container_id[3..].parse().unwrap();
                        mask & (1 << i) != 0
                    };
                    // retain releases in address order.
                    for x in a.retain(|x| live(&x.key)) {
                        released_order.push(x.ip);
                    }
                }
            }
        }
    }

    /// Capacity is exactly the block minus network, tunnel and broadcast addresses.
    #[test]
    fn capacity_is_the_block_minus_three(prefix in 22u8..=30) {
        let block = Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), prefix).unwrap();
        let owned = [block];
        let mut a = Allocator::new();
        let mut n = 0u32;
        while a.allocate(&AttachmentKey::new(format!("c{n}"), "eth0"), &owned, 0).is_ok() {
            n += 1;
        }
        prop_assert_eq!(n, (1u32 << (32 - prefix)) - 3);
        prop_assert_eq!(n, block_capacity(block));
        prop_assert_eq!(a.free_in(&owned), 0);
        let ips: BTreeSet<Ipv4Addr> = a.allocations().map(|x| x.ip).collect();
        prop_assert_eq!(ips.len() as u32, n);
        prop_assert!(!ips.contains(&block.network()));
        prop_assert!(!ips.contains(&block.broadcast()));
        prop_assert!(!ips.contains(&sluice_ipam::tunnel_address(block)));
    }
}
