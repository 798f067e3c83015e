//! kill -9 of the real `sluice-agent` in the middle of applying a large change
//! (hundreds of pods and policies added or removed at once, and members added to or
//! removed from a set already in use), on both iptables backends: after each kill the
//! kernel holds, for sluice's chains and jumps, exactly the rules before or after the
//! change, never a mix; and the restarted agent converges without a moment in
//! between (every `iptables-save` sampled during the restart is the earlier or the
//! later state: nothing is flushed first).
//!
//! The states before and after are what the agent itself programs once settled (the
//! lab's `policy_render_equals_what_the_agent_programs_*` tests show that equals
//! `sluicectl policy render`). Sets may differ from the state of the rules in the
//! two ways docs/reliability.md shows safe, and no other: a set the rules match holds
//! a subset of that state's members (it allows less), and sets no rule references
//! (they match no packet).

mod agent_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use agent_support::*;
use sluice_testkit::require_root;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bulk}
---
apiVersion: v1
kind: Pod
metadata: {name: base0, namespace: bulk, labels: {app: base}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.9.1, podIPs: [{ip: 10.244.9.1}]}
---
# Its peer set is referenced before and after the change; the bulk's even pods join
# it, so the change adds members to (and removing the bulk takes them from) a set in
# use: the ordering of set members around the rules is exercised too.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: base, namespace: bulk}
spec:
  podSelector: {matchLabels: {app: base}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: member}}}]
    ports: [{port: 9000, protocol: TCP}]
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status:
  addresses: [{type: InternalIP, address: 192.168.77.1}]
"#;

/// How many pods and policies the large change adds (and later removes).
const BULK: usize = 300;

fn pod_yaml(i: usize) -> String {
    let ip = format!("10.244.{}.{}", 10 + i / 250, i % 250 + 1);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: bulk, labels: {{app: a{i}, role: {role}}}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\n\
         status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n",
        role = if i.is_multiple_of(2) {
            "member"
        } else {
            "other"
        }
    )
}

fn policy_yaml(i: usize) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: bulk}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: a{i}}}}}\n  ingress:\n\
         \x20 - from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}, {{ipBlock: {{cidr: 192.168.{}.0/24}}}}]\n\
         \x20   ports: [{{port: {}, protocol: TCP}}]\n",
        (i + 1) % BULK,
        i % 200,
        8000 + i
    )
}

fn bulk_yaml() -> String {
    (0..BULK)
        .map(|i| format!("{}---\n{}", pod_yaml(i), policy_yaml(i)))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// sluice's part of the kernel: owned chains and jumps per table, and owned sets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Kernel {
    /// table → lines (`:CHAIN` declarations without counters, `-A` rules of owned
    /// chains, and `-A BUILTIN … -j SLUICE-…` jumps), sorted.
    tables: BTreeMap<String, Vec<String>>,
    /// set → its `create` line and members.
    sets: BTreeMap<String, BTreeSet<String>>,
}

impl Kernel {
    fn referenced_sets(&self) -> BTreeSet<String> {
        self.tables
            .values()
            .flatten()
            .flat_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words
                    .windows(2)
                    .filter(|w| w[0] == "--match-set")
                    .map(|w| w[1].to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn rule_count(&self) -> usize {
        self.tables
            .values()
            .flatten()
            .filter(|l| l.starts_with("-A"))
            .count()
    }
}

fn parse_iptables(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for l in text.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t.to_string();
            continue;
        }
        let owned = if let Some(decl) = l.strip_prefix(":SLUICE-") {
            Some(format!(":SLUICE-{}", decl.split(' ').next().unwrap()))
        } else if l.starts_with("-A ") && l.contains("SLUICE-") {
            Some(l.to_string())
        } else {
            None
        };
        if let Some(line) = owned {
            tables.entry(table.clone()).or_default().push(line);
        }
    }
    for lines in tables.values_mut() {
        lines.sort();
    }
    tables
}

fn parse_ipset(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in text.lines() {
        let mut w = l.splitn(3, ' ');
        let (verb, name) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
        if !name.starts_with("SLUICE-") {
            continue;
        }
        // A set's identity is its name and type; `initval` is random per creation.
        let line = match verb {
            "create" => l.split(' ').take(3).collect::<Vec<_>>().join(" "),
            "add" => l.to_string(),
            _ => continue,
        };
        sets.entry(name.to_string()).or_default().insert(line);
    }
    sets
}

struct Node<'a> {
    w: &'a World,
    save: &'static str,
}

impl Node<'_> {
    /// Run a read-only dump. A dump racing a restore can fail (nft's generation moved
    /// under `iptables-nft-save`, a set destroyed under `ipset save`); a failed read
    /// shows no state, so it is retried.
    fn read(&self, cmd: &str) -> String {
        for _ in 0..50 {
            let out = self.w.node.try_exec(cmd);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.w.node.exec(cmd)
    }

    fn iptables(&self) -> BTreeMap<String, Vec<String>> {
        parse_iptables(&self.read(self.save))
    }

    fn kernel(&self) -> Kernel {
        Kernel {
            tables: self.iptables(),
            sets: parse_ipset(&self.read("ipset save")),
        }
    }

    /// The kernel once it stops changing (the agent resyncs every second).
    fn settled(&self) -> Kernel {
        let mut last = self.kernel();
        let t0 = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(1500));
            let now = self.kernel();
            if now == last {
                return now;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "kernel never settled"
            );
            last = now;
        }
    }
}

/// Which state the kernel holds after a kill: the rules before the change or after
/// it, and how its sets differ from that state's in the two safe ways
/// docs/reliability.md names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    after: bool,
    /// A set the rules match holds a subset of that state's members (removed ahead
    /// of the rules, or not yet added after them): it allows less.
    fewer_members: bool,
    /// Sets no rule references (created ahead, or not yet destroyed).
    unreferenced_sets: bool,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.after { "after" } else { "before" })?;
        if self.fewer_members {
            f.write_str(" + fewer set members")?;
        }
        if self.unreferenced_sets {
            f.write_str(" + unreferenced sets")?;
        }
        Ok(())
    }
}

fn classify(k: &Kernel, old: &Kernel, new: &Kernel) -> Result<Seen, String> {
    let (base, after) = if k.tables == old.tables {
        (old, false)
    } else if k.tables == new.tables {
        (new, true)
    } else {
        let mixed: Vec<&String> = k
            .tables
            .keys()
            .chain(old.tables.keys())
            .filter(|t| k.tables.get(*t) != old.tables.get(*t))
            .collect();
        return Err(format!(
            "rules are neither the state before nor the one after (tables differing from before: \
             {mixed:?}; {} rules, before {}, after {})",
            k.rule_count(),
            old.rule_count(),
            new.rule_count()
        ));
    };
    let referenced = k.referenced_sets();
    let mut fewer_members = false;
    for set in &referenced {
        let (have, want) = (k.sets.get(set), base.sets.get(set));
        match (have, want) {
            (Some(h), Some(w)) if h == w => {}
            // Same set (its create line is a member of both), fewer members.
            (Some(h), Some(w)) if h.is_subset(w) => fewer_members = true,
            _ => {
                let extra: Vec<&String> = match (have, want) {
                    (Some(h), Some(w)) => h.difference(w).take(3).collect(),
                    _ => Vec::new(),
                };
                return Err(format!(
                    "set {set}, matched by the rules {}, holds {} entries where that state has {}; \
                     not a subset (e.g. {extra:?})",
                    if after { "after" } else { "before" },
                    have.map_or(0, BTreeSet::len),
                    want.map_or(0, BTreeSet::len),
                ));
            }
        }
    }
    let unreferenced_sets = k
        .sets
        .iter()
        .chain(&base.sets)
        .any(|(name, _)| !referenced.contains(name) && k.sets.get(name) != base.sets.get(name));
    Ok(Seen {
        after,
        fewer_members,
        unreferenced_sets,
    })
}

/// What the agent was running when it was killed: its child processes' names.
fn kill_point(agent_pid: u32) -> String {
    let mut kids = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{agent_pid}/task")) {
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for pid in children.split_whitespace() {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv: Vec<String> = cmd
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .take(2)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                kids.push(match argv.first() {
                    None => "a child exiting".to_string(),
                    // Forked, not yet exec'd: the agent's own image.
                    Some(a) if a.ends_with("sluice-agent") => "a child being spawned".into(),
                    Some(a) => format!(
                        "{} {}",
                        a.rsplit('/').next().unwrap_or(a),
                        argv.get(1).map_or("", String::as_str)
                    ),
                });
            }
        }
    }
    if kids.is_empty() {
        "agent itself (reading, compiling or planning)".into()
    } else {
        kids.join(", ")
    }
}

/// The apply's steps a targeted round waits for: a child's command line, and whether
/// only after an `iptables-restore` was seen (the second `ipset restore`, of added
/// members).
const TARGETS: [(&str, bool); 4] = [
    ("ipset restore", false),
    ("-restore --noflush", false),
    ("ipset restore", true),
    ("ipset destroy", false),
];

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn kill_mid_apply(backend: &str, save: &'static str, rounds: usize) {
    let w = World::new();
    let node = Node { w: &w, save };
    let args = ["--encapsulation", "none", "--iptables-backend", backend];
    w.write_manifest("00-base.yaml", BASE);
    let agent = w.start_agent(&args);
    w.wait_ready(&agent, Duration::from_secs(30));
    let old = node.settled();

    // The large change once, undisturbed: the new state and how long applying takes.
    let t0 = Instant::now();
    w.write_manifest("10-bulk.yaml", &bulk_yaml());
    wait_for("the large change to land", Duration::from_secs(60), || {
        node.kernel().rule_count() > old.rule_count() + BULK
    });
    let apply_time = t0.elapsed();
    let new = node.settled();
    assert!(
        new.rule_count() > old.rule_count() + 2 * BULK && new.sets.len() > BULK,
        "the change is large: {} → {} rules, {} sets",
        old.rule_count(),
        new.rule_count(),
        new.sets.len()
    );
    eprintln!(
        "{backend}: old {} rules / {} sets, new {} rules / {} sets, tables {:?}; undisturbed apply {apply_time:?}",
        old.rule_count(),
        old.sets.len(),
        new.rule_count(),
        new.sets.len(),
        new.tables.keys().collect::<Vec<_>>()
    );

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut agent = agent;
    let mut on_new = true;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut points: BTreeMap<String, usize> = BTreeMap::new();
    let mut converge = Vec::new();
    let mut samples_total = 0usize;
    for round in 0..rounds {
        // Alternate: remove the bulk (new → old), then add it back (old → new).
        let (from, to) = if on_new { (&new, &old) } else { (&old, &new) };
        let window = apply_time.as_millis() as u64 * 3 / 2;
        let delay = Duration::from_millis(rng.below(window));
        if on_new {
            std::fs::remove_file(w.manifests().join("10-bulk.yaml")).unwrap();
        } else {
            w.write_manifest("10-bulk.yaml", &bulk_yaml());
        }
        let pid = agent.pid();
        // Every third round kills at a random moment; the others the moment a chosen
        // step of the apply is running (polled every millisecond), each step in both
        // directions, falling back to the end of the window when the step was too
        // quick to catch.
        let point = if round.is_multiple_of(3) {
            std::thread::sleep(delay);
            kill_point(pid)
        } else {
            let (target, after_rules) = TARGETS[(round / 2) % TARGETS.len()];
            let t = Instant::now();
            let mut rules_seen = false;
            loop {
                let p = kill_point(pid);
                rules_seen |= p.contains("-restore --noflush");
                let hit = p.contains(target) && (!after_rules || rules_seen);
                if hit || t.elapsed() > Duration::from_millis(window) {
                    break p;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        drop(agent); // SIGKILL
        // An orphaned restore may still be finishing what it read.
        std::thread::sleep(Duration::from_millis(300));
        let k = node.kernel();
        let s = classify(&k, from, to)
            .unwrap_or_else(|e| panic!("round {round} ({backend}), killed during {point}: {e}"));
        eprintln!(
            "round {round} ({}): killed during {point}: {s}",
            if on_new {
                "removing the bulk"
            } else {
                "adding the bulk"
            }
        );
        *seen.entry(s.to_string()).or_default() += 1;
        *points.entry(point).or_default() += 1;

        // Restart: sample the rules in a tight loop until the target state is reached.
        let t = Instant::now();
        let restarted = w.start_agent(&args);
        let mut samples = 0;
        let took = loop {
            let rules = node.iptables();
            samples += 1;
            assert!(
                rules == from.tables || rules == to.tables,
                "round {round} ({backend}): during the restart the rules were neither the old nor \
                 the new state ({} owned lines; old {}, new {})",
                rules.values().map(Vec::len).sum::<usize>(),
                from.rule_count(),
                to.rule_count()
            );
            if rules == to.tables && node.kernel() == *to {
                break t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "round {round} ({backend}): the restarted agent did not converge"
            );
        };
        samples_total += samples;
        converge.push(took);
        agent = restarted;
        on_new = !on_new;
    }
    drop(agent);
    converge.sort();
    eprintln!(
        "FIGURES {backend}: {rounds} rounds; states after kill {seen:?}; kill points {points:?}; \
         convergence after restart min {:?} median {:?} max {:?}; {samples_total} iptables-save samples \
         during restarts, none in between",
        converge[0],
        converge[converge.len() / 2],
        converge[converge.len() - 1]
    );
}

#[test]
fn agent_killed_mid_apply_leaves_old_or_new_rules_and_restart_converges_without_flush_nft() {
    if !require_root("kill_mid_apply_nft") {
        return;
    }
    kill_mid_apply("nft", "iptables-nft-save", 16);
}

#[test]
fn agent_killed_mid_apply_leaves_old_or_new_rules_and_restart_converges_without_flush_legacy() {
    if !require_root("kill_mid_apply_legacy")
        || !sluice_testkit::require_tool("kill_mid_apply_legacy", "iptables-legacy-save")
    {
        return;
    }
    kill_mid_apply("legacy", "iptables-legacy-save", 16);
}
