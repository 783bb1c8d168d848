//! The crate's modules depend one way (lib.rs's doc comment draws the layers): no module reaches,
//! through `crate::` paths, a module that reaches back. Checked from the sources so that a new
//! import loop fails here rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module of a source file: `suites/sni.rs` -> `suites`, `score.rs` -> `score`.
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn collect(dir: &Path, root: &Path, graph: &mut BTreeMap<String, BTreeSet<String>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, root, graph);
            continue;
        }
        let rel = path.strip_prefix(root).unwrap();
        let module = module_of(rel);
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module && name.chars().next().unwrap().is_lowercase() {
                deps.insert(name);
            }
        }
    }
}

#[test]
fn modules_form_no_import_loop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    collect(&root, &root, &mut graph);
    // Kahn's algorithm: whatever cannot be ordered sits on a loop.
    let mut left = graph.clone();
    loop {
        let free: Vec<String> = left
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| m.clone())
            .collect();
        if free.is_empty() {
            break;
        }
        for m in free {
            left.remove(&m);
        }
    }
    assert!(
        left.is_empty(),
        "modules on an import loop (module -> crate:: modules it uses): {left:#?}"
    );
    // The runner only schedules: scoring and suites are the task's.
    let runner = &graph["runner"];
    for m in ["suites", "bias", "metrics", "rouge"] {
        assert!(!runner.contains(m), "runner.rs uses crate::{m}");
    }
}
