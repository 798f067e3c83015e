//! A merge walk of two collections sorted by the same key: one pass over both, where
//! a lookup per element of one side in the other costs a tree descent each. What
//! diffing two versions of a set or map of thousands of elements wants (the planner's
//! element diff, [`super::Ruleset::assign`]).

use std::cmp::Ordering;
use std::iter::Peekable;

/// One step of the walk: an item only the left side has, only the right side has, or
/// the two items of equal key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged<L, R> {
    Left(L),
    Right(R),
    Both(L, R),
}

/// The walk over `left` and `right`, both sorted ascending by `cmp` and without two
/// equal items on one side.
pub fn merge_by<L, R, F>(left: L, right: R, cmp: F) -> MergeBy<L::IntoIter, R::IntoIter, F>
where
    L: IntoIterator,
    R: IntoIterator,
    F: FnMut(&L::Item, &R::Item) -> Ordering,
{
    MergeBy {
        left: left.into_iter().peekable(),
        right: right.into_iter().peekable(),
        cmp,
    }
}

/// The iterator of [`merge_by`].
pub struct MergeBy<L: Iterator, R: Iterator, F> {
    left: Peekable<L>,
    right: Peekable<R>,
    cmp: F,
}

impl<L, R, F> Iterator for MergeBy<L, R, F>
where
    L: Iterator,
    R: Iterator,
    F: FnMut(&L::Item, &R::Item) -> Ordering,
{
    type Item = Merged<L::Item, R::Item>;

    fn next(&mut self) -> Option<Self::Item> {
        let order = match (self.left.peek(), self.right.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(l), Some(r)) => (self.cmp)(l, r),
        };
        Some(match order {
            Ordering::Less => Merged::Left(self.left.next()?),
            Ordering::Greater => Merged::Right(self.right.next()?),
            Ordering::Equal => Merged::Both(self.left.next()?, self.right.next()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    proptest! {
        #[test]
        fn the_walk_yields_each_sides_own_items_and_the_common_ones_once_in_order(
            a in prop::collection::btree_set(0u16..200, 0..60),
            b in prop::collection::btree_set(0u16..200, 0..60),
        ) {
            let (mut left, mut right, mut both, mut order) = (
                BTreeSet::new(),
                BTreeSet::new(),
                BTreeSet::new(),
                Vec::new(),
            );
            for step in merge_by(&a, &b, |x, y| x.cmp(y)) {
                match step {
                    Merged::Left(x) => {
                        left.insert(*x);
                        order.push(*x);
                    }
                    Merged::Right(y) => {
                        right.insert(*y);
                        order.push(*y);
                    }
                    Merged::Both(x, y) => {
                        prop_assert_eq!(x, y);
                        both.insert(*x);
                        order.push(*x);
                    }
                }
            }
            prop_assert_eq!(left, a.difference(&b).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(right, b.difference(&a).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(both, a.intersection(&b).copied().collect::<BTreeSet<_>>());
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "ascending, once each");
        }

        #[test]
        fn maps_walk_by_key_and_pair_the_values_of_a_common_key(
            a in prop::collection::btree_map(0u8..50, 0u8..3, 0..30),
            b in prop::collection::btree_map(0u8..50, 0u8..3, 0..30),
        ) {
            let mut changed = BTreeMap::new();
            for step in merge_by(&a, &b, |x, y| x.0.cmp(y.0)) {
                if let Merged::Both((k, x), (_, y)) = step
                    && x != y
                {
                    changed.insert(*k, *y);
                }
            }
            let want: BTreeMap<u8, u8> = b
                .iter()
                .filter(|(k, v)| a.get(*k).is_some_and(|x| x != *v))
                .map(|(k, v)| (*k, *v))
                .collect();
            prop_assert_eq!(changed, want);
        }
    }
}
