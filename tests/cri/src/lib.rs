//! kubelet's side of the CRI, for tests: a gRPC client of containerd's CRI plugin
//! (the calls kubelet makes for a pod sandbox) and a sandbox ("pause") image built
//! locally, since no registry is reachable.
//!
//! tonic lives here and only here: no production crate depends on this one.

pub mod api;

use std::path::{Path, PathBuf};
use std::time::Duration;

use api::*;
use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};

/// The sandbox image the suite imports and names in containerd's `sandbox_image`.
pub const PAUSE_IMAGE: &str = "sluice.test/pause:1";

/// How long one CRI call may take before the test fails instead of hanging.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connect to {0}: {1}")]
    Connect(PathBuf, tonic::transport::Error),
    #[error("{0}: {1}")]
    Status(&'static str, tonic::Status),
    #[error("{0}: no answer within {CALL_TIMEOUT:?}")]
    Timeout(&'static str),
}

/// The runtime service of one CRI endpoint (a Unix socket), as kubelet holds it.
#[derive(Clone)]
pub struct CriClient {
    channel: Channel,
}

impl CriClient {
    pub async fn connect(socket: &Path) -> Result<CriClient, CriError> {
        let path = socket.to_owned();
        // The URI is a placeholder: every connection goes to the socket.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| CriError::Connect(socket.to_owned(), e))?;
        Ok(CriClient { channel })
    }

    async fn unary<Req, Resp>(&self, method: &'static str, req: Req) -> Result<Resp, CriError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let path = PathAndQuery::from_static(method);
            grpc.unary(
                tonic::Request::new(req),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(CriError::Status(method, status)),
            Err(_) => Err(CriError::Timeout(method)),
        }
    }

    pub async fn version(&self) -> Result<VersionResponse, CriError> {
        self.unary(
            "/runtime.v1.RuntimeService/Version",
            VersionRequest {
                version: "v1".into(),
            },
        )
        .await
    }

    /// RunPodSandbox: containerd creates the netns, calls CNI ADD, starts pause.
    pub async fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, CriError> {
        let resp: RunPodSandboxResponse = self
            .unary(
                "/runtime.v1.RuntimeService/RunPodSandbox",
                RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                },
            )
            .await?;
        Ok(resp.pod_sandbox_id)
    }

    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: StopPodSandboxResponse = self
            .unary(
                "/runtime.v1.RuntimeService/StopPodSandbox",
                StopPodSandboxRequest {
                    pod_sandbox_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: RemovePodSandboxResponse = self
            .unary(
                "/runtime.v1.RuntimeService/RemovePodSandbox",
                RemovePodSandboxRequest {
                    pod_sandbox_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse, CriError> {
        self.unary(
            "/runtime.v1.RuntimeService/PodSandboxStatus",
            PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            },
        )
        .await
    }

    pub async fn list_pod_sandbox(&self) -> Result<Vec<PodSandbox>, CriError> {
        let resp: ListPodSandboxResponse = self
            .unary(
                "/runtime.v1.RuntimeService/ListPodSandbox",
                ListPodSandboxRequest {},
            )
            .await?;
        Ok(resp.items)
    }
}

/// A sandbox config as kubelet sends it for pod `namespace/name`, attempt `attempt`.
pub fn pod_config(
    namespace: &str,
    name: &str,
    attempt: u32,
    port_mappings: Vec<PortMapping>,
) -> PodSandboxConfig {
    let uid = format!("uid-{namespace}-{name}");
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: namespace.into(),
            attempt,
        }),
        hostname: name.into(),
        port_mappings,
        labels: [
            ("io.kubernetes.pod.name".to_owned(), name.to_owned()),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                namespace.to_owned(),
            ),
            ("io.kubernetes.pod.uid".to_owned(), uid),
        ]
        .into(),
        ..Default::default()
    }
}

/// A TCP hostPort mapping, as kubelet builds it from a container's `ports`.
pub fn tcp_host_port(container_port: i32, host_port: i32) -> PortMapping {
    PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port,
        host_port,
        host_ip: String::new(),
    }
}

/// The sandbox process's pid, from containerd's verbose PodSandboxStatus.
pub fn sandbox_pid(status: &PodSandboxStatusResponse) -> Option<u32> {
    let info: serde_json::Value = serde_json::from_str(status.info.get("info")?).ok()?;
    info["pid"].as_u64().filter(|p| *p > 0).map(|p| p as u32)
}

/// Write a docker-archive tarball (what `docker save` writes, which `ctr images
/// import` reads) of a one-layer image named [`PAUSE_IMAGE`]: busybox-static and an
/// entrypoint that sleeps forever, which is all a pause container does.
pub fn build_pause_image(dir: &Path) -> PathBuf {
    use sha2::Digest;
    let work = dir.join("pause-image");
    let root = work.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    for applet in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let layer = work.join("layer.tar");
    sluice_testkit::sh(&format!(
        "tar -C {} --numeric-owner --owner=0 --group=0 -cf {} .",
        root.display(),
        layer.display()
    ));
    let diff_id = hex::encode(sha2::Sha256::digest(std::fs::read(&layer).unwrap()));
    let config = serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep", "2147483647"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]}
    });
    std::fs::write(work.join("config.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [PAUSE_IMAGE],
        "Layers": ["layer.tar"]
    }]);
    std::fs::write(work.join("manifest.json"), manifest.to_string()).unwrap();
    let archive = dir.join("pause.tar");
    sluice_testkit::sh(&format!(
        "tar -C {} -cf {} manifest.json config.json layer.tar",
        work.display(),
        archive.display()
    ));
    archive
}

/// The OCI name of this machine's architecture (containerd imports only those).
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
