//! The original Nixery's grouping (`layers/layers.go` in tazjin/nixery),
//! selectable as `--layering nixery`.
//!
//! The algorithm:
//! 1. Build a graph with a synthetic image root that has edges to every
//!    requested path and, additionally, to every path that is "heavy"
//!    (closure over [`HEAVY_CLOSURE_BYTES`]) or "popular" (popularity of at
//!    least [`POPULAR_THRESHOLD`]).
//! 2. Compute the dominator tree from the image root. Each child of the root,
//!    together with everything it dominates, is one layer.
//! 3. Rate each layer as popularity of its top path times the summed closure
//!    sizes of its members. If there are more layers than the budget, the
//!    lowest-rated ones are folded into a single layer.

use super::graph::{chain_tops, ClosureGraph};
use super::Layer;
use std::collections::HashMap;

/// A path whose closure is strictly larger than this (100 MB, decimal, as in
/// the original) gets a layer boundary of its own.
pub const HEAVY_CLOSURE_BYTES: u64 = 100 * 1_000_000;

/// A path with at least this popularity gets a layer boundary of its own.
pub const POPULAR_THRESHOLD: u64 = 100;

/// Plans a checked closure; `budget` is at least 1.
pub fn plan(graph: &ClosureGraph, budget: usize) -> Vec<Layer> {
    let sizes = closure_sizes(graph);
    let pops = &graph.pops;
    let heavy_or_popular: Vec<bool> = (0..graph.len())
        .map(|i| sizes[i] > HEAVY_CLOSURE_BYTES || pops[i] >= POPULAR_THRESHOLD)
        .collect();
    let top = chain_tops(&graph.dominators(&heavy_or_popular));
    let mut members: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, &t) in top.iter().enumerate() {
        members.entry(t).or_default().push(i);
    }

    let mut layers: Vec<(Layer, String)> = members
        .into_iter()
        .map(|(t, ids)| {
            let size = ids
                .iter()
                .fold(0u64, |acc, &i| acc.saturating_add(sizes[i]));
            let layer = graph.layer(&ids, pops[t].saturating_mul(size));
            let key = layer.key();
            (layer, key)
        })
        .collect();

    if layers.len() > budget {
        // Like the original: fold the lowest-rated layers, in ascending
        // order, into one until the count fits. The fold is not re-sorted
        // between steps, so exactly the lowest `len - budget + 1` merge.
        layers.sort_unstable_by(|(a, ka), (b, kb)| {
            a.merge_rating.cmp(&b.merge_rating).then_with(|| ka.cmp(kb))
        });
        let keep = layers.split_off(layers.len() - budget + 1);
        let mut merged = Layer {
            paths: Vec::new(),
            merge_rating: 0,
            nar_size: 0,
        };
        for (layer, _) in layers {
            merged.paths.extend(layer.paths);
            merged.merge_rating = merged.merge_rating.saturating_add(layer.merge_rating);
            merged.nar_size = merged.nar_size.saturating_add(layer.nar_size);
        }
        merged.paths.sort_unstable();
        let key = merged.key();
        layers = keep;
        layers.push((merged, key));
    }
    layers.into_iter().map(|(layer, _)| layer).collect()
}

/// Each node's closure size: the sum of the NAR sizes of every path it
/// transitively references, itself included, each counted once. This is
/// what Nix reports as `closureSize` and what the original's thresholds and
/// ratings use. Summing the children's closure sizes instead would count
/// shared dependencies repeatedly.
///
/// One iterative traversal per node, with a generation-stamped visited array
/// so nothing is cleared between traversals: cost is the sum of the closure
/// sizes, fine for closures of package graphs, and no recursion. A node
/// with a single reference reuses that reference's result.
fn closure_sizes(graph: &ClosureGraph) -> Vec<u64> {
    let (nodes, edges) = (&graph.nodes, &graph.edges);
    let n = nodes.len();
    let mut sizes: Vec<Option<u64>> = vec![None; n];
    let mut stamp = vec![0u32; n];
    let mut generation = 0u32;
    let mut stack = Vec::new();

    for start in 0..n {
        if sizes[start].is_some() {
            continue;
        }
        // Follow single-reference chains first; their sizes then come for
        // free from the end of the chain.
        let mut chain = vec![start];
        let mut cur = start;
        while edges[cur].len() == 1 && sizes[edges[cur][0]].is_none() {
            cur = edges[cur][0];
            chain.push(cur);
        }
        let last = chain.len() - 1;
        let end = chain[last];
        let end_size = match edges[end].as_slice() {
            [] => nodes[end].nar_size,
            [only] if sizes[*only].is_some() => nodes[end]
                .nar_size
                .saturating_add(sizes[*only].unwrap_or(0)),
            _ => {
                generation = generation.wrapping_add(1);
                if generation == 0 {
                    stamp.iter_mut().for_each(|s| *s = 0);
                    generation = 1;
                }
                let mut total = 0u64;
                stamp[end] = generation;
                stack.push(end);
                while let Some(v) = stack.pop() {
                    total = total.saturating_add(nodes[v].nar_size);
                    for &w in &edges[v] {
                        if stamp[w] != generation {
                            stamp[w] = generation;
                            stack.push(w);
                        }
                    }
                }
                total
            }
        };
        sizes[end] = Some(end_size);
        let mut acc = end_size;
        for &v in chain[..last].iter().rev() {
            // A node cannot be in its own closure twice, so adding is exact
            // for an acyclic graph.
            acc = acc.saturating_add(nodes[v].nar_size);
            sizes[v] = Some(acc);
        }
    }
    sizes.into_iter().map(|s| s.unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::build::layering::tests::{grouping, info, sp, MB};
    use crate::build::layering::{LayerError, Strategy, PINNED_POPULARITY};
    use crate::build::store_path::PathInfo;

    fn plan(
        closure: &[PathInfo],
        roots: &[String],
        popularity: &HashMap<String, u64>,
        budget: usize,
    ) -> Result<Vec<Layer>, LayerError> {
        super::super::plan(Strategy::Nixery, closure, roots, popularity, budget)
    }

    /// The example from the original's doc comment: the image requests A, B,
    /// C and D; A, B and C depend on E, C on D, D on F and G. E is popular
    /// and G is heavy. Sizes and popularities are chosen so that the ratings
    /// order as the doc comment's groupings imply: A, B, C < {D, F} < E < G.
    fn worked_example() -> (Vec<PathInfo>, Vec<String>, HashMap<String, u64>) {
        let closure = vec![
            info("a", MB, &["e"]),
            info("b", MB, &["e"]),
            info("c", MB, &["e", "d"]),
            info("d", MB, &["f", "g"]),
            info("e", MB, &[]),
            info("f", 10 * MB, &[]),
            info("g", 150 * MB, &[]),
        ];
        let roots = ["a", "b", "c", "d"].map(sp).to_vec();
        let popularity = HashMap::from([("e".to_string(), 1000), ("g".to_string(), 10)]);
        (closure, roots, popularity)
    }

    #[test]
    fn worked_example_groupings() {
        let (closure, roots, pop) = worked_example();
        let plan_for = |budget| plan(&closure, &roots, &pop, budget).unwrap();

        assert_eq!(
            grouping(&plan_for(1)),
            vec![vec!["a", "b", "c", "d", "e", "f", "g"]]
        );
        assert_eq!(
            grouping(&plan_for(2)),
            vec![vec!["g"], vec!["a", "b", "c", "d", "e", "f"]]
        );
        assert_eq!(
            grouping(&plan_for(3)),
            vec![vec!["g"], vec!["e"], vec!["a", "b", "c", "d", "f"]]
        );
        assert_eq!(
            grouping(&plan_for(4)),
            vec![vec!["g"], vec!["e"], vec!["d", "f"], vec!["a", "b", "c"]]
        );
        // Unmerged: one layer per child of the root in the dominator tree.
        // A and B tie on rating and are ordered by key.
        let full = plan_for(10);
        let mut groups = grouping(&full);
        groups.sort();
        assert_eq!(
            groups,
            vec![
                vec!["a"],
                vec!["b"],
                vec!["c"],
                vec!["d", "f"],
                vec!["e"],
                vec!["g"]
            ]
        );
        assert_eq!(
            grouping(&full[..3]),
            vec![vec!["g"], vec!["e"], vec!["d", "f"]]
        );
        // Ratings: popularity of the top path times the members' closure sizes.
        assert_eq!(full[0].merge_rating, 10 * 150 * MB);
        assert_eq!(full[1].merge_rating, 1000 * MB);
        assert_eq!(full[2].merge_rating, (1 + 10 + 150) * MB + 10 * MB);
        assert_eq!(full[2].nar_size, 11 * MB);
    }

    #[test]
    fn merges_down_to_the_budget() {
        // Twenty independent tools over a shared, unpopular library: each
        // tool is its own layer, the library is dominated by the root.
        let mut closure = vec![info("lib", MB, &[])];
        let mut roots = Vec::new();
        for i in 0..20 {
            let name = format!("tool{i:02}");
            closure.push(info(&name, (i + 1) * MB, &["lib"]));
            roots.push(sp(&name));
        }
        let pop = HashMap::new();
        let unmerged = plan(&closure, &roots, &pop, 100).unwrap();
        assert_eq!(unmerged.len(), 21);

        let layers = plan(&closure, &roots, &pop, 5).unwrap();
        assert_eq!(layers.len(), 5);
        let mut all: Vec<&String> = layers.iter().flat_map(|l| &l.paths).collect();
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len(), "a path is in two layers");
        assert_eq!(all.len(), closure.len());
        // The four highest-rated layers survive; the rest become one layer,
        // whose summed rating here puts it first.
        assert_eq!(layers[0].paths.len(), 17);
        assert_eq!(
            grouping(&layers[1..]),
            vec![
                vec!["tool19"],
                vec!["tool18"],
                vec!["tool17"],
                vec!["tool16"]
            ]
        );
        assert!(layers
            .windows(2)
            .all(|w| w[0].merge_rating >= w[1].merge_rating));
        let merged_rating: u64 = unmerged[4..].iter().map(|l| l.merge_rating).sum();
        assert_eq!(layers[0].merge_rating, merged_rating);
    }

    #[test]
    fn heavy_and_popular_paths_get_their_own_layers() {
        // app -> helper -> {big -> bigdep, common}. Without the thresholds,
        // all of it would be dominated by app and form one layer.
        let closure = vec![
            info("app", MB, &["helper"]),
            info("helper", MB, &["big", "common"]),
            info("big", 101 * MB, &["bigdep"]),
            info("bigdep", MB, &[]),
            info("common", MB, &[]),
        ];
        let roots = vec![sp("app")];
        let pop = HashMap::from([("common".to_string(), POPULAR_THRESHOLD)]);
        let layers = plan(&closure, &roots, &pop, 10).unwrap();
        let mut groups = grouping(&layers);
        groups.sort();
        // `helper` is heavy as well: its closure includes `big`.
        assert_eq!(
            groups,
            vec![
                vec!["app"],
                vec!["big", "bigdep"],
                vec!["common"],
                vec!["helper"]
            ]
        );

        // A closure of exactly 100 MB is not heavy; popularity 99 is not
        // popular.
        let closure = vec![
            info("app", MB, &["edge", "pop"]),
            info("edge", 99 * MB, &["leaf"]),
            info("leaf", MB, &[]),
            info("pop", MB, &[]),
        ];
        let pop = HashMap::from([("pop".to_string(), POPULAR_THRESHOLD - 1)]);
        let layers = plan(&closure, &[sp("app")], &pop, 10).unwrap();
        assert_eq!(grouping(&layers), vec![vec!["app", "edge", "leaf", "pop"]]);
    }

    #[test]
    fn closure_size_counts_shared_dependencies_once() {
        // top -> {l, r} -> base: base is 60 MB, so summing the children's
        // closure sizes would give 121 MB and wrongly make `top` heavy.
        let closure = vec![
            info("top", 0, &["l", "r"]),
            info("l", 0, &["base"]),
            info("r", 0, &["base"]),
            info("base", 60 * MB, &[]),
            info("x", MB, &["top"]),
        ];
        let layers = plan(&closure, &[sp("x")], &HashMap::new(), 10).unwrap();
        assert_eq!(grouping(&layers), vec![vec!["base", "l", "r", "top", "x"]]);
    }

    #[test]
    fn pinned_paths_are_popular() {
        let closure = vec![
            info("app", MB, &["nss-cacert-3.98"]),
            info("nss-cacert-3.98", MB, &[]),
        ];
        let layers = plan(&closure, &[sp("app")], &HashMap::new(), 10).unwrap();
        assert_eq!(
            grouping(&layers),
            vec![vec!["nss-cacert-3.98"], vec!["app"]]
        );
        assert_eq!(layers[0].merge_rating, PINNED_POPULARITY * MB);
    }
}
