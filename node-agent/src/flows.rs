//! Denied-connection records: what the kernel's log rules (NFLOG / `log group`, see
//! [`sluice_policy::dataplane::deny_log`]) report, turned into [`FlowRecord`]s.
//!
//! Pure core: [`parse_nflog`] reads nfnetlink_log messages, [`decode_ipv4`] the
//! packet head they carry, [`FlowContext::record`] names endpoints and policies from
//! the last applied ruleset. The shell ([`FlowLog`]) keeps the last N records in
//! memory and appends them to the node's rotated file.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::SystemTime;

use sluice_node_files::flows::{FlowFile, FlowRecord, rfc3339};
use sluice_policy::dataplane::deny_log::{DenyReason, DenyTag};
use sluice_policy::names::Direction;

/// `NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET`.
pub const NFULNL_PACKET: u16 = 4 << 8;
/// `NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG`.
pub const NFULNL_CONFIG: u16 = (4 << 8) | 1;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One logged packet: its rule's prefix and the head of the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NflogPacket {
    pub prefix: String,
    pub payload: Vec<u8>,
}

/// The NFLOG packets in one datagram of netlink messages; other messages (acks,
/// errors) and malformed tails are skipped.
pub fn parse_nflog(buf: &[u8]) -> Vec<NflogPacket> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
        if len < 16 || off + len > buf.len() {
            break;
        }
        if ty == NFULNL_PACKET && len >= 20 {
            // nlmsghdr (16) + nfgenmsg (4), then attributes.
            let mut prefix = None;
            let mut payload = None;
            for (t, v) in attributes(&buf[off + 20..off + len]) {
                match t {
                    NFULA_PREFIX => {
                        let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
                        prefix = Some(String::from_utf8_lossy(&v[..end]).into_owned());
                    }
                    NFULA_PAYLOAD => payload = Some(v.to_vec()),
                    _ => {}
                }
            }
            if let (Some(prefix), Some(payload)) = (prefix, payload) {
                out.push(NflogPacket { prefix, payload });
            }
        }
        off += align4(len);
    }
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Netlink attributes (type, value) of `buf`.
pub fn attributes(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > buf.len() {
            break;
        }
        out.push((ty, &buf[off + 4..off + len]));
        off += align4(len);
    }
    out
}

/// The connection a packet head opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Destination port for TCP, UDP and SCTP; 0 otherwise.
    pub port: u16,
}

/// Reads an IPv4 header and the destination port after it.
pub fn decode_ipv4(p: &[u8]) -> Option<Conn> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let protocol = p[9];
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let port = match protocol {
        6 | 17 | 132 if p.len() >= ihl + 4 => u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]),
        _ => 0,
    };
    Some(Conn {
        src,
        dst,
        protocol,
        port,
    })
}

/// What names a record's endpoints and policies: from the last applied ruleset.
#[derive(Debug, Clone, Default)]
pub struct FlowContext {
    pub node: String,
    /// Pod address → `NS/POD`.
    pub endpoints: BTreeMap<Ipv4Addr, String>,
    /// Isolation log id → `NS/NAME` of the isolating policies.
    pub deny_policies: BTreeMap<String, Vec<String>>,
}

impl FlowContext {
    fn endpoint(&self, ip: Ipv4Addr) -> String {
        self.endpoints
            .get(&ip)
            .cloned()
            .unwrap_or_else(|| format!("ip:{ip}"))
    }

    /// The record of one logged packet; `None` when the prefix is not sluice's or the
    /// packet is not IPv4.
    pub fn record(&self, packet: &NflogPacket, time: SystemTime) -> Option<FlowRecord> {
        let tag = DenyTag::parse(&packet.prefix)?;
        let conn = decode_ipv4(&packet.payload)?;
        let policies = match (tag.reason, &tag.id) {
            (DenyReason::Isolated | DenyReason::DeniedByRule, Some(id)) => {
                self.deny_policies.get(id).cloned().unwrap_or_default()
            }
            _ => Vec::new(),
        };
        Some(FlowRecord {
            time: rfc3339(time),
            node: self.node.clone(),
            verdict: "deny".into(),
            direction: match tag.direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            }
            .into(),
            src: self.endpoint(conn.src),
            dst: self.endpoint(conn.dst),
            protocol: match conn.protocol {
                6 => "TCP".into(),
                17 => "UDP".into(),
                132 => "SCTP".into(),
                n => n.to_string(),
            },
            port: conn.port,
            reason: tag.reason.as_str().into(),
            policies,
        })
    }
}

/// The pod a record's counter is labelled by: the protected one (destination on
/// ingress, source on egress), its namespace, or `-` for a bare address.
pub fn counter_labels(r: &FlowRecord) -> (String, String, String) {
    let pod = if r.direction == "ingress" {
        &r.dst
    } else {
        &r.src
    };
    let namespace = match pod.split_once('/') {
        Some((ns, _)) if !pod.starts_with("ip:") => ns.to_string(),
        _ => "-".to_string(),
    };
    let policy = if r.policies.is_empty() {
        "-".to_string()
    } else {
        r.policies.join(",")
    };
    (namespace, policy, r.direction.clone())
}

/// The last `capacity` records in memory, and the node's file.
pub struct FlowLog {
    capacity: usize,
    recent: VecDeque<FlowRecord>,
    file: Option<FlowFile>,
}

impl FlowLog {
    pub fn new(capacity: usize, file: Option<FlowFile>) -> FlowLog {
        FlowLog {
            capacity,
            recent: VecDeque::with_capacity(capacity),
            file,
        }
    }

    pub fn push(&mut self, record: FlowRecord) -> std::io::Result<()> {
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        let out = match &mut self.file {
            Some(f) => f.append(&record),
            None => Ok(()),
        };
        self.recent.push_back(record);
        out
    }

    pub fn recent(&self) -> impl Iterator<Item = &FlowRecord> {
        self.recent.iter()
    }
}

/// A netlink socket bound to one NFLOG group (the shell around [`parse_nflog`]).
pub struct NflogSocket {
    fd: std::os::fd::OwnedFd,
}

impl NflogSocket {
    /// Binds `group` and asks for the first 128 bytes of each packet: the IPv4 and
    /// transport headers are all a record needs.
    pub fn bind(group: u16) -> std::io::Result<NflogSocket> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let sock = NflogSocket {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) },
        };
        let bind_cmd = attr_bytes(1, &[1]); // NFULA_CFG_CMD: NFULNL_CFG_CMD_BIND
        let mut mode = 128u32.to_be_bytes().to_vec();
        mode.extend([2, 0]); // NFULNL_COPY_PACKET
        sock.send_config(group, &bind_cmd)?;
        sock.send_config(group, &attr_bytes(2, &mode))?; // NFULA_CFG_MODE
        Ok(sock)
    }

    fn send_config(&self, group: u16, attrs: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = 16 + 4 + attrs.len();
        let mut msg = (len as u32).to_ne_bytes().to_vec();
        msg.extend(NFULNL_CONFIG.to_ne_bytes());
        msg.extend((libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg.extend([0u8; 8]); // seq, pid
        msg.extend([libc::AF_UNSPEC as u8, 0]);
        msg.extend(group.to_be_bytes());
        msg.extend(attrs);
        // SAFETY: a zeroed sockaddr_nl is the kernel as destination.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and addr outlive the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Blocks for the next datagram and returns its packets.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<Vec<NflogPacket>> {
        use std::os::fd::AsRawFd;
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(parse_nflog(&buf[..n as usize]))
    }
}

fn attr_bytes(ty: u16, v: &[u8]) -> Vec<u8> {
    let mut out = ((4 + v.len()) as u16).to_ne_bytes().to_vec();
    out.extend(ty.to_ne_bytes());
    out.extend(v);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::attr_bytes as attr;

    fn message(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 7];
        body.extend(attr(NFULA_PREFIX, &[prefix.as_bytes(), &[0]].concat()));
        body.extend(attr(NFULA_PAYLOAD, payload));
        let mut out = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        out.extend(NFULNL_PACKET.to_ne_bytes());
        out.extend([0u8; 10]);
        out.extend(body);
        out
    }

    fn tcp_syn(src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend([0x9c, 0x40]);
        p.extend(port.to_be_bytes());
        p.extend([0u8; 16]);
        p
    }

    #[test]
    fn an_isolation_record_names_both_pods_and_the_isolating_policies() {
        let mut buf = message(
            "slc:iso:i:SLUICE-G-abc",
            &tcp_syn([10, 0, 0, 1], [10, 0, 0, 2], 80),
        );
        buf.extend(message("not ours", &tcp_syn([1, 1, 1, 1], [2, 2, 2, 2], 1)));
        let packets = parse_nflog(&buf);
        assert_eq!(packets.len(), 2);
        let ctx = FlowContext {
            node: "node-2".into(),
            endpoints: [(Ipv4Addr::new(10, 0, 0, 2), "prod/db".to_string())].into(),
            deny_policies: [(
                "SLUICE-G-abc".to_string(),
                vec!["prod/deny-all".to_string()],
            )]
            .into(),
        };
        let r = ctx.record(&packets[0], SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(
            (r.src.as_str(), r.dst.as_str(), r.port, r.protocol.as_str()),
            ("ip:10.0.0.1", "prod/db", 80, "TCP")
        );
        assert_eq!(
            (r.direction.as_str(), r.reason.as_str()),
            ("ingress", "isolated")
        );
        assert_eq!(r.policies, ["prod/deny-all"]);
        assert_eq!(
            counter_labels(&r),
            ("prod".into(), "prod/deny-all".into(), "ingress".into())
        );
        assert!(ctx.record(&packets[1], SystemTime::UNIX_EPOCH).is_none());
    }

    #[test]
    fn the_memory_keeps_only_the_last_records() {
        let mut log = FlowLog::new(2, None);
        let ctx = FlowContext::default();
        for port in [1, 2, 3] {
            let p = NflogPacket {
                prefix: "slc:spoof:e".into(),
                payload: tcp_syn([10, 0, 0, 9], [10, 0, 0, 8], port),
            };
            log.push(ctx.record(&p, SystemTime::UNIX_EPOCH).unwrap())
                .unwrap();
        }
        let ports: Vec<u16> = log.recent().map(|r| r.port).collect();
        assert_eq!(ports, [2, 3]);
    }

    #[test]
    fn truncated_messages_yield_nothing_rather_than_panicking() {
        let buf = message("slc:iso:i", &tcp_syn([10, 0, 0, 1], [10, 0, 0, 2], 80));
        for cut in 0..buf.len() {
            let _ = parse_nflog(&buf[..cut]);
        }
        assert_eq!(decode_ipv4(&[0x45; 10]), None);
    }

    /// Privileged: a real NFLOG rule in a throwaway network namespace reports a real
    /// packet with its prefix.
    #[test]
    fn a_kernel_nflog_rule_reaches_the_socket_with_its_prefix() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let ns = format!("slcflows{}", std::process::id());
        let sh = |cmd: &str| {
            std::process::Command::new("sh")
                .args(["-c", cmd])
                .status()
                .unwrap()
                .success()
        };
        assert!(sh(&format!("ip netns add {ns}")));
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let sock = NflogSocket::bind(7).unwrap();
                assert!(sh(&format!(
                    "ip netns exec {ns} sh -c 'ip link set lo up && iptables -A OUTPUT -p udp \\
                     --dport 9 -m conntrack --ctstate NEW -j NFLOG --nflog-group 7 \\
                     --nflog-prefix slc:iso:e:X'"
                )));
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                udp.send_to(b"x", "127.0.0.1:9").unwrap();
                let mut buf = vec![0u8; 65536];
                loop {
                    let got = sock.recv(&mut buf).unwrap();
                    if let Some(p) = got.into_iter().next() {
                        return p;
                    }
                }
            })
            .join()
        });
        sh(&format!("ip netns del {ns}"));
        let p = result.unwrap();
        assert_eq!(p.prefix, "slc:iso:e:X");
        let conn = decode_ipv4(&p.payload).unwrap();
        assert_eq!((conn.protocol, conn.port), (17, 9));
    }
}
