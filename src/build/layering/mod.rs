//! Groups an image's runtime closure into layers. Which store paths share a
//! layer decides what clients download: a layer is shared between images
//! only if its exact set of paths recurs, so a path in a layer of its own is
//! shared perfectly, and the budget forces the rest to be merged.
//!
//! Every strategy is a pure function of the closure, the requested paths,
//! the popularity data and the budget: the same inputs give the same layers
//! (and so the same digests), whatever the order of the inputs.
//!
//! - [`exclusive`] (the default): a path joins the group of its most
//!   popular referrer when the popularity data shows that nothing outside
//!   that referrer uses it, so groups do not depend on the image; the
//!   largest groups, weighted by popularity, get layers of their own.
//! - [`largest`]: the largest paths get layers of their own.
//! - [`popularity_contest`]: as nixpkgs' `streamLayeredImage` and
//!   nix2container: the most referenced paths get layers of their own.
//! - [`nixery`]: the original Nixery's popularity and dominator tree.

mod exclusive;
mod graph;
mod largest;
mod nixery;
mod popularity_contest;

use crate::build::store_path::PathInfo;
use sha2::{Digest as _, Sha256};
use std::cmp::Reverse;
use std::collections::HashMap;

pub use nixery::{HEAVY_CLOSURE_BYTES, POPULAR_THRESHOLD};

/// Nixery's default: Docker's limit of 125 layers minus room for clients that
/// add their own on top.
pub const DEFAULT_LAYER_BUDGET: usize = 94;

/// Popularity forced on paths that Nixery adds to every image.
pub const PINNED_POPULARITY: u64 = 500_000;

/// Name prefixes (see [`crate::build::store_path::name_of`]) of the paths
/// Nixery adds to every image; they have few referrers in nixpkgs but are
/// in every image, so the original pins their popularity above glibc's.
pub const PINNED_NAME_PREFIXES: [&str; 2] = ["nss-cacert", "iana-etc"];

/// How a closure is grouped into layers (`--layering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Strategy {
    /// Groups that do not depend on the image, the largest on their own.
    #[default]
    Exclusive,
    /// The largest paths on their own, the rest in one layer.
    Largest,
    /// The most referenced paths on their own, the rest in one layer.
    PopularityContest,
    /// The original Nixery's: popularity and the dominator tree.
    Nixery,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Exclusive,
        Strategy::Largest,
        Strategy::PopularityContest,
        Strategy::Nixery,
    ];

    /// The name used by `--layering` and `NIXERY_LAYERING`.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Exclusive => "exclusive",
            Strategy::Largest => "largest",
            Strategy::PopularityContest => "popularity-contest",
            Strategy::Nixery => "nixery",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One layer of an image: a set of store paths to be packed together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The store paths of the layer, sorted.
    pub paths: Vec<String>,
    /// The strategy's rating of the layer; a plan lists the highest first.
    /// For `nixery`, popularity of the top path times the summed closure
    /// sizes of its members (saturating), merged layers adding theirs.
    pub merge_rating: u64,
    /// Sum of the members' own NAR sizes: roughly what the layer holds.
    pub nar_size: u64,
}

impl Layer {
    /// Hex sha256 of the sorted paths joined by `'\n'`. The same set of paths
    /// always gives the same key, so a layer built for one image can be
    /// reused by another.
    pub fn key(&self) -> String {
        let mut hasher = Sha256::new();
        for (i, path) in self.paths.iter().enumerate() {
            if i > 0 {
                hasher.update(b"\n");
            }
            hasher.update(path.as_bytes());
        }
        hex::encode(hasher.finalize())
    }
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

/// Plans the layers of an image with `strategy`.
///
/// `closure` holds every path of the image's runtime closure, `roots` the
/// requested top-level paths, and `popularity` maps a path's name to its
/// popcount. Returns at most `budget` layers, highest rating first (ties by
/// key); every closure path is in exactly one. The result does not depend
/// on the order of `closure` or `roots`.
pub fn plan(
    strategy: Strategy,
    closure: &[PathInfo],
    roots: &[String],
    popularity: &HashMap<String, u64>,
    budget: usize,
) -> Result<Vec<Layer>, LayerError> {
    let graph = graph::ClosureGraph::new(closure, roots, popularity)?;
    if graph.len() == 0 {
        return Ok(Vec::new());
    }
    if budget == 0 {
        return Err(LayerError::ZeroBudget);
    }
    let mut layers = match strategy {
        Strategy::Exclusive => exclusive::plan(&graph, budget),
        Strategy::Largest => largest::plan(&graph, budget),
        Strategy::PopularityContest => popularity_contest::plan(&graph, budget),
        Strategy::Nixery => nixery::plan(&graph, budget),
    };
    debug_assert!(layers.len() <= budget);
    let mut keyed: Vec<(Layer, String)> = layers
        .drain(..)
        .map(|layer| {
            let key = layer.key();
            (layer, key)
        })
        .collect();
    keyed.sort_unstable_by(|(a, ka), (b, kb)| {
        Reverse(a.merge_rating)
            .cmp(&Reverse(b.merge_rating))
            .then_with(|| ka.cmp(kb))
    });
    Ok(keyed.into_iter().map(|(layer, _)| layer).collect())
}

/// Strategies that keep the `budget - 1` best paths apart and put the rest
/// into one layer: `ranked` holds node indices, best first, and `rating`
/// rates a single path.
fn best_apart_rest_merged(
    graph: &graph::ClosureGraph,
    mut ranked: Vec<usize>,
    budget: usize,
    rating: impl Fn(usize) -> u64,
) -> Vec<Layer> {
    let apart = if ranked.len() <= budget {
        ranked.len()
    } else {
        budget - 1
    };
    let rest = ranked.split_off(apart);
    let mut layers: Vec<Layer> = ranked
        .into_iter()
        .map(|i| graph.layer(&[i], rating(i)))
        .collect();
    if !rest.is_empty() {
        let rating = rest
            .iter()
            .fold(0u64, |acc, &i| acc.saturating_add(rating(i)));
        layers.push(graph.layer(&rest, rating));
    }
    layers
}

#[cfg(test)]
mod tests;
