//! The connect-latency helper of `tests/bench/connect-latency.sh` (issue 11): std only,
//! compiled by the script with `rustc -O` so it needs no crate of its own and runs
//! inside a pod's network namespace without the workspace.
//!
//! ```text
//! connect_bench loop ADDR:PORT COUNT WARMUP OUT   connect() COUNT times, one latency in ns per line
//! connect_bench stats FILE...                      "median_us p99_us samples" over all files
//! connect_bench plot OUT.svg TITLE RESULTS.tsv...  the latency-versus-policies figure
//! ```
//!
//! Each connection is closed with SO_LINGER 0 (a RST, no TIME_WAIT), so thousands of
//! connects never run out of ephemeral ports; only connect() itself is timed, from
//! the SYN leaving to the SYN-ACK arriving, which is the packet path a new
//! connection's policy verdict sits on.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("loop") if args.len() == 5 => run_loop(&args[1], &args[2], &args[3], &args[4]),
        Some("stats") if args.len() >= 2 => stats(&args[1..]),
        Some("plot") if args.len() >= 4 => plot(&args[1], &args[2], &args[3..]),
        _ => Err("usage: connect_bench loop ADDR:PORT COUNT WARMUP OUT | stats FILE... | plot SVG TITLE TSV...".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connect_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_loop(addr: &str, count: &str, warmup: &str, out: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let count: usize = count.parse().map_err(|e| format!("count: {e}"))?;
    let warmup: usize = warmup.parse().map_err(|e| format!("warmup: {e}"))?;
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {i} to {addr}: {e}"))?;
        let dt = t.elapsed();
        // Linger 0: close sends a RST and leaves no TIME_WAIT behind.
        s.set_linger_zero();
        drop(s);
        if i >= warmup {
            samples.push(dt.as_nanos() as u64);
        }
    }
    let mut f = std::fs::File::create(out).map_err(|e| format!("{out}: {e}"))?;
    let mut text = String::new();
    for s in &samples {
        let _ = writeln!(text, "{s}");
    }
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{out}: {e}"))
}

trait LingerZero {
    fn set_linger_zero(&self);
}

impl LingerZero for TcpStream {
    fn set_linger_zero(&self) {
        use std::os::fd::AsRawFd;
        // struct linger { int l_onoff; int l_linger; }
        let l: [i32; 2] = [1, 0];
        // SAFETY: setsockopt(2) on a valid socket with a correctly sized argument.
        unsafe {
            setsockopt(
                self.as_raw_fd(),
                1,  // SOL_SOCKET
                13, // SO_LINGER
                l.as_ptr().cast(),
                std::mem::size_of_val(&l) as u32,
            );
        }
    }
}

unsafe extern "C" {
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const u8, len: u32) -> i32;
}

fn read_samples(files: &[String]) -> Result<Vec<u64>, String> {
    let mut v = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{f}: {e}"))?;
        for l in text.lines().filter(|l| !l.is_empty()) {
            v.push(l.trim().parse().map_err(|e| format!("{f}: {l:?}: {e}"))?);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(files: &[String]) -> Result<(), String> {
    let v = read_samples(files)?;
    if v.is_empty() {
        return Err("no samples".into());
    }
    println!(
        "{:.1} {:.1} {}",
        percentile(&v, 50.0) as f64 / 1000.0,
        percentile(&v, 99.0) as f64 / 1000.0,
        v.len()
    );
    Ok(())
}

/// One measured point: dataplane, policies, median µs, p99 µs.
struct Point {
    dataplane: String,
    policies: f64,
    median: f64,
    p99: f64,
}

fn read_tsv(path: &str) -> Result<Vec<Point>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = Vec::new();
    // Columns: dataplane policies median_us p99_us samples load
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() < 4 {
            return Err(format!("{path}: short line {l:?}"));
        }
        let num = |s: &str| s.parse::<f64>().map_err(|e| format!("{path}: {s:?}: {e}"));
        out.push(Point {
            dataplane: f[0].to_string(),
            policies: num(f[1])?,
            median: num(f[2])?,
            p99: num(f[3])?,
        });
    }
    Ok(out)
}

/// The figure: connect() median (solid) and p99 (dashed) against policies selecting
/// the server pod, log x (0 policies drawn at the left edge as "0"), log y, one colour
/// per series (a dataplane, and which kind of policy: the first column of the TSVs,
/// all drawn together). Plain SVG text: no plotting library on the machine or in the
/// build.
fn plot(svg: &str, title: &str, tsvs: &[String]) -> Result<(), String> {
    let mut pts = Vec::new();
    for tsv in tsvs {
        pts.extend(read_tsv(tsv)?);
    }
    if pts.is_empty() {
        return Err(format!("{}: no points", tsvs.join(", ")));
    }
    let (w, h) = (740.0, 460.0);
    let (left, right, top, bottom) = (80.0, 210.0, 50.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    // x: decades 1..1000 plus a "0" slot one decade left of 1 (log of 0 is undefined).
    let x_of = |n: f64| {
        let d = if n <= 0.0 { -1.0 } else { n.log10() };
        left + (d + 1.0) / 4.0 * pw
    };
    let ymin_v = pts
        .iter()
        .map(|p| p.median.min(p.p99))
        .fold(f64::INFINITY, f64::min);
    let ymax_v = pts.iter().map(|p| p.p99.max(p.median)).fold(0.0, f64::max);
    let ylo = 10f64.powf(ymin_v.max(0.1).log10().floor());
    let yhi = 10f64.powf(ymax_v.max(ylo * 10.0).log10().ceil());
    let (llo, lhi) = (ylo.log10(), yhi.log10());
    let y_of = |v: f64| top + ph - (v.max(ylo).log10() - llo) / (lhi - llo) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    // Grid and axes.
    let mut decade = llo as i32;
    while decade as f64 <= lhi {
        let v = 10f64.powi(decade);
        let y = y_of(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 8.0,
            y + 4.0,
            fmt_us(v)
        );
        decade += 1;
    }
    for (n, label) in [
        (0.0, "0"),
        (1.0, "1"),
        (10.0, "10"),
        (100.0, "100"),
        (1000.0, "1000"),
    ] {
        let x = x_of(n);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            top + ph,
            top + ph + 20.0
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">policies selecting the server pod (log scale; 0 = none; CNP: Admin tier)</text>"#,
        left + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(22 {:.1}) rotate(-90)" text-anchor="middle">connect() latency, µs (log scale)</text>"#,
        top + ph / 2.0
    );
    // One colour per dataplane, in order of first appearance.
    let colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
    let mut planes: Vec<&str> = Vec::new();
    for p in &pts {
        if !planes.contains(&p.dataplane.as_str()) {
            planes.push(&p.dataplane);
        }
    }
    for (i, plane) in planes.iter().enumerate() {
        let c = colours[i % colours.len()];
        let mut mine: Vec<&Point> = pts.iter().filter(|p| p.dataplane == *plane).collect();
        mine.sort_by(|a, b| a.policies.total_cmp(&b.policies));
        for (which, dash, get) in [
            ("median", "", (|p: &Point| p.median) as fn(&Point) -> f64),
            ("p99", r#" stroke-dasharray="6 4""#, |p: &Point| p.p99),
        ] {
            let path: Vec<String> = mine
                .iter()
                .map(|p| format!("{:.1},{:.1}", x_of(p.policies), y_of(get(p))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            for p in &mine {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"><title>{plane} {which}, {} policies: {:.1} µs</title></circle>"#,
                    x_of(p.policies),
                    y_of(get(p)),
                    p.policies,
                    get(p)
                );
            }
            // Legend.
            let ly = top + 20.0 + (i * 2 + usize::from(which == "p99")) as f64 * 22.0;
            let lx = left + pw + 15.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{} {which}</text>"#,
                lx + 28.0,
                lx + 34.0,
                ly + 4.0,
                escape(plane)
            );
        }
    }
    s.push_str("</svg>\n");
    std::fs::write(svg, s).map_err(|e| format!("{svg}: {e}"))
}

fn fmt_us(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
