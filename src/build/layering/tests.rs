//! Helpers for the strategies' tests, and what every strategy must do:
//! stay within the budget, put every path in exactly one layer, and give
//! the same layers whatever the order of its inputs.

use super::{plan, Layer, LayerError, Strategy};
use crate::build::store_path::{name_of, PathInfo};
use std::collections::HashMap;

pub const MB: u64 = 1_000_000;

pub fn sp(name: &str) -> String {
    // A fixed 32-character hash part, so `name_of` yields `name`.
    format!("/nix/store/{}-{name}", "0".repeat(32))
}

pub fn info(name: &str, nar_size: u64, refs: &[&str]) -> PathInfo {
    PathInfo {
        path: sp(name),
        nar_size,
        nar_hash: String::new(),
        // Nix lists a self-reference; it must be ignored.
        references: std::iter::once(sp(name))
            .chain(refs.iter().map(|r| sp(r)))
            .collect(),
        deriver: None,
    }
}

pub fn names(layer: &Layer) -> Vec<&str> {
    layer.paths.iter().map(|p| name_of(p)).collect()
}

pub fn grouping(layers: &[Layer]) -> Vec<Vec<&str>> {
    layers.iter().map(names).collect()
}

/// A tangled closure of 60 paths with some popularity data.
fn tangle() -> (Vec<PathInfo>, Vec<String>, HashMap<String, u64>) {
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
        .map(|i| (format!("p{i:02}"), 60 - i))
        .collect();
    (closure, roots, pop)
}

fn assert_partition(layers: &[Layer], closure: &[PathInfo]) {
    let mut all: Vec<&String> = layers.iter().flat_map(|l| &l.paths).collect();
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "a path is in two layers");
    let mut expected: Vec<&String> = closure.iter().map(|p| &p.path).collect();
    expected.sort();
    assert_eq!(all, expected, "every path is in a layer");
    for layer in layers {
        assert!(layer.paths.windows(2).all(|w| w[0] < w[1]), "sorted");
        let size: u64 = closure
            .iter()
            .filter(|p| layer.paths.contains(&p.path))
            .map(|p| p.nar_size)
            .sum();
        assert_eq!(layer.nar_size, size);
    }
}

#[test]
fn every_strategy_partitions_the_closure_within_the_budget() {
    let (closure, roots, pop) = tangle();
    for strategy in Strategy::ALL {
        for budget in [1, 2, 3, 5, 6, 17, 59, 60, 61, 94] {
            let layers = plan(strategy, &closure, &roots, &pop, budget).unwrap();
            assert!(layers.len() <= budget, "{strategy} at budget {budget}");
            assert!(!layers.is_empty());
            assert_partition(&layers, &closure);
            assert!(
                layers
                    .windows(2)
                    .all(|w| w[0].merge_rating >= w[1].merge_rating),
                "{strategy}: highest rating first"
            );
        }
    }
}

#[test]
fn every_strategy_is_deterministic_under_shuffled_input() {
    let (closure, roots, pop) = tangle();
    // A small deterministic shuffle (xorshift), so no extra dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for strategy in Strategy::ALL {
        let expected = plan(strategy, &closure, &roots, &pop, 6).unwrap();
        assert_eq!(expected.len(), 6, "{strategy}");
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
            // A requested path may be named twice.
            r.push(r[0].clone());
            // A fresh map has a fresh iteration order.
            let pop: HashMap<String, u64> = pop.clone().into_iter().collect();
            assert_eq!(plan(strategy, &c, &r, &pop, 6).unwrap(), expected);
        }
    }
}

#[test]
fn invalid_input_is_an_error() {
    let pop = HashMap::new();
    for s in Strategy::ALL {
        let dangling = vec![info("app", 1, &["missing"])];
        assert_eq!(
            plan(s, &dangling, &[sp("app")], &pop, 10),
            Err(LayerError::DanglingReference {
                from: sp("app"),
                to: sp("missing")
            })
        );
        let ok = vec![info("app", 1, &[])];
        assert_eq!(
            plan(s, &ok, &[sp("other")], &pop, 10),
            Err(LayerError::RootNotInClosure(sp("other")))
        );
        let dup = vec![info("app", 1, &[]), info("app", 1, &[])];
        assert_eq!(
            plan(s, &dup, &[sp("app")], &pop, 10),
            Err(LayerError::DuplicatePath(sp("app")))
        );
        let stray = vec![info("app", 1, &[]), info("stray", 1, &[])];
        assert_eq!(
            plan(s, &stray, &[sp("app")], &pop, 10),
            Err(LayerError::Unreachable(sp("stray")))
        );
        let cyclic = vec![info("a", 1, &["b"]), info("b", 1, &["a"])];
        assert!(matches!(
            plan(s, &cyclic, &[sp("a")], &pop, 10),
            Err(LayerError::Cycle(_))
        ));
    }
}

#[test]
fn tiny_budgets() {
    let (closure, roots, pop) = tangle();
    for s in Strategy::ALL {
        assert_eq!(
            plan(s, &closure, &roots, &pop, 0),
            Err(LayerError::ZeroBudget)
        );
        assert_eq!(plan(s, &closure, &roots, &pop, 1).unwrap().len(), 1);
        assert_eq!(plan(s, &[], &[], &pop, 0), Ok(vec![]));
    }
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
            nar_hash: String::new(),
            references: if i + 1 < n {
                vec![format!("/nix/store/{:032}-p", i + 1)]
            } else {
                vec![]
            },
            deriver: None,
        })
        .collect();
    let roots = vec![closure[0].path.clone()];
    // Every path known and used by the one above it alone: one group.
    let pop: HashMap<String, u64> = HashMap::from([("p".to_string(), 1)]);
    for s in Strategy::ALL {
        let layers = plan(s, &closure, &roots, &pop, 3).unwrap();
        assert!(layers.len() <= 3);
        assert_eq!(layers.iter().map(|l| l.paths.len()).sum::<usize>(), n);
    }
}
