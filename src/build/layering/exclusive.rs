//! The default strategy: groups that do not depend on the image.
//!
//! A merged layer is shared only if its exact set of paths recurs in another
//! image. A path `d` that the popularity data shows is used by nothing but
//! the path `p` above it (and what lies between them) appears in an image
//! exactly when `p` does, so `d` joins `p`'s group and the group is the same
//! in every image. The test, for `p` the immediate dominator of `d` in this
//! image: popularity counts referrers (as popcount does), so `pop(d) -
//! pop(p)` referrers of `d` are not referrers of `p`; if the paths between
//! `p` and `d` in this image account for all of them, `d` has no referrer
//! elsewhere. A path missing from the popularity data stays on its own, so
//! without data every path is a group of its own.
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

/// Groups of nodes keyed by their top node: each node joins its immediate
/// dominator's group when the popularity data shows nothing else uses it.
fn exclusive_groups(graph: &ClosureGraph) -> BTreeMap<usize, Vec<usize>> {
    let n = graph.len();
    let idom = graph.dominators(&[]);
    let referrers = graph.referrers();
    let mut joins = vec![IMAGE_ROOT; n];
    let mut stamp = vec![0u32; n];
    let mut stack = Vec::new();
    for d in 0..n {
        let p = idom[d];
        if p == IMAGE_ROOT || !graph.pop_known[d] {
            continue;
        }
        // Generation `d + 1` marks this search's visits.
        let generation = d as u32 + 1;
        let outside = graph.pops[d].saturating_sub(graph.pops[p]);
        if used_only_below(
            d, p, outside, &referrers, &mut stamp, generation, &mut stack,
        ) {
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

/// Whether `d` and the paths between its dominator `p` and it number at
/// least `needed`: then they account for all of `d`'s referrers that are
/// not `p`'s. Walks up from `d` without passing `p` (every upward path from
/// `d` meets `p`, which dominates it) and stops as soon as it has counted
/// enough, so the cost is at most `needed` nodes.
fn used_only_below(
    d: usize,
    p: usize,
    needed: u64,
    referrers: &[Vec<usize>],
    stamp: &mut [u32],
    generation: u32,
    stack: &mut Vec<usize>,
) -> bool {
    let mut counted = 1u64;
    if counted >= needed {
        return true;
    }
    stack.clear();
    stamp[d] = generation;
    stack.push(d);
    while let Some(v) = stack.pop() {
        for &u in &referrers[v] {
            if u == p || stamp[u] == generation {
                continue;
            }
            stamp[u] = generation;
            counted += 1;
            if counted >= needed {
                return true;
            }
            stack.push(u);
        }
    }
    false
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
