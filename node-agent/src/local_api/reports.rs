//! What the CNI plugin reported over the node-local API, laid over the datastore's
//! snapshot (pure). The datastore stays the truth:
//!
//! - a report fills in the address of a pod the datastore knows but shows without
//!   one (kubelet has not written the status yet), so policy for it is programmed
//!   now; its labels come from the datastore, so it gets exactly its policies;
//! - a pod the datastore does not know (yet) is not added: without its labels no
//!   policy could be chosen for it, and it stays fail-closed until it appears;
//! - a report the datastore confirms (the pod shows that address) is done and
//!   dropped; one it contradicts (another address) is not applied;
//! - a report the datastore has not confirmed after the grace period is dropped.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use sluice_node_files::local_api::{Attachment, Detachment};
use sluice_policy::NamespacedName;

use crate::datastore::Snapshot;

/// The default grace period of an unconfirmed report.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub attachment: Attachment,
    pub at: Instant,
}

/// What became of a report in one overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The datastore showed the pod without an address: the report's is used.
    Applied,
    /// The datastore shows the reported address: the report is done.
    Confirmed,
    /// The datastore does not know the pod, or shows another address: waiting.
    Waiting,
    /// Unconfirmed for longer than the grace period: dropped.
    Expired,
}

#[derive(Debug, Default, Clone)]
pub struct Reports {
    by_pod: BTreeMap<NamespacedName, Reported>,
}

impl Reports {
    pub fn attach(&mut self, a: Attachment, now: Instant) {
        let key = NamespacedName::new(&a.namespace, &a.name);
        self.by_pod.insert(
            key,
            Reported {
                attachment: a,
                at: now,
            },
        );
    }

    /// Forget the report of this attachment (not a newer sandbox's of the same pod).
    pub fn detach(&mut self, d: &Detachment) -> bool {
        let key = NamespacedName::new(&d.namespace, &d.name);
        let ours = self.by_pod.get(&key).is_some_and(|r| {
            r.attachment.container_id == d.container_id && r.attachment.ifname == d.ifname
        });
        if ours {
            self.by_pod.remove(&key);
        }
        ours
    }

    pub fn len(&self) -> usize {
        self.by_pod.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pod.is_empty()
    }

    /// When the newest report came, if any is held.
    pub fn newest(&self) -> Option<Instant> {
        self.by_pod.values().map(|r| r.at).max()
    }

    /// When the oldest report expires, if any is held.
    pub fn next_expiry(&self, grace: Duration) -> Option<Instant> {
        self.by_pod.values().map(|r| r.at + grace).min()
    }

    /// `snap` with the reports laid over it, and each report's outcome. Pure: the
    /// caller lays a copy of the reports over the snapshot outside their lock (a
    /// report arriving meanwhile must not wait for a copy of 10,000 pods: the plugin
    /// gives up after 5 ms), then [`Reports::settle`]s the outcomes. `snap` itself
    /// (borrowed) when no report applies: a copy of 10,000 pods per report would cost
    /// more than the incremental compile that follows.
    pub fn overlay<'s>(
        &self,
        snap: &'s Snapshot,
        node: &str,
        now: Instant,
        grace: Duration,
    ) -> (Cow<'s, Snapshot>, Vec<(NamespacedName, Outcome)>) {
        let mut out = Cow::Borrowed(snap);
        let mut outcomes = Vec::new();
        for (key, r) in &self.by_pod {
            let addr = IpAddr::V4(r.attachment.address);
            let outcome = match snap.cluster.pods.get(key) {
                Some(p) if p.ips.contains(&addr) => Outcome::Confirmed,
                _ if now.saturating_duration_since(r.at) > grace => Outcome::Expired,
                Some(p) if p.ips.is_empty() && !p.host_network => {
                    let out = out.to_mut();
                    if let Some(p) = out.cluster.pod_mut(key) {
                        p.ips = vec![addr];
                        p.node.get_or_insert_with(|| node.to_owned());
                    }
                    out.reported.insert(key.clone(), r.at);
                    Outcome::Applied
                }
                _ => Outcome::Waiting,
            };
            outcomes.push((key.clone(), outcome));
        }
        (out, outcomes)
    }

    /// Drop the reports an overlay of `seen` (a copy of these reports) confirmed or
    /// expired, but not one that a newer report of the same pod replaced since.
    pub fn settle(&mut self, seen: &Reports, outcomes: &[(NamespacedName, Outcome)]) {
        for (key, outcome) in outcomes {
            if matches!(outcome, Outcome::Confirmed | Outcome::Expired)
                && self.by_pod.get(key) == seen.by_pod.get(key)
            {
                self.by_pod.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::objects::{convert, parse_manifest_text};

    fn attachment(name: &str, ip: &str) -> Attachment {
        Attachment {
            namespace: "prod".into(),
            name: name.into(),
            container_id: format!("cid-{name}"),
            ifname: "eth0".into(),
            host_ifname: "slc0".into(),
            address: ip.parse().unwrap(),
            no_ipam: false,
        }
    }

    fn snap(pods: &[(&str, Option<&str>)]) -> Snapshot {
        let text: Vec<String> = pods
            .iter()
            .map(|(n, ip)| {
                let status = ip.map(|i| format!("status: {{podIP: {i}}}\n")).unwrap_or_default();
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: prod, labels: {{app: {n}}}}}\n\
                     spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\n{status}"
                )
            })
            .collect();
        Snapshot {
            cluster: convert(&parse_manifest_text("t", &text.join("---\n")).unwrap()).cluster,
            ..Default::default()
        }
    }

    fn key(n: &str) -> NamespacedName {
        NamespacedName::new("prod", n)
    }

    #[test]
    fn a_report_gives_a_known_pod_its_address_until_the_datastore_confirms_it() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut r = Reports::default();
        r.attach(attachment("web", "10.244.1.5"), t0);
        let s = snap(&[("web", None)]);
        let (merged, o) = r.overlay(&s, "node-1", t0, grace);
        assert_eq!(o, vec![(key("web"), Outcome::Applied)]);
        let pod = &merged.cluster.pods[&key("web")];
        assert_eq!(pod.ips, vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(merged.reported.get(&key("web")), Some(&t0));
        assert!(merged.reported_after(t0 - Duration::from_millis(1)));
        // kubelet caught up: the datastore is the truth and the report is done.
        let (_, o) = r.overlay(&snap(&[("web", Some("10.244.1.5"))]), "node-1", t0, grace);
        assert_eq!(o, vec![(key("web"), Outcome::Confirmed)]);
        r.settle(&r.clone(), &o);
        assert!(r.is_empty());
    }

    #[test]
    fn an_unknown_pod_is_not_invented_and_an_unconfirmed_report_expires() {
        let t0 = Instant::now();
        let grace = Duration::from_millis(100);
        let mut r = Reports::default();
        r.attach(attachment("ghost", "10.244.1.6"), t0);
        let s = snap(&[]);
        let (merged, o) = r.overlay(&s, "node-1", t0, grace);
        assert!(
            merged.cluster.pods.is_empty(),
            "no labels, no policy: fail-closed"
        );
        assert_eq!(o, vec![(key("ghost"), Outcome::Waiting)]);
        assert_eq!(r.next_expiry(grace), Some(t0 + grace));
        let later = t0 + Duration::from_millis(150);
        let (_, o) = r.overlay(&snap(&[("ghost", None)]), "node-1", later, grace);
        assert_eq!(o, vec![(key("ghost"), Outcome::Expired)]);
        r.settle(&r.clone(), &o);
        assert!(r.is_empty());
    }

    #[test]
    fn a_report_that_came_during_an_overlay_outlives_the_one_it_replaced() {
        let t0 = Instant::now();
        let mut r = Reports::default();
        r.attach(attachment("web", "10.244.1.5"), t0);
        r.attach(attachment("db", "10.244.1.6"), t0);
        let seen = r.clone();
        let s = snap(&[("web", Some("10.244.1.5")), ("db", None)]);
        let (_, o) = seen.overlay(&s, "node-1", t0, DEFAULT_GRACE);
        assert_eq!(
            o,
            vec![
                (key("db"), Outcome::Applied),
                (key("web"), Outcome::Confirmed)
            ]
        );
        // While the overlay ran, web's pod got a new sandbox and reported again.
        let t1 = t0 + Duration::from_millis(3);
        r.attach(attachment("web", "10.244.1.7"), t1);
        r.settle(&seen, &o);
        assert_eq!(
            r.len(),
            2,
            "the new report stays, and so does db's applied one"
        );
        assert_eq!(r.newest(), Some(t1));
        // Settled against the copy it was taken from, a confirmed report goes.
        let seen = r.clone();
        let s = snap(&[("web", Some("10.244.1.7")), ("db", Some("10.244.1.6"))]);
        let (_, o) = seen.overlay(&s, "node-1", t1, DEFAULT_GRACE);
        r.settle(&seen, &o);
        assert!(r.is_empty());
    }

    #[test]
    fn the_datastore_wins_over_a_contradicting_report() {
        let t0 = Instant::now();
        let mut r = Reports::default();
        r.attach(attachment("web", "10.244.1.5"), t0);
        let s = snap(&[("web", Some("10.244.1.9"))]);
        let (merged, o) = r.overlay(&s, "node-1", t0, DEFAULT_GRACE);
        assert_eq!(o, vec![(key("web"), Outcome::Waiting)]);
        assert_eq!(
            merged.cluster.pods[&key("web")].ips,
            vec!["10.244.1.9".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn a_detachment_forgets_only_its_own_sandbox() {
        let mut r = Reports::default();
        r.attach(attachment("web", "10.244.1.5"), Instant::now());
        let mut old = Detachment {
            namespace: "prod".into(),
            name: "web".into(),
            container_id: "an-older-sandbox".into(),
            ifname: "eth0".into(),
        };
        assert!(!r.detach(&old));
        old.container_id = "cid-web".into();
        assert!(r.detach(&old));
        assert!(r.is_empty());
    }
}
