//! Kubernetes label selectors (`matchLabels` + `matchExpressions`), as upstream
//! `metav1.LabelSelector` means them.
//!
//! All requirements are ANDed. An empty selector (`{}`) matches every label set.
//! A *missing* selector means something that depends on where it is missing, so it is
//! never represented here: the model turns it into the right thing at conversion
//! (a peer without `podSelector` gets [`LabelSelector::everything`]; a peer without
//! `namespaceSelector` gets [`crate::model::NamespaceScope::PolicyNamespace`]).

use std::collections::BTreeSet;

use crate::model::Labels;

/// A `matchExpressions` operator with its values. Values are a set: order and
/// duplicates in the manifest do not matter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// The label is present and its value is one of these (never empty; validated).
    In(BTreeSet<String>),
    /// The label is absent, or present with a value not among these. (Upstream: a
    /// pod without the key matches `NotIn`.)
    NotIn(BTreeSet<String>),
    /// The label is present, whatever its value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.contains(v)),
            Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector. `match_labels` entries are equivalent to `In` requirements with
/// a single value; everything is ANDed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// `{}`: matches everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// A selector of `matchLabels` only.
    pub fn from_labels<K: Into<String>, V: Into<String>>(
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        LabelSelector {
            match_labels: labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            match_expressions: Vec::new(),
        }
    }

    /// True for `{}` (no requirement at all), which selects every label set.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn set(values: &[&str]) -> BTreeSet<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    fn expr(key: &str, operator: Operator) -> LabelSelector {
        LabelSelector {
            match_labels: Labels::new(),
            match_expressions: vec![Requirement {
                key: key.into(),
                operator,
            }],
        }
    }

    #[test]
    fn empty_selector_matches_everything_including_no_labels() {
        let sel = LabelSelector::everything();
        assert!(sel.is_empty());
        assert!(sel.matches(&Labels::new()));
        assert!(sel.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let sel = LabelSelector::from_labels([("app", "web"), ("tier", "fe")]);
        assert!(sel.matches(&labels(&[("app", "web"), ("tier", "fe"), ("x", "y")])));
        assert!(!sel.matches(&labels(&[("app", "web")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("tier", "be")])));
    }

    #[test]
    fn in_needs_the_key_present_with_a_listed_value() {
        let sel = expr("region", Operator::In(set(&["bar", "baz"])));
        assert!(sel.matches(&labels(&[("region", "baz")])));
        assert!(!sel.matches(&labels(&[("region", "qux")])));
        assert!(!sel.matches(&Labels::new()));
    }

    #[test]
    fn not_in_matches_when_the_key_is_absent() {
        // Seed 001 relies on this: namespaces without a `region` label are admitted.
        let sel = expr("region", Operator::NotIn(set(&["bar"])));
        assert!(sel.matches(&Labels::new()));
        assert!(sel.matches(&labels(&[("region", "foo")])));
        assert!(!sel.matches(&labels(&[("region", "bar")])));
    }

    #[test]
    fn exists_and_does_not_exist_look_only_at_the_key() {
        let exists = expr("k", Operator::Exists);
        let absent = expr("k", Operator::DoesNotExist);
        for l in [labels(&[("k", "")]), labels(&[("k", "v")])] {
            assert!(exists.matches(&l));
            assert!(!absent.matches(&l));
        }
        assert!(!exists.matches(&Labels::new()));
        assert!(absent.matches(&Labels::new()));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let mut sel = LabelSelector::from_labels([("app", "web")]);
        sel.match_expressions.push(Requirement {
            key: "env".into(),
            operator: Operator::NotIn(set(&["prod"])),
        });
        assert!(sel.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!sel.matches(&labels(&[("app", "db"), ("env", "dev")])));
    }
}
