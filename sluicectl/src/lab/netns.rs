//! Named network namespaces (`ip netns`), and running things inside them.
//!
//! Every namespace the lab makes is a named one under `/run/netns` so people can look
//! inside with `ip netns exec`. Processes are put into a namespace with `setns(2)` in
//! the child between fork and exec (no `ip netns exec`, which also remounts /sys); a
//! probe enters a namespace on a thread of its own, since setns changes one thread.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::sched::CloneFlags;

use super::LabError;

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// `ip netns add NAME` and bring `lo` up.
pub fn add(name: &str) -> Result<(), LabError> {
    if !exists(name) {
        run("ip", &["netns", "add", name])?;
    }
    run("ip", &["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Kill every process left in the namespace (all were started by the lab), then
/// delete it. Missing namespaces are fine: teardown keeps going.
pub fn delete(name: &str) -> Result<(), LabError> {
    if !exists(name) {
        return Ok(());
    }
    for pid in pids(name) {
        kill_pid(pid);
    }
    run("ip", &["netns", "del", name]).map(|_| ())
}

/// PIDs of processes whose network namespace is `name` (`ip netns pids`).
pub fn pids(name: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every named namespace whose name starts with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// SIGTERM, a short grace, then SIGKILL; a pid that is already gone is fine.
pub fn kill_pid(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let p = Pid::from_raw(pid as i32);
    if kill(p, Signal::SIGTERM).is_err() {
        return;
    }
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        if !alive(pid) {
            return;
        }
    }
    let _ = kill(p, Signal::SIGKILL);
    for _ in 0..100 {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the field after the parenthesised command name
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Run a command in the caller's namespaces; non-zero exit is an error with stderr.
pub fn run(prog: &str, args: &[&str]) -> Result<Output, LabError> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Spawn(prog.to_string(), e))?;
    check(prog, args, out)
}

/// Run a command with `input` on stdin.
pub fn run_input(prog: &str, args: &[&str], input: &str) -> Result<Output, LabError> {
    feed(Command::new(prog), prog, args, input)
}

/// Spawn `cmd` with `args`, write `input` to its stdin, wait, and check its status.
fn feed(mut cmd: Command, prog: &str, args: &[&str], input: &str) -> Result<Output, LabError> {
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Spawn(prog.to_string(), e))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .map_err(|e| LabError::Spawn(prog.to_string(), e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::Spawn(prog.to_string(), e))?;
    check(prog, args, out)
}

fn check(prog: &str, args: &[&str], out: Output) -> Result<Output, LabError> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Command {
            command: format!("{prog} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `ip -n NS -batch -` with one command per line: one exec for many changes.
pub fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<(), LabError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut args = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut input = lines.join("\n");
    input.push('\n');
    run_input("ip", &args, &input).map(|_| ())
}

/// A `Command` that will run inside namespace `ns` (setns in the child before exec).
pub fn command_in(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Result<Command, LabError> {
    let p = path(ns);
    let file = File::open(&p).map_err(|e| LabError::io(&p, e))?;
    let mut cmd = Command::new(prog);
    // SAFETY: only async-signal-safe calls (setns) between fork and exec; the file
    // descriptor stays open in the parent until the Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    Ok(cmd)
}

/// Run a command inside `ns` and wait for it.
pub fn run_in(ns: &str, prog: &str, args: &[&str]) -> Result<Output, LabError> {
    let out = command_in(ns, prog)?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Spawn(prog.to_string(), e))?;
    check(prog, args, out)
}

/// Run with stdin inside `ns`.
pub fn run_in_input(ns: &str, prog: &str, args: &[&str], input: &str) -> Result<Output, LabError> {
    feed(command_in(ns, prog)?, prog, args, input)
}

/// Start a long-lived process inside `ns`, detached (own session, stdio to `log`),
/// and return its pid. The child is not waited for: `lab down` kills it by pid and
/// by namespace membership.
pub fn spawn_daemon(
    ns: &str,
    prog: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<u32, LabError> {
    let logf = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| LabError::io(log, e))?;
    let logf2 = logf.try_clone().map_err(|e| LabError::io(log, e))?;
    let mut cmd = command_in(ns, prog)?;
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2);
    // SAFETY: setsid is async-signal-safe; a new session keeps the daemon out of
    // the terminal's process group (a ^C to sluicectl must not kill the lab).
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| LabError::Spawn(prog.display().to_string(), e))?;
    Ok(child.id())
}

/// Run `f` on a new thread that has entered namespace `ns`.
pub fn on_thread_in<F, R>(ns: &str, f: F) -> Result<R, LabError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let p = path(ns);
    let file = File::open(&p).map_err(|e| LabError::io(&p, e))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| LabError::Setns(ns.to_string(), e))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Enter `ns` on the current thread (a thread the caller owns and discards).
pub fn enter(ns: &str) -> Result<(), LabError> {
    let p = path(ns);
    let file = File::open(&p).map_err(|e| LabError::io(&p, e))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| LabError::Setns(ns.to_string(), e))
}

/// Run `f` on a fresh thread inside `ns`, flattening a namespace error into `f`'s.
pub fn enter_and<T: Send>(
    ns: &str,
    f: impl FnOnce() -> Result<T, LabError> + Send,
) -> Result<T, LabError> {
    on_thread_in(ns, f)?
}
