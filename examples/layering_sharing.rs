//! Layering simulator: how many bytes a client downloads over a sequence
//! of image pulls, for every layering strategy.
//!
//! Reads a closure workload laid out as `../shared/data` (see its README):
//! `debian-graph.json.gz`, `debian-popularity.json` and
//! `debian-names.json.gz` in DATA_DIR, and a sequence file holding either
//! a list of sequences or one sequence (each image a list of package
//! names). Every image of a sequence is planned with the default budget; a
//! client that keeps every layer it pulled downloads each distinct layer
//! once. The minimum is the bytes of the distinct store paths pulled.
//!
//! Usage: `cargo run --release --example layering_sharing -- DATA_DIR SEQUENCES`
//!
//! The last line is `default ratio: X.XX`, the default strategy's worst
//! ratio over the sequences, for scripts.

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use nixery::build::layering::{plan, Strategy, DEFAULT_LAYER_BUDGET, PINNED_POPULARITY};
use nixery::build::store_path::{name_of, PathInfo};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Deserialize)]
struct RawGraph {
    paths: Vec<RawPath>,
}

#[derive(Deserialize)]
struct RawPath {
    path: String,
    #[serde(rename = "narSize")]
    nar_size: u64,
    references: Vec<String>,
}

/// A sequence file holds several sequences or just one.
#[derive(Deserialize)]
#[serde(untagged)]
enum Sequences {
    Many(Vec<Vec<Vec<String>>>),
    One(Vec<Vec<String>>),
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = BufReader::new(file);
    let parsed = if path.extension().is_some_and(|e| e == "gz") {
        serde_json::from_reader(BufReader::new(GzDecoder::new(reader)))
    } else {
        serde_json::from_reader(reader)
    };
    parsed.with_context(|| format!("parsing {}", path.display()))
}

/// One image: its requested paths and its closure.
struct Image {
    roots: Vec<String>,
    closure: Vec<PathInfo>,
}

/// What one strategy did over one sequence.
struct Outcome {
    downloaded: u64,
    minimum: u64,
    layers: Vec<usize>,
    times: Vec<Duration>,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, sequences] = args.as_slice() else {
        bail!("usage: layering_sharing DATA_DIR SEQUENCES_FILE (e.g. ../shared/data ../shared/data/pull-sequences.json)");
    };
    let dir = Path::new(dir);
    let budget = DEFAULT_LAYER_BUDGET;

    let t = Instant::now();
    let graph: RawGraph = read_json(&dir.join("debian-graph.json.gz"))?;
    let mut popularity: HashMap<String, u64> = read_json(&dir.join("debian-popularity.json"))?;
    let names: HashMap<String, String> = read_json(&dir.join("debian-names.json.gz"))?;
    let sequences = match read_json(Path::new(sequences))? {
        Sequences::Many(many) => many,
        Sequences::One(one) => vec![one],
    };
    let paths: Vec<PathInfo> = graph
        .paths
        .into_iter()
        .map(|p| PathInfo {
            path: p.path,
            nar_size: p.nar_size,
            nar_hash: String::new(),
            references: p.references,
            deriver: None,
        })
        .collect();
    println!("loaded {} paths in {:.2?}", paths.len(), t.elapsed());

    // The data's stand-ins for nss-cacert and iana-etc get the popularity
    // the planner pins those to (see the data README).
    for p in &paths {
        let name = name_of(&p.path);
        if name.starts_with("ca-certificates-") || name.starts_with("netbase-") {
            popularity.insert(name.to_string(), PINNED_POPULARITY);
        }
    }
    let index: HashMap<&str, usize> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.as_str(), i))
        .collect();

    let mut images: Vec<Vec<Image>> = Vec::new();
    for sequence in &sequences {
        let mut planned = Vec::with_capacity(sequence.len());
        for image in sequence {
            let roots: Vec<String> = image
                .iter()
                .map(|n| {
                    names
                        .get(n)
                        .cloned()
                        .with_context(|| format!("unknown package {n}"))
                })
                .collect::<Result<_>>()?;
            let closure = closure_of(&roots, &paths, &index)?
                .into_iter()
                .map(|i| paths[i].clone())
                .collect();
            planned.push(Image { roots, closure });
        }
        images.push(planned);
    }

    println!("budget {budget} layers per image (+ the symlink layer)\n");
    println!("| strategy | sequence | downloaded | minimum | ratio | layers/image (median, max) | plan time/image (median, max) |");
    println!("|---|---|---|---|---|---|---|");
    let mut default_ratio: f64 = 0.0;
    for strategy in Strategy::ALL {
        for (s, sequence) in images.iter().enumerate() {
            let o = simulate(strategy, sequence, &popularity, budget)?;
            let ratio = o.downloaded as f64 / o.minimum as f64;
            if strategy == Strategy::default() {
                default_ratio = default_ratio.max(ratio);
            }
            println!(
                "| {strategy} | {} | {:.2} GB | {:.2} GB | {ratio:.2} | {}, {} | {:.2?}, {:.2?} |",
                s + 1,
                gb(o.downloaded),
                gb(o.minimum),
                o.layers[o.layers.len() / 2],
                o.layers[o.layers.len() - 1],
                o.times[o.times.len() / 2],
                o.times[o.times.len() - 1],
            );
        }
    }

    // The whole graph as one "image", every path nothing refers to as a root.
    let referenced: HashSet<&str> = paths
        .iter()
        .flat_map(|p| p.references.iter().filter(move |r| **r != p.path))
        .map(String::as_str)
        .collect();
    let roots: Vec<String> = paths
        .iter()
        .filter(|p| !referenced.contains(p.path.as_str()))
        .map(|p| p.path.clone())
        .collect();
    println!(
        "\nwhole graph ({} paths, {} roots):",
        paths.len(),
        roots.len()
    );
    for strategy in Strategy::ALL {
        let t = Instant::now();
        let layers = plan(strategy, &paths, &roots, &popularity, budget)?;
        println!(
            "  {strategy}: {} layers in {:.2?}",
            layers.len(),
            t.elapsed()
        );
    }
    println!(
        "\ndefault strategy: {}; worst ratio over {} sequence(s)",
        Strategy::default(),
        images.len()
    );
    println!("default ratio: {default_ratio:.2}");
    Ok(())
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// Plans every image of a sequence in order for a client that keeps every
/// layer it pulled.
fn simulate(
    strategy: Strategy,
    images: &[Image],
    popularity: &HashMap<String, u64>,
    budget: usize,
) -> Result<Outcome> {
    let mut pulled: HashSet<String> = HashSet::new();
    let mut distinct: HashMap<&str, u64> = HashMap::new();
    let mut o = Outcome {
        downloaded: 0,
        minimum: 0,
        layers: Vec::with_capacity(images.len()),
        times: Vec::with_capacity(images.len()),
    };
    for image in images {
        let t = Instant::now();
        let layers = plan(strategy, &image.closure, &image.roots, popularity, budget)?;
        o.times.push(t.elapsed());
        if layers.len() > budget {
            bail!("{strategy} planned {} layers over the budget", layers.len());
        }
        let placed: usize = layers.iter().map(|l| l.paths.len()).sum();
        if placed != image.closure.len() {
            bail!(
                "{strategy} placed {placed} of {} paths",
                image.closure.len()
            );
        }
        o.layers.push(layers.len());
        for layer in &layers {
            if pulled.insert(layer.key()) {
                o.downloaded += layer.nar_size;
            }
        }
        for p in &image.closure {
            distinct.insert(&p.path, p.nar_size);
        }
    }
    o.minimum = distinct.values().sum();
    o.layers.sort_unstable();
    o.times.sort_unstable();
    Ok(o)
}

/// Indices of every path reachable from `roots`, including the roots.
fn closure_of(
    roots: &[String],
    paths: &[PathInfo],
    index: &HashMap<&str, usize>,
) -> Result<Vec<usize>> {
    let mut seen = HashSet::new();
    let mut stack = Vec::new();
    for r in roots {
        let &i = index
            .get(r.as_str())
            .with_context(|| format!("{r} not in graph"))?;
        if seen.insert(i) {
            stack.push(i);
        }
    }
    while let Some(i) = stack.pop() {
        for r in &paths[i].references {
            let &j = index
                .get(r.as_str())
                .with_context(|| format!("{r} not in graph"))?;
            if seen.insert(j) {
                stack.push(j);
            }
        }
    }
    let mut members: Vec<usize> = seen.into_iter().collect();
    members.sort_unstable();
    Ok(members)
}
