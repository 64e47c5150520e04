//! The default strategy: groups that do not depend on the image.
//!
//! A merged layer is shared only if its exact set of paths recurs in another
//! image. A path `d` whose users all use its most popular referrer `p` too,
//! or are themselves used by `p`, appears in an image only where `p` does
//! (unless requested without it), so `d` joins `p`'s group and the group is
//! the same in every image. The test: popularity counts a path and
//! everything that refers to it, directly or not (as popcount does);
//! everything that uses `p` uses `d`, so `pop(d) - pop(p)` paths use `d`
//! but not `p`. If this image holds that many (counting `d`), all of them
//! in `p`'s closure, they are all of them: nothing outside `p` brings `d`
//! into an image. A path missing from the popularity data stays on its
//! own, so without data every path is a group of its own.
//!
//! If the groups fit the budget, each is a layer. Otherwise the groups with
//! the highest rating (their size times one plus log2 of their top path's
//! popularity: large and widely used) get layers of their own, and the rest
//! are merged by popularity band (powers of two), the least popular bands
//! together, so that the popular small libraries most images carry land in
//! the same few layers. Integer arithmetic only, so plans do not depend on
//! the platform's floating point.

use super::graph::{chain_tops, ClosureGraph, IMAGE_ROOT};
use super::Layer;
use std::cmp::Reverse;
use std::collections::BTreeMap;

/// At most this many merged layers, fewer for small budgets (one per 16
/// layers of budget, at least one).
const MAX_MERGED_LAYERS: usize = 4;

/// The walks that test for joins may visit this many nodes and edges per
/// node and edge of the closure; past that, no further path joins a group.
/// Image closures need at most about 13 (Debian workload), a long chain of
/// paths would need its length: this keeps planning linear.
const WALK_BUDGET_PER_ELEMENT: u64 = 64;

/// Plans a checked closure; `budget` is at least 1.
pub fn plan(graph: &ClosureGraph, budget: usize) -> Vec<Layer> {
    let groups = exclusive_groups(graph);
    let rating = |group: &[usize], top: usize| -> u64 {
        let bytes: u128 = group.iter().map(|&i| graph.nodes[i].nar_size as u128).sum();
        let weight = 1 + u128::from(graph.pops[top].max(1).ilog2());
        u64::try_from(bytes * weight).unwrap_or(u64::MAX)
    };
    let mut rated: Vec<(u64, usize, Vec<usize>)> = groups
        .into_iter()
        .map(|(top, members)| (rating(&members, top), top, members))
        .collect();
    if rated.len() <= budget {
        return rated
            .iter()
            .map(|(r, _, members)| graph.layer(members, *r))
            .collect();
    }
    // Tops are distinct, and node order is path order: a total order.
    rated.sort_unstable_by_key(|&(r, top, _)| (Reverse(r), top));
    let band = |top: usize| Reverse(graph.pops[top].max(1).ilog2());
    // Fewer bands than merged layers would leave budget unused: give it to
    // groups of their own (which can only lower the count of bands left).
    let mut merged_layers = (budget / 16).clamp(1, MAX_MERGED_LAYERS);
    loop {
        let mut bands: Vec<_> = rated[budget - merged_layers..]
            .iter()
            .map(|&(_, top, _)| band(top))
            .collect();
        bands.sort_unstable();
        bands.dedup();
        if bands.len() >= merged_layers {
            break;
        }
        merged_layers = bands.len();
    }
    let rest = rated.split_off(budget - merged_layers);
    let mut layers: Vec<Layer> = rated
        .iter()
        .map(|(r, _, members)| graph.layer(members, *r))
        .collect();

    // Most popular band first.
    let mut bands: BTreeMap<Reverse<u32>, (u64, Vec<usize>)> = BTreeMap::new();
    for (r, top, members) in rest {
        let slot = bands.entry(band(top)).or_default();
        slot.0 = slot.0.saturating_add(r);
        slot.1.extend(members);
    }
    let mut bands: Vec<(u64, Vec<usize>)> = bands.into_values().collect();
    while bands.len() > merged_layers {
        if let Some((r, members)) = bands.pop() {
            if let Some(last) = bands.last_mut() {
                last.0 = last.0.saturating_add(r);
                last.1.extend(members);
            }
        }
    }
    layers.extend(bands.iter().map(|(r, members)| graph.layer(members, *r)));
    layers
}

/// Groups of nodes keyed by their top node: each node joins the group of
/// its most popular referrer when the popularity data shows that all its
/// users use that referrer or are in its closure.
fn exclusive_groups(graph: &ClosureGraph) -> BTreeMap<usize, Vec<usize>> {
    let n = graph.len();
    let pops = &graph.pops;
    let referrers = graph.referrers();
    // (referrer, node), grouped by referrer so each referrer's users are
    // marked once. A referrer more popular than the node contradicts the
    // data's meaning; it is no candidate.
    let mut candidates: Vec<(usize, usize)> = (0..n)
        .filter(|&d| graph.pop_known[d])
        .filter_map(|d| {
            referrers[d]
                .iter()
                .copied()
                .filter(|&p| pops[p] <= pops[d])
                .max_by_key(|&p| (pops[p], Reverse(p)))
                .map(|p| (p, d))
        })
        .collect();
    candidates.sort_unstable();

    let elements = n + graph.edges.iter().map(Vec::len).sum::<usize>();
    let mut walk = Walk {
        budget: WALK_BUDGET_PER_ELEMENT.saturating_mul(elements as u64),
        referrers: &referrers,
        uses_p: vec![IMAGE_ROOT; n],
        below_p: vec![IMAGE_ROOT; n],
        seen: vec![IMAGE_ROOT; n],
        stack: Vec::new(),
    };
    let mut joins = vec![IMAGE_ROOT; n];
    let mut marked = IMAGE_ROOT;
    for (p, d) in candidates {
        if marked != p {
            walk.mark_users(p);
            walk.mark_closure(p, &graph.edges);
            marked = p;
        }
        let joined = walk.only_below(d, p, pops[d] - pops[p]);
        // Out of budget, the marks or the walk may be incomplete.
        if walk.budget == 0 {
            break;
        }
        if joined {
            joins[d] = p;
        }
    }
    let top = chain_tops(&joins);
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, t) in top.into_iter().enumerate() {
        groups.entry(t).or_default().push(i);
    }
    groups
}

/// Upward walks over the closure, with stamps instead of cleared sets.
struct Walk<'a> {
    /// Nodes and edges the walks may still visit.
    budget: u64,
    referrers: &'a [Vec<usize>],
    /// `uses_p[x] == p`: `x` is `p` or refers to it, directly or not.
    uses_p: Vec<usize>,
    /// `below_p[x] == p`: `x` is in `p`'s closure.
    below_p: Vec<usize>,
    /// `seen[x] == d`: the walk from `d` has counted `x`.
    seen: Vec<usize>,
    stack: Vec<usize>,
}

impl Walk<'_> {
    /// Takes `work` from the budget; false (and the budget empty) if it
    /// does not cover it.
    fn spend(&mut self, work: usize) -> bool {
        match self.budget.checked_sub(work as u64) {
            Some(left) => {
                self.budget = left;
                true
            }
            None => {
                self.budget = 0;
                false
            }
        }
    }

    /// Stamps `p` and every path that uses it.
    fn mark_users(&mut self, p: usize) {
        self.stack.clear();
        self.uses_p[p] = p;
        self.stack.push(p);
        while let Some(v) = self.stack.pop() {
            if !self.spend(1 + self.referrers[v].len()) {
                return;
            }
            for &u in &self.referrers[v] {
                if self.uses_p[u] != p {
                    self.uses_p[u] = p;
                    self.stack.push(u);
                }
            }
        }
    }

    /// Stamps `p`'s closure.
    fn mark_closure(&mut self, p: usize, edges: &[Vec<usize>]) {
        self.stack.clear();
        self.below_p[p] = p;
        self.stack.push(p);
        while let Some(v) = self.stack.pop() {
            if !self.spend(1 + edges[v].len()) {
                return;
            }
            for &w in &edges[v] {
                if self.below_p[w] != p {
                    self.below_p[w] = p;
                    self.stack.push(w);
                }
            }
        }
    }

    /// Whether `d` and the paths that use it but not `p` (stamped by
    /// [`Self::mark_users`]) are all in `p`'s closure and number at least
    /// `needed`. A user of `p` ends the walk, as all of its users use `p`
    /// too; a path outside `p`'s closure ends the search, so the walk
    /// visits at most `p`'s closure.
    fn only_below(&mut self, d: usize, p: usize, needed: u64) -> bool {
        let mut counted = 1u64;
        self.stack.clear();
        self.seen[d] = d;
        self.stack.push(d);
        while let Some(v) = self.stack.pop() {
            if !self.spend(1 + self.referrers[v].len()) {
                return false;
            }
            for &u in &self.referrers[v] {
                if self.uses_p[u] == p || self.seen[u] == d {
                    continue;
                }
                if self.below_p[u] != p {
                    return false;
                }
                self.seen[u] = d;
                counted += 1;
                self.stack.push(u);
            }
        }
        counted >= needed
    }
}

#[cfg(test)]
mod tests {
    use crate::build::layering::tests::{grouping, info, sp, MB};
    use crate::build::layering::{plan, Strategy};
    use std::collections::HashMap;

    fn pops(entries: &[(&str, u64)]) -> HashMap<String, u64> {
        entries.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    #[test]
    fn exclusive_dependencies_join_their_user() {
        // app -> {libfoo -> libfoo-data, libc}. Package set: app, other ->
        // libc; libfoo and libfoo-data are used by app alone (popularity
        // counts the path itself and everything that needs it).
        let closure = vec![
            info("app", MB, &["libfoo", "libc"]),
            info("libfoo", 2 * MB, &["libfoo-data", "libc"]),
            info("libfoo-data", 3 * MB, &[]),
            info("libc", 10 * MB, &[]),
        ];
        let counts = pops(&[("app", 1), ("libfoo", 2), ("libfoo-data", 3), ("libc", 4)]);
        let layers = plan(Strategy::Exclusive, &closure, &[sp("app")], &counts, 10).unwrap();
        assert_eq!(
            grouping(&layers),
            vec![vec!["libc"], vec!["app", "libfoo", "libfoo-data"]]
        );

        // libfoo-data is also used by a package outside this image: it
        // stays on its own, so an image of that package shares it.
        let counts = pops(&[("app", 1), ("libfoo", 2), ("libfoo-data", 5), ("libc", 5)]);
        let layers = plan(Strategy::Exclusive, &closure, &[sp("app")], &counts, 10).unwrap();
        let mut groups = grouping(&layers);
        groups.sort();
        assert_eq!(
            groups,
            vec![vec!["app", "libfoo"], vec!["libc"], vec!["libfoo-data"]]
        );
    }

    #[test]
    fn a_dependency_whose_users_all_use_another_joins_it() {
        // libc -> libgcc; app uses both. Package set: app and other use
        // libc, and whatever uses libgcc uses libc: libgcc joins libc,
        // though libc does not dominate it here.
        let closure = vec![
            info("app", MB, &["libc", "libgcc"]),
            info("libc", 10 * MB, &["libgcc"]),
            info("libgcc", MB, &[]),
        ];
        let counts = pops(&[("app", 1), ("libc", 3), ("libgcc", 4)]);
        let layers = plan(Strategy::Exclusive, &closure, &[sp("app")], &counts, 10).unwrap();
        assert_eq!(grouping(&layers), vec![vec!["libc", "libgcc"], vec!["app"]]);
    }

    #[test]
    fn a_shared_base_stays_apart_from_any_one_user() {
        // Both tools use base and the image holds all of its users, but
        // either tool can come without the other: base joins neither.
        let closure = vec![
            info("tool1", MB, &["base"]),
            info("tool2", MB, &["base"]),
            info("base", 10 * MB, &[]),
        ];
        let counts = pops(&[("tool1", 1), ("tool2", 1), ("base", 3)]);
        let roots = [sp("tool1"), sp("tool2")];
        let layers = plan(Strategy::Exclusive, &closure, &roots, &counts, 10).unwrap();
        assert_eq!(layers.len(), 3);
    }

    #[test]
    fn the_whole_budget_is_used_with_a_single_band() {
        // No popularity data: one band, so one merged layer, not four.
        let mut closure = vec![info("base", MB, &[])];
        let mut roots = Vec::new();
        for i in 0..120u64 {
            let name = format!("tool{i:03}");
            closure.push(info(&name, (i + 1) * MB, &["base"]));
            roots.push(sp(&name));
        }
        let layers = plan(Strategy::Exclusive, &closure, &roots, &HashMap::new(), 94).unwrap();
        assert_eq!(layers.len(), 94);
    }

    #[test]
    fn without_popularity_every_path_is_apart() {
        let closure = vec![
            info("app", MB, &["lib"]),
            info("lib", 50 * MB, &["data"]),
            info("data", MB, &[]),
        ];
        let layers = plan(
            Strategy::Exclusive,
            &closure,
            &[sp("app")],
            &HashMap::new(),
            10,
        )
        .unwrap();
        assert_eq!(layers.len(), 3);
    }

    #[test]
    fn over_budget_the_largest_stay_apart_and_bands_merge() {
        // 40 tools over a 100 MB base: budget 20 keeps the base and the 18
        // largest tools apart (19 + 1 merged layer, as 20 / 16 = 1).
        let mut closure = vec![info("base", 100 * MB, &[])];
        let mut roots = Vec::new();
        for i in 0..40u64 {
            let name = format!("tool{i:02}");
            closure.push(info(&name, (i + 1) * MB, &["base"]));
            roots.push(sp(&name));
        }
        let mut counts = pops(&[("base", 41)]);
        for i in 0..40 {
            counts.insert(format!("tool{i:02}"), 1);
        }
        let layers = plan(Strategy::Exclusive, &closure, &roots, &counts, 20).unwrap();
        assert_eq!(layers.len(), 20);
        let groups = grouping(&layers);
        assert_eq!(groups[0], vec!["base"]);
        // The merged layer rates as the sum of its members.
        let expected: Vec<String> = (0..22).map(|i| format!("tool{i:02}")).collect();
        assert_eq!(groups[1], expected);
        for (i, group) in groups[2..].iter().enumerate() {
            assert_eq!(group, &vec![format!("tool{:02}", 39 - i)]);
        }
    }
}
