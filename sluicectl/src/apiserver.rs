//! The live cluster's API server, reached as kubectl reaches it: the kubeconfig is
//! `--kubeconfig FILE` alone when given, else every file of the `KUBECONFIG` list
//! that exists, merged (the first file to set a value wins), else `~/.kube/config`,
//! else the pod's in-cluster service account; `--context NAME` picks a context of
//! that kubeconfig instead of its `current-context`.
//!
//! sluicectl is synchronous; this module owns a small tokio runtime for kube-rs and
//! offers blocking calls: a GET whose body is returned as text (the policy reader
//! takes the API's JSON exactly as it takes a file), and a GET streamed line by line
//! (`/flows` through the pod proxy, `follow=1`).

use std::ffi::OsStr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use futures::{AsyncBufReadExt, TryStreamExt};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// `--kubeconfig` and `--context`, spelled and meaning as kubectl's.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// Path to the kubeconfig file to use (only this file; KUBECONFIG is ignored).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The name of the kubeconfig context to use.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

impl KubeArgs {
    /// Whether either flag was given.
    pub fn given(&self) -> bool {
        self.kubeconfig.is_some() || self.context.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig ({files}): {source}")]
    Config {
        files: String,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no kubeconfig (KUBECONFIG unset or naming no existing file, no ~/.kube/config) \
         and not inside a cluster ({0}); give --kubeconfig PATH, or -f PATH to read files"
    )]
    NoConfig(String),
    #[error("--context {0}: no kubeconfig file found to take the context from")]
    ContextWithoutKubeconfig(String),
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("starting the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("Kubernetes API server: GET {path}: {source}")]
    Get {
        path: String,
        #[source]
        source: kube::Error,
    },
    #[error("Kubernetes API server: GET {path}: reading the response: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The kubeconfig files kubectl would read, in merge order: the explicit file alone;
/// else the existing entries of `KUBECONFIG` (missing ones are skipped, as client-go
/// skips them); else `$HOME/.kube/config` if it exists. Empty means in-cluster.
pub fn kubeconfig_files(
    explicit: Option<&Path>,
    kubeconfig_env: Option<&OsStr>,
    home: Option<&Path>,
) -> Vec<PathBuf> {
    if let Some(path) = explicit {
        // Named by the operator: it must exist, and reading it says so if not.
        return vec![path.to_path_buf()];
    }
    if let Some(list) = kubeconfig_env.filter(|v| !v.is_empty()) {
        return std::env::split_paths(list)
            .filter(|p| !p.as_os_str().is_empty() && p.exists())
            .collect();
    }
    home.map(|h| h.join(".kube").join("config"))
        .filter(|p| p.exists())
        .into_iter()
        .collect()
}

/// A connected client and the runtime it runs on.
pub struct ApiServer {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl ApiServer {
    /// Finds the kubeconfig as kubectl does (see the module doc) and builds a client.
    /// Nothing is sent yet.
    pub fn connect(args: &KubeArgs) -> Result<ApiServer, ApiServerError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ApiServerError::Runtime)?;
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let files = kubeconfig_files(
            args.kubeconfig.as_deref(),
            std::env::var_os("KUBECONFIG").as_deref(),
            home.as_deref(),
        );
        let mut config = rt.block_on(config(&files, args.context.as_deref()))?;
        // kube-rs retries 429/503/504 up to 15 times with backoff growing towards
        // minutes, made for controllers; an operator at a terminal wants the pod
        // proxy's 503 (the agent is not answering) at once, as kubectl gives it.
        config.default_retry = false;
        // The client spawns its connection tasks on the current runtime.
        let client = rt
            .block_on(async { kube::Client::try_from(config) })
            .map_err(ApiServerError::Client)?;
        Ok(ApiServer { rt, client })
    }

    /// GET `path` (with its query), the body as text; `Ok(None)` on 404, which the
    /// API server answers for a collection it does not serve (a CRD not installed).
    pub fn get_text(&self, path: &str) -> Result<Option<String>, ApiServerError> {
        let request = get(path);
        match self.rt.block_on(self.client.request_text(request)) {
            Ok(text) => Ok(Some(text)),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(source) => Err(ApiServerError::Get {
                path: path.to_string(),
                source,
            }),
        }
    }

    /// GET `path` and hand each line of the body to `line` as it arrives, until the
    /// body ends or `line` breaks (its reader has gone).
    pub fn get_lines(
        &self,
        path: &str,
        mut line: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(), ApiServerError> {
        let read = |source| ApiServerError::Read {
            path: path.to_string(),
            source,
        };
        self.rt.block_on(async {
            let body = self
                .client
                .request_stream(get(path))
                .await
                .map_err(|source| ApiServerError::Get {
                    path: path.to_string(),
                    source,
                })?;
            let mut lines = std::pin::pin!(body.lines());
            while let Some(l) = lines.try_next().await.map_err(read)? {
                if line(&l).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }
}

fn get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .body(Vec::new())
        .expect("a path and query built by sluicectl is a valid URI")
}

/// The client configuration from `files` (merged) and `context`, or in-cluster when
/// there is no file.
async fn config(files: &[PathBuf], context: Option<&str>) -> Result<kube::Config, ApiServerError> {
    if files.is_empty() {
        if let Some(c) = context {
            return Err(ApiServerError::ContextWithoutKubeconfig(c.to_string()));
        }
        return kube::Config::incluster().map_err(|e| ApiServerError::NoConfig(e.to_string()));
    }
    let mut merged = Kubeconfig::default();
    for path in files {
        let read = Kubeconfig::read_from(path).and_then(|k| merged.clone().merge(k));
        merged = read.map_err(|source| ApiServerError::Kubeconfig {
            path: path.clone(),
            source,
        })?;
    }
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    kube::Config::from_custom_kubeconfig(merged, &options)
        .await
        .map_err(|source| ApiServerError::Config {
            files: files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            source,
        })
}

/// `s` percent-encoded for a query value (RFC 3986 unreserved characters kept).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_kubeconfig_is_the_only_file_read_even_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "").unwrap();
        let explicit = dir.path().join("missing");
        assert_eq!(
            kubeconfig_files(Some(&explicit), Some(a.as_os_str()), Some(dir.path())),
            vec![explicit]
        );
    }

    #[test]
    fn the_kubeconfig_list_keeps_existing_files_in_order_and_skips_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let list =
            std::env::join_paths([&b, &dir.path().join("missing"), &PathBuf::new(), &a]).unwrap();
        assert_eq!(
            kubeconfig_files(None, Some(&list), Some(dir.path())),
            vec![b, a]
        );
    }

    #[test]
    fn without_kubeconfig_the_home_file_is_read_and_without_it_none_means_in_cluster() {
        let home = tempfile::tempdir().unwrap();
        assert!(kubeconfig_files(None, None, Some(home.path())).is_empty());
        assert!(kubeconfig_files(None, Some(OsStr::new("")), Some(home.path())).is_empty());
        let file = home.path().join(".kube/config");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            kubeconfig_files(None, Some(OsStr::new("")), Some(home.path())),
            vec![file]
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query_escape("2026-12-06T09:00:00+01:00"),
            "2026-12-06T09%3A00%3A00%2B01%3A00"
        );
        assert_eq!(
            query_escape("app.kubernetes.io/name=sluice,x=y"),
            "app.kubernetes.io%2Fname%3Dsluice%2Cx%3Dy"
        );
    }
}
