//! Shared helpers of the integration tests: fixture paths and the original implementation's outputs.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde_json::Value;

pub const FIXTURES: [&str; 3] = ["tiny_shared", "tiny_vector", "tiny_mlp"];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `expected.json.gz` of a fixture.
pub fn expected(name: &str) -> Value {
    let f = std::fs::File::open(fixture_dir(name).join("expected.json.gz")).unwrap();
    serde_json::from_reader(flate2::read::GzDecoder::new(f)).unwrap()
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Max |a - b| over two `[rows][cols]` tables, asserting equal shapes.
pub fn max_abs_diff_2d(ours: &[Vec<f32>], theirs: &Value) -> f64 {
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len(), "row count");
    let mut max = 0f64;
    for (a, b) in ours.iter().zip(theirs) {
        let b = f64s(b);
        assert_eq!(a.len(), b.len(), "column count");
        for (x, y) in a.iter().zip(b) {
            max = max.max((*x as f64 - y).abs());
        }
    }
    max
}

/// An edge without its value: what must match exactly between implementations.
pub type EdgeKey = (String, String, u64, u64, u64, u64, bool);

pub fn edge_key(e: &Value) -> EdgeKey {
    let e = e.as_array().unwrap();
    (
        e[0].as_str().unwrap().to_owned(),
        e[1].as_str().unwrap().to_owned(),
        e[2].as_u64().unwrap(),
        e[3].as_u64().unwrap(),
        e[4].as_u64().unwrap(),
        e[5].as_u64().unwrap(),
        e[7].as_bool().unwrap(),
    )
}

pub fn edge_map(edges: &Value) -> HashMap<EdgeKey, f64> {
    let mut map = HashMap::new();
    for e in edges.as_array().unwrap() {
        let prev = map.insert(edge_key(e), e[6].as_f64().unwrap());
        assert!(prev.is_none(), "duplicate edge {e}");
    }
    map
}

/// Compares two edge lists: identical key sets, values within `rel_tol` of the largest |value|.
/// Returns the max difference relative to that scale.
pub fn compare_edges(ours: &Value, theirs: &Value, rel_tol: f64, what: &str) -> f64 {
    let ours = edge_map(ours);
    let theirs = edge_map(theirs);
    let missing: Vec<_> = theirs
        .keys()
        .filter(|k| !ours.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = ours
        .keys()
        .filter(|k| !theirs.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: edge sets differ ({} ours, {} theirs); missing {missing:?}, extra {extra:?}",
        ours.len(),
        theirs.len()
    );
    let scale = theirs.values().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let mut max_rel = 0f64;
    for (k, v) in &theirs {
        let rel = (ours[k] - v).abs() / scale;
        assert!(
            rel <= rel_tol,
            "{what}: edge {k:?}: ours {} theirs {v} (rel {rel:e})",
            ours[k]
        );
        max_rel = max_rel.max(rel);
    }
    max_rel
}

/// `active` as `key -> (max, positions)`.
pub fn active_map(v: &Value) -> BTreeMap<String, (f64, Vec<u64>)> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, e)| {
            let e = e.as_array().unwrap();
            let pos = e[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap())
                .collect();
            (k.clone(), (e[0].as_f64().unwrap(), pos))
        })
        .collect()
}

/// Copies a directory tree (a fixture run) to `to`.
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// The fixture's layer names (spd `dev`'s canonical ones, or module paths) as this tool's.
pub fn canonical_names(exp: &Value) -> impl Fn(&str) -> String + '_ {
    move |theirs: &str| {
        if let Some(map) = exp["meta"]["canonical"].as_object()
            && let Some((path, _)) = map.iter().find(|(_, c)| c.as_str() == Some(theirs))
        {
            return match path.as_str() {
                "lm_head" => "output".into(),
                p => p.into(),
            };
        }
        match theirs {
            "embed" => "wte".into(),
            "lm_head" => "output".into(),
            t => t.into(),
        }
    }
}

/// A fixture prompt's `tokens` as ids.
pub fn token_ids(prompt: &Value) -> Vec<u32> {
    prompt["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}
