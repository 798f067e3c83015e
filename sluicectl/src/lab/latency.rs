//! `sluicectl lab latency` (hidden, for `tests/bench/flows-flood.sh`): many allowed
//! connections timed from inside one process in the source pod's namespace.
//!
//! Each connection is one `connect()` (SYN out, SYN-ACK back: the packet path a new
//! connection's policy verdict sits on), timed alone, then closed with SO_LINGER 0 (a
//! RST, no TIME_WAIT, so thousands never run out of ports), then a pause: spaced, so
//! the probes sample the whole window rather than a burst of it, and add no load of
//! their own. One process for all of them: `sluicectl lab probe` per connection would
//! time a fork and exec in every sample.

use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::probe::{parse_endpoint, resolve};
use super::state::{self, LabPaths, Protocol};
use super::{LabError, netns};

#[derive(clap::Args)]
pub struct LatencyArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub from: String,
    #[arg(long)]
    pub to: String,
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

pub fn exec(args: LatencyArgs) -> anyhow::Result<ExitCode> {
    let paths = LabPaths::new(&args.name);
    let r = {
        let _lock = state::lock(&paths)?;
        let mut st = state::load(&args.name)?;
        let r = resolve(
            &mut st,
            &parse_endpoint(&args.from)?,
            &parse_endpoint(&args.to)?,
            Some(args.port),
            Protocol::Tcp,
            Duration::from_secs(1),
        )?;
        state::save(&st)?;
        r
    };
    let (count, interval) = (args.count, Duration::from_micros(args.interval_us));
    let duration = args.duration_ms.map(Duration::from_millis);
    let dest = SocketAddr::V4(r.dest);
    let (mut samples, failed) = netns::on_thread_in(&r.source_netns, move || {
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
