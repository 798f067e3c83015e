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
use sluice_policy::dataplane::deny_log::{AllowTag, DenyReason, LogTag};
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
    /// Source port for TCP, UDP and SCTP; 0 otherwise.
    pub sport: u16,
    /// What tells one opening of this 5-tuple from another: a TCP SYN's initial
    /// sequence number, an SCTP INIT's initiate tag (a retransmission carries the
    /// same, a new connection a new one); `None` for any other packet.
    pub opening: Option<u32>,
}

/// Bytes of each logged packet the agent asks the kernel for: the longest IPv4
/// header (60) plus what [`decode_ipv4`] reads after it (20: the TCP sequence number
/// and flags, the SCTP INIT's initiate tag). The log rules set no size of their own
/// (no `--nflog-size`, no `snaplen`), so this copy range is what the kernel sends.
pub const COPY_RANGE: u32 = 128;

/// Reads an IPv4 header, the ports after it, and what tells a new connection on
/// them from a retransmission ([`Conn::opening`]).
pub fn decode_ipv4(p: &[u8]) -> Option<Conn> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let protocol = p[9];
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let (sport, port) = match protocol {
        6 | 17 | 132 if p.len() >= ihl + 4 => (
            u16::from_be_bytes([p[ihl], p[ihl + 1]]),
            u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]),
        ),
        _ => (0, 0),
    };
    let word = |at: usize| {
        p.get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    };
    let opening = match protocol {
        // A SYN without ACK: the sequence number is the connection's ISN.
        6 => p
            .get(ihl + 13)
            .filter(|flags| *flags & 0x12 == 0x02)
            .and_then(|_| word(ihl + 4)),
        // Common header (12 bytes), then the first chunk: INIT (type 1) carries its
        // initiate tag right after the chunk header.
        132 if p.get(ihl + 12) == Some(&1) => word(ihl + 16),
        _ => None,
    };
    Some(Conn {
        src,
        dst,
        protocol,
        port,
        sport,
        opening,
    })
}

/// How long a denied TCP or SCTP 5-tuple is remembered: a dropped first packet
/// leaves no conntrack entry, so every retransmitted SYN (1, 3, 7 … s) or INIT is
/// `ct state new` again and logged again. The kernel forgets an unanswered SYN after
/// 120 s (`nf_conntrack_tcp_timeout_syn_sent`); so do we. Within it, the opening
/// ([`Conn::opening`]) tells a retransmission (the same ISN or initiate tag) from a
/// new connection reusing the 5-tuple (a new one).
pub const SAME_CONNECTION_MS: u64 = 120_000;
/// How long a denied UDP (or other untagged) 5-tuple stays one connection: nothing
/// in a datagram tells a resend from a new socket on the same ports, so we count as
/// conntrack counts an allowed flow: datagrams on one 5-tuple less than
/// `nf_conntrack_udp_timeout` (30 s) apart are one connection.
pub const SAME_FLOW_MS: u64 = 30_000;
/// Most 5-tuples remembered; past it the least recently seen are forgotten.
pub const MAX_REMEMBERED: usize = 65_536;

/// How long a 5-tuple of `protocol` is remembered after its last packet.
pub fn remembered_ms(protocol: u8) -> u64 {
    match protocol {
        6 | 132 => SAME_CONNECTION_MS,
        _ => SAME_FLOW_MS,
    }
}

/// (source, source port, destination, destination port, protocol).
pub type ConnKey = (Ipv4Addr, u16, Ipv4Addr, u16, u8);

/// What is remembered of a recorded 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// Unix ms of its last logged packet.
    last_ms: u64,
    /// The opening of the connection recorded on it, once a packet carried one.
    opening: Option<u32>,
}

/// Which logged packets open a new denied connection and which repeat one already
/// recorded (pure: the caller passes the time).
#[derive(Debug, Default, Clone)]
pub struct Repeats {
    seen: std::collections::HashMap<ConnKey, Seen>,
}

impl Repeats {
    /// Notes a packet of `conn` at `now_ms` (Unix ms); true when it opens a new
    /// connection (record it), false when it repeats one recorded on the same 5-tuple
    /// within [`remembered_ms`]. A packet whose opening differs from the recorded one
    /// is a new connection reusing the 5-tuple; one without an opening (UDP, a TCP
    /// segment that is no SYN), or on a 5-tuple whose opening is not known, repeats.
    /// Each sighting extends the window.
    pub fn first_sight(&mut self, conn: &Conn, now_ms: u64) -> bool {
        let key = (conn.src, conn.sport, conn.dst, conn.port, conn.protocol);
        let window = remembered_ms(conn.protocol);
        let earlier = self
            .seen
            .get(&key)
            .filter(|s| now_ms.saturating_sub(s.last_ms) < window)
            .copied();
        let new = match (earlier, conn.opening) {
            (None, _) => true,
            (
                Some(Seen {
                    opening: Some(was), ..
                }),
                Some(now),
            ) => was != now,
            (Some(_), _) => false,
        };
        let opening = match earlier {
            Some(s) if !new => s.opening.or(conn.opening),
            _ => conn.opening,
        };
        self.seen.insert(
            key,
            Seen {
                last_ms: now_ms,
                opening,
            },
        );
        if self.seen.len() > MAX_REMEMBERED {
            self.forget_expired(now_ms);
            if self.seen.len() > MAX_REMEMBERED {
                // Still full of live ones: drop the oldest half.
                let mut times: Vec<u64> = self.seen.values().map(|s| s.last_ms).collect();
                times.sort_unstable();
                let cut = times[times.len() / 2];
                self.seen.retain(|_, s| s.last_ms > cut);
            }
        }
        new
    }

    fn forget_expired(&mut self, now_ms: u64) {
        self.seen
            .retain(|k, s| now_ms.saturating_sub(s.last_ms) < remembered_ms(k.4));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// The live entries as text lines (`src sport dst dport proto ms opening`, the
    /// opening `-` when not known), for the file a stopping agent leaves to the next
    /// one.
    pub fn save(&self, now_ms: u64) -> String {
        let mut out = String::new();
        for ((s, sp, d, dp, p), seen) in &self.seen {
            if now_ms.saturating_sub(seen.last_ms) < remembered_ms(*p) {
                let opening = seen
                    .opening
                    .map_or_else(|| "-".to_string(), |o| o.to_string());
                out.push_str(&format!(
                    "{s} {sp} {d} {dp} {p} {} {opening}\n",
                    seen.last_ms
                ));
            }
        }
        out
    }

    /// Reads [`Repeats::save`]'s text; bad lines are skipped. A line of an older
    /// agent (no opening field) loads with the opening not known.
    pub fn load(text: &str, now_ms: u64) -> Repeats {
        let mut r = Repeats::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let parsed = (|| {
                let key: ConnKey = (
                    f.first()?.parse().ok()?,
                    f.get(1)?.parse().ok()?,
                    f.get(2)?.parse().ok()?,
                    f.get(3)?.parse().ok()?,
                    f.get(4)?.parse().ok()?,
                );
                let last_ms = f.get(5)?.parse::<u64>().ok()?;
                let opening = match f.get(6) {
                    None | Some(&"-") => None,
                    Some(o) => Some(o.parse::<u32>().ok()?),
                };
                Some((key, Seen { last_ms, opening }))
            })();
            if let Some((k, seen)) = parsed
                && now_ms.saturating_sub(seen.last_ms) < remembered_ms(k.4)
            {
                r.seen.insert(k, seen);
            }
        }
        r
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What names a record's endpoints and policies: from the last applied ruleset.
#[derive(Debug, Clone, Default)]
pub struct FlowContext {
    pub node: String,
    /// Pod address → `NS/POD`.
    pub endpoints: BTreeMap<Ipv4Addr, String>,
    /// Isolation log id → `NS/NAME` of the isolating policies.
    pub deny_policies: BTreeMap<String, Vec<String>>,
    /// The snapshot the last applied ruleset was compiled from: allow records are
    /// named, and kept or not, by evaluating the connection in it.
    pub snapshot: Option<std::sync::Arc<crate::datastore::Snapshot>>,
}

/// Why an allowed connection was allowed, as records spell it.
pub const ALLOWED_BY_RULE: &str = "allowed-by-rule";
/// An allowed connection of a pod no policy isolates in that direction.
pub const NOT_ISOLATED: &str = "not-isolated";

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
        let tag = match LogTag::parse(&packet.prefix)? {
            LogTag::Deny(tag) => tag,
            LogTag::Allow(tag) => return self.allow_record(&tag, packet, time),
        };
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
            protocol: protocol_name(conn.protocol),
            port: conn.port,
            reason: tag.reason.as_str().into(),
            policies,
        })
    }
}

impl FlowContext {
    /// The record of an allowed connection an opt-in asks for, `None` otherwise.
    /// The kernel logs every allow of an opted-in pod (its namespace's opt-in, or a
    /// policy's that selects it); here the connection is evaluated in the snapshot
    /// the rules came from, which names every policy that allowed it and says
    /// whether an opt-in covers it: the pod's namespace's in that direction, or
    /// that of one of the allowing policies. A connection the source's egress
    /// allowed but the destination's ingress then denies is not an allow (its deny
    /// record says what happened).
    fn allow_record(
        &self,
        tag: &AllowTag,
        packet: &NflogPacket,
        time: SystemTime,
    ) -> Option<FlowRecord> {
        use sluice_policy::evaluate::{Side, allowing_policies};
        use sluice_policy::model::{Action, Protocol};
        use sluice_policy::{Endpoint, Probe, Verdict, evaluate};
        let conn = decode_ipv4(&packet.payload)?;
        let cluster = &self.snapshot.as_ref()?.cluster;
        let (protocol, port) = match conn.protocol {
            6 => (Protocol::Tcp, conn.port),
            17 => (Protocol::Udp, conn.port),
            132 => (Protocol::Sctp, conn.port),
            1 => (Protocol::Icmp, 0),
            _ => return None,
        };
        let probe = Probe {
            from: Endpoint::Ip(conn.src.into()),
            to: Endpoint::Ip(conn.dst.into()),
            port,
            protocol,
        };
        let e = evaluate(cluster, &probe).ok()?;
        if e.verdict != Verdict::Allow {
            return None;
        }
        let ingress = tag.direction == Direction::Ingress;
        let (side, pod) = if ingress {
            (&e.ingress, &e.to)
        } else {
            (&e.egress, &e.from)
        };
        let sluice_policy::evaluate::Resolved::Pod { pod, .. } = pod else {
            return None;
        };
        let (reason, opted, policies) = match side {
            Side::Allowed { .. } => {
                let by = allowing_policies(cluster, &e, ingress);
                let opted = by.iter().any(|k| {
                    cluster
                        .policies
                        .get(k)
                        .is_some_and(|p| p.log_allowed.covers(ingress))
                });
                (
                    ALLOWED_BY_RULE,
                    opted,
                    by.iter().map(|k| k.to_string()).collect(),
                )
            }
            Side::ClusterPolicy { by } if by.action == Action::Accept => {
                let opted = cluster
                    .cluster_policies
                    .get(&by.policy)
                    .is_some_and(|p| p.log_allowed.covers(ingress));
                let name = format!("ClusterNetworkPolicy/{}", by.policy);
                (ALLOWED_BY_RULE, opted, vec![name])
            }
            Side::NotIsolated => (NOT_ISOLATED, false, Vec::new()),
            // Loopback, the node itself: never through a pod's chain.
            _ => return None,
        };
        if !opted
            && !cluster
                .namespace_log_allowed(&pod.namespace)
                .covers(ingress)
        {
            return None;
        }
        Some(FlowRecord {
            time: rfc3339(time),
            node: self.node.clone(),
            verdict: "allow".into(),
            direction: if ingress { "ingress" } else { "egress" }.into(),
            src: self.endpoint(conn.src),
            dst: self.endpoint(conn.dst),
            protocol: protocol_name(conn.protocol),
            port: conn.port,
            reason: reason.into(),
            policies,
        })
    }
}

fn protocol_name(protocol: u8) -> String {
    match protocol {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
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
    // One increment per record, under one label naming every deciding policy
    // (sorted, comma-joined): a sum over the family counts connections, not
    // connections times policies (docs/flows.md, "Counters").
    let policy = if r.policies.is_empty() {
        "-".to_string()
    } else {
        let mut p = r.policies.clone();
        p.sort();
        p.join(",")
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

    /// Keeps a record in memory only (one read back from the file).
    fn remember(&mut self, record: FlowRecord) {
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(record);
    }
}

/// Records kept in memory for `sluicectl flows` (a record is ~300 bytes there).
pub const RECENT_RECORDS: usize = 4096;

/// Everything the agent knows of denied connections, shared by the reading thread,
/// the node-local API and `GET /flows`: the context records are named from, the
/// last [`RECENT_RECORDS`] records, the file, and the live feed followers read.
pub struct FlowStore {
    log: std::sync::Mutex<FlowLog>,
    context: std::sync::RwLock<FlowContext>,
    live: tokio::sync::broadcast::Sender<std::sync::Arc<FlowRecord>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    repeats: std::sync::Mutex<Repeats>,
    /// The same for allow records, one table per direction ([ingress, egress]):
    /// each opted-in side records a connection once, and an egress allow never
    /// hides a deny record of the same 5-tuple.
    allow_repeats: std::sync::Mutex<[Repeats; 2]>,
    /// The log group is bound: connections denied from now on are recorded.
    recording: std::sync::atomic::AtomicBool,
}

impl FlowStore {
    pub fn new(
        node: &str,
        capacity: usize,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> std::sync::Arc<FlowStore> {
        let (live, _) = tokio::sync::broadcast::channel(1024);
        std::sync::Arc::new(FlowStore {
            log: std::sync::Mutex::new(FlowLog::new(capacity, None)),
            context: std::sync::RwLock::new(FlowContext {
                node: node.to_string(),
                ..Default::default()
            }),
            live,
            metrics,
            repeats: std::sync::Mutex::new(Repeats::default()),
            allow_repeats: std::sync::Mutex::new(Default::default()),
            recording: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the log group is bound (denied connections are being recorded).
    pub fn recording(&self) -> bool {
        self.recording.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn repeats(&self) -> std::sync::MutexGuard<'_, Repeats> {
        self.repeats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self) -> std::sync::MutexGuard<'_, FlowLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After each apply: who has which address, and which policies each isolation
    /// or deny log id stands for.
    pub fn set_context(
        &self,
        endpoints: BTreeMap<Ipv4Addr, String>,
        deny_policies: BTreeMap<String, Vec<String>>,
    ) {
        let mut c = self.context.write().unwrap_or_else(|e| e.into_inner());
        c.endpoints = endpoints;
        c.deny_policies = deny_policies;
    }

    /// After each apply: the snapshot its rules came from, which allow records are
    /// evaluated in.
    pub fn set_snapshot(&self, snapshot: std::sync::Arc<crate::datastore::Snapshot>) {
        let mut c = self.context.write().unwrap_or_else(|e| e.into_inner());
        c.snapshot = Some(snapshot);
    }

    /// Takes over the file: what it already holds becomes the memory (the last
    /// `capacity` records), and new records are appended to it.
    pub fn attach_file(&self, file: FlowFile, earlier: Vec<FlowRecord>) {
        let mut log = self.log();
        for r in earlier {
            log.remember(r);
        }
        log.file = Some(file);
    }

    /// Lets go of the file (on the way out).
    pub fn detach_file(&self) {
        self.log().file = None;
    }

    /// One logged packet: named, kept, written, counted and sent to followers.
    pub fn ingest(&self, packet: &NflogPacket, time: SystemTime) {
        let Some(conn) = decode_ipv4(&packet.payload) else {
            return;
        };
        let record = match LogTag::parse(&packet.prefix) {
            None => return,
            Some(LogTag::Deny(_)) => {
                if !self.repeats().first_sight(&conn, unix_ms(time)) {
                    return;
                }
                self.name(packet, time)
            }
            // Evaluated first: only an allow that is kept takes its 5-tuple.
            Some(LogTag::Allow(tag)) => self.name(packet, time).filter(|_| {
                let mut seen = self.allow_repeats.lock().unwrap_or_else(|e| e.into_inner());
                let side = usize::from(tag.direction == Direction::Egress);
                seen[side].first_sight(&conn, unix_ms(time))
            }),
        };
        let Some(record) = record else {
            return;
        };
        let (namespace, policy, direction) = counter_labels(&record);
        let counters = if record.verdict == "allow" {
            &self.metrics.allowed_connections
        } else {
            &self.metrics.denied_connections
        };
        counters
            .get_or_create(&vec![
                ("namespace".to_string(), namespace),
                ("policy".to_string(), policy),
                ("direction".to_string(), direction),
            ])
            .inc();
        let mut log = self.log();
        if let Err(e) = log.push(record.clone()) {
            tracing::warn!(error = %e, "cannot append to the flow record file");
        }
        // Under the log's lock: a follower that subscribed under it gets every
        // record exactly once, from the memory or from here.
        let _ = self.live.send(std::sync::Arc::new(record));
    }

    fn name(&self, packet: &NflogPacket, time: SystemTime) -> Option<FlowRecord> {
        let c = self.context.read().unwrap_or_else(|e| e.into_inner());
        c.record(packet, time)
    }

    /// The records `query` asks for now, and (for `follow`) a feed of every later
    /// one: no record is in both, none is missed between them.
    pub fn query(
        &self,
        query: &sluice_node_files::flows::FlowQuery,
    ) -> (
        Vec<FlowRecord>,
        tokio::sync::broadcast::Receiver<std::sync::Arc<FlowRecord>>,
    ) {
        let log = self.log();
        let feed = self.live.subscribe();
        (query.select(log.recent()), feed)
    }
}

/// The answer to a `flows` request, as JSON lines (one [`FlowRecord`] each): the
/// matching records in memory, then, with `follow`, every later matching one as it
/// is made. Shared by the node-local API and `GET /flows`, so both say the same.
/// A follower too slow for the feed skips what it missed (the file keeps it).
pub fn answer(
    store: &FlowStore,
    query: sluice_node_files::flows::FlowQuery,
) -> impl futures::Stream<Item = Vec<u8>> + Send + 'static {
    let (now, feed) = store.query(&query);
    let feed = query.follow.then_some(feed);
    let line = |r: &FlowRecord| {
        let mut v = serde_json::to_vec(r).expect("records serialize");
        v.push(b'\n');
        v
    };
    let first = futures::stream::iter(now.iter().map(line).collect::<Vec<_>>());
    let rest = futures::stream::unfold((feed, query), move |(feed, query)| async move {
        let mut feed = feed?;
        loop {
            match feed.recv().await {
                Ok(r) if query.matches(&r) => return Some((line(&r), (Some(feed), query))),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "flows follower lagged");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    futures::StreamExt::chain(first, rest)
}

/// Addresses of the cluster's pods (hostNetwork ones share their node's and stay
/// bare addresses), as `NS/POD`.
pub fn endpoints(cluster: &sluice_policy::model::Cluster) -> BTreeMap<Ipv4Addr, String> {
    let mut out = BTreeMap::new();
    for pod in cluster.pods.values().filter(|p| !p.host_network) {
        for ip in &pod.ips {
            if let std::net::IpAddr::V4(v4) = ip {
                out.insert(*v4, format!("{}/{}", pod.namespace, pod.name));
            }
        }
    }
    out
}

/// Stops the reading thread, which then drains what the kernel already queued.
#[derive(Clone, Default)]
pub struct StopReader(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl StopReader {
    pub fn stop(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn stopped(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The reading thread's life, in the order that keeps a restart from losing or
/// repeating records (docs/flows.md, "Restarts"):
/// 1. lock `<file>.lock` (an agent on its way out holds it until it has drained);
/// 2. bind the log group (retrying while the old agent still holds it);
/// 3. load the file's last records into memory, then append to it;
/// 4. on stop: unbind (the kernel stops queueing), drain what is queued, write it,
///    release the file and the lock.
pub fn read_loop(store: std::sync::Arc<FlowStore>, path: std::path::PathBuf, stop: StopReader) {
    use sluice_policy::dataplane::deny_log::LOG_GROUP;
    let beside = |ext: &str| {
        let mut s = path.as_os_str().to_owned();
        s.push(ext);
        std::path::PathBuf::from(s)
    };
    let (lock_path, seen_path) = (beside(".lock"), beside(".seen"));
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let lock = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
    {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, path = %lock_path.display(), "cannot open the flow record lock; denied connections are not recorded");
            return;
        }
    };
    // Blocking: an earlier agent draining on its way out is the only holder.
    if let Err(e) = lock.lock() {
        tracing::error!(error = %e, "cannot lock the flow record file; denied connections are not recorded");
        return;
    }
    let sock = loop {
        match NflogSocket::bind(LOG_GROUP) {
            Ok(s) => break s,
            Err(e) if stop.stopped() => {
                tracing::debug!(error = %e, "stopped before the log group was bound");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, group = LOG_GROUP, "cannot bind the log group yet; retrying");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    };
    match (
        sluice_node_files::flows::read_last(&path, RECENT_RECORDS),
        FlowFile::open(&path, sluice_node_files::flows::MAX_FILE_BYTES),
    ) {
        (Ok(earlier), Ok(file)) => store.attach_file(file, earlier),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, path = %path.display(), "flow record file unusable; keeping records in memory only")
        }
    }
    // The connections the previous agent recorded and may still see retransmitted.
    if let Ok(text) = std::fs::read_to_string(&seen_path) {
        *store.repeats() = Repeats::load(&text, unix_ms(SystemTime::now()));
    }
    let save_seen = |store: &FlowStore| {
        let text = store.repeats().save(unix_ms(SystemTime::now()));
        if let Err(e) = crate::status::write_atomic(&seen_path, text.as_bytes(), 0o600) {
            tracing::debug!(error = %e, "cannot save the recent denied connections");
        }
    };
    store
        .recording
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(group = LOG_GROUP, file = %path.display(), "recording denied connections");
    let mut buf = vec![0u8; 256 * 1024];
    let mut saved = std::time::Instant::now();
    let mut unsaved = false;
    while !stop.stopped() {
        // Now and then, so even a killed agent leaves its successor most of them.
        if unsaved && saved.elapsed() >= std::time::Duration::from_secs(2) {
            save_seen(&store);
            (saved, unsaved) = (std::time::Instant::now(), false);
        }
        match sock.recv(&mut buf) {
            Ok(packets) => {
                let now = SystemTime::now();
                unsaved |= !packets.is_empty();
                for p in &packets {
                    store.ingest(p, now);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::warn!("flow records lost: the log socket's buffer overflowed")
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(error = %e, "reading the log group failed; denied connections are no longer recorded");
                break;
            }
        }
    }
    if let Err(e) = sock.unbind(LOG_GROUP) {
        tracing::warn!(error = %e, "unbinding the log group");
    }
    store
        .recording
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let now = SystemTime::now();
    for p in sock.drain(&mut buf) {
        store.ingest(&p, now);
    }
    save_seen(&store);
    store.detach_file();
    drop(lock);
}

/// A netlink socket bound to one NFLOG group (the shell around [`parse_nflog`]).
pub struct NflogSocket {
    fd: std::os::fd::OwnedFd,
}

impl NflogSocket {
    /// Binds `group` and asks for the first [`COPY_RANGE`] bytes of each packet: the
    /// IPv4 and transport headers are all a record and its deduplication need.
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
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend([2, 0]); // NFULNL_COPY_PACKET
        // Acked: a group another process holds (an agent still draining on its way
        // out) answers EBUSY, which the caller waits out.
        sock.send_config(group, &bind_cmd, true)?;
        sock.ack()?;
        sock.send_config(group, &attr_bytes(2, &mode), false)?; // NFULA_CFG_MODE
        // Send each packet at once: nft's `log group` rules carry no threshold of
        // their own, and the instance's default batches 100 packets or 1 s.
        sock.send_config(group, &attr_bytes(4, &1u32.to_be_bytes()), false)?; // NFULA_CFG_QTHRESH
        // A receive timeout, so the reading thread sees a stop request.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: tv outlives the call; the length is its size.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                sock.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(sock)
    }

    /// Stops the kernel sending to this socket (what is already queued stays
    /// readable: [`NflogSocket::drain`] it).
    pub fn unbind(&self, group: u16) -> std::io::Result<()> {
        self.send_config(group, &attr_bytes(1, &[2]), false) // NFULNL_CFG_CMD_UNBIND
    }

    /// Every packet still queued on the socket, without waiting.
    pub fn drain(&self, buf: &mut [u8]) -> Vec<NflogPacket> {
        use std::os::fd::AsRawFd;
        let mut out = Vec::new();
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                return out;
            }
            out.extend(parse_nflog(&buf[..n as usize]));
        }
    }

    /// Reads the kernel's answer to an acked request: its error, if any.
    fn ack(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 1024];
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        // nlmsghdr (16), then NLMSG_ERROR's negative errno (0 = ack).
        if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
            let code = i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes"));
            if code != 0 {
                return Err(std::io::Error::from_raw_os_error(-code));
            }
        }
        Ok(())
    }

    fn send_config(&self, group: u16, attrs: &[u8], ack: bool) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = 16 + 4 + attrs.len();
        let mut msg = (len as u32).to_ne_bytes().to_vec();
        msg.extend(NFULNL_CONFIG.to_ne_bytes());
        let flags = libc::NLM_F_REQUEST | if ack { libc::NLM_F_ACK } else { 0 };
        msg.extend((flags as u16).to_ne_bytes());
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
            ..Default::default()
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

    /// A shop: `web` calls `api`, which two policies open to it on port 80 (one of
    /// them also on 81) under a default-deny; `out` is outside.
    fn shop(namespace_opt_in: &str, opted_policies: &[(&str, &str)]) -> FlowContext {
        let annotate =
            |value: &str| format!(", annotations: {{sluice.dev/log-allowed: \"{value}\"}}");
        let policy = |name: &str, spec: &str| {
            let a = opted_policies
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| annotate(v))
                .unwrap_or_default();
            format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: {name}, namespace: prod{a}}}\nspec: {spec}\n"
            )
        };
        let pod = |name: &str, ip: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: prod, labels: {{app: {name}}}}}\n\
                 spec: {{nodeName: n1, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
            )
        };
        let mut text = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: prod{}}}\n",
            annotate(namespace_opt_in)
        );
        text += &pod("web", "10.0.0.1");
        text += &pod("api", "10.0.0.2");
        text += &policy("default-deny", "{podSelector: {}, policyTypes: [Ingress]}");
        let from_web = "from: [{podSelector: {matchLabels: {app: web}}}]";
        text += &policy(
            "api-a",
            &format!(
                "{{podSelector: {{matchLabels: {{app: api}}}}, ingress: [{{{from_web}, ports: [{{port: 80}}]}}]}}"
            ),
        );
        text += &policy(
            "api-b",
            &format!(
                "{{podSelector: {{matchLabels: {{app: api}}}}, ingress: [{{{from_web}, ports: [{{port: 80}}, {{port: 81}}]}}]}}"
            ),
        );
        let cluster = sluice_policy::parse_documents("t", &text)
            .unwrap()
            .into_cluster();
        FlowContext {
            node: "n1".into(),
            endpoints: crate::flows::endpoints(&cluster),
            snapshot: Some(std::sync::Arc::new(crate::datastore::Snapshot {
                cluster,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn allow(ctx: &FlowContext, dir: &str, dst: [u8; 4], port: u16) -> Option<FlowRecord> {
        let p = NflogPacket {
            prefix: format!("slc:allow:{dir}"),
            payload: tcp_syn([10, 0, 0, 1], dst, port),
        };
        ctx.record(&p, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn an_allow_record_names_every_policy_whose_rule_admits_the_connection() {
        let ctx = shop("ingress", &[]);
        let r = allow(&ctx, "i", [10, 0, 0, 2], 80).unwrap();
        assert_eq!(
            (r.verdict.as_str(), r.direction.as_str(), r.reason.as_str()),
            ("allow", "ingress", "allowed-by-rule")
        );
        assert_eq!((r.src.as_str(), r.dst.as_str()), ("prod/web", "prod/api"));
        assert_eq!(r.policies, ["prod/api-a", "prod/api-b"]);
        assert_eq!(
            allow(&ctx, "i", [10, 0, 0, 2], 81).unwrap().policies,
            ["prod/api-b"]
        );
        assert_eq!(
            counter_labels(&r),
            (
                "prod".into(),
                "prod/api-a,prod/api-b".into(),
                "ingress".into()
            )
        );
        // The namespace opts in ingress only: web's egress allows are not kept.
        assert_eq!(allow(&ctx, "e", [10, 0, 0, 2], 80), None);
    }

    #[test]
    fn a_pod_no_policy_isolates_is_recorded_as_not_isolated_under_its_namespaces_opt_in() {
        let ctx = shop("egress", &[]);
        let r = allow(&ctx, "e", [192, 0, 2, 1], 443).unwrap();
        assert_eq!(
            (r.direction.as_str(), r.reason.as_str(), r.dst.as_str()),
            ("egress", "not-isolated", "ip:192.0.2.1")
        );
        assert!(r.policies.is_empty());
        assert_eq!(counter_labels(&r).1, "-");
    }

    #[test]
    fn an_egress_allow_the_destination_then_denies_is_no_allow_record() {
        let ctx = shop("true", &[]);
        assert!(allow(&ctx, "e", [10, 0, 0, 2], 80).is_some());
        assert_eq!(allow(&ctx, "e", [10, 0, 0, 2], 82), None);
    }

    #[test]
    fn a_policys_opt_in_keeps_only_the_connections_that_policy_allows() {
        // default-deny selects api and opts in, but allows nothing itself.
        let ctx = shop("false", &[("default-deny", "true")]);
        assert_eq!(allow(&ctx, "i", [10, 0, 0, 2], 80), None);
        let ctx = shop("false", &[("default-deny", "true"), ("api-b", "ingress")]);
        let r = allow(&ctx, "i", [10, 0, 0, 2], 81).unwrap();
        assert_eq!(r.policies, ["prod/api-b"]);
        // Allowed by api-a too: every allowing policy is named, opted in or not.
        let r = allow(&ctx, "i", [10, 0, 0, 2], 80).unwrap();
        assert_eq!(r.policies, ["prod/api-a", "prod/api-b"]);
        let ctx = shop("false", &[("api-b", "egress")]);
        assert_eq!(allow(&ctx, "i", [10, 0, 0, 2], 81), None);
    }

    #[test]
    fn allow_records_are_counted_apart_and_repeats_of_one_side_are_recorded_once() {
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let store = FlowStore::new("n1", 16, metrics.clone());
        let ctx = shop("true", &[]);
        store.set_context(ctx.endpoints.clone(), Default::default());
        store.set_snapshot(ctx.snapshot.clone().unwrap());
        let now = SystemTime::now();
        for prefix in ["slc:allow:e", "slc:allow:e", "slc:allow:i"] {
            let p = NflogPacket {
                prefix: prefix.into(),
                payload: tcp_syn([10, 0, 0, 1], [10, 0, 0, 2], 80),
            };
            store.ingest(&p, now);
        }
        let (records, _) = store.query(&Default::default());
        let sides: Vec<(&str, &str)> = records
            .iter()
            .map(|r| (r.verdict.as_str(), r.direction.as_str()))
            .collect();
        assert_eq!(sides, [("allow", "egress"), ("allow", "ingress")]);
        let text = metrics.encode();
        assert!(
            text.contains("sluice_policy_allowed_connections_total{namespace=\"prod\",policy=\"-\",direction=\"egress\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("sluice_policy_denied_connections_total{"),
            "{text}"
        );
        let denied = sluice_node_files::flows::FlowQuery {
            denied: true,
            ..Default::default()
        };
        assert!(store.query(&denied).0.is_empty());
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

    /// An IPv4 TCP segment head from `sport` with `flags` and sequence number `seq`.
    fn tcp(sport: u16, port: u16, flags: u8, seq: u32) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend(sport.to_be_bytes());
        p.extend(port.to_be_bytes());
        p.extend(seq.to_be_bytes());
        p.extend([0, 0, 0, 0, 0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        p
    }

    /// An IPv4 SCTP packet head whose first chunk is of `chunk` type, with `tag`
    /// where an INIT has its initiate tag.
    fn sctp(sport: u16, chunk: u8, tag: u32) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 52, 0, 0, 0, 0, 64, 132, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend(sport.to_be_bytes());
        p.extend(5000u16.to_be_bytes());
        p.extend([0u8; 8]); // verification tag, checksum
        p.extend([chunk, 0, 0, 20]);
        p.extend(tag.to_be_bytes());
        p
    }

    fn udp(sport: u16) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 29, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend(sport.to_be_bytes());
        p.extend(53u16.to_be_bytes());
        p.extend([0, 9, 0, 0, b'x']);
        p
    }

    fn sight(r: &mut Repeats, packet: &[u8], at_ms: u64) -> bool {
        r.first_sight(&decode_ipv4(packet).unwrap(), at_ms)
    }

    #[test]
    fn the_opening_is_a_syns_sequence_number_or_an_inits_initiate_tag_and_nothing_else() {
        let open = |p: &[u8]| decode_ipv4(p).unwrap().opening;
        assert_eq!(open(&tcp(40000, 80, 0x02, 7)), Some(7), "SYN");
        assert_eq!(open(&tcp(40000, 80, 0x12, 7)), None, "SYN-ACK");
        assert_eq!(open(&tcp(40000, 80, 0x10, 7)), None, "ACK");
        assert_eq!(open(&sctp(40000, 1, 9)), Some(9), "INIT");
        assert_eq!(open(&sctp(40000, 0, 9)), None, "DATA");
        assert_eq!(open(&udp(40000)), None);
        // Options push the TCP header further: the IHL is honoured.
        let mut long = tcp(40000, 80, 0x02, 11);
        long[0] = 0x46;
        long.splice(20..20, [1, 1, 1, 1]);
        assert_eq!(open(&long), Some(11));
        // A head cut before the sequence number still names the connection.
        let cut = &tcp(40000, 80, 0x02, 7)[..24];
        assert_eq!(
            decode_ipv4(cut).map(|c| (c.port, c.opening)),
            Some((80, None))
        );
    }

    #[test]
    fn retransmitted_syns_are_one_connection_and_a_new_syn_on_the_same_ports_is_another() {
        let mut r = Repeats::default();
        // Connection 1: its SYN and two retransmissions (same ISN) at 1 s and 3 s.
        assert!(sight(&mut r, &tcp(40000, 80, 0x02, 1000), 0));
        assert!(!sight(&mut r, &tcp(40000, 80, 0x02, 1000), 1_000));
        assert!(!sight(&mut r, &tcp(40000, 80, 0x02, 1000), 3_000));
        // Connection 2 reuses the 5-tuple: a new ISN, a new record; then its own
        // retransmission is not.
        assert!(sight(&mut r, &tcp(40000, 80, 0x02, 5555), 4_000));
        assert!(!sight(&mut r, &tcp(40000, 80, 0x02, 5555), 5_000));
        // A segment that is no SYN tells nothing apart.
        assert!(!sight(&mut r, &tcp(40000, 80, 0x10, 123), 6_000));
        // Past the SYN_SENT window even the same ISN is a new connection.
        assert!(sight(
            &mut r,
            &tcp(40000, 80, 0x02, 5555),
            6_000 + SAME_CONNECTION_MS
        ));
    }

    #[test]
    fn sctp_inits_are_told_apart_by_their_initiate_tag() {
        let mut r = Repeats::default();
        assert!(sight(&mut r, &sctp(40000, 1, 77), 0));
        assert!(!sight(&mut r, &sctp(40000, 1, 77), 3_000));
        assert!(sight(&mut r, &sctp(40000, 1, 78), 4_000));
    }

    #[test]
    fn udp_datagrams_on_one_five_tuple_are_one_flow_until_they_pause_for_the_conntrack_udp_timeout()
    {
        let mut r = Repeats::default();
        assert!(sight(&mut r, &udp(40000), 0));
        assert!(!sight(&mut r, &udp(40000), 200));
        // Each datagram extends the flow, as it would a conntrack entry.
        assert!(!sight(&mut r, &udp(40000), 200 + SAME_FLOW_MS - 1));
        assert!(sight(&mut r, &udp(40000), 200 + 2 * SAME_FLOW_MS));
        assert!(
            sight(&mut r, &udp(40001), 200 + 2 * SAME_FLOW_MS),
            "another port"
        );
    }

    #[test]
    fn a_first_packet_without_an_opening_adopts_the_next_syns() {
        let mut r = Repeats::default();
        // A mid-stream segment first (ct state new by loose pick-up): recorded.
        assert!(sight(&mut r, &tcp(40000, 80, 0x10, 1), 0));
        // The SYN that follows is taken for the same connection, and its ISN kept:
        assert!(!sight(&mut r, &tcp(40000, 80, 0x02, 42), 100));
        assert!(!sight(&mut r, &tcp(40000, 80, 0x02, 42), 1_100));
        assert!(sight(&mut r, &tcp(40000, 80, 0x02, 43), 2_000));
    }

    #[test]
    fn the_seen_table_handed_to_the_next_agent_keeps_openings_and_reads_the_older_format() {
        let mut r = Repeats::default();
        assert!(sight(&mut r, &tcp(40000, 80, 0x02, 1000), 0));
        assert!(sight(&mut r, &udp(40000), 0));
        let text = r.save(10);
        assert!(
            text.contains("10.0.0.1 40000 10.0.0.2 80 6 0 1000\n"),
            "{text}"
        );
        assert!(
            text.contains("10.0.0.1 40000 10.0.0.2 53 17 0 -\n"),
            "{text}"
        );
        let mut next = Repeats::load(&text, 1_000);
        assert_eq!(next.len(), 2);
        assert!(
            !sight(&mut next, &tcp(40000, 80, 0x02, 1000), 1_000),
            "retransmission"
        );
        assert!(
            sight(&mut next, &tcp(40000, 80, 0x02, 2000), 1_100),
            "new connection"
        );
        assert!(!sight(&mut next, &udp(40000), 1_200));
        // An older agent's lines (no opening): a repeat, whatever the opening.
        let mut old = Repeats::load("10.0.0.1 40000 10.0.0.2 80 6 0\nbad line\n", 1_000);
        assert_eq!(old.len(), 1);
        assert!(!sight(&mut old, &tcp(40000, 80, 0x02, 9), 1_000));
        // What expired while no agent ran is not loaded.
        assert!(Repeats::load(&text, SAME_CONNECTION_MS).is_empty());
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
                    let got = match sock.recv(&mut buf) {
                        Ok(got) => got,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => panic!("{e}"),
                    };
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
