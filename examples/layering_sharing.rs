//! Measures how well layer planning shares layers across a pull sequence.
//!
//! Loads the Debian-derived graph in `/work/shared/data` (see its README),
//! plans every image of pull sequence 1 with the default budget, and prints
//! how many layers are built vs. reused, the bytes a client pulling every
//! image in order downloads vs. the summed image sizes, and planning times.
//!
//! Usage: `cargo run --example layering_sharing [DATA_DIR] [SEQUENCE]`

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use nixery::build::layers::{plan, DEFAULT_LAYER_BUDGET, PINNED_POPULARITY};
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

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "/work/shared/data".to_string());
    let dir = Path::new(&dir);
    let sequence: usize = args.next().map_or(Ok(1), |s| s.parse())?;

    let t = Instant::now();
    let graph: RawGraph = read_json(&dir.join("debian-graph.json.gz"))?;
    let mut popularity: HashMap<String, u64> = read_json(&dir.join("debian-popularity.json"))?;
    let names: HashMap<String, String> = read_json(&dir.join("debian-names.json.gz"))?;
    let sequences: Vec<Vec<Vec<String>>> = read_json(&dir.join("pull-sequences.json"))?;
    let paths: Vec<PathInfo> = graph
        .paths
        .into_iter()
        .map(|p| PathInfo {
            path: p.path,
            nar_size: p.nar_size,
            references: p.references,
        })
        .collect();
    println!("loaded {} paths in {:.2?}", paths.len(), t.elapsed());

    // The data's stand-ins for nss-cacert and iana-etc get the same pinned
    // popularity the planner gives those (see the data README).
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

    let Some(images) = sequence.checked_sub(1).and_then(|i| sequences.get(i)) else {
        bail!("no pull sequence {sequence}");
    };

    let mut seen_layers: HashSet<String> = HashSet::new();
    let (mut built, mut reused) = (0usize, 0usize);
    let (mut downloaded, mut image_bytes) = (0u64, 0u64);
    let mut all_paths: HashSet<usize> = HashSet::new();
    let mut times: Vec<Duration> = Vec::with_capacity(images.len());
    let mut layer_counts: Vec<usize> = Vec::with_capacity(images.len());

    for image in images {
        let roots: Vec<String> = image
            .iter()
            .map(|n| {
                names
                    .get(n)
                    .cloned()
                    .with_context(|| format!("unknown package {n}"))
            })
            .collect::<Result<_>>()?;
        let members = closure_of(&roots, &paths, &index)?;
        all_paths.extend(&members);
        let closure: Vec<PathInfo> = members.iter().map(|&i| paths[i].clone()).collect();
        image_bytes += closure.iter().map(|p| p.nar_size).sum::<u64>();

        let t = Instant::now();
        let layers = plan(&closure, &roots, &popularity, DEFAULT_LAYER_BUDGET)?;
        times.push(t.elapsed());
        layer_counts.push(layers.len());

        for layer in &layers {
            if seen_layers.insert(layer.key()) {
                built += 1;
                downloaded += layer.nar_size;
            } else {
                reused += 1;
            }
        }
    }

    let union_bytes: u64 = all_paths.iter().map(|&i| paths[i].nar_size).sum();
    times.sort();
    layer_counts.sort();
    let total: Duration = times.iter().sum();
    let gb = |b: u64| b as f64 / 1e9;

    println!(
        "sequence {sequence}: {} images, budget {DEFAULT_LAYER_BUDGET}",
        images.len()
    );
    println!(
        "layers: {} built, {} reused ({} layer references; per image median {}, max {})",
        built,
        reused,
        built + reused,
        layer_counts[layer_counts.len() / 2],
        layer_counts[layer_counts.len() - 1],
    );
    println!(
        "bytes (NAR sizes): client downloads {:.2} GB vs. {:.2} GB summed image sizes ({:.1}%); distinct paths pulled {:.2} GB",
        gb(downloaded),
        gb(image_bytes),
        100.0 * downloaded as f64 / image_bytes as f64,
        gb(union_bytes),
    );
    println!(
        "plan time per image: median {:.2?}, mean {:.2?}, max {:.2?}",
        times[times.len() / 2],
        total / times.len() as u32,
        times[times.len() - 1],
    );

    // The whole graph as one "image", every path nothing depends on as a root.
    let mut referenced = vec![false; paths.len()];
    for p in &paths {
        for r in &p.references {
            if let Some(&j) = index.get(r.as_str()) {
                if r != &p.path {
                    referenced[j] = true;
                }
            }
        }
    }
    let roots: Vec<String> = paths
        .iter()
        .zip(&referenced)
        .filter(|(_, &r)| !r)
        .map(|(p, _)| p.path.clone())
        .collect();
    let t = Instant::now();
    let layers = plan(&paths, &roots, &popularity, DEFAULT_LAYER_BUDGET)?;
    println!(
        "whole graph: {} paths, {} roots -> {} layers in {:.2?}",
        paths.len(),
        roots.len(),
        layers.len(),
        t.elapsed()
    );
    Ok(())
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
