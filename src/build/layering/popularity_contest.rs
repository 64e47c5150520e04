//! The "popularity contest" of nixpkgs' `dockerTools.streamLayeredImage`
//! (`closure-graph.py`), which nix2container uses too: a path's popularity
//! is the number of reference chains that reach it from the closure's top
//! paths (those nothing in the closure refers to); the `budget - 1` most
//! popular paths get layers of their own, ties by name, the rest one layer.

use super::graph::ClosureGraph;
use super::{best_apart_rest_merged, Layer};
use crate::build::store_path::name_of;
use std::cmp::Reverse;

/// Plans a checked closure; `budget` is at least 1.
pub fn plan(graph: &ClosureGraph, budget: usize) -> Vec<Layer> {
    let chains = chain_counts(graph);
    let names: Vec<&str> = graph.nodes.iter().map(|p| name_of(&p.path)).collect();
    let mut ranked: Vec<usize> = (0..graph.len()).collect();
    // As closure-graph.py's `package_name`: the name, then the hash (node
    // order is path order).
    ranked.sort_unstable_by_key(|&i| (Reverse(chains[i]), names[i], i));
    best_apart_rest_merged(graph, ranked, budget, |i| chains[i])
}

/// Reference chains from the closure's top paths to each path (saturating):
/// 1 for a top path, plus the sum over its referrers. Visits referrers
/// before the paths they refer to (Kahn's algorithm; the graph is acyclic).
fn chain_counts(graph: &ClosureGraph) -> Vec<u64> {
    let n = graph.len();
    let mut pending = vec![0usize; n];
    for refs in &graph.edges {
        for &j in refs {
            pending[j] += 1;
        }
    }
    let mut chains: Vec<u64> = pending.iter().map(|&p| u64::from(p == 0)).collect();
    let mut ready: Vec<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    while let Some(v) = ready.pop() {
        for &w in &graph.edges[v] {
            chains[w] = chains[w].saturating_add(chains[v]);
            pending[w] -= 1;
            if pending[w] == 0 {
                ready.push(w);
            }
        }
    }
    chains
}

#[cfg(test)]
mod tests {
    use crate::build::layering::tests::{grouping, info, sp, MB};
    use crate::build::layering::{plan, Strategy};
    use std::collections::HashMap;

    #[test]
    fn most_referenced_paths_stay_apart() {
        // The example of closure-graph.py: foo -> {bar, baz}, bar -> baz,
        // baz -> tux. Chains: foo 1, bar 1, baz 2, tux 2.
        let closure = vec![
            info("foo", MB, &["bar", "baz"]),
            info("bar", MB, &["baz"]),
            info("baz", MB, &["tux"]),
            info("tux", MB, &[]),
        ];
        let pop = HashMap::new();
        let layers = plan(Strategy::PopularityContest, &closure, &[sp("foo")], &pop, 3).unwrap();
        let mut groups = grouping(&layers);
        groups.sort();
        assert_eq!(groups, vec![vec!["bar", "foo"], vec!["baz"], vec!["tux"]]);
        assert_eq!(
            plan(Strategy::PopularityContest, &closure, &[sp("foo")], &pop, 4)
                .unwrap()
                .len(),
            4
        );
    }
}
