//! `sluicectl lab flood` (hidden, for `tests/bench/flows-flood.sh`): TCP SYNs at a
//! steady rate from inside one pod's namespace to another's port, each from a new
//! source port with a new initial sequence number (each a new connection).
//!
//! The sender must not itself be the load the bench measures: it builds a batch of
//! SYNs once per tick, hands the whole batch to the kernel in one `sendmmsg(2)` on a
//! raw socket, and sleeps until the next tick (by default 100 SYNs every 10 ms for
//! 10,000/s). It reports its own CPU time and the rate it achieved, so the bench can
//! show what the flood cost apart from what the kernel's packet path cost.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::probe::{Endpoint, parse_endpoint};
use super::state;
use super::{LabError, netns};

#[derive(clap::Args)]
pub struct FloodArgs {
    #[arg(long)]
    pub name: String,
    /// NS/POD the SYNs come from (with its own address as source).
    #[arg(long)]
    pub from: String,
    /// NS/POD they go to.
    #[arg(long)]
    pub to: String,
    #[arg(long)]
    pub port: u16,
    /// SYNs per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// How long to send, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub duration_ms: u64,
    /// SYNs per tick (one sendmmsg); the tick is batch/rate seconds.
    #[arg(long, default_value_t = 100)]
    pub batch: u32,
}

/// What the sender did, printed as one JSON object.
#[derive(Debug, Serialize)]
pub struct FloodReport {
    pub sent: u64,
    pub seconds: f64,
    /// SYNs per second achieved.
    pub rate: f64,
    /// The sending thread's CPU time (user + system, the kernel's send path
    /// included) as a share of one core over the run.
    pub cpu_percent: f64,
}

/// One TCP SYN (IPv4 header + 20-byte TCP header). The IPv4 checksum and ID are left
/// 0 for the kernel to fill (raw sockets with IP_HDRINCL do); the TCP checksum is
/// ours.
pub fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, isn: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[..12].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&isn.to_be_bytes());
    t[12] = 0x50; // data offset: 5 words
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = tcp_checksum(src, dst, &p[20..]);
    p[36..38].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The TCP checksum over the IPv4 pseudo-header and `segment` (checksum field 0).
pub fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for pair in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6]);
    add(&(segment.len() as u16).to_be_bytes());
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Source ports cycle through 10000..60000; with 10,000/s a port comes back after
/// 5 s, always with another ISN (a new connection, as the records must count it).
fn next_port(p: u16) -> u16 {
    if (10_000..59_999).contains(&p) {
        p + 1
    } else {
        10_000
    }
}

/// A cheap, well-spread sequence of ISNs (xorshift32).
fn next_isn(x: u32) -> u32 {
    let mut x = x;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    x
}

fn thread_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Ticks' worth of SYNs one late tick may send at once.
const MAX_TICKS_AT_ONCE: usize = 4;

/// Sends from the current thread's namespace.
fn send(
    src: Ipv4Addr,
    dst: SocketAddrV4,
    rate: u32,
    duration: Duration,
    batch: u32,
) -> Result<FloodReport, LabError> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if raw < 0 {
        return Err(LabError::Probe(format!(
            "raw socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let batch = batch.max(1) as usize;
    let tick = Duration::from_secs_f64(batch as f64 / f64::from(rate.max(1)));
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from(*dst.ip()).to_be();
    // Room for a few late ticks' worth at once: see the schedule below.
    let mut packets = vec![[0u8; 40]; batch * MAX_TICKS_AT_ONCE];
    let (mut port, mut isn, mut sent) = (10_000u16, 0x9e37_79b9u32, 0u64);
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < duration {
        // What the rate owes by now: a tick that woke late (a loaded machine
        // oversleeps) sends what it missed, up to a few ticks' worth, so the
        // achieved rate is the one asked for as long as the machine can send it.
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64 + batch as u64;
        let n = (due.saturating_sub(sent) as usize).min(packets.len());
        for p in packets[..n].iter_mut() {
            (port, isn) = (next_port(port), next_isn(isn));
            *p = syn(src, *dst.ip(), port, dst.port(), isn);
        }
        let mut iov: Vec<libc::iovec> = packets[..n]
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: an all-zero msghdr is valid; the pointers set below
                // outlive the sendmmsg call.
                let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                h.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = v;
                h.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        if !msgs.is_empty() {
            // SAFETY: msgs, iov, packets and addr are live for the call.
            let n = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    return Err(LabError::Probe(format!("sendmmsg: {e}")));
                }
            } else {
                sent += n as u64;
            }
        }
        next += tick;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = (thread_cpu() - cpu0).as_secs_f64();
    Ok(FloodReport {
        sent,
        seconds: (seconds * 1000.0).round() / 1000.0,
        rate: (sent as f64 / seconds).round(),
        cpu_percent: (cpu / seconds * 1000.0).round() / 10.0,
    })
}

pub fn exec(args: FloodArgs) -> anyhow::Result<ExitCode> {
    // Names only: nothing is started for the target (an unserved port answers a SYN
    // with a RST, a denied one with nothing).
    let st = state::load(&args.name)?;
    let pod = |e: &str| match parse_endpoint(e)? {
        Endpoint::Pod { namespace, name } => st
            .pods
            .get(&format!("{namespace}/{name}"))
            .ok_or_else(|| LabError::Probe(format!("no pod {e} in lab {}", st.name))),
        _ => Err(LabError::Usage(format!("{e}: want NS/POD"))),
    };
    let from = pod(&args.from)?;
    let (source_netns, src) = (from.netns.clone(), from.ip);
    let dest = SocketAddrV4::new(pod(&args.to)?.ip, args.port);
    let (rate, duration, batch) = (
        args.rate,
        Duration::from_millis(args.duration_ms),
        args.batch,
    );
    let report = netns::enter_and(&source_netns, move || {
        send(src, dest, rate, duration, batch)
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_syn_checksums_to_zero_as_a_receiver_verifies_it() {
        let (s, d) = (Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(10, 244, 2, 7));
        let p = syn(s, d, 40000, 5432, 0xdead_beef);
        // Summing a segment with its checksum in place gives 0 (RFC 1071).
        assert_eq!(tcp_checksum(s, d, &p[20..]), 0);
        assert_eq!(&p[24..28], &0xdead_beefu32.to_be_bytes());
        assert_eq!(p[33], 0x02, "SYN only");
    }

    #[test]
    fn source_ports_cycle_and_isns_never_repeat_back_to_back() {
        assert_eq!(next_port(59_999), 10_000);
        assert_eq!(next_port(10_000), 10_001);
        assert_eq!(next_port(0), 10_000);
        let mut x = 1;
        for _ in 0..1000 {
            let y = next_isn(x);
            assert_ne!(x, y);
            x = y;
        }
    }
}
