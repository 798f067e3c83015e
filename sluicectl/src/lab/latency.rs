//! `sluicectl lab latency` (hidden, for `tests/bench/flows-flood.sh`): many allowed
//! connections timed from inside one process in the source pod's namespace.
//!
//! Each connection is one `connect()` (SYN out, SYN-ACK back: the packet path a new
//! connection's policy verdict sits on), timed alone, then closed with SO_LINGER 0 (a
//! RST, no TIME_WAIT, so thousands never run out of ports), then a pause: spaced, so
//! the probes sample the whole window rather than a burst of it, and add no load of
//! their own. One process for all of them: `sluicectl lab probe` per connection would
//! time a fork and exec in every sample.
//!
//! With `--until-connected` it times one thing instead: when the first connection to
//! a pod that is still fail-closed goes through (`tests/e2e/measure-add-to-connect.sh`).
//! An attempt starts every `--interval-us` without waiting for the earlier ones (a
//! dropped SYN is not retried by the kernel for a second), so the answer's resolution
//! is the interval, not a connect timeout plus a process start per attempt.

use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::probe::{self, parse_endpoint, resolve};
use super::state::{self, LabPaths, Protocol};
use super::{LabError, netns};

#[derive(clap::Args)]
pub struct LatencyArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub from: String,
    #[arg(long, required_unless_present = "to_address")]
    pub to: Option<String>,
    /// With `--until-connected`: the destination as a bare address, no pod or server
    /// looked up, so the prober can start before the pod exists (a pod that asks
    /// for this address with `sluice.dev/ip-addrs`): ADD's return to the first
    /// connection is then timed with no process start in it.
    #[arg(long, hide = true, requires = "until_connected", conflicts_with = "to")]
    pub to_address: Option<std::net::Ipv4Addr>,
    #[arg(long)]
    pub port: u16,
    /// Connections timed (at most).
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Stop starting connections after this many milliseconds (default: none), so
    /// the samples stay inside a window of known length.
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Pause after each connection, in microseconds.
    #[arg(long, default_value_t = 4000)]
    pub interval_us: u64,
    /// Print every sample (microseconds) too, for pooling windows.
    #[arg(long)]
    pub samples: bool,
    /// Instead of timing connects: start one every `--interval-us` until one goes
    /// through (at most `--duration-ms`, default 10 s), and print when it did.
    #[arg(long)]
    pub until_connected: bool,
}

/// `--until-connected`'s answer.
#[derive(Debug, Serialize)]
pub struct FirstConnection {
    /// When the first connection was seen established, wall clock (Unix µs): a
    /// script compares it with its own clock, so this process's start is no part of
    /// the figure.
    pub connected_unix_us: Option<u128>,
    /// Attempts started, the successful one included.
    pub attempts: usize,
}

#[derive(Debug, Serialize)]
pub struct LatencyReport {
    pub count: usize,
    /// Connections that failed (refused, timed out): not in the figures.
    pub failed: usize,
    pub median_us: f64,
    pub p99_us: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples_us: Vec<f64>,
}

/// The `q` quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn close_with_rst(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a valid socket with a correctly sized argument.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn measure(
    dest: SocketAddr,
    count: usize,
    interval: Duration,
    duration: Option<Duration>,
) -> (Vec<f64>, usize) {
    let mut samples = Vec::with_capacity(count);
    let mut failed = 0;
    let start = Instant::now();
    for _ in 0..count {
        if duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let t = Instant::now();
        match TcpStream::connect_timeout(&dest, Duration::from_secs(1)) {
            Ok(s) => {
                samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
                close_with_rst(s);
            }
            Err(_) => failed += 1,
        }
        std::thread::sleep(interval);
    }
    (samples, failed)
}

/// A non-blocking connect in flight.
struct Attempt {
    fd: std::os::fd::OwnedFd,
    started: Instant,
}

/// Start a non-blocking connect to `dest`; None when no socket could be made.
fn start_attempt(dest: std::net::SocketAddrV4) -> Option<Attempt> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned from here on.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dest.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dest.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect(2) on a valid socket with a correctly sized sockaddr_in.
    let r = unsafe {
        libc::connect(
            raw,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let in_progress = std::io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS);
    (r == 0 || in_progress).then_some(Attempt {
        fd,
        started: Instant::now(),
    })
}

/// The pending error of a socket whose connect finished (0: connected).
fn socket_error(fd: &std::os::fd::OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) on a valid socket into a correctly sized int.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 { -1 } else { err }
}

/// One attempt every `interval` until one connects or `limit` passes. An attempt
/// still unanswered after a second is given up (its SYN was dropped: the kernel would
/// only send it again after a second).
fn first_connection(
    dest: std::net::SocketAddrV4,
    interval: Duration,
    limit: Duration,
) -> FirstConnection {
    use std::os::fd::AsRawFd;
    const GIVE_UP: Duration = Duration::from_secs(1);
    let start = Instant::now();
    let mut pending: Vec<Attempt> = Vec::new();
    let mut attempts = 0;
    let mut next = start;
    while start.elapsed() < limit {
        let now = Instant::now();
        if now >= next {
            if let Some(a) = start_attempt(dest) {
                pending.push(a);
                attempts += 1;
            }
            next += interval;
        }
        pending.retain(|a| a.started.elapsed() < GIVE_UP);
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|a| libc::pollfd {
                fd: a.fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let wait = next.saturating_duration_since(Instant::now());
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: ppoll(2) over a live array of pollfds, no signal mask.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if n <= 0 {
            continue;
        }
        let mut finished = Vec::new();
        for (i, p) in fds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            if socket_error(&pending[i].fd) == 0 {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros());
                let s = TcpStream::from(pending.swap_remove(i).fd);
                close_with_rst(s);
                return FirstConnection {
                    connected_unix_us: Some(at),
                    attempts,
                };
            }
            finished.push(i);
        }
        // Refused or unreachable: that attempt is over; later ones go on.
        for i in finished.into_iter().rev() {
            pending.swap_remove(i);
        }
    }
    FirstConnection {
        connected_unix_us: None,
        attempts,
    }
}

pub fn exec(args: LatencyArgs) -> anyhow::Result<ExitCode> {
    let paths = LabPaths::new(&args.name);
    let (source_netns, dest) = {
        let _lock = state::lock(&paths)?;
        let mut st = state::load(&args.name)?;
        let from = parse_endpoint(&args.from)?;
        let resolved = match (&args.to, args.to_address) {
            (_, Some(addr)) => (
                probe::source_netns(&mut st, &from)?,
                SocketAddrV4::new(addr, args.port),
            ),
            (Some(to), None) => {
                let r = resolve(
                    &mut st,
                    &from,
                    &parse_endpoint(to)?,
                    Some(args.port),
                    Protocol::Tcp,
                    Duration::from_secs(1),
                )?;
                (r.source_netns, r.dest)
            }
            (None, None) => unreachable!("clap requires --to or --to-address"),
        };
        state::save(&st)?;
        resolved
    };
    let (count, interval) = (args.count, Duration::from_micros(args.interval_us));
    let duration = args.duration_ms.map(Duration::from_millis);
    if args.until_connected {
        let limit = duration.unwrap_or(Duration::from_secs(10));
        let first = netns::on_thread_in(&source_netns, move || {
            first_connection(dest, interval, limit)
        })?;
        println!("{}", serde_json::to_string(&first)?);
        return Ok(if first.connected_unix_us.is_some() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let dest = SocketAddr::V4(dest);
    let (mut samples, failed) = netns::on_thread_in(&source_netns, move || {
        measure(dest, count, interval, duration)
    })?;
    if samples.is_empty() {
        return Err(LabError::Probe(format!("no connection to {dest} succeeded")).into());
    }
    samples.sort_by(f64::total_cmp);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let report = LatencyReport {
        count: samples.len(),
        failed,
        median_us: round(quantile(&samples, 0.5)),
        p99_us: round(quantile(&samples, 0.99)),
        samples_us: if args.samples {
            samples.iter().map(|s| round(*s)).collect()
        } else {
            Vec::new()
        },
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
