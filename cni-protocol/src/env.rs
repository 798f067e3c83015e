//! The `CNI_*` environment a runtime execs a plugin with.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::codes::ErrorCode;
use crate::config::head;
use crate::error::CniError;

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("unknown CNI_COMMAND {other:?}"),
                )
                .with_details("expected ADD, DEL, CHECK, STATUS, GC or VERSION"));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }

    /// Verbs that act on one attachment and so need `CNI_CONTAINERID` and `CNI_IFNAME`.
    pub fn is_per_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// `CNI_ARGS`: `KEY=VALUE;KEY=VALUE`. The keys Kubernetes runtimes send are typed;
/// the rest are kept in `other`. Unknown keys are accepted whether or not
/// `IgnoreUnknown` is set: runtimes add keys over time and refusing a pod for one
/// we do not read helps nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ignore_unknown: bool,
    pub k8s_pod_namespace: Option<String>,
    pub k8s_pod_name: Option<String>,
    pub k8s_pod_uid: Option<String>,
    pub k8s_pod_infra_container_id: Option<String>,
    /// `MAC=`: a requested MAC for the pod interface.
    pub mac: Option<String>,
    /// `IP=`: a requested address (read by IPAM plugins).
    pub ip: Option<String>,
    /// Every other pair, in order.
    pub other: Vec<(String, String)>,
}

impl CniArgs {
    /// Parse `CNI_ARGS`. A pair without `=` is code 4 (invalid environment).
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut args = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS: invalid pair {pair:?}"),
                )
                .with_details("expected KEY=VALUE pairs separated by ';'"));
            };
            let val = Some(v.to_owned());
            match k {
                "IgnoreUnknown" => {
                    args.ignore_unknown = matches!(v.to_ascii_lowercase().as_str(), "1" | "true")
                }
                "K8S_POD_NAMESPACE" => args.k8s_pod_namespace = val,
                "K8S_POD_NAME" => args.k8s_pod_name = val,
                "K8S_POD_UID" => args.k8s_pod_uid = val,
                "K8S_POD_INFRA_CONTAINER_ID" => args.k8s_pod_infra_container_id = val,
                "MAC" => args.mac = val,
                "IP" => args.ip = val,
                _ => args.other.push((k.to_owned(), v.to_owned())),
            }
        }
        Ok(args)
    }

    /// `(namespace, pod name)` when both are present and non-empty.
    pub fn k8s_pod(&self) -> Option<(&str, &str)> {
        match (
            self.k8s_pod_namespace.as_deref(),
            self.k8s_pod_name.as_deref(),
        ) {
            (Some(ns), Some(pod)) if !ns.is_empty() && !pod.is_empty() => Some((ns, pod)),
            _ => None,
        }
    }
}

/// The parsed `CNI_*` environment. Fields a verb does not need may be absent;
/// [`Env::from_lookup`] checks what each verb requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    /// `CNI_NETNS`; `None` when unset or empty (DEL may come without one).
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: CniArgs,
    /// `CNI_PATH`, split on `:`.
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Read the process environment.
    pub fn from_process() -> Result<Env, CniError> {
        Env::from_lookup(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Parse from any lookup (tests pass a map). Required per verb, as the spec says:
    /// ADD and CHECK need `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`; DEL needs
    /// `CNI_CONTAINERID` and `CNI_IFNAME` (netns may be empty); every verb but
    /// VERSION needs `CNI_PATH` to find a delegate. Missing or invalid: code 4.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = match nonempty("CNI_COMMAND") {
            Some(c) => Command::parse(&c)?,
            None => return Err(missing("CNI_COMMAND")),
        };
        let env = Env {
            command,
            container_id: nonempty("CNI_CONTAINERID"),
            netns: nonempty("CNI_NETNS").map(PathBuf::from),
            ifname: nonempty("CNI_IFNAME"),
            args: CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?,
            path: nonempty("CNI_PATH")
                .map(|p| {
                    std::env::split_paths(&OsString::from(p))
                        .filter(|p| !p.as_os_str().is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        };
        if command.is_per_attachment() {
            let id = env
                .container_id
                .as_deref()
                .ok_or_else(|| missing("CNI_CONTAINERID"))?;
            validate_container_id(id)?;
            let ifname = env.ifname.as_deref().ok_or_else(|| missing("CNI_IFNAME"))?;
            validate_ifname(ifname)?;
            if command != Command::Del && env.netns.is_none() {
                return Err(missing("CNI_NETNS"));
            }
        }
        if command != Command::Version && env.path.is_empty() {
            return Err(missing("CNI_PATH"));
        }
        Ok(env)
    }

    /// The container id; only call on verbs that checked it ([`Command::is_per_attachment`]).
    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or("")
    }

    /// The interface name inside the container; only for per-attachment verbs.
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or("")
    }
}

fn missing(var: &str) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!("required environment variable {var} is missing or empty"),
    )
}

/// The longest container id sluice accepts. The spec sets no limit; runtimes send
/// 64 hex digits. The id goes into the host link's alias, which the kernel caps at
/// 255 bytes (see [`crate::MAX_NETWORK_NAME_LEN`]).
pub const MAX_CONTAINER_ID_LEN: usize = 128;

/// The spec: a container id is non-empty, starts with an alphanumeric character and
/// holds only alphanumerics, `_`, `.` and `-`; and sluice's bound on its length.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_CONTAINERID {:?} has invalid characters", head(id)),
        ));
    }
    if id.len() > MAX_CONTAINER_ID_LEN {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_CONTAINERID {:?}… is {} bytes; sluice accepts at most {MAX_CONTAINER_ID_LEN}",
                head(id),
                id.len()
            ),
        ));
    }
    Ok(())
}

/// The kernel's rule for an interface name: 1–15 bytes, not `.` or `..`, no `/`,
/// `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_IFNAME {name:?} is not a valid interface name"),
        )
        .with_details("1-15 characters, no '/', ':' or whitespace"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1;MAC=0a:58:0a:f4:00:05;IP=10.244.0.9;Extra=x",
        ),
    ];

    #[test]
    fn a_kubernetes_add_environment_parses_fully() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id(), "abc123");
        assert_eq!(
            e.netns.as_deref(),
            Some(std::path::Path::new("/var/run/netns/x"))
        );
        assert_eq!(e.ifname(), "eth0");
        assert_eq!(
            e.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
        assert!(e.args.ignore_unknown);
        assert_eq!(e.args.k8s_pod(), Some(("default", "web-0")));
        assert_eq!(e.args.k8s_pod_uid.as_deref(), Some("u-1"));
        assert_eq!(e.args.mac.as_deref(), Some("0a:58:0a:f4:00:05"));
        assert_eq!(e.args.ip.as_deref(), Some("10.244.0.9"));
        assert_eq!(e.args.other, vec![("Extra".into(), "x".into())]);
    }

    #[test]
    fn each_missing_variable_is_code_4() {
        for drop in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_PATH",
        ] {
            let pairs: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != drop).collect();
            let e = env(&pairs).unwrap_err();
            assert_eq!(e.code, 4, "without {drop}");
            if drop != "CNI_COMMAND" {
                assert!(e.msg.contains(drop), "{drop}: {}", e.msg);
            }
        }
    }

    #[test]
    fn del_accepts_an_empty_netns() {
        let mut pairs: Vec<_> = ADD.to_vec();
        pairs[0] = ("CNI_COMMAND", "DEL");
        pairs[2] = ("CNI_NETNS", "");
        let e = env(&pairs).unwrap();
        assert_eq!(e.command, Command::Del);
        assert_eq!(e.netns, None);
    }

    #[test]
    fn version_needs_nothing_but_the_command() {
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
    }

    #[test]
    fn status_and_gc_need_only_cni_path() {
        for c in ["STATUS", "GC"] {
            assert!(env(&[("CNI_COMMAND", c), ("CNI_PATH", "/opt/cni/bin")]).is_ok());
            assert_eq!(env(&[("CNI_COMMAND", c)]).unwrap_err().code, 4);
        }
    }

    #[test]
    fn unknown_command_is_code_4() {
        assert_eq!(env(&[("CNI_COMMAND", "UP")]).unwrap_err().code, 4);
    }

    #[test]
    fn cni_args_without_ignore_unknown_still_parse_and_bad_pairs_do_not() {
        let a = CniArgs::parse("K8S_POD_NAME=p;Foo=bar").unwrap();
        assert!(!a.ignore_unknown);
        assert_eq!(a.k8s_pod(), None, "namespace missing");
        assert_eq!(CniArgs::parse("novalue").unwrap_err().code, 4);
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        assert!(
            CniArgs::parse("IgnoreUnknown=true;")
                .unwrap()
                .ignore_unknown
        );
    }

    #[test]
    fn a_container_id_longer_than_the_bound_is_code_4() {
        validate_container_id(&"a".repeat(MAX_CONTAINER_ID_LEN)).unwrap();
        let e = validate_container_id(&"a".repeat(70_000)).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.len() < 200, "{}", e.msg);
    }

    #[test]
    fn container_ids_and_ifnames_follow_the_spec() {
        for ok in ["a", "abc-1.2_3", "0123456789abcdef"] {
            validate_container_id(ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "a;b"] {
            assert_eq!(validate_container_id(bad).unwrap_err().code, 4, "{bad:?}");
        }
        for ok in ["eth0", "net1", "a23456789012345"] {
            validate_ifname(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "a234567890123456"] {
            assert_eq!(validate_ifname(bad).unwrap_err().code, 4, "{bad:?}");
        }
    }
}
