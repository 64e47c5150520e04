//! A closure checked and indexed once for every strategy: paths in sorted
//! order (so nothing depends on the caller's order), references as indices,
//! popularity per path, and the image's dominator tree on demand.

use super::{Layer, LayerError, PINNED_NAME_PREFIXES, PINNED_POPULARITY};
use crate::build::store_path::{name_of, PathInfo};
use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::HashMap;

/// Popularity of a path missing from the popularity data, as in the original.
const DEFAULT_POPULARITY: u64 = 1;

/// In [`ClosureGraph::dominators`]: dominated by the image root only.
pub const IMAGE_ROOT: usize = usize::MAX;

pub struct ClosureGraph<'a> {
    /// The closure, sorted by path.
    pub nodes: Vec<&'a PathInfo>,
    /// Each node's references, sorted, without itself or duplicates.
    pub edges: Vec<Vec<usize>>,
    /// The requested paths, sorted.
    pub roots: Vec<usize>,
    /// Each node's popularity, pinned ones included.
    pub pops: Vec<u64>,
    /// Whether the popularity data names the node (or it is pinned).
    pub pop_known: Vec<bool>,
}

impl<'a> ClosureGraph<'a> {
    /// Checks that the closure is a closure: no duplicates, no dangling
    /// references, no cycles, every path reachable from a requested one.
    pub fn new(
        closure: &'a [PathInfo],
        roots: &[String],
        popularity: &HashMap<String, u64>,
    ) -> Result<Self, LayerError> {
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
        let mut root_ids = roots
            .iter()
            .map(|r| {
                index
                    .get(r.as_str())
                    .copied()
                    .ok_or_else(|| LayerError::RootNotInClosure(r.clone()))
            })
            .collect::<Result<Vec<usize>, _>>()?;
        root_ids.sort_unstable();
        root_ids.dedup();
        if let Some(i) = first_unreachable(&edges, &root_ids) {
            return Err(LayerError::Unreachable(nodes[i].path.clone()));
        }
        let (pops, pop_known) = nodes
            .iter()
            .map(|p| popularity_of(&p.path, popularity))
            .unzip();
        Ok(ClosureGraph {
            nodes,
            edges,
            roots: root_ids,
            pops,
            pop_known,
        })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Each node's referrers (the reverse of `edges`), sorted.
    pub fn referrers(&self) -> Vec<Vec<usize>> {
        let mut back = vec![Vec::new(); self.len()];
        for (i, refs) in self.edges.iter().enumerate() {
            for &j in refs {
                back[j].push(i);
            }
        }
        back
    }

    /// Each node's immediate dominator, [`IMAGE_ROOT`] for the children of
    /// a synthetic image root with edges to the requested paths and to the
    /// nodes in `extra_roots`.
    pub fn dominators(&self, extra_roots: &[bool]) -> Vec<usize> {
        let n = self.len();
        let mut graph: DiGraph<(), (), u32> =
            DiGraph::with_capacity(n + 1, self.edges.iter().map(Vec::len).sum::<usize>() + n);
        let image_root = graph.add_node(());
        for _ in 0..n {
            graph.add_node(());
        }
        let node = |i: usize| NodeIndex::new(i + 1);
        let mut from_root = extra_roots.to_vec();
        from_root.resize(n, false);
        for &r in &self.roots {
            from_root[r] = true;
        }
        for (i, _) in from_root.iter().enumerate().filter(|(_, &r)| r) {
            graph.add_edge(image_root, node(i), ());
        }
        for (i, refs) in self.edges.iter().enumerate() {
            for &j in refs {
                graph.add_edge(node(i), node(j), ());
            }
        }
        let doms = dominators::simple_fast(&graph, image_root);
        // Every node is reachable (checked in `new`), so each has one; the
        // image root (index 0) maps to IMAGE_ROOT by wrapping.
        (0..n)
            .map(|i| {
                doms.immediate_dominator(node(i))
                    .map_or(IMAGE_ROOT, |d| d.index().wrapping_sub(1))
            })
            .collect()
    }

    /// A layer of the given nodes (any order) with the given rating.
    pub fn layer(&self, members: &[usize], rating: u64) -> Layer {
        let mut ids = members.to_vec();
        // Node indices follow path order, so sorted ids give sorted paths.
        ids.sort_unstable();
        Layer {
            paths: ids.iter().map(|&i| self.nodes[i].path.clone()).collect(),
            merge_rating: rating,
            nar_size: ids
                .iter()
                .fold(0u64, |acc, &i| acc.saturating_add(self.nodes[i].nar_size)),
        }
    }
}

/// A path's popularity and whether the data (or the pinning) gave it.
fn popularity_of(path: &str, popularity: &HashMap<String, u64>) -> (u64, bool) {
    let name = name_of(path);
    if PINNED_NAME_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return (PINNED_POPULARITY, true);
    }
    match popularity.get(name) {
        Some(&n) => (n, true),
        None => (DEFAULT_POPULARITY, false),
    }
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
/// the strategies rely on that.
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

/// The first node no requested path reaches, if any.
fn first_unreachable(edges: &[Vec<usize>], roots: &[usize]) -> Option<usize> {
    let mut seen = vec![false; edges.len()];
    let mut stack = Vec::with_capacity(roots.len());
    for &r in roots {
        if !seen[r] {
            seen[r] = true;
            stack.push(r);
        }
    }
    while let Some(v) = stack.pop() {
        for &w in &edges[v] {
            if !seen[w] {
                seen[w] = true;
                stack.push(w);
            }
        }
    }
    seen.iter().position(|&s| !s)
}

/// For each node, the last node of its chain in a forest given by `up`
/// ([`IMAGE_ROOT`] ends a chain). Iterative with memoisation, so deep
/// chains cannot overflow the stack.
pub fn chain_tops(up: &[usize]) -> Vec<usize> {
    let mut top = vec![IMAGE_ROOT; up.len()];
    let mut chain = Vec::new();
    for start in 0..up.len() {
        let mut v = start;
        while top[v] == IMAGE_ROOT {
            if up[v] == IMAGE_ROOT {
                top[v] = v;
                break;
            }
            chain.push(v);
            v = up[v];
        }
        let t = top[v];
        for u in chain.drain(..) {
            top[u] = t;
        }
    }
    top
}
