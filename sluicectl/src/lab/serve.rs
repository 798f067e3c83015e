//! `sluicectl lab serve` (hidden): the echo server the lab runs in every pod for
//! each declared container port, and in outside hosts for probed ports.
//!
//! The protocol is one line: the client sends `SLUICE-PROBE <nonce>\n` and the server
//! answers `SLUICE-PROBE <nonce> FROM <peer-ip>:<peer-port>\n`. The echoed nonce proves
//! the answer belongs to this probe; the peer address is what the destination saw,
//! which is how tests show that no SNAT happened inside the cluster.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub const MAGIC: &str = "SLUICE-PROBE";

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub tcp: Vec<u16>,
    #[arg(long)]
    pub udp: Vec<u16>,
    #[arg(long)]
    pub sctp: Vec<u16>,
    /// Written once every socket is bound, so the lab knows the server is up.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// The server's answer to one request, or None for anything that is not a probe.
pub fn reply(request: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
    let line = std::str::from_utf8(request).ok()?.trim_end();
    let nonce = line.strip_prefix(MAGIC)?.trim();
    if nonce.is_empty() || nonce.contains(char::is_whitespace) {
        return None;
    }
    Some(format!("{MAGIC} {nonce} FROM {peer}\n").into_bytes())
}

pub fn request(nonce: &str) -> Vec<u8> {
    format!("{MAGIC} {nonce}\n").into_bytes()
}

/// Parse the answer to `nonce`: the peer address the server saw.
pub fn parse_reply(answer: &[u8], nonce: &str) -> Option<SocketAddr> {
    let line = std::str::from_utf8(answer).ok()?.trim_end();
    let rest = line.strip_prefix(MAGIC)?.trim_start();
    let (n, rest) = rest.split_once(' ')?;
    if n != nonce {
        return None;
    }
    rest.strip_prefix("FROM ")?.trim().parse().ok()
}

/// Whether this kernel can open SCTP sockets (this host's cannot; the QEMU kernel can).
pub fn sctp_supported() -> bool {
    // SAFETY: plain socket(2); the fd is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a valid, owned descriptor.
    unsafe { libc::close(fd) };
    true
}

/// An SCTP one-to-one socket; its API is TCP's (bind, listen, accept, connect, read,
/// write), so it is driven through std's TCP types.
pub fn sctp_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sctp_listener(port: u16) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let fd = sctp_socket()?;
    let one: libc::c_int = 1;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: valid fd and properly sized arguments.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of_val(&one) as libc::socklen_t,
        );
        if libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&addr) as libc::socklen_t,
        ) < 0
            || libc::listen(fd.as_raw_fd(), 128) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(TcpListener::from(fd))
}

fn serve_stream(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(peer) = s.peer_addr() else { return };
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while !got.contains(&b'\n') && got.len() < 256 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if let Some(r) = reply(&got, peer) {
        let _ = s.write_all(&r);
    }
}

fn accept_loop(l: TcpListener) {
    for s in l.incoming().flatten() {
        std::thread::spawn(move || serve_stream(s));
    }
}

fn udp_loop(sock: UdpSocket) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(r) = reply(&buf[..n], peer) {
            let _ = sock.send_to(&r, peer);
        }
    }
}

pub fn exec(args: ServeArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let any = Ipv4Addr::UNSPECIFIED;
    let mut threads = Vec::new();
    for &p in &args.tcp {
        let l = TcpListener::bind((any, p)).with_context(|| format!("bind TCP {p}"))?;
        threads.push(std::thread::spawn(move || accept_loop(l)));
    }
    for &p in &args.udp {
        let s = UdpSocket::bind((any, p)).with_context(|| format!("bind UDP {p}"))?;
        threads.push(std::thread::spawn(move || udp_loop(s)));
    }
    for &p in &args.sctp {
        let l = sctp_listener(p).with_context(|| format!("bind SCTP {p}"))?;
        threads.push(std::thread::spawn(move || accept_loop(l)));
    }
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"ready\n").with_context(|| format!("write {}", f.display()))?;
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(ExitCode::SUCCESS)
}

/// Start `sluicectl lab serve` inside `ns` for `ports` and wait until it has bound
/// every socket. Returns the server's pid.
pub fn spawn(
    ns: &str,
    ports: &[super::state::DeclaredPort],
    paths: &super::state::LabPaths,
    tag: &str,
) -> Result<u32, super::LabError> {
    use super::state::Protocol;
    use super::{LabError, netns};
    let exe = std::env::current_exe().map_err(|e| LabError::Spawn("sluicectl".into(), e))?;
    let ready = paths.logs().join(format!("serve-{tag}.ready"));
    let _ = std::fs::remove_file(&ready);
    let mut args = vec!["lab".to_string(), "serve".to_string()];
    for p in ports {
        let flag = match p.protocol {
            Protocol::Tcp => "--tcp",
            Protocol::Udp => "--udp",
            Protocol::Sctp => "--sctp",
        };
        args.push(flag.into());
        args.push(p.port.to_string());
    }
    args.push("--ready-file".into());
    args.push(ready.display().to_string());
    let log = paths.logs().join(format!("serve-{tag}.log"));
    let pid = netns::spawn_daemon(ns, &exe, &args, &[], &log)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        if !netns::alive(pid) || std::time::Instant::now() > deadline {
            netns::kill_pid(pid);
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(LabError::Usage(format!(
                "echo server in {ns} did not start: {}",
                tail.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(&ready);
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_echoes_the_nonce_and_names_the_peer_it_saw() {
        let peer: SocketAddr = "10.244.1.7:40000".parse().unwrap();
        let r = reply(&request("n1"), peer).unwrap();
        assert_eq!(r, b"SLUICE-PROBE n1 FROM 10.244.1.7:40000\n");
        assert_eq!(parse_reply(&r, "n1"), Some(peer));
        assert_eq!(
            parse_reply(&r, "n2"),
            None,
            "an answer to another probe is not ours"
        );
    }

    #[test]
    fn reply_ignores_anything_that_is_not_a_probe() {
        let peer: SocketAddr = "1.2.3.4:5".parse().unwrap();
        assert!(reply(b"GET / HTTP/1.0\r\n", peer).is_none());
        assert!(reply(b"SLUICE-PROBE \n", peer).is_none());
    }
}
