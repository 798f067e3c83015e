//! kill -9 of the real `sluice-agent` in the middle of applying a large change
//! (hundreds of pods and policies added or removed at once), on both iptables
//! backends: after each kill the kernel holds, for sluice's chains, jumps and the sets
//! those chains reference, exactly the old or exactly the new state; and the
//! restarted agent converges to the new state without a moment in between (every
//! `iptables-save` sampled during the restart is the old or the new state: nothing is
//! flushed first).
//!
//! The old and new states are what the agent itself programs once settled (the lab's
//! `policy_render_equals_what_the_agent_programs_*` tests show that equals
//! `sluicectl policy render`). The one intermediate allowed is a set no kernel rule
//! references (created ahead of the rules that will use it, or left until after the
//! rules that used it are gone): such a set matches no packet, so it cannot allow a
//! connection; docs/reliability.md says so.

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
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: bulk, labels: {{app: a{i}}}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\n\
         status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
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
    fn iptables(&self) -> BTreeMap<String, Vec<String>> {
        parse_iptables(&self.w.node.exec(self.save))
    }

    fn kernel(&self) -> Kernel {
        Kernel {
            tables: self.iptables(),
            sets: parse_ipset(&self.w.node.exec("ipset save")),
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

/// Which state the kernel holds after a kill: the one before the change or the one
/// after it, or why it holds neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Before,
    After,
    /// The rules before or after, with sets no rule references (created ahead of the
    /// rules that will use them, or not yet destroyed after the rules that used them).
    BeforeWithUnreferencedSets,
    AfterWithUnreferencedSets,
}

fn classify(k: &Kernel, old: &Kernel, new: &Kernel) -> Result<Seen, String> {
    let (base, is_new) = if k.tables == old.tables {
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
    for set in k.referenced_sets() {
        if k.sets.get(&set) != base.sets.get(&set) {
            return Err(format!(
                "set {set}, referenced by the {} rules, holds {:?}, not {:?}",
                if is_new { "after" } else { "before" },
                k.sets.get(&set),
                base.sets.get(&set)
            ));
        }
    }
    let exact = k.sets == base.sets;
    Ok(match (is_new, exact) {
        (false, true) => Seen::Before,
        (true, true) => Seen::After,
        (false, false) => Seen::BeforeWithUnreferencedSets,
        (true, false) => Seen::AfterWithUnreferencedSets,
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

/// The apply's steps a targeted round waits for (child command lines).
const TARGETS: [&str; 3] = ["-restore --noflush", "ipset restore", "ipset destroy"];

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
    let mut seen: BTreeMap<Seen, usize> = BTreeMap::new();
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
        // Even rounds kill at a random moment; odd ones the moment a chosen step of
        // the apply is running (polled every millisecond), falling back to the end
        // of the window when the step was too quick to catch.
        let point = if round % 2 == 0 {
            std::thread::sleep(delay);
            kill_point(pid)
        } else {
            let target = TARGETS[(round / 2) % TARGETS.len()];
            let t = Instant::now();
            loop {
                let p = kill_point(pid);
                if p.contains(target) || t.elapsed() > Duration::from_millis(window) {
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
            "round {round} ({}): killed during {point}: {s:?}",
            if on_new {
                "removing the bulk"
            } else {
                "adding the bulk"
            }
        );
        *seen.entry(s).or_default() += 1;
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
    kill_mid_apply("nft", "iptables-nft-save", 12);
}

#[test]
fn agent_killed_mid_apply_leaves_old_or_new_rules_and_restart_converges_without_flush_legacy() {
    if !require_root("kill_mid_apply_legacy")
        || !sluice_testkit::require_tool("kill_mid_apply_legacy", "iptables-legacy-save")
    {
        return;
    }
    kill_mid_apply("legacy", "iptables-legacy-save", 12);
}
