//! Groups an image's runtime closure into layers, the way the original
//! Nixery does (`layers/layers.go` in tazjin/nixery), so that images with
//! overlapping closures end up with identical, shareable layers.
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

use crate::build::store_path::{name_of, PathInfo};
use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};
use sha2::{Digest as _, Sha256};
use std::cmp::Reverse;
use std::collections::HashMap;

/// Nixery's default: Docker's limit of 125 layers minus room for clients that
/// add their own on top.
pub const DEFAULT_LAYER_BUDGET: usize = 94;

/// A path whose closure is strictly larger than this (100 MB, decimal, as in
/// the original) gets a layer boundary of its own.
pub const HEAVY_CLOSURE_BYTES: u64 = 100 * 1_000_000;

/// A path with at least this popularity gets a layer boundary of its own.
pub const POPULAR_THRESHOLD: u64 = 100;

/// Popularity forced on paths that Nixery adds to every image.
pub const PINNED_POPULARITY: u64 = 500_000;

/// Name prefixes (see [`name_of`]) of the paths Nixery adds to every image;
/// they have few referrers in nixpkgs but are in every image, so the original
/// pins their popularity above glibc's.
pub const PINNED_NAME_PREFIXES: [&str; 2] = ["nss-cacert", "iana-etc"];

/// Popularity of a path missing from the popularity data, as in the original.
const DEFAULT_POPULARITY: u64 = 1;

/// One layer of an image: a set of store paths to be packed together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The store paths of the layer, sorted.
    pub paths: Vec<String>,
    /// Popularity of the layer's top path times the summed closure sizes of
    /// its members (saturating); merged layers add their ratings.
    pub merge_rating: u64,
    /// Sum of the members' own NAR sizes: roughly what the layer holds.
    pub nar_size: u64,
}

impl Layer {
    /// Hex sha256 of the sorted paths joined by `'\n'`. The same set of paths
    /// always gives the same key, so a layer built for one image can be
    /// reused by another.
    pub fn key(&self) -> String {
        layer_key(&self.paths)
    }
}

fn layer_key(sorted_paths: &[String]) -> String {
    let mut hasher = Sha256::new();
    for (i, path) in sorted_paths.iter().enumerate() {
        if i > 0 {
            hasher.update(b"\n");
        }
        hasher.update(path.as_bytes());
    }
    hex::encode(hasher.finalize())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayerError {
    #[error("store path {0} appears more than once in the closure")]
    DuplicatePath(String),
    #[error("{from} refers to {to}, which is not in the closure")]
    DanglingReference { from: String, to: String },
    #[error("requested path {0} is not in the closure")]
    RootNotInClosure(String),
    #[error("{0} is in the closure but not reachable from any requested path")]
    Unreachable(String),
    #[error("the references form a cycle (found at or below {0})")]
    Cycle(String),
    #[error("a layer budget of 0 cannot hold a non-empty closure")]
    ZeroBudget,
}

/// Plans the layers of an image.
///
/// `closure` holds every path of the image's runtime closure, `roots` the
/// requested top-level paths, and `popularity` maps a path's name (see
/// [`name_of`]) to its popcount. Returns at most `budget` layers, highest
/// merge rating first (ties by key); every closure path is in exactly one.
/// The result does not depend on the order of `closure` or `roots`.
pub fn plan(
    closure: &[PathInfo],
    roots: &[String],
    popularity: &HashMap<String, u64>,
    budget: usize,
) -> Result<Vec<Layer>, LayerError> {
    // Index paths in sorted order so every later step is independent of the
    // caller's ordering.
    let mut nodes: Vec<&PathInfo> = closure.iter().collect();
    nodes.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    if let Some(pair) = nodes.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(LayerError::DuplicatePath(pair[0].path.clone()));
    }
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.as_str(), i))
        .collect();

    let edges = reference_lists(&nodes, &index)?;
    if let Some(i) = find_cycle(&edges) {
        return Err(LayerError::Cycle(nodes[i].path.clone()));
    }
    let sizes = closure_sizes(&nodes, &edges);
    let pops: Vec<u64> = nodes
        .iter()
        .map(|p| popularity_of(&p.path, popularity))
        .collect();

    // Node 0 is the image root; path i is node i + 1.
    let n = nodes.len();
    let mut graph: DiGraph<(), (), u32> =
        DiGraph::with_capacity(n + 1, edges.iter().map(Vec::len).sum::<usize>() + n);
    let image_root = graph.add_node(());
    for _ in 0..n {
        graph.add_node(());
    }
    let node = |i: usize| NodeIndex::new(i + 1);

    let mut from_root = vec![false; n];
    for root in roots {
        let &i = index
            .get(root.as_str())
            .ok_or_else(|| LayerError::RootNotInClosure(root.clone()))?;
        from_root[i] = true;
    }
    for i in 0..n {
        if sizes[i] > HEAVY_CLOSURE_BYTES || pops[i] >= POPULAR_THRESHOLD {
            from_root[i] = true;
        }
    }
    for (i, _) in from_root.iter().enumerate().filter(|(_, &r)| r) {
        graph.add_edge(image_root, node(i), ());
    }
    for (i, refs) in edges.iter().enumerate() {
        for &j in refs {
            graph.add_edge(node(i), node(j), ());
        }
    }

    let doms = dominators::simple_fast(&graph, image_root);
    let mut idom = vec![usize::MAX; n];
    for (i, slot) in idom.iter_mut().enumerate() {
        match doms.immediate_dominator(node(i)) {
            // NodeIndex 0 is the image root, which maps to usize::MAX here.
            Some(d) => *slot = d.index().wrapping_sub(1),
            None => return Err(LayerError::Unreachable(nodes[i].path.clone())),
        }
    }

    let top = top_level_ancestors(&idom);
    let mut members: HashMap<usize, Vec<usize>> = HashMap::new();
    // Ascending indices keep each layer's paths sorted.
    for (i, &t) in top.iter().enumerate() {
        members.entry(t).or_default().push(i);
    }

    let mut layers: Vec<(Layer, String)> = members
        .into_iter()
        .map(|(t, ids)| {
            let size = ids
                .iter()
                .fold(0u64, |acc, &i| acc.saturating_add(sizes[i]));
            let layer = Layer {
                paths: ids.iter().map(|&i| nodes[i].path.clone()).collect(),
                merge_rating: pops[t].saturating_mul(size),
                nar_size: ids
                    .iter()
                    .fold(0u64, |acc, &i| acc.saturating_add(nodes[i].nar_size)),
            };
            let key = layer.key();
            (layer, key)
        })
        .collect();

    if layers.len() > budget {
        if budget == 0 {
            return Err(LayerError::ZeroBudget);
        }
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

    layers.sort_unstable_by(|(a, ka), (b, kb)| {
        Reverse(a.merge_rating)
            .cmp(&Reverse(b.merge_rating))
            .then_with(|| ka.cmp(kb))
    });
    Ok(layers.into_iter().map(|(layer, _)| layer).collect())
}

fn popularity_of(path: &str, popularity: &HashMap<String, u64>) -> u64 {
    let name = name_of(path);
    if PINNED_NAME_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return PINNED_POPULARITY;
    }
    popularity.get(name).copied().unwrap_or(DEFAULT_POPULARITY)
}

/// Each node's references as indices, without self-references (Nix lists
/// them, they carry no dependency) and without duplicates.
fn reference_lists(
    nodes: &[&PathInfo],
    index: &HashMap<&str, usize>,
) -> Result<Vec<Vec<usize>>, LayerError> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut refs = Vec::with_capacity(p.references.len());
            for r in &p.references {
                let &j = index
                    .get(r.as_str())
                    .ok_or_else(|| LayerError::DanglingReference {
                        from: p.path.clone(),
                        to: r.clone(),
                    })?;
                if j != i {
                    refs.push(j);
                }
            }
            refs.sort_unstable();
            refs.dedup();
            Ok(refs)
        })
        .collect()
}

/// Some node on a reference cycle, if there is one (Kahn's algorithm). Nix
/// closures are acyclic apart from self-references, which are already gone;
/// closure sizes below rely on that.
fn find_cycle(edges: &[Vec<usize>]) -> Option<usize> {
    let mut indegree = vec![0usize; edges.len()];
    for refs in edges {
        for &j in refs {
            indegree[j] += 1;
        }
    }
    let mut ready: Vec<usize> = (0..edges.len()).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(v) = ready.pop() {
        seen += 1;
        for &w in &edges[v] {
            indegree[w] -= 1;
            if indegree[w] == 0 {
                ready.push(w);
            }
        }
    }
    if seen == edges.len() {
        None
    } else {
        indegree.iter().position(|&d| d > 0)
    }
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
fn closure_sizes(nodes: &[&PathInfo], edges: &[Vec<usize>]) -> Vec<u64> {
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

/// For each node, the ancestor in the dominator tree that is a direct child
/// of the image root (`usize::MAX` in `idom`). Iterative with memoisation,
/// so deep dominator chains cannot overflow the stack.
fn top_level_ancestors(idom: &[usize]) -> Vec<usize> {
    let mut top = vec![usize::MAX; idom.len()];
    let mut chain = Vec::new();
    for start in 0..idom.len() {
        let mut v = start;
        while top[v] == usize::MAX {
            if idom[v] == usize::MAX {
                top[v] = v;
                break;
            }
            chain.push(v);
            v = idom[v];
        }
        let t = top[v];
        for u in chain.drain(..) {
            top[u] = t;
        }
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn sp(name: &str) -> String {
        // A fixed 32-character hash part, so `name_of` yields `name`.
        format!("/nix/store/{}-{name}", "0".repeat(32))
    }

    fn info(name: &str, nar_size: u64, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: sp(name),
            nar_size,
            // Nix lists a self-reference; it must be ignored.
            references: std::iter::once(sp(name))
                .chain(refs.iter().map(|r| sp(r)))
                .collect(),
        }
    }

    fn names(layer: &Layer) -> Vec<&str> {
        layer.paths.iter().map(|p| name_of(p)).collect()
    }

    fn grouping(layers: &[Layer]) -> Vec<Vec<&str>> {
        layers.iter().map(names).collect()
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
    fn deterministic_under_shuffled_input() {
        let mut closure = Vec::new();
        let mut roots = Vec::new();
        for i in 0..60u64 {
            let refs: Vec<String> = (0..i)
                .filter(|j| (i * 7 + j * 13) % 5 == 0)
                .map(|j| format!("p{j:02}"))
                .collect();
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            closure.push(info(&format!("p{i:02}"), (i % 7 + 1) * 3 * MB, &refs));
            if i % 9 == 0 || i >= 55 {
                roots.push(sp(&format!("p{i:02}")));
            }
        }
        let pop: HashMap<String, u64> = (0..60u64)
            .filter(|i| i % 4 == 0)
            .map(|i| (format!("p{i:02}"), i * 3))
            .collect();
        let expected = plan(&closure, &roots, &pop, 6).unwrap();
        assert_eq!(expected.len(), 6);

        // A small deterministic shuffle (xorshift), so no extra dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20 {
            let mut c = closure.clone();
            let mut r = roots.clone();
            for i in (1..c.len()).rev() {
                c.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            for i in (1..r.len()).rev() {
                r.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            for p in &mut c {
                p.references.reverse();
            }
            // A fresh map has a fresh iteration order.
            let pop: HashMap<String, u64> = pop.clone().into_iter().collect();
            assert_eq!(plan(&c, &r, &pop, 6).unwrap(), expected);
        }
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

    #[test]
    fn invalid_input_is_an_error() {
        let pop = HashMap::new();
        let dangling = vec![info("app", 1, &["missing"])];
        assert_eq!(
            plan(&dangling, &[sp("app")], &pop, 10),
            Err(LayerError::DanglingReference {
                from: sp("app"),
                to: sp("missing")
            })
        );
        let ok = vec![info("app", 1, &[])];
        assert_eq!(
            plan(&ok, &[sp("other")], &pop, 10),
            Err(LayerError::RootNotInClosure(sp("other")))
        );
        let dup = vec![info("app", 1, &[]), info("app", 1, &[])];
        assert_eq!(
            plan(&dup, &[sp("app")], &pop, 10),
            Err(LayerError::DuplicatePath(sp("app")))
        );
        let stray = vec![info("app", 1, &[]), info("stray", 1, &[])];
        assert_eq!(
            plan(&stray, &[sp("app")], &pop, 10),
            Err(LayerError::Unreachable(sp("stray")))
        );
        let cyclic = vec![info("a", 1, &["b"]), info("b", 1, &["a"])];
        assert!(matches!(
            plan(&cyclic, &[sp("a")], &pop, 10),
            Err(LayerError::Cycle(_))
        ));
    }

    #[test]
    fn tiny_budgets() {
        let (closure, roots, pop) = worked_example();
        assert_eq!(plan(&closure, &roots, &pop, 0), Err(LayerError::ZeroBudget));
        assert_eq!(plan(&closure, &roots, &pop, 1).unwrap().len(), 1);
        assert_eq!(plan(&[], &[], &pop, 0), Ok(vec![]));
    }

    #[test]
    fn key_depends_only_on_the_paths() {
        let layer = Layer {
            paths: vec![sp("a"), sp("b")],
            merge_rating: 1,
            nar_size: 2,
        };
        let other = Layer {
            merge_rating: 7,
            nar_size: 9,
            ..layer.clone()
        };
        assert_eq!(layer.key(), other.key());
        let joined = format!("{}\n{}", sp("a"), sp("b"));
        assert_eq!(
            layer.key(),
            crate::digest::Digest::of(joined.as_bytes()).hex()
        );
    }

    #[test]
    fn deep_chains_do_not_overflow_the_stack() {
        let n = 100_000;
        let closure: Vec<PathInfo> = (0..n)
            .map(|i| PathInfo {
                path: format!("/nix/store/{i:032}-p"),
                nar_size: 1,
                references: if i + 1 < n {
                    vec![format!("/nix/store/{:032}-p", i + 1)]
                } else {
                    vec![]
                },
            })
            .collect();
        let roots = vec![closure[0].path.clone()];
        let layers = plan(&closure, &roots, &HashMap::new(), 3).unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].paths.len(), n);
    }
}
