//! The English analyzer BM25 sees: split on non-alphanumerics, drop very long tokens, lowercase,
//! Lucene's English stopwords, Snowball English stemming (Pyserini's default minus the Porter/Snowball
//! difference).

use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
    TokenStream,
};

/// Name under which the analyzer is registered in the index.
pub(crate) const ANALYZER: &str = "en_silo";

/// The analyzer used for indexing and for queries.
pub fn english_analyzer() -> TextAnalyzer {
    // English always has a built-in stopword list; `None` is only returned for languages without one.
    let stop = StopWordFilter::new(Language::English).unwrap_or_else(|| StopWordFilter::remove([]));
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(stop)
        .filter(Stemmer::new(Language::English))
        .build()
}

/// Terms of `text` as the index sees them (handy for comparing with other BM25 implementations).
///
/// ```
/// assert_eq!(datastore::analyze("The Rivers are running"), ["river", "run"]);
/// ```
pub fn analyze(text: &str) -> Vec<String> {
    analyze_with(&mut english_analyzer(), text)
}

pub(crate) fn analyze_with(analyzer: &mut TextAnalyzer, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stream = analyzer.token_stream(text);
    while stream.advance() {
        out.push(stream.token().text.clone());
    }
    out
}
