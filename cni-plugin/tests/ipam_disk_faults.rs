//! Root: sluice-ipam's state directory and directory block store on a full file
//! system and on a read-only one, driven through the real `sluice` ADD delegating to
//! `sluice-ipam`. Each failed ADD must reach the runtime as one JSON error with the
//! registry's code and a message naming the path, leave the state file byte for byte
//! as it was (no temporary file beside it, no block claimed), leave no link, route or
//! address behind, and the same ADD must succeed once space is back or the mount is
//! writable again.
//!
//! The file systems are a small tmpfs mounted in a private mount namespace on the
//! test's own thread (with its own network namespace): the host's mounts are never
//! touched, and both namespaces vanish with the thread.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::mount::{MsFlags, mount, umount};
use serde_json::Value;
use sluice_cni_protocol::ErrorCode;
use sluice_testkit::{NetnsHolder, in_new_netns, require_root};
use support::*;

const NONE: Option<&str> = None;

/// Leave the host's mount table alone: a private mount namespace for this thread
/// (and the plugins it spawns), with propagation off so nothing leaks back.
fn private_mounts() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
        .expect("make / private in the test's mount namespace");
}

fn mount_tmpfs(at: &Path, size: &str) {
    std::fs::create_dir_all(at).unwrap();
    mount(
        Some("sluice-test"),
        at,
        Some("tmpfs"),
        MsFlags::empty(),
        Some(format!("size={size}").as_str()),
    )
    .expect("mount tmpfs");
}

/// Write zeros into `file` until the file system says ENOSPC: "full to the brim".
fn fill(file: &Path) -> u64 {
    let mut f = std::fs::File::create(file).unwrap();
    let chunk = [0u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => break,
            Err(e) => panic!("filling {}: {e}", file.display()),
        }
    }
    assert!(f.write(&[0u8]).is_err(), "not even one byte fits");
    written
}

/// A sluice config whose sluice-ipam keeps its state under `state` and claims
/// blocks in `blocks` (the directory block store writes on the first ADD).
fn node_conf(dir: &Path, node: &str, state: &Path, blocks: &Path) -> Value {
    let mut c = conf("1.0.0", Ipam::SluiceIpam, dir);
    c["ipam"]["nodeName"] = node.into();
    c["ipam"]["pool"] = "10.97.0.0/16".into();
    c["ipam"]["stateDir"] = state.to_str().into();
    c["ipam"]["blockStore"]["path"] = blocks.to_str().into();
    c
}

/// Every name in `dir` (state file, lock, temporaries, block claims), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The state directory, block store and host links before an ADD that must fail:
/// afterwards all must be as they were, and the pod empty.
struct Snapshot {
    state: PathBuf,
    state_bytes: Option<Vec<u8>>,
    state_names: Vec<String>,
    blocks: PathBuf,
    block_names: Vec<String>,
    links: Vec<String>,
}

impl Snapshot {
    fn take(state: &Path, blocks: &Path) -> Snapshot {
        Snapshot {
            state: state.to_owned(),
            state_bytes: std::fs::read(state.join("allocations.json")).ok(),
            state_names: names(state),
            blocks: blocks.to_owned(),
            block_names: names(blocks),
            links: sluice_links(),
        }
    }

    fn assert_unchanged(&self, pod: &NetnsHolder) {
        let now = std::fs::read(self.state.join("allocations.json")).ok();
        assert_eq!(now, self.state_bytes, "the state file changed");
        if let Some(bytes) = &now {
            let v: Value = serde_json::from_slice(bytes).expect("the state file still parses");
            assert_eq!(v["version"], 1, "{v}");
        }
        // The lock file and the boot marker are created by the first ADD on a node
        // (in a boot); they hold no allocation.
        let bookkeeping = |n: &String| n != "lock" && n != "boot-id";
        let mut state_names = names(&self.state);
        state_names.retain(bookkeeping);
        let mut was = self.state_names.clone();
        was.retain(bookkeeping);
        assert_eq!(state_names, was, "state dir changed (a temporary left?)");
        assert_eq!(names(&self.blocks), self.block_names, "block store changed");
        assert_eq!(sluice_links(), self.links, "a host link was left behind");
        assert_pod_empty(pod);
    }
}

fn assert_error(out: &Outcome, want: ErrorCode, says: &str, path: &Path) {
    let e = out.error();
    eprintln!("{e}");
    let msg = e["msg"].as_str().unwrap();
    assert_eq!(e["code"], want.code(), "{e}\nstderr: {}", out.stderr);
    assert!(msg.starts_with("sluice-ipam: "), "{msg}");
    assert!(msg.contains(says), "{msg}");
    assert!(
        msg.contains(path.to_str().unwrap()),
        "{msg} does not name {}",
        path.display()
    );
}

#[test]
fn ipam_on_a_full_or_read_only_disk_fails_cleanly_and_recovers() {
    if !require_root("ipam_disk_faults") {
        return;
    }
    if !require_sluice_ipam("ipam_disk_faults") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bins = CniBin::new(dir);
    let started = Instant::now();
    let (failed, recovered) = in_new_netns(|| {
        private_mounts();
        setup_node();
        std::fs::write(dir.join("mtu"), "1440\n").unwrap();
        let disk = dir.join("disk");
        mount_tmpfs(&disk, "256k");
        let state = disk.join("ipam");
        let blocks = disk.join("blocks");
        let conf = node_conf(dir, "node-1", &state, &blocks);
        let (mut failed, mut recovered) = (0, 0);

        // A pod that holds an address before the disk fills.
        let first = NetnsHolder::new();
        let out = Call::new("ADD", "ctr-first", Some(first.path()), &conf).run(&bins);
        let first_ip = result_ip(&out.result());

        // Full: the state write fails (ENOSPC), the temporary file goes with it.
        let filler = disk.join("filler");
        fill(&filler);
        let pod = NetnsHolder::new();
        let before = Snapshot::take(&state, &blocks);
        let out = Call::new("ADD", "ctr-full", Some(pod.path()), &conf).run(&bins);
        assert_error(&out, ErrorCode::StateNotWritable, "is full", &state);
        before.assert_unchanged(&pod);
        failed += 1;

        // Full, and the ADD must claim a block: the claim's record cannot be written,
        // so no block is claimed and no claim temporary is left.
        let state2 = dir.join("node-2-ipam"); // writable: only the store is full
        let conf2 = node_conf(dir, "node-2", &state2, &blocks);
        let pod2 = NetnsHolder::new();
        let before2 = Snapshot::take(&state2, &blocks);
        let out = Call::new("ADD", "ctr-full-claim", Some(pod2.path()), &conf2).run(&bins);
        assert_error(&out, ErrorCode::BlockStore, "No space left", &blocks);
        before2.assert_unchanged(&pod2);
        failed += 1;

        // Space back: the same ADDs succeed, each with its own address.
        std::fs::remove_file(&filler).unwrap();
        let ip = result_ip(
            &Call::new("ADD", "ctr-full", Some(pod.path()), &conf)
                .run(&bins)
                .result(),
        );
        assert_ne!(ip, first_ip);
        let ip2 = result_ip(
            &Call::new("ADD", "ctr-full-claim", Some(pod2.path()), &conf2)
                .run(&bins)
                .result(),
        );
        assert_ne!(ip2, ip);
        recovered += 2;
        Call::new("DEL", "ctr-full-claim", Some(pod2.path()), &conf2)
            .run(&bins)
            .assert_silent_ok();
        Call::new("DEL", "ctr-full", Some(pod.path()), &conf)
            .run(&bins)
            .assert_silent_ok();

        // Read-only bind mount of the state directory (a hostPath mounted `ro`).
        mount(Some(&state), &state, NONE, MsFlags::MS_BIND, NONE).expect("bind");
        mount(
            NONE,
            &state,
            NONE,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            NONE,
        )
        .expect("remount the bind read-only");
        let before = Snapshot::take(&state, &blocks);
        let out = Call::new("ADD", "ctr-ro", Some(pod.path()), &conf).run(&bins);
        assert_error(&out, ErrorCode::StateNotWritable, "not writable", &state);
        before.assert_unchanged(&pod);
        failed += 1;
        umount(&state).expect("unmount the read-only bind");
        Call::new("ADD", "ctr-ro", Some(pod.path()), &conf)
            .run(&bins)
            .result();
        recovered += 1;
        Call::new("DEL", "ctr-ro", Some(pod.path()), &conf)
            .run(&bins)
            .assert_silent_ok();

        // The whole file system remounted read-only: the state directory, and a node
        // that must claim a block in the store on it.
        mount(
            NONE,
            &disk,
            NONE,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            Some("size=256k"),
        )
        .expect("remount tmpfs read-only");
        let before = Snapshot::take(&state, &blocks);
        let out = Call::new("ADD", "ctr-ro", Some(pod.path()), &conf).run(&bins);
        assert_error(&out, ErrorCode::StateNotWritable, "not writable", &state);
        before.assert_unchanged(&pod);
        let state3 = dir.join("node-3-ipam");
        let conf3 = node_conf(dir, "node-3", &state3, &blocks);
        let pod3 = NetnsHolder::new();
        let before3 = Snapshot::take(&state3, &blocks);
        let out = Call::new("ADD", "ctr-ro-claim", Some(pod3.path()), &conf3).run(&bins);
        assert_error(
            &out,
            ErrorCode::BlockStore,
            "Read-only file system",
            &blocks,
        );
        before3.assert_unchanged(&pod3);
        failed += 2;

        // Writable again: both succeed, then everything is released.
        mount(NONE, &disk, NONE, MsFlags::MS_REMOUNT, Some("size=256k"))
            .expect("remount tmpfs read-write");
        for (cid, p, c) in [("ctr-ro", &pod, &conf), ("ctr-ro-claim", &pod3, &conf3)] {
            Call::new("ADD", cid, Some(p.path()), c).run(&bins).result();
            recovered += 1;
            Call::new("DEL", cid, Some(p.path()), c)
                .run(&bins)
                .assert_silent_ok();
        }
        Call::new("DEL", "ctr-first", Some(first.path()), &conf)
            .run(&bins)
            .assert_silent_ok();
        assert_pod_empty(&first);
        for s in [&state, &state2, &state3] {
            let left = std::fs::read_to_string(s.join("allocations.json")).unwrap();
            assert!(
                !left.contains("ctr-"),
                "{} still allocates: {left}",
                s.display()
            );
        }
        assert_no_node_leftovers();
        umount(&disk).expect("unmount tmpfs");
        (failed, recovered)
    });
    eprintln!(
        "ipam disk faults: {failed} failed ADDs clean, {recovered} ADDs after recovery, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
