//! `sluicectl lab probe`: one real connection from inside the source's namespace.
//!
//! TCP: connect, send the probe line, read the echo. UDP: send the probe datagram
//! (resent every 200 ms) and wait for the echo. SCTP: as TCP, where the kernel has it.
//! A probe ends `connected` (the echo came back), `blocked` (no answer before the
//! timeout, or the connection was refused/rejected), or is an error: no route in the
//! source, a namespace that does not exist, a destination that serves no such port,
//! SCTP on a kernel without it. An error is never reported as `blocked`.

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::state::{self, DeclaredPort, LabPaths, LabState, Protocol};
use super::{LabError, Output, external, netns, serve};

#[derive(clap::Args)]
pub struct ProbeArgs {
    #[arg(long)]
    pub name: String,
    /// NS/POD, ip:ADDR or node:NODE.
    #[arg(long, required_unless_present = "probes")]
    pub from: Option<String>,
    /// NS/POD, ip:ADDR or node:NODE:PORT (a NodePort, or else a port the node serves
    /// on its own address, started on first use).
    #[arg(long, required_unless_present = "probes")]
    pub to: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long, default_value = "TCP")]
    pub protocol: Protocol,
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// JSON lines `{"from":..,"to":..,"port":..,"protocol":..}`; prints a JSON array.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub probes: Option<PathBuf>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// A probe endpoint as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Pod { namespace: String, name: String },
    Ip(Ipv4Addr),
    Node { name: String, port: Option<u16> },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Endpoint::Ip(a) => write!(f, "ip:{a}"),
            Endpoint::Node { name, port: None } => write!(f, "node:{name}"),
            Endpoint::Node {
                name,
                port: Some(p),
            } => write!(f, "node:{name}:{p}"),
        }
    }
}

pub fn parse_endpoint(s: &str) -> Result<Endpoint, LabError> {
    let bad = || {
        LabError::Usage(format!(
            "bad endpoint {s:?}: want NS/POD, ip:ADDR, node:NODE or node:NODE:PORT"
        ))
    };
    if let Some(a) = s.strip_prefix("ip:") {
        return a.parse().map(Endpoint::Ip).map_err(|_| bad());
    }
    if let Some(rest) = s.strip_prefix("node:") {
        let (name, port) = match rest.rsplit_once(':') {
            Some((n, p)) => (n, Some(p.parse::<u16>().map_err(|_| bad())?)),
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(bad());
        }
        return Ok(Endpoint::Node {
            name: name.to_string(),
            port,
        });
    }
    match s.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
            Ok(Endpoint::Pod {
                namespace: ns.to_string(),
                name: pod.to_string(),
            })
        }
        _ => Err(bad()),
    }
}

/// One line of a `--probes` file (the same shape `sluicectl policy check` reads).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ProbeSpec {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A probe with names resolved to a namespace and an address.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub source_netns: String,
    pub dest: SocketAddrV4,
    pub protocol: Protocol,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Connected,
    Blocked,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub result: Verdict,
    pub latency_ms: f64,
    /// The source address the destination saw (connected probes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_seen: Option<Ipv4Addr>,
    /// Why it was blocked: `timeout` or `refused`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Resolve endpoints against the lab, creating outside hosts and servers on first
/// use (hence `&mut`: the caller saves the state).
pub fn resolve(
    st: &mut LabState,
    from: &Endpoint,
    to: &Endpoint,
    port: Option<u16>,
    protocol: Protocol,
    timeout: Duration,
) -> Result<Resolved, LabError> {
    let port = match (to, port) {
        (Endpoint::Node { port: Some(p), .. }, Some(q)) if *p != q => {
            return Err(LabError::Usage(format!(
                "--to {to} names port {p} but --port says {q}"
            )));
        }
        (Endpoint::Node { port: Some(p), .. }, _) => *p,
        (_, Some(p)) => p,
        (_, None) => return Err(LabError::Usage("--port is required".into())),
    };
    if protocol == Protocol::Sctp && !serve::sctp_supported() {
        return Err(LabError::Probe(
            "this kernel has no SCTP sockets (SCTP probes run under the QEMU kernel)".into(),
        ));
    }
    let source_netns = source_netns(st, from)?;
    let dest_ip = match to {
        Endpoint::Pod { namespace, name } => {
            let pod = st
                .pods
                .get(&format!("{namespace}/{name}"))
                .ok_or_else(|| LabError::Probe(format!("no pod {to} in lab {}", st.name)))?;
            if pod
                .unserved
                .iter()
                .any(|p| p.port == port && p.protocol == protocol)
            {
                return Err(LabError::Probe(format!(
                    "{to} declares {protocol} {port} but this kernel cannot serve it"
                )));
            }
            let ip = pod.ip;
            if !pod
                .ports
                .iter()
                .any(|p| p.port == port && p.protocol == protocol)
            {
                extra_server(st, &format!("{namespace}/{name}"), port, protocol)?;
            }
            ip
        }
        Endpoint::Ip(a) => {
            external::ensure(st, *a)?;
            external::ensure_server(
                st,
                *a,
                DeclaredPort {
                    port,
                    protocol,
                    name: None,
                },
            )?;
            *a
        }
        Endpoint::Node { name, .. } => {
            let ip = st
                .node(name)
                .ok_or_else(|| LabError::Probe(format!("no node {name} in lab {}", st.name)))?
                .uplink_ip;
            node_server(st, name, port, protocol)?;
            ip
        }
    };
    Ok(Resolved {
        source_netns,
        dest: SocketAddrV4::new(dest_ip, port),
        protocol,
        timeout,
    })
}

/// The network namespace a probe from `from` starts in (an outside host is made on
/// first use, hence `&mut`).
pub fn source_netns(st: &mut LabState, from: &Endpoint) -> Result<String, LabError> {
    Ok(match from {
        Endpoint::Pod { namespace, name } => st
            .pods
            .get(&format!("{namespace}/{name}"))
            .map(|p| p.netns.clone())
            .ok_or_else(|| LabError::Probe(format!("no pod {from} in lab {}", st.name)))?,
        Endpoint::Ip(a) => external::ensure(st, *a)?.netns.clone(),
        Endpoint::Node { name, .. } => st
            .node(name)
            .map(|n| n.netns.clone())
            .ok_or_else(|| LabError::Probe(format!("no node {name} in lab {}", st.name)))?,
    })
}

/// A server for a port the pod does not declare, started on first use.
fn extra_server(
    st: &mut LabState,
    key: &str,
    port: u16,
    protocol: Protocol,
) -> Result<(), LabError> {
    let pod = &st.pods[key];
    if pod
        .extra_servers
        .iter()
        .any(|s| s.port == port && s.protocol == protocol && netns::alive(s.pid))
    {
        return Ok(());
    }
    let paths = LabPaths::new(&st.name);
    let server = spawn_server(&pod.netns, port, protocol, &paths)?;
    let pod = st.pods.get_mut(key).expect("present");
    record_server(&mut pod.extra_servers, server);
    state::save(st)
}

/// One echo server for `port`/`protocol` in `netns`, as a probe starts it on first use.
fn spawn_server(
    netns: &str,
    port: u16,
    protocol: Protocol,
    paths: &LabPaths,
) -> Result<super::state::ExternalServer, LabError> {
    let tag = format!("{netns}-{}-{port}", protocol.lower());
    let decl = DeclaredPort {
        port,
        protocol,
        name: None,
    };
    let pid = serve::spawn(netns, std::slice::from_ref(&decl), paths, &tag)?;
    Ok(super::state::ExternalServer {
        port,
        protocol,
        pid,
    })
}

/// Keep `server` in `servers`, replacing a dead one of the same port and protocol.
fn record_server(
    servers: &mut Vec<super::state::ExternalServer>,
    server: super::state::ExternalServer,
) {
    servers.retain(|s| !(s.port == server.port && s.protocol == server.protocol));
    servers.push(server);
}

/// A server on the node's own address for a port no NodePort Service takes, started
/// on first use, so a probe to a node's address (a pod reaching its host, as
/// upstream's egress cases do) gets an answer unless policy stops it. A NodePort's
/// port is left to the kube-proxy stand-in: its DNAT runs before local delivery.
fn node_server(
    st: &mut LabState,
    node: &str,
    port: u16,
    protocol: Protocol,
) -> Result<(), LabError> {
    let paths = LabPaths::new(&st.name);
    if super::services::all_node_ports(&paths)?
        .iter()
        .any(|np| np.node_port == port && np.protocol == protocol)
    {
        return Ok(());
    }
    let n = st.node(node).expect("resolved above");
    if n.servers
        .iter()
        .any(|s| s.port == port && s.protocol == protocol && netns::alive(s.pid))
    {
        return Ok(());
    }
    let server = spawn_server(&n.netns, port, protocol, &paths)?;
    let n = st
        .nodes
        .iter_mut()
        .find(|n| n.name == node)
        .expect("present");
    record_server(&mut n.servers, server);
    state::save(st)
}

fn nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{t}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

fn blocked(start: Instant, why: &str) -> Outcome {
    Outcome {
        result: Verdict::Blocked,
        latency_ms: ms(start.elapsed()),
        source_seen: None,
        detail: Some(why.to_string()),
    }
}

/// Classify a connect/receive error: refused and timeouts are verdicts, everything
/// else means the probe could not be sent.
fn classify(e: &std::io::Error, start: Instant) -> Result<Outcome, LabError> {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::TimedOut | K::WouldBlock => Ok(blocked(start, "timeout")),
        K::ConnectionRefused | K::ConnectionReset => Ok(blocked(start, "refused")),
        _ => Err(LabError::Probe(e.to_string())),
    }
}

/// Send the probe line on an established connection and read the echo. The echo
/// gets a full `timeout` of its own: the handshake already went through (the policy
/// verdict), and a slow machine (QEMU's emulation, 64 probes at once) can spend
/// most of the connect budget on the handshake alone.
fn stream_echo(mut s: TcpStream, start: Instant, timeout: Duration) -> Result<Outcome, LabError> {
    let n = nonce();
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .ok();
    s.write_all(&serve::request(&n))
        .map_err(|e| LabError::Probe(format!("send on an open connection: {e}")))?;
    let mut line = Vec::new();
    let mut r = std::io::BufReader::new(s);
    match r.read_until(b'\n', &mut line) {
        Ok(_) => match serve::parse_reply(&line, &n) {
            Some(peer) => Ok(Outcome {
                result: Verdict::Connected,
                latency_ms: ms(start.elapsed()),
                source_seen: match peer {
                    SocketAddr::V4(a) => Some(*a.ip()),
                    SocketAddr::V6(_) => None,
                },
                detail: None,
            }),
            None => Err(LabError::Probe(format!(
                "connected, but the answer was not the echo: {:?}",
                String::from_utf8_lossy(&line)
            ))),
        },
        // The handshake went through, so policy let it in; an echo that never
        // comes is a broken server or path, not a verdict.
        Err(e) => Err(LabError::Probe(format!(
            "connected, but no echo before the timeout: {e}"
        ))),
    }
}

fn probe_tcp(p: &Resolved) -> Result<Outcome, LabError> {
    let start = Instant::now();
    match TcpStream::connect_timeout(&SocketAddr::V4(p.dest), p.timeout) {
        Ok(s) => stream_echo(s, start, p.timeout),
        Err(e) => classify(&e, start),
    }
}

/// A UDP socket on a source port that moves with the clock (one port per
/// millisecond over 10000-60999, so a port comes back after 51 s), else any port.
/// A denied UDP 5-tuple is recorded once per 30 s (`docs/flows.md`: a new socket on
/// the same 5-tuple is the same flow to conntrack and to the records), so probes
/// that let the kernel pick a port could reuse one between two cases of a run and
/// lose a record the run expects.
fn udp_socket() -> Result<UdpSocket, LabError> {
    const FIRST: u64 = 10_000;
    const COUNT: u64 = 51_000;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for i in 0..16 {
        let port = (FIRST + (ms + i) % COUNT) as u16;
        if let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
            return Ok(s);
        }
    }
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| LabError::Probe(e.to_string()))
}

fn probe_udp(p: &Resolved) -> Result<Outcome, LabError> {
    let start = Instant::now();
    let deadline = start + p.timeout;
    let sock = udp_socket()?;
    sock.connect(p.dest)
        .map_err(|e| LabError::Probe(e.to_string()))?;
    let n = nonce();
    let req = serve::request(&n);
    let mut buf = [0u8; 512];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(blocked(start, "timeout"));
        }
        if let Err(e) = sock.send(&req) {
            return classify(&e, start);
        }
        // UDP has no handshake: resend a few times within the timeout so one
        // packet lost to a not-yet-resolved neighbour is not a verdict.
        let wait = (deadline - now).min(Duration::from_millis(200));
        sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .ok();
        loop {
            match sock.recv(&mut buf) {
                Ok(len) => {
                    if let Some(peer) = serve::parse_reply(&buf[..len], &n) {
                        return Ok(Outcome {
                            result: Verdict::Connected,
                            latency_ms: ms(start.elapsed()),
                            source_seen: match peer {
                                SocketAddr::V4(a) => Some(*a.ip()),
                                SocketAddr::V6(_) => None,
                            },
                            detail: None,
                        });
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return classify(&e, start),
            }
        }
    }
}

fn probe_sctp(p: &Resolved) -> Result<Outcome, LabError> {
    use std::os::fd::AsRawFd;
    let start = Instant::now();
    let fd = serve::sctp_socket().map_err(|e| LabError::Probe(format!("SCTP socket: {e}")))?;
    let raw = fd.as_raw_fd();
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: p.dest.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*p.dest.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // A blocking connect with SO_SNDTIMEO: for SCTP it returns only once the
    // association is established (COOKIE-ACK), or EINPROGRESS when the timeout ran
    // out. (poll(POLLOUT) on a non-blocking SCTP socket says "writable" before the
    // association exists, which would turn a blocked INIT into a missing echo.)
    let tv = libc::timeval {
        tv_sec: p.timeout.as_secs() as libc::time_t,
        tv_usec: p.timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd, sockaddr and timeval, sizes given.
    let r = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of_val(&tv) as libc::socklen_t,
        );
        libc::connect(
            raw,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&addr) as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINPROGRESS) {
            return Ok(blocked(start, "timeout"));
        }
        return classify(&e, start);
    }
    stream_echo(TcpStream::from(fd), start, p.timeout)
}

/// Send one probe from the current thread's namespace.
pub fn send(p: &Resolved) -> Result<Outcome, LabError> {
    match p.protocol {
        Protocol::Tcp => probe_tcp(p),
        Protocol::Udp => probe_udp(p),
        Protocol::Sctp => probe_sctp(p),
    }
}

/// Run probes concurrently (each worker thread enters each probe's source
/// namespace); results in input order.
pub fn send_all(probes: &[Resolved], parallel: usize) -> Vec<Result<Outcome, LabError>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Outcome, LabError>>>> =
        Mutex::new((0..probes.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1).min(probes.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = probes.get(i) else { break };
                    let r = netns::enter(&p.source_netns).and_then(|()| send(p));
                    results.lock().expect("no panics while locked")[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("workers joined")
        .into_iter()
        .map(|r| r.expect("every probe ran"))
        .collect()
}

/// [`send_all`], then every probe that could not produce a verdict sent once more,
/// one at a time: on a slow machine (QEMU's emulation) a burst of parallel SCTP or
/// TCP handshakes can starve an echo. A retry is a new real connection; a probe that
/// fails twice stays an error.
pub fn send_all_retrying(probes: &[Resolved], parallel: usize) -> Vec<Result<Outcome, LabError>> {
    let mut results = send_all(probes, parallel);
    for (i, r) in results.iter_mut().enumerate() {
        if r.is_err() {
            *r = netns::enter_and(&probes[i].source_netns, || send(&probes[i]));
        }
    }
    results
}

/// How many probes run at once: blocked probes spend their whole timeout waiting,
/// so concurrency, not CPU, bounds a matrix's run time.
pub const PARALLEL: usize = 64;

pub fn exec(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let paths = LabPaths::new(&args.name);
    let specs: Vec<ProbeSpec> = match &args.probes {
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|e| LabError::io(file, e))?;
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
                .map(|(i, l)| {
                    serde_json::from_str(l)
                        .map_err(|e| LabError::Usage(format!("{}:{}: {e}", file.display(), i + 1)))
                })
                .collect::<Result<_, _>>()?
        }
        None => vec![ProbeSpec {
            from: args.from.clone().unwrap_or_default(),
            to: args.to.clone().unwrap_or_default(),
            port: args.port,
            protocol: Some(args.protocol.to_string()),
        }],
    };
    // Resolve under the lab lock (it may create outside hosts), probe without it.
    let resolved: Vec<Result<Resolved, LabError>> = {
        let _lock = state::lock(&paths)?;
        let mut st = state::load(&args.name)?;
        let r = specs
            .iter()
            .map(|s| {
                let protocol = match &s.protocol {
                    Some(p) => p.parse::<Protocol>().map_err(LabError::Usage)?,
                    None => Protocol::Tcp,
                };
                resolve(
                    &mut st,
                    &parse_endpoint(&s.from)?,
                    &parse_endpoint(&s.to)?,
                    s.port,
                    protocol,
                    timeout,
                )
            })
            .collect();
        state::save(&st)?;
        r
    };
    if args.probes.is_none() {
        let p = resolved.into_iter().next().expect("one probe")?;
        let port = p.dest.port();
        let outcome = netns::on_thread_in(&p.source_netns.clone(), move || send(&p))??;
        match args.output {
            Output::Json => println!("{}", serde_json::to_string(&outcome)?),
            Output::Text => {
                let spec = &specs[0];
                print!(
                    "{} -> {} {}/{}: {} in {:.3} ms",
                    spec.from,
                    spec.to,
                    args.protocol,
                    port,
                    match outcome.result {
                        Verdict::Connected => "connected",
                        Verdict::Blocked => "blocked",
                    },
                    outcome.latency_ms
                );
                if let Some(s) = outcome.source_seen {
                    print!(" (destination saw source {s})");
                }
                if let Some(d) = &outcome.detail {
                    print!(" ({d})");
                }
                println!();
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let ok: Vec<Resolved> = resolved
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    let mut sent = send_all_retrying(&ok, PARALLEL).into_iter();
    let mut failed = false;
    let out: Vec<serde_json::Value> = resolved
        .into_iter()
        .map(|r| {
            let r = r.and_then(|_| sent.next().expect("one result per probe"));
            match r {
                Ok(o) => serde_json::to_value(o).expect("outcome serializes"),
                Err(e) => {
                    failed = true;
                    serde_json::json!({"error": e.to_string()})
                }
            }
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&out)?);
    if failed {
        eprintln!("sluicectl lab probe: some probes could not be sent (see \"error\")");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_in_every_documented_form() {
        assert_eq!(
            parse_endpoint("x/a").unwrap(),
            Endpoint::Pod {
                namespace: "x".into(),
                name: "a".into()
            }
        );
        assert_eq!(
            parse_endpoint("ip:10.2.3.4").unwrap(),
            Endpoint::Ip(Ipv4Addr::new(10, 2, 3, 4))
        );
        assert_eq!(
            parse_endpoint("node:node-2:30080").unwrap(),
            Endpoint::Node {
                name: "node-2".into(),
                port: Some(30080)
            }
        );
        assert_eq!(
            parse_endpoint("node:node-1").unwrap(),
            Endpoint::Node {
                name: "node-1".into(),
                port: None
            }
        );
        for bad in [
            "x",
            "x/",
            "/a",
            "x/a/b",
            "ip:300.1.1.1",
            "node:",
            "node:n:99999",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusal_and_timeout_are_verdicts_other_errors_are_not() {
        let t = Instant::now();
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(classify(&refused, t).unwrap().result, Verdict::Blocked);
        let timed = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(classify(&timed, t).unwrap().result, Verdict::Blocked);
        let unreachable = std::io::Error::from_raw_os_error(libc::ENETUNREACH);
        assert!(classify(&unreachable, t).is_err());
    }
}
