//! The node-local API between the CNI plugin and the agent: a Unix socket the agent
//! serves (mode 0600, root's, at [`crate::paths::AGENT_SOCKET`] under the node's run
//! directory), and the one definition of what travels over it. Both sides import
//! this module, so a field cannot mean two things (docs/architecture.md, "The
//! node-local API").
//!
//! Framing: one request per connection. The client writes one JSON object
//! ([`Request`], tagged by `op`, with the protocol version `v`) followed by a
//! newline and shuts down its write half; the agent answers with one JSON object
//! ([`Response`], tagged by `result`) and a newline, and closes. A request is at most
//! [`MAX_MESSAGE`] bytes. New operations are new `op` tags; a server that does not
//! know one answers `{"result":"error"}`, so an old agent and a new plugin fail
//! cleanly rather than guess. A breaking change of an existing `op` bumps
//! [`VERSION`].
//!
//! The plugin's side ([`call`]) is synchronous and bounded by one deadline over
//! connect, write and read: the plugin never waits on a slow agent for longer than
//! that, and ADD succeeds without it (the pod then stays fail-closed until the agent
//! learns of it from its datastore).

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The protocol version a request carries in `v`.
pub const VERSION: u32 = 1;
/// The largest request or response either side reads.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The plugin's default deadline for one call (connect + write + read): long enough
/// for an idle agent on a busy node, short enough that ADD does not feel it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5);
/// The plugin's deadline for [`Request::ClaimBlock`]: the agent writes the cluster's
/// block store (one API request) before answering. Rare (a pod asking for an address
/// in a block its node does not hold), so it may take what an API write takes.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(3);

/// Pod annotation: a JSON list holding one IPv4 address, taken from the pool through
/// IPAM (Calico's `cni.projectcalico.org/ipAddrs`).
pub const ANNOTATION_IP_ADDRS: &str = "sluice.dev/ip-addrs";
/// Pod annotation: a JSON list holding one IPv4 address, used as given with IPAM
/// bypassed (Calico's `cni.projectcalico.org/ipAddrsNoIpam`).
pub const ANNOTATION_IP_ADDRS_NO_IPAM: &str = "sluice.dev/ip-addrs-no-ipam";
/// The CNI capability (and `runtimeConfig` key) under which containerd's and CRI-O's
/// CRI hand a plugin that declares it the pod sandbox's annotations, which kubelet
/// fills with the pod's own. With it the plugin reads the two annotations above
/// without asking the agent.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// A request with its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// What the plugin asks or tells the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// ADD wired a pod: enforce for it now.
    ReportAttachment(Attachment),
    /// DEL removed a pod's attachment.
    ReportDetachment(Detachment),
    /// The pod's address annotations, from the agent's datastore cache.
    PodAnnotations { namespace: String, name: String },
    /// A requested address lies in a block this node does not hold: claim that block
    /// for the node (in a cluster only the agent writes the block store) and publish
    /// it before answering. Claiming a block the node already holds is a no-op.
    ClaimBlock { address: Ipv4Addr },
    /// The node's denied-connection records (`sluicectl flows`). Unlike every other
    /// op the answer is not one [`Response`] but JSON lines, one
    /// [`FlowRecord`](crate::flows::FlowRecord) each, oldest first, ended by the
    /// agent closing the connection (never, with `follow`, until the client goes);
    /// a refused request is answered by one `{"result":"error",…}` line instead.
    Flows(crate::flows::FlowQuery),
}

/// One wired attachment, as ADD made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub ifname: String,
    pub host_ifname: String,
    pub address: Ipv4Addr,
    /// The address came from `sluice.dev/ip-addrs-no-ipam`, not from IPAM.
    #[serde(default)]
    pub no_ipam: bool,
}

/// One removed attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Detachment {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub ifname: String,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "result",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum Response {
    /// A report was taken.
    Ok,
    /// The pod's address annotations (raw values, parsed by [`parse_address_list`]).
    /// `known` is false when the agent's cache does not hold the pod (yet).
    Annotations {
        known: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip_addrs: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip_addrs_no_ipam: Option<String>,
    },
    /// The block holding the address is this node's now (claimed, or already held)
    /// and the node-blocks file says so.
    BlockClaimed { block: String },
    /// The block holding the address belongs to another node.
    BlockTaken { block: String, owner: String },
    /// The request was not understood or could not be served.
    Error { message: String },
}

/// A pod's address annotations, as the agent caches them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressAnnotations {
    pub ip_addrs: Option<String>,
    pub ip_addrs_no_ipam: Option<String>,
}

impl AddressAnnotations {
    /// Picks the two annotations out of `metadata.annotations`; `None` when neither
    /// is set (most pods), so the cache holds only pods that ask for an address.
    pub fn from_metadata(annotations: &serde_json::Value) -> Option<AddressAnnotations> {
        let get = |k: &str| {
            annotations
                .get(k)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let a = AddressAnnotations {
            ip_addrs: get(ANNOTATION_IP_ADDRS),
            ip_addrs_no_ipam: get(ANNOTATION_IP_ADDRS_NO_IPAM),
        };
        (a != AddressAnnotations::default()).then_some(a)
    }
}

/// The address a pod asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestedAddress {
    /// From the pool, through IPAM (`sluice.dev/ip-addrs`).
    Ipam(Ipv4Addr),
    /// As given, IPAM bypassed (`sluice.dev/ip-addrs-no-ipam`).
    NoIpam(Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("annotation {key}: {value:?} is not a JSON list of IPv4 addresses: {reason}")]
    Malformed {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("annotation {key}: {value:?} names {count} addresses; sluice gives a pod one")]
    NotOne {
        key: &'static str,
        value: String,
        count: usize,
    },
    #[error("both {ANNOTATION_IP_ADDRS} and {ANNOTATION_IP_ADDRS_NO_IPAM} are set; a pod uses one")]
    Both,
}

/// `["10.244.3.7"]` → the one address (pure).
pub fn parse_address_list(key: &'static str, value: &str) -> Result<Ipv4Addr, AnnotationError> {
    let malformed = |reason: String| AnnotationError::Malformed {
        key,
        value: value.to_owned(),
        reason,
    };
    let list: Vec<String> = serde_json::from_str(value).map_err(|e| malformed(e.to_string()))?;
    if list.len() != 1 {
        return Err(AnnotationError::NotOne {
            key,
            value: value.to_owned(),
            count: list.len(),
        });
    }
    list[0]
        .trim()
        .parse::<Ipv4Addr>()
        .map_err(|e| malformed(format!("{:?}: {e}", list[0])))
}

impl AddressAnnotations {
    /// What the annotations ask for, if anything (pure).
    pub fn requested(&self) -> Result<Option<RequestedAddress>, AnnotationError> {
        match (&self.ip_addrs, &self.ip_addrs_no_ipam) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(AnnotationError::Both),
            (Some(v), None) => {
                parse_address_list(ANNOTATION_IP_ADDRS, v).map(|a| Some(RequestedAddress::Ipam(a)))
            }
            (None, Some(v)) => parse_address_list(ANNOTATION_IP_ADDRS_NO_IPAM, v)
                .map(|a| Some(RequestedAddress::NoIpam(a))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("agent socket {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent socket {path}: no answer within {ms} ms")]
    Timeout { path: std::path::PathBuf, ms: u128 },
    #[error("agent socket {path}: unreadable answer: {reason}")]
    Decode {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// A call's I/O error: a timed-out read or write is [`CallError::Timeout`].
fn io_error(path: &Path, timeout: Duration, source: std::io::Error) -> CallError {
    if matches!(
        source.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        CallError::Timeout {
            path: path.to_owned(),
            ms: timeout.as_millis(),
        }
    } else {
        CallError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What is left of `timeout` until `deadline`, or the timeout error.
fn time_left(path: &Path, timeout: Duration, deadline: Instant) -> Result<Duration, CallError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| CallError::Timeout {
            path: path.to_owned(),
            ms: timeout.as_millis(),
        })
}

/// Connect, write `request` as one line and shut the write half, by `deadline`.
/// connect(2) on a Unix socket does not block on a live listener (the backlog takes
/// it) and fails at once on a missing one, so only the write needs the deadline.
fn send(
    path: &Path,
    request: &Request,
    timeout: Duration,
    deadline: Instant,
) -> Result<UnixStream, CallError> {
    let io = |e| io_error(path, timeout, e);
    let mut s = UnixStream::connect(path).map_err(io)?;
    let mut line = serde_json::to_vec(&Envelope {
        v: VERSION,
        request: request.clone(),
    })
    .expect("requests serialize");
    line.push(b'\n');
    s.set_write_timeout(Some(time_left(path, timeout, deadline)?))
        .map_err(io)?;
    s.write_all(&line).map_err(io)?;
    s.shutdown(std::net::Shutdown::Write).map_err(io)?;
    Ok(s)
}

/// One request, one answer, all within `timeout` (the plugin's side).
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
    let deadline = Instant::now() + timeout;
    let io = |e| io_error(path, timeout, e);
    let mut s = send(path, request, timeout, deadline)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(time_left(path, timeout, deadline)?))
            .map_err(io)?;
        let n = s.read(&mut chunk).map_err(io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_MESSAGE {
            return Err(CallError::Decode {
                path: path.to_owned(),
                reason: format!("longer than {MAX_MESSAGE} bytes"),
            });
        }
    }
    serde_json::from_slice(&buf).map_err(|e| CallError::Decode {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads the `flows` answer: each record to `each` as it arrives (return `false` to
/// stop). Without `follow` the whole answer must come within `timeout`; with it,
/// only the connection and the request do, and the stream ends when the agent goes.
pub fn flows(
    path: &Path,
    query: &crate::flows::FlowQuery,
    timeout: Duration,
    mut each: impl FnMut(crate::flows::FlowRecord) -> bool,
) -> Result<(), CallError> {
    use std::io::BufRead;
    let io = |e| io_error(path, timeout, e);
    let s = send(
        path,
        &Request::Flows(query.clone()),
        timeout,
        Instant::now() + timeout,
    )?;
    let deadline = Instant::now() + timeout;
    let mut reader = std::io::BufReader::new(s);
    let mut text = String::new();
    loop {
        if !query.follow {
            let left = time_left(path, timeout, deadline)?;
            reader.get_ref().set_read_timeout(Some(left)).map_err(io)?;
        }
        text.clear();
        if reader.read_line(&mut text).map_err(io)? == 0 {
            return Ok(());
        }
        let decode = |reason: String| CallError::Decode {
            path: path.to_owned(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| decode(e.to_string()))?;
        if v.get("result").is_some() {
            let r: Response = serde_json::from_value(v).map_err(|e| decode(e.to_string()))?;
            return Err(decode(match r {
                Response::Error { message } => message,
                other => format!("unexpected answer {other:?}"),
            }));
        }
        let record = serde_json::from_value(v).map_err(|e| decode(e.to_string()))?;
        if !each(record) {
            return Ok(());
        }
    }
}

/// The agent's side: decode one request (version checked).
pub fn decode_request(bytes: &[u8]) -> Result<Request, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("v").and_then(|v| v.as_u64()) {
        Some(n) if n == u64::from(VERSION) => {}
        other => {
            return Err(format!(
                "protocol version {other:?}; this agent speaks {VERSION}"
            ));
        }
    }
    serde_json::from_value::<Envelope>(v)
        .map(|e| e.request)
        .map_err(|e| format!("unknown or malformed request: {e}"))
}

/// The agent's side: one encoded answer line.
pub fn encode_response(r: &Response) -> Vec<u8> {
    let mut v = serde_json::to_vec(r).expect("responses serialize");
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_is_the_documented_one() {
        let req = Request::ReportAttachment(Attachment {
            namespace: "prod".into(),
            name: "web".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            host_ifname: "slc0123456789a".into(),
            address: "10.244.1.5".parse().unwrap(),
            no_ipam: false,
        });
        let text = serde_json::to_string(&Envelope {
            v: VERSION,
            request: req.clone(),
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"op":"report-attachment","namespace":"prod","name":"web","containerId":"c1","ifname":"eth0","hostIfname":"slc0123456789a","address":"10.244.1.5","noIpam":false}"#
        );
        assert_eq!(decode_request(text.as_bytes()), Ok(req));
        let ans = Response::Annotations {
            known: true,
            ip_addrs: None,
            ip_addrs_no_ipam: Some(r#"["192.0.2.7"]"#.into()),
        };
        assert_eq!(
            String::from_utf8(encode_response(&ans)).unwrap(),
            "{\"result\":\"annotations\",\"known\":true,\"ipAddrsNoIpam\":\"[\\\"192.0.2.7\\\"]\"}\n"
        );
    }

    #[test]
    fn a_block_claim_and_its_answers_have_the_documented_wire_form() {
        let req = Request::ClaimBlock {
            address: "10.244.7.9".parse().unwrap(),
        };
        let text = serde_json::to_string(&Envelope {
            v: VERSION,
            request: req.clone(),
        })
        .unwrap();
        assert_eq!(text, r#"{"v":1,"op":"claim-block","address":"10.244.7.9"}"#);
        assert_eq!(decode_request(text.as_bytes()), Ok(req));
        let taken = Response::BlockTaken {
            block: "10.244.7.0/24".into(),
            owner: "node-3".into(),
        };
        assert_eq!(
            String::from_utf8(encode_response(&taken)).unwrap(),
            "{\"result\":\"block-taken\",\"block\":\"10.244.7.0/24\",\"owner\":\"node-3\"}\n"
        );
        let claimed = Response::BlockClaimed {
            block: "10.244.7.0/24".into(),
        };
        assert_eq!(
            String::from_utf8(encode_response(&claimed)).unwrap(),
            "{\"result\":\"block-claimed\",\"block\":\"10.244.7.0/24\"}\n"
        );
    }

    #[test]
    fn the_flows_op_carries_the_query_fields_by_their_http_names() {
        let q = crate::flows::FlowQuery {
            since: Some("2026-12-06T07:00:00Z".into()),
            denied: true,
            namespace: Some("prod".into()),
            limit: Some(5),
            follow: true,
        };
        let text = serde_json::to_string(&Envelope {
            v: VERSION,
            request: Request::Flows(q.clone()),
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"op":"flows","since":"2026-12-06T07:00:00Z","denied":true,"namespace":"prod","limit":5,"follow":true}"#
        );
        assert_eq!(decode_request(text.as_bytes()), Ok(Request::Flows(q)));
        assert_eq!(
            decode_request(br#"{"v":1,"op":"flows"}"#),
            Ok(Request::Flows(Default::default()))
        );
    }

    #[test]
    fn another_version_or_an_unknown_op_is_refused_not_guessed() {
        assert!(
            decode_request(br#"{"v":2,"op":"pod-annotations","namespace":"a","name":"b"}"#)
                .is_err()
        );
        assert!(decode_request(br#"{"v":1,"op":"teleport"}"#).is_err());
        assert!(decode_request(br#"{"op":"pod-annotations","namespace":"a","name":"b"}"#).is_err());
    }

    #[test]
    fn annotations_parse_to_one_address_or_a_clear_error() {
        let a = |ip: Option<&str>, no: Option<&str>| AddressAnnotations {
            ip_addrs: ip.map(str::to_owned),
            ip_addrs_no_ipam: no.map(str::to_owned),
        };
        assert_eq!(a(None, None).requested(), Ok(None));
        assert_eq!(
            a(Some(r#"["10.244.3.7"]"#), None).requested(),
            Ok(Some(RequestedAddress::Ipam("10.244.3.7".parse().unwrap())))
        );
        assert_eq!(
            a(None, Some(r#"[" 192.0.2.7 "]"#)).requested(),
            Ok(Some(RequestedAddress::NoIpam("192.0.2.7".parse().unwrap())))
        );
        let table = [
            (a(Some("10.244.3.7"), None), "not a JSON list"),
            (a(Some(r#"["10.244.3.7/32"]"#), None), "not a JSON list"),
            (a(Some(r#"["fd00::1"]"#), None), "not a JSON list"),
            (a(None, Some("[]")), "names 0 addresses"),
            (
                a(None, Some(r#"["1.1.1.1","1.1.1.2"]"#)),
                "names 2 addresses",
            ),
            (a(Some("[]"), Some("[]")), "both"),
        ];
        for (ann, want) in table {
            let e = ann.requested().unwrap_err().to_string();
            assert!(e.contains(want), "{ann:?}: {e}");
        }
    }

    #[test]
    fn only_pods_that_ask_for_an_address_are_cached() {
        let none = serde_json::json!({"other": "x"});
        assert_eq!(AddressAnnotations::from_metadata(&none), None);
        let some = serde_json::json!({ANNOTATION_IP_ADDRS: "[\"10.0.0.1\"]"});
        assert_eq!(
            AddressAnnotations::from_metadata(&some)
                .unwrap()
                .ip_addrs
                .as_deref(),
            Some("[\"10.0.0.1\"]")
        );
    }

    #[test]
    fn a_missing_agent_fails_at_once_and_a_silent_one_within_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let req = Request::PodAnnotations {
            namespace: "a".into(),
            name: "b".into(),
        };
        let t = Instant::now();
        assert!(matches!(
            call(&path, &req, Duration::from_millis(5)),
            Err(CallError::Io { .. })
        ));
        assert!(t.elapsed() < Duration::from_millis(50));
        // A listener that accepts (the backlog does) and never answers.
        let _silent = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = Instant::now();
        assert!(matches!(
            call(&path, &req, Duration::from_millis(5)),
            Err(CallError::Timeout { .. })
        ));
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    }
}
