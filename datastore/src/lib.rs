//! A SILO-style nonparametric datastore: documents cut into token blocks, indexed for BM25 retrieval
//! (RIC-LM) and, optionally, kNN-LM keys; documents can be opted out exactly.
//!
//! A store is a directory holding a tantivy index (one row per block, with its block id, document id,
//! owner, license, text and token ids), a `manifest.json` whose hash identifies the store, an
//! `audit.jsonl` of opt-outs, and optionally `knn/` (f16 keys, next-token values, block ids, and for
//! large stores an approximate index over the keys).
//!
//! ```
//! use datastore::{build, BuildOptions, Datastore, OptOut, Tokenizer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! # let input = tmp.path().join("docs.jsonl");
//! std::fs::write(&input, concat!(
//!     r#"{"id": "a", "text": "Rivers carry sediment to the sea.", "owner": "alice", "license": "cc-by"}"#, "\n",
//!     r#"{"id": "b", "text": "Glaciers carve valleys slowly.", "owner": "bob", "license": "pd"}"#, "\n",
//! ))?;
//! // Any tokenizer works for the blocks; here one token per byte.
//! let tok = Tokenizer::bytes();
//! let out = tmp.path().join("store");
//! let opts = BuildOptions { block: 16, stride: 8, ..BuildOptions::default() };
//! let report = build(&[input], &tok, &out, &opts, &|_| {})?;
//! assert_eq!(report.documents, 2);
//!
//! let store = Datastore::open(&out)?;
//! let hits = store.search("a glacier carving", 1)?;
//! assert_eq!(hits[0].doc_id, "b");
//!
//! // Bob leaves: his blocks are deleted and BM25 statistics no longer count them.
//! drop(store);
//! Datastore::opt_out(&out, &OptOut::owner("bob", "request #12"))?;
//! let store = Datastore::open(&out)?;
//! assert!(store.search("glacier", 1)?.iter().all(|h| h.owner != "bob"));
//! # Ok(()) }
//! ```

mod analyzer;
mod ann;
pub mod bench;
mod build;
mod error;
mod input;
pub mod knn;
mod manifest;
mod store;
mod tokenizer;
mod txn;

pub use analyzer::{analyze, english_analyzer};
pub use ann::AnnSettings;
pub use build::{build, BuildOptions, BuildReport, Malformed};
pub use error::{Error, Result};
pub use manifest::{InputFile, KnnInfo, Manifest};
pub use store::{
    Block, Bm25Statistics, Counts, Datastore, Hit, OptOut, OptOutReport, Source, Stats,
};
pub use tokenizer::Tokenizer;
