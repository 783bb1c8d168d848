//! The model interface the runner drives, and the token-level request semantics of
//! lm-evaluation-harness (so every implementation splits, prefixes and truncates alike).

/// Log-likelihood of `continuation` after `context` (texts, as lm-evaluation-harness passes them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoglikelihoodRequest {
    pub context: String,
    pub continuation: String,
}

/// Summed log-probability of the continuation and whether every token was the argmax.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loglikelihood {
    pub logprob: f64,
    pub is_greedy: bool,
}

/// Continue `context` until a stop string, EOS or `max_gen_toks` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub context: String,
    /// Stop strings; the output is cut before the first one (EOS always stops).
    pub until: Vec<String>,
    pub max_gen_toks: usize,
    /// 0 (or `do_sample: false`) means greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Beam search as transformers' `generate` runs it; 1 = no beams.
    pub num_beams: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
}

/// transformers' `early_stopping` for beam search.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EarlyStopping {
    /// `false` (the default): stop once no running beam can beat the worst finished one at its current
    /// length.
    #[default]
    Heuristic,
    /// `true`: stop as soon as `num_beams` hypotheses are finished.
    Always,
    /// `"never"`: stop only when no running beam could improve even at the maximum length.
    Never,
}

/// Boxed error of a model implementation.
pub type ModelError = Box<dyn std::error::Error + Send + Sync>;

/// A model the task runner can evaluate. Calls are batched; results come back in request order and
/// must not depend on how requests are batched or ordered.
///
/// The `*_answers` methods return the same values with what the model did to produce them
/// ([`Answers`]); the runner calls those. A model with nothing to report implements the three plain
/// methods only; one that reports implements [`AnsweringModel`] instead, which implements this.
pub trait LanguageModel {
    fn loglikelihood(
        &self,
        requests: &[LoglikelihoodRequest],
    ) -> Result<Vec<Loglikelihood>, ModelError>;
    /// Summed log-likelihood of each whole text (disjoint windows, see [`rolling_windows`]).
    fn loglikelihood_rolling(&self, texts: &[String]) -> Result<Vec<f64>, ModelError>;
    fn generate_until(&self, requests: &[GenerateRequest]) -> Result<Vec<String>, ModelError>;

    fn loglikelihood_answers(
        &self,
        requests: &[LoglikelihoodRequest],
    ) -> Result<Answers<Loglikelihood>, ModelError> {
        Ok(Answers::plain(self.loglikelihood(requests)?))
    }

    fn loglikelihood_rolling_answers(&self, texts: &[String]) -> Result<Answers<f64>, ModelError> {
        Ok(Answers::plain(self.loglikelihood_rolling(texts)?))
    }

    fn generate_until_answers(
        &self,
        requests: &[GenerateRequest],
    ) -> Result<Answers<String>, ModelError> {
        Ok(Answers::plain(self.generate_until(requests)?))
    }
}

/// A [`LanguageModel`] that reports what it did with every answer: implement these three and the
/// plain methods return the answers' values.
pub trait AnsweringModel {
    fn answer_loglikelihood(
        &self,
        requests: &[LoglikelihoodRequest],
    ) -> Result<Answers<Loglikelihood>, ModelError>;
    fn answer_rolling(&self, texts: &[String]) -> Result<Answers<f64>, ModelError>;
    fn answer_generate(&self, requests: &[GenerateRequest]) -> Result<Answers<String>, ModelError>;
}

impl<M: AnsweringModel> LanguageModel for M {
    fn loglikelihood(
        &self,
        requests: &[LoglikelihoodRequest],
    ) -> Result<Vec<Loglikelihood>, ModelError> {
        Ok(self.answer_loglikelihood(requests)?.values)
    }

    fn loglikelihood_rolling(&self, texts: &[String]) -> Result<Vec<f64>, ModelError> {
        Ok(self.answer_rolling(texts)?.values)
    }

    fn generate_until(&self, requests: &[GenerateRequest]) -> Result<Vec<String>, ModelError> {
        Ok(self.answer_generate(requests)?.values)
    }

    fn loglikelihood_answers(
        &self,
        requests: &[LoglikelihoodRequest],
    ) -> Result<Answers<Loglikelihood>, ModelError> {
        self.answer_loglikelihood(requests)
    }

    fn loglikelihood_rolling_answers(&self, texts: &[String]) -> Result<Answers<f64>, ModelError> {
        self.answer_rolling(texts)
    }

    fn generate_until_answers(
        &self,
        requests: &[GenerateRequest],
    ) -> Result<Answers<String>, ModelError> {
        self.answer_generate(requests)
    }
}

/// One call's answers and what the model did to produce them, as lm-evaluation-harness's
/// `Instance` carries its responses: per answer, the documents it drew on; per call, the tokens
/// routed to each expert and how many answers came from a cache.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answers<T> {
    pub values: Vec<T>,
    /// Per answer, in order: the retrieved sources that fed it. Empty when the model retrieves
    /// nothing.
    pub sources: Vec<Sources>,
    /// Tokens the call's forward passes routed to each expert, `[layer][expert]` (each token counted
    /// once per expert it was sent to). Empty for dense models and answers taken from a cache.
    pub routed: Vec<Vec<u64>>,
    /// Answers taken from a cache rather than computed.
    pub cached: usize,
}

impl<T> Answers<T> {
    /// Values with nothing else to report.
    pub fn plain(values: Vec<T>) -> Self {
        Answers {
            values,
            sources: Vec::new(),
            routed: Vec::new(),
            cached: 0,
        }
    }

    /// The sources of answer `i` (none when the model reported none).
    pub fn sources_of(&self, i: usize) -> Sources {
        self.sources.get(i).cloned().unwrap_or_default()
    }
}

/// Adds routed-token counts `[layer][expert]` (growing `total` to their shape).
pub fn add_routed(total: &mut Vec<Vec<u64>>, more: &[Vec<u64>]) {
    if total.len() < more.len() {
        total.resize(more.len(), Vec::new());
    }
    for (t, m) in total.iter_mut().zip(more) {
        if t.len() < m.len() {
            t.resize(m.len(), 0);
        }
        for (a, b) in t.iter_mut().zip(m) {
            *a += b;
        }
    }
}

/// The retrieved documents that fed one answer: how many units (windows or tokens) it scored and,
/// for each unit, the documents that contributed and with what weight.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sources {
    pub units: u32,
    pub contributions: Vec<Contribution>,
}

/// One retrieved document's share of one scored unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    pub unit: u32,
    pub block_id: u64,
    pub doc_id: String,
    pub owner: String,
    pub license: String,
    /// Share of the unit's prediction: BM25 score share for RIC-LM, lambda x neighbour weight for
    /// kNN-LM.
    pub weight: f64,
}

/// Python's `str.isspace`, which `str.rstrip` uses: Unicode whitespace plus the ASCII separators 0x1c-0x1f.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Tokenises a (context, continuation) pair the way lm-evaluation-harness does: trailing whitespace
/// of the context moves onto the continuation, the pair is encoded jointly, and the continuation is
/// whatever the joint encoding has beyond the context's own encoding. An empty context becomes
/// `[prefix_token]` (the BOS token, else EOS).
pub fn encode_pair<E>(
    encode: impl Fn(&str) -> Result<Vec<u32>, E>,
    context: &str,
    continuation: &str,
    prefix_token: u32,
) -> Result<(Vec<u32>, Vec<u32>), E> {
    if context.is_empty() {
        return Ok((vec![prefix_token], encode(continuation)?));
    }
    let trimmed = context.trim_end_matches(is_py_space);
    let moved = &context[trimmed.len()..];
    let whole = encode(&format!("{trimmed}{moved}{continuation}"))?;
    let ctx = encode(trimmed)?;
    let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    Ok((ctx, cont))
}

/// Keeps the last `max_length + 1` tokens of context + continuation (the model sees all but the last),
/// as the harness's left truncation does. At least one context token is kept.
pub fn truncate_left(ctx: Vec<u32>, cont: Vec<u32>, max_length: usize) -> (Vec<u32>, Vec<u32>) {
    let total = ctx.len() + cont.len();
    if total <= max_length + 1 {
        return (ctx, cont);
    }
    let mut all = ctx;
    let split = all.len();
    all.extend(cont);
    let start = total - (max_length + 1);
    let keep = all.split_off(start);
    let ctx_len = split.saturating_sub(start).max(1);
    let (c, k) = keep.split_at(ctx_len.min(keep.len() - 1));
    (c.to_vec(), k.to_vec())
}

/// Disjoint scoring windows of a token list for rolling log-likelihood (context length 1): the first
/// window is `[prefix_token]` then up to `max_length` tokens; each later window predicts the next
/// `max_length` tokens (fewer at the end) with as much preceding context as fits in `max_length + 1`.
/// Returns (context, continuation) pairs whose continuations tile the input exactly once.
pub fn rolling_windows(
    tokens: &[u32],
    prefix_token: u32,
    max_length: usize,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut out = Vec::new();
    if tokens.is_empty() || max_length == 0 {
        return out;
    }
    let first = max_length.min(tokens.len());
    out.push((vec![prefix_token], tokens[..first].to_vec()));
    let mut predicted = first;
    while predicted < tokens.len() {
        let n = (tokens.len() - predicted).min(max_length);
        let end = predicted + n;
        // Input window tokens[end - max_length - 1 .. end - 1], made disjoint from the predictions.
        let a_start = end - max_length - 1;
        let a = &tokens[a_start..end - 1];
        let ctx = &a[..a.len() - (n - 1)];
        out.push((ctx.to_vec(), tokens[end - n..end].to_vec()));
        predicted += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Result<Vec<u32>, ()> {
        Ok(s.chars().map(|c| c as u32).collect())
    }

    #[test]
    fn trailing_whitespace_moves_to_continuation() {
        let (c, k) = encode_pair(chars, "Q: a \n", "b", 0).unwrap();
        assert_eq!(c, chars("Q: a").unwrap());
        assert_eq!(k, chars(" \nb").unwrap());
        let (c, k) = encode_pair(chars, "", "xy", 7).unwrap();
        assert_eq!((c, k), (vec![7], chars("xy").unwrap()));
    }

    #[test]
    fn truncation_keeps_the_tail() {
        let (c, k) = truncate_left(vec![1, 2, 3, 4], vec![5, 6], 4);
        assert_eq!((c, k), (vec![2, 3, 4], vec![5, 6]));
        let (c, k) = truncate_left(vec![1], vec![2, 3, 4, 5], 2);
        assert_eq!((c, k), (vec![3], vec![4, 5]));
    }

    #[test]
    fn rolling_windows_match_the_harness() {
        // Values from lm_eval.utils.get_rolling_token_windows + make_disjoint_window,
        // token_list=range(10), prefix=-1 (here 99), max_seq_len=4, context_len=1.
        let t: Vec<u32> = (0..10).collect();
        let w = rolling_windows(&t, 99, 4);
        assert_eq!(
            w,
            vec![
                (vec![99], vec![0, 1, 2, 3]),
                (vec![3], vec![4, 5, 6, 7]),
                (vec![5, 6, 7], vec![8, 9]),
            ]
        );
    }
}
