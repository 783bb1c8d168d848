//! Building, querying, malformed input and exact opt-out on generated corpora.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use datastore::knn::{KnnIndex, KnnWriter, Search};
use datastore::{build, AnnSettings, BuildOptions, Datastore, Error, OptOut, Tokenizer};

const WORDS: &[&str] = &[
    "river", "mountain", "glacier", "valley", "forest", "ocean", "desert", "storm", "harbor",
    "lantern", "copper", "violin", "orchard", "meadow", "thunder", "canyon", "island", "bridge",
    "castle", "garden", "falcon", "engine", "library", "market", "signal", "planet", "comet",
    "marble", "silver", "winter", "summer", "running", "carved", "ancient", "quiet", "bright",
    "the", "of", "and", "a", "to", "is",
];

/// A tiny seeded generator (xorshift), so corpora are the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn words(&mut self, n: usize, skew: usize) -> String {
        (0..n)
            .map(|_| {
                // Owners favour different parts of the vocabulary, so their blocks differ.
                let i = (self.next() as usize % WORDS.len() + skew * (self.next() % 2) as usize)
                    % WORDS.len();
                WORDS[i]
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn row(id: &str, owner: &str, license: &str, text: &str) -> String {
    serde_json::json!({"id": id, "owner": owner, "license": license, "text": text}).to_string()
}

/// Documents of owners alice, bob and carol; `skip` leaves one owner out.
fn corpus(skip: Option<&str>) -> String {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut out = String::new();
    for i in 0..60 {
        let (owner, license, skew) = match i % 3 {
            0 => ("alice", "cc-by", 0),
            1 => ("bob", "proprietary", 11),
            _ => ("carol", "pd", 23),
        };
        let n = 20 + (rng.next() % 200) as usize;
        let text = rng.words(n, skew);
        if Some(owner) != skip {
            out += &row(&format!("d{i}"), owner, license, &text);
            out.push('\n');
        }
    }
    out
}

fn opts() -> BuildOptions {
    BuildOptions {
        block: 64,
        stride: 32,
        threads: 2,
        memory_budget: 64 << 20,
        ..BuildOptions::default()
    }
}

fn make(dir: &Path, name: &str, jsonl: &str) -> PathBuf {
    let input = dir.join(format!("{name}.jsonl"));
    std::fs::write(&input, jsonl).unwrap();
    let out = dir.join(name);
    build(&[input], &Tokenizer::bytes(), &out, &opts(), &|_| {}).unwrap();
    out
}

fn queries() -> Vec<String> {
    let mut rng = Rng(42);
    (0..40).map(|i| rng.words(3 + i % 30, i)).collect()
}

/// Every block's score for every query, keyed by (document, block start).
fn scores(store: &Datastore) -> Vec<BTreeMap<(String, u64), f32>> {
    queries()
        .iter()
        .map(|q| {
            store
                .search(q, 10_000)
                .unwrap()
                .into_iter()
                .map(|h| ((h.doc_id, h.start), h.score))
                .collect()
        })
        .collect()
}

/// Textbook BM25 (k1 = 1.2, b = 0.75, Lucene idf, times 1 + k1 like tantivy) of every block.
fn exact_bm25(store: &Datastore, query: &str) -> BTreeMap<(String, u64), (u64, f64)> {
    let tok = Tokenizer::bytes();
    let blocks: Vec<_> = store
        .blocks()
        .unwrap()
        .into_iter()
        .map(|b| {
            let terms = datastore::analyze(&tok.decode(&b.tokens).unwrap());
            (b, terms)
        })
        .collect();
    let n = blocks.len() as f64;
    let avgdl = blocks.iter().map(|(_, t)| t.len()).sum::<usize>() as f64 / n;
    let mut q = datastore::analyze(query);
    let mut seen = std::collections::HashSet::new();
    q.retain(|t| seen.insert(t.clone()));
    let mut out = BTreeMap::new();
    for (b, terms) in &blocks {
        let mut score = 0.0;
        let mut matched = false;
        for t in &q {
            let tf = terms.iter().filter(|x| *x == t).count() as f64;
            if tf == 0.0 {
                continue;
            }
            matched = true;
            let df = blocks.iter().filter(|(_, ts)| ts.contains(t)).count() as f64;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            let len = terms.len() as f64;
            score += idf * 2.2 * tf / (tf + 1.2 * (0.25 + 0.75 * len / avgdl));
        }
        if matched {
            out.insert((b.doc_id.clone(), b.start), (b.block_id, score));
        }
    }
    out
}

#[test]
fn scores_are_exact_bm25_and_ranked_by_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make(tmp.path(), "full", &corpus(None));
    let store = Datastore::open(&dir).unwrap();
    for (i, q) in queries().iter().enumerate() {
        let want = exact_bm25(&store, q);
        let hits = store.search(q, 10_000).unwrap();
        assert_eq!(hits.len(), want.len(), "query {i}: matched blocks");
        for h in &hits {
            let (_, s) = want[&(h.doc_id.clone(), h.start)];
            assert!(
                (f64::from(h.score) - s).abs() <= 1e-6 * s,
                "query {i}: {} vs {s}",
                h.score
            );
        }
        // Top-1 with only the re-scored candidates: the exact best, ties to the lower block id.
        let best = want
            .values()
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
            .unwrap();
        let top = store.search_ids(q, 1).unwrap();
        assert_eq!(top[0].0, best.0, "query {i}: top-1");
        let scores: Vec<f32> = hits.iter().map(|h| h.score).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "query {i}: order");
    }
}

#[test]
fn opt_out_equals_a_store_built_without_the_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let full = make(tmp.path(), "full", &corpus(None));
    let without = make(tmp.path(), "without", &corpus(Some("bob")));

    let before = scores(&Datastore::open(&full).unwrap());
    let reference = scores(&Datastore::open(&without).unwrap());
    // The test is sensitive: with bob's blocks still there the scores differ.
    assert_ne!(before, reference);

    let report = Datastore::opt_out(&full, &OptOut::owner("bob", "left the consortium")).unwrap();
    assert!(report.blocks_removed > 0);
    assert_ne!(report.identity_before, report.identity_after);
    let store = Datastore::open(&full).unwrap();
    let after = scores(&store);
    // BM25 statistics are exactly those of the store built without bob ...
    let reference_store = Datastore::open(&without).unwrap();
    for q in queries() {
        assert_eq!(
            store.bm25_statistics(&q).unwrap(),
            reference_store.bm25_statistics(&q).unwrap()
        );
    }
    // ... so every query matches the same blocks with bit-identical scores (exact BM25 re-scoring
    // sums term scores in query order, whatever the segment layout).
    for (i, (a, r)) in after.iter().zip(&reference).enumerate() {
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            r.keys().collect::<Vec<_>>(),
            "query {i}: matched blocks"
        );
        for (key, s) in r {
            assert_eq!(a[key].to_bits(), s.to_bits(), "query {i}, block {key:?}");
        }
    }
    for q in queries() {
        assert!(store
            .search(&q, 10_000)
            .unwrap()
            .iter()
            .all(|h| h.owner != "bob"));
    }
    let st = store.stats().unwrap();
    assert!(!st.owners.contains_key("bob"));
    assert_eq!(st, Datastore::open(&without).unwrap().stats().unwrap());
    assert_eq!(store.manifest().excluded_owners, ["bob"]);

    // The audit log has the build, the opt-out's start (written before anything was deleted) and its
    // completion, with the reason.
    let audit = std::fs::read_to_string(full.join("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["action"], "opt-out-started");
    assert_eq!(lines[2]["action"], "opt-out");
    assert_eq!(lines[1]["opt_out_id"], lines[2]["opt_out_id"]);
    for l in &lines[1..] {
        assert_eq!(l["reason"], "left the consortium");
        assert_eq!(l["owners"][0], "bob");
    }
    assert!(!full.join("opt-out.pending.json").exists());

    // Again: nothing left to remove, not an error. An owner never seen is.
    drop(store);
    let again = Datastore::opt_out(&full, &OptOut::owner("bob", "")).unwrap();
    assert_eq!(again.blocks_removed, 0);
    let err = Datastore::opt_out(&full, &OptOut::owner("mallory", "")).unwrap_err();
    assert!(
        err.to_string().contains("no blocks of owner `mallory`"),
        "{err}"
    );
}

#[test]
fn opt_out_by_document_id() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = concat!(
        r#"{"id": "x1", "owner": "o", "text": "zebra zebra crossing"}"#,
        "\n",
        r#"{"id": "x2", "owner": "o", "text": "zebra stripes"}"#,
        "\n"
    );
    let dir = make(tmp.path(), "s", jsonl);
    let store = Datastore::open(&dir).unwrap();
    assert_eq!(store.search("zebra", 5).unwrap().len(), 2);
    assert_eq!(store.search("zebra", 5).unwrap()[0].license, "unknown");
    drop(store);
    Datastore::opt_out(&dir, &OptOut::documents(&["x1"], "takedown")).unwrap();
    let store = Datastore::open(&dir).unwrap();
    let hits = store.search("zebra crossing", 5).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].doc_id, "x2");
    assert_eq!(store.manifest().excluded_documents, ["x1"]);
}

#[test]
fn malformed_rows_are_reported_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("bad.jsonl");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(br#"{"id": "ok", "owner": "o", "text": "fine text"}"#);
    bytes.extend_from_slice(b"\n{\"owner\": \"o\"}\n");
    bytes.extend_from_slice(b"{\"owner\": \"o\", \"text\": 5}\n");
    bytes.extend_from_slice(b"{\"owner\": \"o\", \"text\": \"caf\xff\"}\n");
    bytes.extend_from_slice(b"not json\n\n");
    bytes.extend_from_slice(b"{\"text\": \"no owner\"}\n");
    std::fs::write(&input, &bytes).unwrap();

    let out = tmp.path().join("lenient");
    let r = build(
        std::slice::from_ref(&input),
        &Tokenizer::bytes(),
        &out,
        &opts(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.documents, 1);
    let lines: Vec<(u64, &str)> = r
        .skipped
        .iter()
        .map(|m| (m.line, m.reason.as_str()))
        .collect();
    assert_eq!(lines[0], (2, "missing field `text`"));
    assert_eq!(lines[1], (3, "field `text` is a number, expected a string"));
    assert_eq!(lines[2].0, 4);
    assert!(lines[2].1.starts_with("invalid UTF-8"));
    assert_eq!(lines[3].0, 5);
    assert!(lines[3].1.starts_with("not valid JSON"));
    assert_eq!(lines[4], (7, "missing field `owner`"));
    assert_eq!(Datastore::open(&out).unwrap().manifest().skipped_rows, 5);

    let strict = BuildOptions {
        strict: true,
        ..opts()
    };
    let err = build(
        std::slice::from_ref(&input),
        &Tokenizer::bytes(),
        &tmp.path().join("strict"),
        &strict,
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Malformed { line: 2, .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2: ", input.display())),
        "{err}"
    );

    // An existing, non-empty output is refused rather than overwritten.
    let again = build(&[input], &Tokenizer::bytes(), &out, &opts(), &|_| {}).unwrap_err();
    assert!(again.to_string().contains("not empty"), "{again}");
}

#[test]
fn parquet_input_and_model_tokenizer() {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("docs.parquet");
    let col = |v: Vec<Option<&str>>| Arc::new(StringArray::from(v)) as ArrayRef;
    let batch = RecordBatch::try_from_iter([
        ("id", col(vec![Some("p1"), Some("p2"), Some("p3")])),
        (
            "body",
            col(vec![
                Some("Rivers carry sediment to the sea."),
                None,
                Some("Glaciers carve valleys."),
            ]),
        ),
        ("who", col(vec![Some("alice"), Some("bob"), Some("bob")])),
        ("license", col(vec![Some("cc-by"), Some("pd"), Some("pd")])),
    ])
    .unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny-flexolmo");
    let tok = Tokenizer::from_model_dir(&model).unwrap();
    let o = BuildOptions {
        text_field: "body".into(),
        owner_field: "who".into(),
        block: 8,
        stride: 4,
        ..opts()
    };
    let out = tmp.path().join("store");
    let r = build(&[path], &tok, &out, &o, &|_| {}).unwrap();
    assert_eq!(r.documents, 2);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].line, 2);
    let store = Datastore::open(&out).unwrap();
    let hits = store.search("glacier", 3).unwrap();
    assert_eq!(hits[0].doc_id, "p3");
    // Stored tokens are the model tokenizer's, and decode to the stored text.
    assert_eq!(tok.decode(&hits[0].tokens).unwrap(), hits[0].text);
    assert!(hits[0].tokens.len() <= 8);
    assert!(
        st_blocks(&store) > 2,
        "documents are cut into several blocks"
    );
    let st = store.stats().unwrap();
    assert_eq!(st.owners["bob"].documents, 1);
    assert_eq!(
        st.total.tokens,
        st.owners["alice"].tokens + st.owners["bob"].tokens
    );
    assert_eq!(st.licenses["pd"].blocks, st.owners["bob"].blocks);
}

fn st_blocks(s: &Datastore) -> u64 {
    s.stats().unwrap().total.blocks
}

#[test]
fn knn_entries_of_opted_out_blocks_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = concat!(
        r#"{"id": "a", "owner": "x", "text": "aaaa"}"#,
        "\n",
        r#"{"id": "b", "owner": "y", "text": "bbbb"}"#,
        "\n"
    );
    let dir = make(tmp.path(), "s", jsonl);
    let store = Datastore::open(&dir).unwrap();
    let blocks = store.blocks().unwrap();
    drop(store);
    let mut w = KnnWriter::create(&dir, 2).unwrap();
    for b in &blocks {
        let v = b.block_id as f32;
        w.push(b.block_id, &[v, v, v, v], &[1, 2]).unwrap();
    }
    assert_eq!(w.finish("test-model", "0").unwrap(), 4);
    let knn = KnnIndex::open(&dir).unwrap();
    assert_eq!(knn.len(), 4);
    // Exact neighbours: the nearest key to (1, 1) is block 1's.
    assert_eq!(knn.block(knn.search(&[1.0, 1.0], 1).unwrap()[0].entry), 1);
    let r = Datastore::opt_out(&dir, &OptOut::owner("y", "")).unwrap();
    assert_eq!(r.knn_entries_removed, 2);
    let store = Datastore::open(&dir).unwrap();
    let knn = store.knn().unwrap();
    assert_eq!(knn.len(), 2);
    assert!(knn
        .search(&[1.0, 1.0], 10)
        .unwrap()
        .iter()
        .all(|n| knn.block(n.entry) == 0));
    assert_eq!(store.manifest().knn.as_ref().unwrap().entries, 2);
}

/// Random keys around a few centres per block, so that neighbours are meaningful (seeded).
fn clustered_keys(rng: &mut Rng, block: u64, n: usize, dim: usize) -> Vec<f32> {
    let unit = |r: &mut Rng| (r.next() % 10_000) as f32 / 10_000.0;
    let centre: Vec<f32> = (0..dim)
        .map(|d| ((block as usize * 7 + d) % 13) as f32 / 4.0)
        .collect();
    (0..n * dim)
        .map(|i| centre[i % dim] + unit(rng) - 0.5)
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn approximate_index_matches_exact_search_and_opt_out_removes_keys_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make(tmp.path(), "s", &corpus(None));
    let store = Datastore::open(&dir).unwrap();
    let blocks = store.blocks().unwrap();
    let owner_of: BTreeMap<u64, String> = blocks
        .iter()
        .map(|b| {
            (
                b.block_id,
                store.source(b.block_id).unwrap().unwrap().owner.clone(),
            )
        })
        .collect();
    drop(store);
    let dim = 16;
    let per_block = 3;
    let settings = AnnSettings {
        part_entries: 1000,
        ..AnnSettings::default()
    };
    let mut w = KnnWriter::create(&dir, dim)
        .unwrap()
        .with_search(Search::Index(settings));
    let mut rng = Rng(7);
    let mut bob_keys = Vec::new();
    for b in &blocks {
        let keys = clustered_keys(&mut rng, b.block_id, per_block, dim);
        if owner_of[&b.block_id] == "bob" {
            bob_keys.extend(keys.chunks(dim).map(<[f32]>::to_vec));
        }
        let values: Vec<u32> = (0..per_block as u32).collect();
        w.push(b.block_id, &keys, &values).unwrap();
    }
    let n = w.finish("test-model", "0").unwrap() as usize;
    assert!(n > 3 * 1000, "{n} entries: more than three parts");
    let store = Datastore::open(&dir).unwrap();
    assert_eq!(store.manifest().knn.as_ref().unwrap().search, "hnsw");
    let knn = store.knn().unwrap();
    assert_eq!(knn.index_settings(), Some(settings));

    // Recall@16 against the exact scan, and every distance equal to the exact one.
    let queries: Vec<Vec<f32>> = (0..50)
        .map(|i| {
            let mut q = knn.key(i * n / 50);
            q[0] += 0.05;
            q
        })
        .collect();
    let mut found = 0;
    for q in &queries {
        let exact = knn.search_exact(q, 16);
        let approx = knn.search(q, 16).unwrap();
        assert_eq!(approx.len(), 16);
        for h in &approx {
            assert_eq!(h.distance, knn.distance(h.entry, q));
        }
        found += approx.iter().filter(|h| exact.contains(h)).count();
    }
    let recall = found as f64 / (16 * queries.len()) as f64;
    assert!(recall >= 0.95, "recall@16 {recall}");
    // Asking for every entry returns exactly the exact search's list.
    assert_eq!(
        knn.search(&queries[0], n).unwrap(),
        knn.search_exact(&queries[0], n)
    );
    drop(store);

    // Bob leaves: no file of the store holds any of his keys (as the f16 bytes both the key files and
    // the graphs store), and his blocks are never found.
    let r = Datastore::opt_out(&dir, &OptOut::owner("bob", "canary")).unwrap();
    assert_eq!(r.knn_entries_removed as usize, bob_keys.len());
    let files: Vec<(PathBuf, Vec<u8>)> = files_under(&dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    let as_f16 = |k: &[f32]| -> Vec<u8> {
        k.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    };
    for k in bob_keys.iter().step_by(37) {
        let needle = as_f16(k);
        for (p, bytes) in &files {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "a key of bob's is still in {}",
                p.display()
            );
        }
    }
    let store = Datastore::open(&dir).unwrap();
    let knn = store.knn().unwrap();
    assert_eq!(knn.len(), n - bob_keys.len());
    assert_eq!(knn.index_settings(), Some(settings));
    for k in bob_keys.iter().step_by(53) {
        for h in knn.search(k, 16).unwrap() {
            assert_ne!(owner_of[&knn.block(h.entry)], "bob");
        }
    }
    // The index after the opt-out is the one a build without bob's keys gives.
    let mut recall_after = 0;
    for q in &queries {
        let exact = knn.search_exact(q, 16);
        recall_after += knn
            .search(q, 16)
            .unwrap()
            .iter()
            .filter(|h| exact.contains(h))
            .count();
    }
    assert!(recall_after as f64 / (16 * queries.len()) as f64 >= 0.95);
    drop(store);

    // Back to exact search, and the index files are gone.
    datastore::knn::reindex(&dir, Search::Exact, &|_, _| {}).unwrap();
    let store = Datastore::open(&dir).unwrap();
    assert_eq!(store.manifest().knn.as_ref().unwrap().search, "exact");
    assert!(store.knn().unwrap().index_settings().is_none());
    assert!(!files_under(&dir)
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".usearch")));
}

/// Keys repeated across documents (every document's first position holds the same state) enter each
/// graph once; a search still returns every entry holding such a key, ties broken by the lower entry
/// as exact search does, before and after an opt-out removes some of them.
#[test]
fn repeated_keys_enter_the_graph_once_and_are_all_found() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make(tmp.path(), "s", &corpus(None));
    let store = Datastore::open(&dir).unwrap();
    let blocks = store.blocks().unwrap();
    drop(store);
    let dim = 8;
    let settings = AnnSettings {
        part_entries: 40,
        ..AnnSettings::default()
    };
    let mut w = KnnWriter::create(&dir, dim)
        .unwrap()
        .with_search(Search::Index(settings));
    let mut rng = Rng(11);
    let shared = vec![3.0f32; dim];
    for b in &blocks {
        let mut keys = shared.clone();
        keys.extend(clustered_keys(&mut rng, b.block_id, 3, dim));
        w.push(b.block_id, &keys, &[9, 1, 2, 3]).unwrap();
    }
    let n = w.finish("test-model", "0").unwrap() as usize;
    assert!(n > 2 * 40, "{n} entries: several parts");
    let duplicates = files_under(&dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".duplicates"))
        .count();
    assert!(duplicates >= 2, "{duplicates} duplicates files");

    let check = |dir: &Path| {
        let store = Datastore::open(dir).unwrap();
        let knn = store.knn().unwrap();
        let mut near = shared.clone();
        near[0] += 0.01;
        let far = vec![40.0f32; dim];
        for q in [&shared, &near, &far] {
            for k in [1, 5, 16, knn.len()] {
                assert_eq!(knn.search(q, k).unwrap(), knn.search_exact(q, k), "k {k}");
            }
        }
        knn.len()
    };
    assert_eq!(check(&dir), n);

    // Another search breadth needs no rebuild: the graphs are linked into the new key folder as they are.
    let graphs = |dir: &Path| -> BTreeMap<String, u64> {
        use std::os::unix::fs::MetadataExt;
        files_under(dir)
            .into_iter()
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "usearch" || e == "duplicates")
            })
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::metadata(&p).unwrap().ino(),
                )
            })
            .collect()
    };
    let before = graphs(&dir);
    let breadth = AnnSettings {
        expansion_search: 500,
        ..settings
    };
    datastore::knn::reindex(&dir, Search::Index(breadth), &|_, _| panic!("rebuilt")).unwrap();
    assert_eq!(graphs(&dir), before);
    assert_eq!(
        Datastore::open(&dir)
            .unwrap()
            .knn()
            .unwrap()
            .index_settings(),
        Some(breadth)
    );
    assert_eq!(check(&dir), n);

    let r = Datastore::opt_out(&dir, &OptOut::owner("bob", "")).unwrap();
    assert!(r.knn_entries_removed > 0);
    assert_eq!(check(&dir), n - r.knn_entries_removed as usize);
}

#[test]
fn document_ids_shared_by_two_owners_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("dup.jsonl");
    let jsonl = [
        row("d1", "alice", "cc-by", "river mountain glacier"),
        row("d1", "alice", "cc-by", "a second row of alice's d1 is hers"),
        row("d2", "bob", "pd", "valley forest ocean"),
        row("d1", "bob", "pd", "desert storm harbor"),
    ]
    .join("\n");
    std::fs::write(&input, jsonl).unwrap();
    let out = tmp.path().join("s");
    let e = build(&[input], &Tokenizer::bytes(), &out, &opts(), &|_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("dup.jsonl:4")
            && e.contains("`d1`")
            && e.contains("`alice`")
            && e.contains("dup.jsonl:1"),
        "{e}"
    );
    // Nothing is left at --out, and no half-built store beside it is mistaken for one.
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
}
