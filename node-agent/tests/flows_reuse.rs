//! One record per denied connection, told apart by what the connection's first
//! packet carries (docs/flows.md, "One record per connection"): with the log rules
//! as sluice renders them (iptables NFLOG, nftables `log group`, neither setting a
//! copy size) and the agent's reader in a throwaway network namespace, the kernel's
//! own TCP stack opens two connections one after the other from the same source port
//! to the same denied destination, each retransmitting its SYN. Two connections, two
//! records; their retransmissions, none.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_agent::flows::{FlowStore, StopReader, read_loop};
use sluice_agent::metrics::Metrics;
use sluice_node_files::flows::FlowQuery;
use sluice_policy::dataplane::deny_log::{
    DenyReason, DenyTag, LOG_BURST, LOG_GROUP, LOG_RATE_PER_SECOND, deny,
};
use sluice_policy::dataplane::{Match, Target};
use sluice_policy::model::Protocol;
use sluice_policy::names::Direction;

const SPORT: u16 = 41000;
const DPORT: u16 = 9100;

fn sh(cmd: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap()
}

fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f_ns = std::fs::File::open(path).unwrap();
        nix::sched::setns(f_ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// A non-blocking TCP connect from 127.0.0.1:SPORT to 127.0.0.1:DPORT: the kernel
/// sends the SYN (dropped, logged) and retransmits it after its initial RTO (1 s).
fn syn_from_fixed_port() -> OwnedFd {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe {
        OwnedFd::from_raw_fd(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))
    };
    let one: libc::c_int = 1;
    let addr = |port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid descriptor, option and addresses with their sizes.
    unsafe {
        assert_eq!(
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ),
            0
        );
        let local = addr(SPORT);
        assert_eq!(
            libc::bind(
                fd.as_raw_fd(),
                (&local as *const libc::sockaddr_in).cast(),
                len
            ),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        let remote = addr(DPORT);
        libc::connect(
            fd.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        );
    }
    fd
}

/// The log rules as sluice renders them, on OUTPUT, with a verdict-less counting
/// rule ahead of them (how many packets were `ct state new`, i.e. logged).
fn install(ns: &str, dataplane: &str) {
    let tag = DenyTag::new(DenyReason::Isolated, Direction::Egress, Some("X".into()));
    let [log, drop] = deny(
        vec![
            Match::Protocol(Protocol::Tcp),
            Match::DestinationPorts {
                start: DPORT,
                end: DPORT,
            },
        ],
        &tag,
    );
    assert!(matches!(drop.target, Target::Drop));
    let script = match dataplane {
        "iptables" => {
            use sluice_policy::render::iptables::rule_body;
            format!(
                "iptables -A OUTPUT -p tcp --dport {DPORT} -m conntrack --ctstate NEW && \
                 iptables -A OUTPUT {} && iptables -A OUTPUT {}",
                rule_body(&log),
                rule_body(&drop)
            )
        }
        _ => format!(
            "nft -f - <<'NFT'\n\
             table ip flowsreuse {{\n\
               chain out {{\n\
                 type filter hook output priority 0; policy accept;\n\
                 tcp dport {DPORT} ct state new counter\n\
                 tcp dport {DPORT} ct state new limit rate {LOG_RATE_PER_SECOND}/second \
                   burst {LOG_BURST} packets log prefix \"{}\" group {LOG_GROUP}\n\
                 tcp dport {DPORT} drop\n\
               }}\n\
             }}\n\
             NFT",
            tag.prefix()
        ),
    };
    let out = sh(&format!(
        "ip netns exec {ns} sh -c 'ip link set lo up' && ip netns exec {ns} sh -c {}",
        shell_quote(&script)
    ));
    assert!(out.status.success(), "{dataplane}: {out:?}");
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Packets the counting rule saw: every logged SYN, retransmissions included.
fn logged(ns: &str, dataplane: &str) -> u64 {
    let out = match dataplane {
        "iptables" => sh(&format!("ip netns exec {ns} iptables -L OUTPUT -v -x -n")),
        _ => sh(&format!(
            "ip netns exec {ns} nft list chain ip flowsreuse out"
        )),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let n = match dataplane {
        "iptables" => text
            .lines()
            .nth(2)
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok()),
        _ => text
            .split("counter packets ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok()),
    };
    n.unwrap_or_else(|| panic!("{dataplane}: no counter in {text}"))
}

fn two_connections_on_one_five_tuple(dataplane: &str) {
    let ns = format!("flood-reuse-{dataplane}-{}", std::process::id());
    assert!(sh(&format!("ip netns add {ns}")).status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flows.jsonl");
    let result = std::panic::catch_unwind(|| {
        install(&ns, dataplane);
        let store = FlowStore::new("node-1", 4096, Arc::new(Metrics::new()));
        let stop = StopReader::default();
        let reader = {
            let (s, p, st) = (store.clone(), file.clone(), stop.clone());
            in_ns(&ns, move || read_loop(s, p, st))
        };
        let t = Instant::now();
        while !store.recording() {
            assert!(t.elapsed() < Duration::from_secs(10), "reader never bound");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Each connection lives past its first retransmission (initial RTO 1 s),
        // then is closed (a SYN_SENT socket leaves nothing behind) and the next
        // one binds the same source port: a new ISN on the same 5-tuple.
        in_ns(&ns, || {
            for _ in 0..2 {
                let conn = syn_from_fixed_port();
                std::thread::sleep(Duration::from_millis(1500));
                drop(conn);
            }
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let (records, _) = store.query(&FlowQuery::default());
        stop.stop();
        reader.join().unwrap();
        let packets = logged(&ns, dataplane);
        assert!(
            packets >= 4,
            "{dataplane}: each connection's SYN and its retransmission are logged, saw {packets}"
        );
        let ours: Vec<_> = records.iter().filter(|r| r.port == DPORT).collect();
        assert_eq!(
            ours.len(),
            2,
            "{dataplane}: {packets} logged SYNs of 2 connections on one 5-tuple: {ours:?}"
        );
    });
    sh(&format!("ip netns del {ns}"));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn two_connections_reusing_one_five_tuple_are_two_records_and_their_retransmissions_none() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    two_connections_on_one_five_tuple("iptables");
    if sh("nft --version").status.success() {
        two_connections_on_one_five_tuple("nftables");
    } else {
        eprintln!("nftables part skipped: no nft");
    }
}
