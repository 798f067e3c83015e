//! Build the sluice image without a registry and run its containers the way the
//! DaemonSet in `manifests/` runs them.
//!
//! - [`base_tarball`]: a minimal Debian root file system made with debootstrap (from
//!   Debian's mirror, the one reachable network), cached under the target dir keyed
//!   by release, so only the first run pays for it.
//! - [`Podman`]: podman 4.3 with private storage under the target dir (also a cache:
//!   the base image and the build's layers survive between runs) and the settings
//!   this machine needs (TESTBED.md).
//! - [`build_image`]: the repository's `Dockerfile`, with the base image and the
//!   binaries given as build args (`BASE_IMAGE`, `BINARIES=prebuilt`) instead of the
//!   official images, which are not reachable here.
//! - [`PodRun`]: one container of the DaemonSet's pod template turned into
//!   `podman run` arguments: securityContext, hostNetwork, env (fieldRef and
//!   configMapKeyRef resolved), volume mounts with host paths under a temp dir,
//!   command. Anything in the template it does not know how to reproduce is a panic,
//!   so a new field in the manifest cannot be skipped silently.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec};
use sluice_testkit::{bin_path, target_profile_dir};

/// The binaries the image holds (`/opt/sluice/bin`), read from the Dockerfile: the
/// prebuilt stage's `COPY --from=prebuilt` list, which must be the source stage's
/// `for bin in` list (the two ways to build give the same image).
pub fn image_binaries() -> Vec<String> {
    let dockerfile = std::fs::read_to_string(sluice_e2e::workspace_root().join("Dockerfile"))
        .expect("read the Dockerfile");
    let prebuilt: Vec<String> = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("COPY --from=prebuilt "))
        .and_then(|l| l.strip_suffix(" /out/"))
        .expect("the Dockerfile's COPY --from=prebuilt line")
        .split_whitespace()
        .map(String::from)
        .collect();
    let source: Vec<String> = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("&& for bin in "))
        .and_then(|l| l.split("; do").next())
        .expect("the source stage's list of binaries")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        prebuilt, source,
        "both build paths put the same binaries in the image"
    );
    prebuilt
}

/// Cache and podman storage: `<target dir>/sluice-image/`.
pub fn cache_dir() -> PathBuf {
    let dir = target_profile_dir()
        .parent()
        .expect("the profile dir has a parent (the target dir)")
        .join("sluice-image");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_ok(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: spawn: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A gzipped tarball of a minimal Debian `release` (debootstrap `--variant=minbase`),
/// made once and kept in the cache (≈ 1.5 min cold on the project's machines).
/// `SLUICE_DEBIAN_MIRROR` overrides the mirror.
pub fn base_tarball(release: &str) -> PathBuf {
    let dir = cache_dir();
    let tarball = dir.join(format!("debian-{release}-minbase.tar.gz"));
    if tarball.is_file() {
        return tarball;
    }
    let mirror = std::env::var("SLUICE_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let rootfs = dir.join(format!("rootfs-{release}"));
    let _ = std::fs::remove_dir_all(&rootfs);
    run_ok(
        "debootstrap",
        Command::new("debootstrap")
            .args(["--variant=minbase", release])
            .arg(&rootfs)
            .arg(&mirror),
    );
    // Written aside and renamed, so an interrupted run never leaves a tarball that
    // looks complete.
    let partial = dir.join(format!("debian-{release}-minbase.tar.gz.partial"));
    run_ok(
        "tar the base rootfs",
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["--numeric-owner", "--one-file-system", "-czf"])
            .arg(&partial)
            .arg("."),
    );
    std::fs::rename(&partial, &tarball).unwrap();
    std::fs::remove_dir_all(&rootfs).unwrap();
    tarball
}

/// podman with this test's private storage, optionally inside a network namespace
/// (`nsenter --net`, not `ip netns exec`, which remounts /sys: TESTBED.md).
#[derive(Clone)]
pub struct Podman {
    dir: PathBuf,
    netns: Option<PathBuf>,
}

impl Podman {
    pub fn new() -> Podman {
        let dir = cache_dir().join("podman");
        std::fs::create_dir_all(&dir).unwrap();
        // crun 1.8 refuses this host's cgroup layout, hence runc; root here lacks
        // CAP_SYS_RESOURCE, hence explicit ulimits; the cni backend so that no
        // netavark is needed (no container here gets a podman network anyway).
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             [network]\nnetwork_backend = \"cni\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        Podman { dir, netns: None }
    }

    /// The same storage, with every command run inside the namespace at `netns`.
    pub fn in_netns(&self, netns: &Path) -> Podman {
        Podman {
            dir: self.dir.clone(),
            netns: Some(netns.to_owned()),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("podman");
                c
            }
            None => Command::new("podman"),
        };
        let d = &self.dir;
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            // overlay, not vfs: vfs copies the whole root file system per layer.
            .args(["--storage-driver", "overlay"]);
        cmd
    }

    pub fn output<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command().args(args).output().expect("spawn podman")
    }

    /// Run podman, panic with its output on failure, return its stdout trimmed.
    pub fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        let out = run_ok(&format!("podman {shown:?}"), self.command().args(args));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn image_exists(&self, name: &str) -> bool {
        self.output(&["image", "exists", name]).status.success()
    }
}

impl Default for Podman {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`build_image`] did, for the test's timing line.
pub struct Built {
    pub image: String,
    pub base_imported: bool,
}

/// Build the repository's Dockerfile into `tag` the local way: base image imported
/// from the debootstrap tarball, binaries from this workspace's target dir (glibc,
/// built on a Debian `release` host, so they match the base's glibc), stripped of
/// debug info to keep the image small.
pub fn build_image(podman: &Podman, release: &str, tag: &str) -> Built {
    let base = format!("localhost/sluice-base:{release}");
    let base_imported = !podman.image_exists(&base);
    if base_imported {
        let tarball = base_tarball(release);
        podman.ok(&[OsStr::new("import"), tarball.as_os_str(), OsStr::new(&base)]);
    }
    let prebuilt = cache_dir().join("prebuilt");
    std::fs::create_dir_all(&prebuilt).unwrap();
    for bin in image_binaries() {
        run_ok(
            &format!("strip {bin}"),
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(prebuilt.join(&bin))
                .arg(bin_path(&bin)),
        );
    }
    let root = sluice_e2e::workspace_root();
    let mut args: Vec<OsString> = [
        "build",
        // RUN apt-get reaches Debian's mirror through the host's network; no podman
        // network (and so no bridge or NAT rule on the host) is created.
        "--network=host",
        "--pull=never",
        "--build-arg=BINARIES=prebuilt",
        "-t",
        tag,
    ]
    .map(OsString::from)
    .to_vec();
    args.push(format!("--build-arg=DEBIAN_RELEASE={release}").into());
    args.push(format!("--build-arg=BASE_IMAGE={base}").into());
    args.push(format!("--build-context=prebuilt={}", prebuilt.display()).into());
    args.push("-f".into());
    args.push(root.join("Dockerfile").into());
    args.push(root.into());
    podman.ok(&args);
    // Earlier builds' layers, untagged now: the storage stays bounded.
    let _ = podman.output(&["image", "prune", "-f"]);
    Built {
        image: tag.into(),
        base_imported,
    }
}

/// One container of the DaemonSet's pod template, ready to become `podman run`
/// arguments on a lab node whose host file system is `host_root`.
pub struct PodRun<'a> {
    pub pod: &'a PodSpec,
    pub container: &'a Container,
    pub config_map: &'a ConfigMap,
    /// `spec.nodeName`, for `fieldRef`.
    pub node_name: &'a str,
    /// Stands in for the node's `/`: every hostPath volume lives under it.
    pub host_root: &'a Path,
    /// Environment added to the manifest's (only what the test's world needs; the
    /// caller says why).
    pub extra_env: Vec<(String, String)>,
    /// Mounts added to the manifest's: (host path, container path), read-only.
    pub extra_mounts: Vec<(PathBuf, String)>,
}

impl PodRun<'_> {
    /// The container's environment as the kubelet computes it from the manifest.
    pub fn env(&self) -> BTreeMap<String, String> {
        let data = self.config_map.data.clone().unwrap_or_default();
        let cm_name = self.config_map.metadata.name.as_deref().unwrap_or_default();
        let mut env = BTreeMap::new();
        for e in self.container.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => v.clone(),
                (None, Some(from)) => {
                    if let Some(f) = &from.field_ref {
                        assert_eq!(
                            f.field_path, "spec.nodeName",
                            "env {}: fieldRef {} is not reproduced by this test",
                            e.name, f.field_path
                        );
                        self.node_name.to_owned()
                    } else if let Some(c) = &from.config_map_key_ref {
                        assert_eq!(c.name, cm_name, "env {}: another ConfigMap", e.name);
                        data.get(&c.key)
                            .unwrap_or_else(|| {
                                panic!("env {}: key {} not in the ConfigMap", e.name, c.key)
                            })
                            .clone()
                    } else {
                        panic!("env {}: valueFrom {from:?} is not reproduced", e.name)
                    }
                }
                other => panic!("env {}: {other:?} is not reproduced", e.name),
            };
            env.insert(e.name.clone(), value);
        }
        for (k, v) in &self.extra_env {
            assert!(
                env.insert(k.clone(), v.clone()).is_none(),
                "extra env {k} would override the manifest's"
            );
        }
        env
    }

    /// The host path standing in for `hostPath.path`, created as `type` says.
    fn host_path(&self, volume: &str) -> PathBuf {
        let v = self
            .pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .unwrap_or_else(|| panic!("volume {volume} is not declared"));
        let hp = v
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("volume {volume}: only hostPath volumes are reproduced"));
        let path = self.host_root.join(hp.path.trim_start_matches('/'));
        match hp.type_.as_deref() {
            Some("DirectoryOrCreate") => std::fs::create_dir_all(&path).unwrap(),
            Some("FileOrCreate") => {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap();
            }
            // No type: kubelet mounts whatever is there; this node has an empty
            // directory (no modules can be loaded on this kernel anyway).
            None | Some("") | Some("Directory") => std::fs::create_dir_all(&path).unwrap(),
            Some(t) => panic!("volume {volume}: hostPath type {t} is not reproduced"),
        }
        path
    }

    /// `podman run` arguments (without `run` itself and the detach/name choices),
    /// ending with the image.
    pub fn args(&self) -> Vec<String> {
        let c = self.container;
        let mut a = Vec::new();
        assert_eq!(
            self.pod.host_network,
            Some(true),
            "the agent runs on the host network"
        );
        // The caller runs podman inside the node's namespace: "host" is that node.
        a.push("--network=host".into());
        if let Some(sc) = &c.security_context {
            assert!(
                sc.privileged != Some(true),
                "{}: privileged is not reproduced",
                c.name
            );
            assert!(
                sc.run_as_user.is_none()
                    && sc.run_as_group.is_none()
                    && sc.run_as_non_root.is_none()
                    && sc.read_only_root_filesystem.is_none()
                    && sc.se_linux_options.is_none()
                    && sc.seccomp_profile.is_none()
                    && sc.proc_mount.is_none(),
                "{}: a securityContext field this test does not reproduce: {sc:?}",
                c.name
            );
            if sc.allow_privilege_escalation == Some(false) {
                a.push("--security-opt=no-new-privileges".into());
            }
            if let Some(caps) = &sc.capabilities {
                for d in caps.drop.iter().flatten() {
                    a.push(format!("--cap-drop={d}"));
                }
                for add in caps.add.iter().flatten() {
                    a.push(format!("--cap-add={add}"));
                }
            }
        }
        for (k, v) in self.env() {
            a.push(format!("--env={k}={v}"));
        }
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                m.sub_path.is_none() && m.mount_propagation.is_none(),
                "{}: mount {} has options this test does not reproduce",
                c.name,
                m.name
            );
            let host = self.host_path(&m.name);
            let ro = if m.read_only == Some(true) { ":ro" } else { "" };
            a.push(format!("--volume={}:{}{ro}", host.display(), m.mount_path));
        }
        for (host, path) in &self.extra_mounts {
            a.push(format!("--volume={}:{path}:ro", host.display()));
        }
        // `imagePullPolicy: IfNotPresent` with the image present: never pull.
        a.push("--pull=never".into());
        if let Some(cmd) = &c.command {
            // A container's `command` replaces the image's ENTRYPOINT, `args` its CMD.
            a.push(format!(
                "--entrypoint={}",
                serde_json::to_string(cmd).unwrap()
            ));
        }
        a.push(c.image.clone().expect("the container names its image"));
        a.extend(c.args.iter().flatten().cloned());
        a
    }
}

/// An HTTP/1.0 GET from inside the network namespace at `netns`: (status, body).
pub fn http_get(netns: &Path, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    sluice_testkit::in_netns(netns, || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
}
