//! ROUGE as Google's `rouge_score` package computes it: its default tokeniser (lowercase,
//! everything but `a-z0-9` is a separator, optional NLTK Porter stemming of tokens longer than
//! three characters), `rougeN` from clipped n-gram counts, `rougeL` from the longest common
//! subsequence, and `rougeLsum` from the union LCS over newline-separated sentences with
//! rouge_score's double-counting guard. Every function returns the F-measure. A metric's
//! `tokenizer` option replaces the default tokeniser with a subword tokenizer's tokens, as SNI's
//! cross-lingual track scores with GPT-2's ([`SubwordTokens`]).

use std::collections::HashMap;

use crate::porter;

/// The ROUGE variants lm-evaluation-harness and SNI name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rouge {
    N(usize),
    L,
    LSum,
}

impl Rouge {
    /// `rouge1` .. `rouge9`, `rougeL`, `rougeLsum`.
    pub fn parse(name: &str) -> Option<Rouge> {
        match name {
            "rougeL" => Some(Rouge::L),
            "rougeLsum" => Some(Rouge::LSum),
            _ => {
                let n: usize = name.strip_prefix("rouge")?.parse().ok()?;
                (name.len() == 6 && n > 0).then_some(Rouge::N(n))
            }
        }
    }
}

/// rouge_score's `tokenize(text, stemmer)`.
pub fn tokenize(text: &str, stem: bool) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| {
            if stem && t.len() > 3 {
                porter::stem(t)
            } else {
                t.to_string()
            }
        })
        // rouge_score drops anything the stemmer left that is not a plain token.
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

fn fmeasure(p: f64, r: f64) -> f64 {
    if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    }
}

/// `RougeScorer([kind], use_stemmer=stem).score(target, prediction)[kind].fmeasure`.
pub fn score(kind: Rouge, target: &str, prediction: &str, stem: bool) -> f64 {
    let tokens = |t: &str| -> Result<Vec<String>, String> { Ok(tokenize(t, stem)) };
    score_with(kind, target, prediction, &tokens).unwrap_or(0.0)
}

/// `RougeScorer([kind], tokenizer=t).score(target, prediction)[kind].fmeasure`: the same scores
/// over the tokens `tokens` gives (rouge_score neither lowercases nor stems them).
pub fn score_with(
    kind: Rouge,
    target: &str,
    prediction: &str,
    tokens: &dyn Fn(&str) -> Result<Vec<String>, String>,
) -> Result<f64, String> {
    Ok(match kind {
        Rouge::N(n) => ngram_score(&tokens(target)?, &tokens(prediction)?, n),
        Rouge::L => lcs_score(&tokens(target)?, &tokens(prediction)?),
        Rouge::LSum => {
            let sents = |t: &str| -> Result<Vec<Vec<String>>, String> {
                t.split('\n')
                    .filter(|s| !s.is_empty())
                    .map(tokens)
                    .collect()
            };
            summary_lcs_score(&sents(target)?, &sents(prediction)?)
        }
    })
}

/// The `tokenizer.json` a path names: the file itself, or the one in a model folder.
pub(crate) fn tokenizer_file(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    }
}

/// SNI's cross-lingual tokenizer (Tk-Instruct's `GPTTokenizer`): the tokens of a byte-level BPE
/// tokenizer, GPT-2's there, each with its leading `Ġ` (the space marker) removed.
pub struct SubwordTokens {
    path: std::path::PathBuf,
    tokenizer: tokenizers::Tokenizer,
}

impl SubwordTokens {
    /// `path`: a `tokenizer.json`, or a model folder holding one.
    pub fn load(path: &std::path::Path) -> Result<SubwordTokens, String> {
        let file = tokenizer_file(path);
        let tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| format!("cannot load the tokenizer {}: {e}", file.display()))?;
        Ok(SubwordTokens {
            path: file,
            tokenizer,
        })
    }

    pub fn tokens(&self, text: &str) -> Result<Vec<String>, String> {
        let e = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("{}: cannot tokenise {text:?}: {e}", self.path.display()))?;
        Ok(e.get_tokens()
            .iter()
            .map(|t| t.trim_start_matches('Ġ').to_string())
            .collect())
    }
}

fn ngrams(t: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    for w in t.windows(n) {
        *m.entry(w).or_insert(0) += 1;
    }
    m
}

fn ngram_score(target: &[String], pred: &[String], n: usize) -> f64 {
    let (t, p) = (ngrams(target, n), ngrams(pred, n));
    let hits: usize = t
        .iter()
        .map(|(g, &c)| c.min(p.get(g).copied().unwrap_or(0)))
        .sum();
    let tn: usize = t.values().sum();
    let pn: usize = p.values().sum();
    fmeasure(
        hits as f64 / pn.max(1) as f64,
        hits as f64 / tn.max(1) as f64,
    )
}

fn lcs_table(r: &[String], c: &[String]) -> Vec<Vec<usize>> {
    let mut t = vec![vec![0usize; c.len() + 1]; r.len() + 1];
    for i in 1..=r.len() {
        for j in 1..=c.len() {
            t[i][j] = if r[i - 1] == c[j - 1] {
                t[i - 1][j - 1] + 1
            } else {
                t[i - 1][j].max(t[i][j - 1])
            };
        }
    }
    t
}

fn lcs_score(target: &[String], pred: &[String]) -> f64 {
    if target.is_empty() || pred.is_empty() {
        return 0.0;
    }
    let lcs = lcs_table(target, pred)[target.len()][pred.len()] as f64;
    fmeasure(lcs / pred.len() as f64, lcs / target.len() as f64)
}

/// Indices into `r` of one longest common subsequence, chosen as rouge_score's backtrack does.
fn lcs_indices(r: &[String], c: &[String]) -> Vec<usize> {
    let t = lcs_table(r, c);
    let (mut i, mut j) = (r.len(), c.len());
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if r[i - 1] == c[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i][j - 1] > t[i - 1][j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out.reverse();
    out
}

fn summary_lcs_score(refs: &[Vec<String>], cands: &[Vec<String>]) -> f64 {
    let m: usize = refs.iter().map(Vec::len).sum();
    let n: usize = cands.iter().map(Vec::len).sum();
    if refs.is_empty() || cands.is_empty() || m == 0 || n == 0 {
        return 0.0;
    }
    let mut cnt_r: HashMap<&str, usize> = HashMap::new();
    let mut cnt_c: HashMap<&str, usize> = HashMap::new();
    for t in refs.iter().flatten() {
        *cnt_r.entry(t).or_insert(0) += 1;
    }
    for t in cands.iter().flatten() {
        *cnt_c.entry(t).or_insert(0) += 1;
    }
    let mut hits = 0usize;
    for r in refs {
        let mut union: Vec<usize> = cands.iter().flat_map(|c| lcs_indices(r, c)).collect();
        union.sort_unstable();
        union.dedup();
        for i in union {
            let t = r[i].as_str();
            let (cc, cr) = (cnt_c.get(t).copied(), cnt_r.get(t).copied());
            if cc.unwrap_or(0) > 0 && cr.unwrap_or(0) > 0 {
                hits += 1;
                *cnt_c.entry(t).or_insert(0) -= 1;
                *cnt_r.entry(t).or_insert(0) -= 1;
            }
        }
    }
    fmeasure(hits as f64 / n as f64, hits as f64 / m as f64)
}
