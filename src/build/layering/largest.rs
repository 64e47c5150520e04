//! The simplest strategy that shares well: the `budget - 1` largest paths
//! get layers of their own, the rest one layer.

use super::graph::ClosureGraph;
use super::{best_apart_rest_merged, Layer};
use std::cmp::Reverse;

/// Plans a checked closure; `budget` is at least 1.
pub fn plan(graph: &ClosureGraph, budget: usize) -> Vec<Layer> {
    let size = |i: usize| graph.nodes[i].nar_size;
    let mut ranked: Vec<usize> = (0..graph.len()).collect();
    // Node order is path order, so ties are broken by path.
    ranked.sort_unstable_by_key(|&i| (Reverse(size(i)), i));
    best_apart_rest_merged(graph, ranked, budget, size)
}
