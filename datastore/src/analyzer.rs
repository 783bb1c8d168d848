//! The English analyzer BM25 sees: split on non-alphanumerics, drop very long tokens, lowercase,
//! Lucene's English stopwords, Snowball English stemming (Pyserini's default minus the Porter/Snowball
//! difference).

use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
    TokenStream,
};

/// Name under which the analyzer is registered in the index.
pub(crate) const ANALYZER: &str = "en_silo";

fn stopwords() -> StopWordFilter {
    // English always has a built-in stopword list; `None` is only returned for languages without one.
    StopWordFilter::new(Language::English).unwrap_or_else(|| StopWordFilter::remove([]))
}

/// The analyzer used for indexing and for queries.
pub fn english_analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(stopwords())
        .filter(Stemmer::new(Language::English))
        .build()
}

/// The English analyzer without its stemmer: it emits as many tokens (stemming rewrites tokens, never
/// drops them), more cheaply, so it gives a block's exact BM25 length at build time.
pub(crate) fn length_analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(stopwords())
        .build()
}

/// Number of terms the index records for `text` (its BM25 length) when `analyzer` is
/// [`length_analyzer`] or [`english_analyzer`].
pub(crate) fn count_terms(analyzer: &mut TextAnalyzer, text: &str) -> u64 {
    let mut n = 0;
    let mut stream = analyzer.token_stream(text);
    while stream.advance() {
        n += 1;
    }
    n
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_analyzer_counts_like_the_english_analyzer() {
        let text = "The RIVERS were running; running rivers ran. A b c 123 x\u{e9}t\u{e9} \
                    aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa and, of it: generously";
        let full = analyze(text).len() as u64;
        assert_eq!(count_terms(&mut length_analyzer(), text), full);
        assert_eq!(count_terms(&mut english_analyzer(), text), full);
    }
}
