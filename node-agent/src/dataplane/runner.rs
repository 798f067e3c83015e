//! Command execution at the OS boundary: `iptables-restore`, `iptables-save`, `ipset`.
//!
//! The dataplane decides what text to feed which tool; a [`CommandRunner`] runs it.
//! [`ExecRunner`] execs for real; [`RecordingRunner`] records every call and answers
//! from a script so reconcile logic is tested without a kernel.
//!
//! Set member adds and deletes ([`CommandRunner::set_members`]) are `ipset restore`
//! text by default; [`ExecRunner`] sends them over netlink instead
//! ([`sluice_netlink::ipset`]): a new pod's addresses enter its peers' sets without a
//! process start on the way to its first allowed packet.

use std::fmt::Write as _;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use sluice_netlink::ipset as nl;
use sluice_policy::Protocol;
use sluice_policy::dataplane::SetMember;
use sluice_policy::render::ipset::member_text;

/// One finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn ok(stdout: impl Into<String>) -> CommandOutput {
        CommandOutput {
            status: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    pub fn success(&self) -> bool {
        self.status == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{program} {args}` exited with {status}: {stderr}")]
    Failed {
        program: String,
        args: String,
        status: i32,
        stderr: String,
    },
    #[error(transparent)]
    Netlink(#[from] sluice_netlink::NetlinkError),
}

/// Runs a program with arguments and optional stdin, waiting for it to finish.
pub trait CommandRunner: Send + Sync {
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<CommandOutput, RunError>;

    /// Whether this runner changes the kernel of the namespace it runs in (a
    /// recording runner only records). The nftables writers that speak netlink
    /// themselves instead of running a program are used only beside a runner that
    /// does, so a test's recording runner never writes the host's tables through them.
    fn writes_kernel(&self) -> bool {
        false
    }

    /// Add then delete set members (`-exist`: an add of a member already there or a
    /// delete of one that is not is no error), in order. By default one
    /// `ipset restore`.
    fn set_members(
        &self,
        add: &[(String, SetMember)],
        remove: &[(String, SetMember)],
    ) -> Result<(), RunError> {
        let text = members_restore_text(add, remove);
        self.run_ok("ipset", &["restore"], Some(&text)).map(|_| ())
    }

    /// Like [`CommandRunner::run`] but a non-zero exit is an error.
    fn run_ok(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<CommandOutput, RunError> {
        let out = self.run(program, args, stdin)?;
        if out.success() {
            Ok(out)
        } else {
            Err(RunError::Failed {
                program: program.to_string(),
                args: args.join(" "),
                status: out.status,
                stderr: out.stderr.trim().to_string(),
            })
        }
    }
}

/// The `ipset restore` text of member additions then deletions, each `-exist`.
pub fn members_restore_text(add: &[(String, SetMember)], remove: &[(String, SetMember)]) -> String {
    let mut out = String::new();
    for (name, m) in add {
        let _ = writeln!(out, "add {name} {} -exist", member_text(m));
    }
    for (name, m) in remove {
        let _ = writeln!(out, "del {name} {} -exist", member_text(m));
    }
    out
}

/// A member as the netlink writer takes it; `None` for what only `ipset`'s own
/// parser spells (ICMP "ports") or only nftables holds.
fn netlink_member(m: &SetMember) -> Option<nl::Member> {
    Some(match *m {
        SetMember::Ip(ip) => nl::Member::Ip(ip),
        SetMember::Net { net, nomatch } => nl::Member::Net {
            addr: net.network(),
            prefix: net.prefix_len(),
            nomatch,
        },
        SetMember::IpPort { ip, protocol, port } => nl::Member::IpPort {
            ip,
            protocol: match protocol {
                Protocol::Tcp => libc::IPPROTO_TCP as u8,
                Protocol::Udp => libc::IPPROTO_UDP as u8,
                Protocol::Sctp => libc::IPPROTO_SCTP as u8,
                Protocol::Icmp => return None,
            },
            port,
        },
        SetMember::NetIface { net, iface } => nl::Member::NetIface {
            addr: net.network(),
            prefix: net.prefix_len(),
            iface: iface.as_str().to_string(),
        },
        SetMember::Range(_)
        | SetMember::Tuple { .. }
        | SetMember::ClassTuple { .. }
        | SetMember::Classes(_) => return None,
    })
}

/// Execs the program for real, in the calling thread's network namespace.
#[derive(Debug, Default, Clone)]
pub struct ExecRunner;

impl CommandRunner for ExecRunner {
    fn writes_kernel(&self) -> bool {
        true
    }

    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<CommandOutput, RunError> {
        let spawn_err = |source| RunError::Spawn {
            program: program.to_string(),
            source,
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin was piped");
            // A tool that exits early (bad input) closes its end; the exit status and
            // stderr then say why, so a broken pipe here is not the error to report.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        Ok(CommandOutput {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Over netlink, in the calling thread's network namespace; through
    /// `ipset restore` when a member has no netlink form here.
    fn set_members(
        &self,
        add: &[(String, SetMember)],
        remove: &[(String, SetMember)],
    ) -> Result<(), RunError> {
        let changes: Option<Vec<nl::Change>> = add
            .iter()
            .map(|m| (nl::Op::Add, m))
            .chain(remove.iter().map(|m| (nl::Op::Del, m)))
            .map(|(op, (set, m))| {
                Some(nl::Change {
                    op,
                    set: set.clone(),
                    member: netlink_member(m)?,
                })
            })
            .collect();
        match changes {
            Some(changes) => Ok(nl::apply(&changes)?),
            None => {
                let text = members_restore_text(add, remove);
                self.run_ok("ipset", &["restore"], Some(&text)).map(|_| ())
            }
        }
    }
}

/// One call seen by a [`RecordingRunner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCall {
    pub program: String,
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

impl RecordedCall {
    /// `program arg1 arg2`, for assertions.
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

type Responder = dyn Fn(&RecordedCall) -> CommandOutput + Send + Sync;

/// Records every call; answers through a responder (default: success, empty output).
#[derive(Clone)]
pub struct RecordingRunner {
    calls: Arc<Mutex<Vec<RecordedCall>>>,
    responder: Arc<Responder>,
}

impl Default for RecordingRunner {
    fn default() -> Self {
        RecordingRunner::new(|_| CommandOutput::ok(""))
    }
}

impl RecordingRunner {
    pub fn new(responder: impl Fn(&RecordedCall) -> CommandOutput + Send + Sync + 'static) -> Self {
        RecordingRunner {
            calls: Arc::new(Mutex::new(Vec::new())),
            responder: Arc::new(responder),
        }
    }

    pub fn calls(&self) -> Vec<RecordedCall> {
        self.calls.lock().expect("recorder lock").clone()
    }

    pub fn clear(&self) {
        self.calls.lock().expect("recorder lock").clear();
    }
}

impl CommandRunner for RecordingRunner {
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<CommandOutput, RunError> {
        let call = RecordedCall {
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin: stdin.map(str::to_string),
        };
        let out = (self.responder)(&call);
        self.calls.lock().expect("recorder lock").push(call);
        Ok(out)
    }
}
