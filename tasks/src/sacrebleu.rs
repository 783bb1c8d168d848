//! BLEU, chrF and TER as sacreBLEU 2.x computes them with its defaults, which is how
//! lm-evaluation-harness reports `bleu`, `chrf` and `ter` (`corpus_bleu(preds, refs).score` and so
//! on): the `13a` tokeniser, `exp` smoothing, corpus-level statistics, several references per
//! segment. Scores are x100. `tasks/tests/metrics.rs` checks every function here against numbers
//! sacreBLEU itself produced.

use std::collections::HashMap;

use crate::pytext;

/// sacreBLEU's `13a` tokeniser (mteval-v13a): the result's tokens are its space-separated words.
pub fn tokenize_13a(line: &str) -> String {
    let mut s = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let chars: Vec<char> = format!(" {s} ").chars().collect();
    // Symbols other than `'`, `,`, `-`, `.` become words of their own.
    let mut a = Vec::with_capacity(chars.len() * 2);
    for c in chars {
        if matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/') {
            a.extend([' ', c, ' ']);
        } else {
            a.push(c);
        }
    }
    let digit = |c: char| c.is_ascii_digit();
    let dot = |c: char| c == '.' || c == ',';
    // Periods and commas split unless inside a number, then a hyphen after a digit splits. Each
    // pass mirrors one `re.sub` of a two-character pattern: leftmost matches, none overlapping.
    let a = two_char_pass(
        &a,
        |x, y| !digit(x) && dot(y),
        |x, y, o| o.extend([x, ' ', y, ' ']),
    );
    let a = two_char_pass(
        &a,
        |x, y| dot(x) && !digit(y),
        |x, y, o| o.extend([' ', x, ' ', y]),
    );
    let a = two_char_pass(
        &a,
        |x, y| digit(x) && y == '-',
        |x, y, o| o.extend([x, ' ', y, ' ']),
    );
    let s: String = a.into_iter().collect();
    pytext::split(&s).collect::<Vec<_>>().join(" ")
}

fn two_char_pass(
    s: &[char],
    hit: impl Fn(char, char) -> bool,
    put: impl Fn(char, char, &mut Vec<char>),
) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() * 2);
    let mut i = 0;
    while i < s.len() {
        if i + 1 < s.len() && hit(s[i], s[i + 1]) {
            put(s[i], s[i + 1], &mut out);
            i += 2;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

const MAX_ORDER: usize = 4;

/// Per-segment BLEU statistics: hypothesis length, closest reference length, matches and totals
/// per n-gram order. A corpus's BLEU is a function of their sum ([`bleu_from`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct BleuStats {
    hyp_len: usize,
    ref_len: usize,
    correct: [usize; MAX_ORDER],
    total: [usize; MAX_ORDER],
}

fn word_ngrams(tokens: &[&str]) -> HashMap<Vec<String>, usize> {
    let mut m = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in tokens.windows(n) {
            *m.entry(w.iter().map(|t| t.to_string()).collect())
                .or_insert(0) += 1;
        }
    }
    m
}

/// One segment's BLEU statistics against its references.
pub fn bleu_segment(hyp: &str, refs: &[&str]) -> BleuStats {
    let mut ref_ngrams: HashMap<Vec<String>, usize> = HashMap::new();
    let mut ref_lens = Vec::with_capacity(refs.len());
    for r in refs {
        let t = tokenize_13a(pytext::rstrip(r));
        let toks: Vec<&str> = pytext::split(&t).collect();
        ref_lens.push(toks.len());
        for (g, c) in word_ngrams(&toks) {
            let e = ref_ngrams.entry(g).or_insert(0);
            *e = (*e).max(c);
        }
    }
    let t = tokenize_13a(pytext::rstrip(hyp));
    let toks: Vec<&str> = pytext::split(&t).collect();
    let mut st = BleuStats {
        hyp_len: toks.len(),
        ..Default::default()
    };
    // The closest reference length; the shorter one on a tie.
    let mut best: Option<(usize, usize)> = None;
    for &l in &ref_lens {
        let d = l.abs_diff(st.hyp_len);
        if best.is_none_or(|(bd, bl)| d < bd || (d == bd && l < bl)) {
            best = Some((d, l));
        }
    }
    st.ref_len = best.map_or(0, |(_, l)| l);
    for (g, c) in word_ngrams(&toks) {
        let n = g.len() - 1;
        st.total[n] += c;
        if let Some(&rc) = ref_ngrams.get(&g) {
            st.correct[n] += c.min(rc);
        }
    }
    st
}

/// sacreBLEU's `log` for the geometric mean: a zero precision counts as a very large negative.
fn my_log(x: f64) -> f64 {
    if x == 0.0 {
        -9_999_999_999.0
    } else {
        x.ln()
    }
}

fn bleu_from_stats(st: &BleuStats, effective_order: bool) -> f64 {
    if st.correct.iter().all(|&c| c == 0) {
        return 0.0;
    }
    let bp = if st.hyp_len < st.ref_len {
        if st.hyp_len > 0 {
            (1.0 - st.ref_len as f64 / st.hyp_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0f64; MAX_ORDER];
    let mut smooth = 1.0;
    let mut eff_order = MAX_ORDER;
    for (n, (&correct, &total)) in st.correct.iter().zip(&st.total).enumerate() {
        if total == 0 {
            break;
        }
        if effective_order {
            eff_order = n + 1;
        }
        precisions[n] = if correct == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total as f64)
        } else {
            100.0 * correct as f64 / total as f64
        };
    }
    let s: f64 = precisions[..eff_order].iter().map(|&p| my_log(p)).sum();
    bp * (s / eff_order as f64).exp()
}

/// `sacrebleu.corpus_bleu(hyps, refs).score`: `refs[k][i]` is the `k`-th reference of segment
/// `i` (sacreBLEU's layout: one stream per reference). Streams shorter than `hyps` are an error.
pub fn corpus_bleu(hyps: &[&str], refs: &[Vec<&str>]) -> Result<f64, String> {
    let stats: Vec<BleuStats> = segments(hyps, refs)?
        .into_iter()
        .map(|(h, r)| bleu_segment(h, &r))
        .collect();
    Ok(bleu_from(&stats))
}

/// Corpus BLEU from segments' statistics (summed in order).
pub fn bleu_from<'a>(stats: impl IntoIterator<Item = &'a BleuStats>) -> f64 {
    let mut tot = BleuStats::default();
    for s in stats {
        tot.hyp_len += s.hyp_len;
        tot.ref_len += s.ref_len;
        for n in 0..MAX_ORDER {
            tot.correct[n] += s.correct[n];
            tot.total[n] += s.total[n];
        }
    }
    bleu_from_stats(&tot, false)
}

/// `sacrebleu.sentence_bleu(hyp, refs).score` (effective n-gram order).
pub fn sentence_bleu(hyp: &str, refs: &[&str]) -> f64 {
    bleu_from_stats(&bleu_segment(hyp, refs), true)
}

/// Pairs each hypothesis with its references, as sacreBLEU's `zip(*references)` does.
fn segments<'a>(
    hyps: &[&'a str],
    refs: &[Vec<&'a str>],
) -> Result<Vec<(&'a str, Vec<&'a str>)>, String> {
    if refs.is_empty() {
        return Err("no references".into());
    }
    if let Some(r) = refs.iter().find(|r| r.len() != hyps.len()) {
        return Err(format!(
            "a reference stream has {} segments for {} hypotheses",
            r.len(),
            hyps.len()
        ));
    }
    Ok(hyps
        .iter()
        .enumerate()
        .map(|(i, &h)| (h, refs.iter().map(|r| r[i]).collect()))
        .collect())
}

const CHRF_ORDER: usize = 6;
const CHRF_BETA: f64 = 2.0;

fn char_ngrams(s: &str) -> Vec<HashMap<String, usize>> {
    // chrF ignores whitespace: n-grams run over the words glued together.
    let chars: Vec<char> = pytext::split(s).flat_map(str::chars).collect();
    (1..=CHRF_ORDER)
        .map(|n| {
            let mut m = HashMap::new();
            for w in chars.windows(n) {
                *m.entry(w.iter().collect()).or_insert(0) += 1;
            }
            m
        })
        .collect()
}

/// chrF statistics: per character order, (hypothesis n-grams, reference n-grams, matches). A
/// corpus's chrF is a function of their sum ([`chrf_from`]).
pub type ChrfStats = [[usize; 3]; CHRF_ORDER];

fn chrf_score(st: &ChrfStats) -> f64 {
    const EPS: f64 = 1e-16;
    let factor = CHRF_BETA * CHRF_BETA;
    let (mut avg_prec, mut avg_rec, mut eff) = (0.0, 0.0, 0usize);
    for &[n_hyp, n_ref, n_match] in st {
        let prec = if n_hyp > 0 {
            n_match as f64 / n_hyp as f64
        } else {
            EPS
        };
        let rec = if n_ref > 0 {
            n_match as f64 / n_ref as f64
        } else {
            EPS
        };
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += prec;
            avg_rec += rec;
            eff += 1;
        }
    }
    if eff == 0 {
        return 0.0;
    }
    avg_prec /= eff as f64;
    avg_rec /= eff as f64;
    if avg_prec + avg_rec == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec)
}

/// One segment's chrF statistics against its best reference.
pub fn chrf_segment(hyp: &str, refs: &[&str]) -> ChrfStats {
    let h = char_ngrams(hyp);
    let mut best: Option<(f64, ChrfStats)> = None;
    for r in refs {
        let r = char_ngrams(r);
        let mut st = [[0usize; 3]; CHRF_ORDER];
        for (k, (hn, rn)) in h.iter().zip(&r).enumerate() {
            let hyp_count: usize = hn.values().sum();
            let matches: usize = hn
                .iter()
                .map(|(g, &c)| rn.get(g).map_or(0, |&rc| c.min(rc)))
                .sum();
            // sacreBLEU counts no hypothesis n-grams against an empty reference.
            st[k] = [
                if rn.is_empty() { 0 } else { hyp_count },
                rn.values().sum(),
                matches,
            ];
        }
        let f = chrf_score(&st);
        if best.as_ref().is_none_or(|(bf, _)| f > *bf) {
            best = Some((f, st));
        }
    }
    best.map_or([[0; 3]; CHRF_ORDER], |(_, st)| st)
}

/// `sacrebleu.corpus_chrf(hyps, refs).score` (chrF2: character 6-grams, no word n-grams).
pub fn corpus_chrf(hyps: &[&str], refs: &[Vec<&str>]) -> Result<f64, String> {
    let stats: Vec<ChrfStats> = segments(hyps, refs)?
        .into_iter()
        .map(|(h, r)| chrf_segment(h, &r))
        .collect();
    Ok(chrf_from(&stats))
}

/// Corpus chrF from segments' statistics (summed in order).
pub fn chrf_from<'a>(stats: impl IntoIterator<Item = &'a ChrfStats>) -> f64 {
    let mut tot = [[0usize; 3]; CHRF_ORDER];
    for st in stats {
        for (t, s) in tot.iter_mut().zip(st) {
            for k in 0..3 {
                t[k] += s[k];
            }
        }
    }
    chrf_score(&tot)
}

/// `sacrebleu.corpus_ter(hyps, refs).score`: case-insensitive, no tokenisation beyond
/// whitespace (sacreBLEU's defaults).
pub fn corpus_ter(hyps: &[&str], refs: &[Vec<&str>]) -> Result<f64, String> {
    let stats: Vec<(usize, f64)> = segments(hyps, refs)?
        .into_iter()
        .map(|(h, r)| ter_segment(h, &r))
        .collect();
    Ok(ter_from(&stats))
}

/// Corpus TER from segments' (edits, mean reference length), summed in order.
pub fn ter_from<'a>(stats: impl IntoIterator<Item = &'a (usize, f64)>) -> f64 {
    let (mut edits, mut ref_len) = (0.0f64, 0.0f64);
    for &(e, l) in stats {
        edits += e as f64;
        ref_len += l;
    }
    100.0
        * if ref_len > 0.0 {
            edits / ref_len
        } else if edits > 0.0 {
            1.0
        } else {
            0.0
        }
}

/// The best number of edits over the references, and the mean reference length.
pub fn ter_segment(hyp: &str, refs: &[&str]) -> (usize, f64) {
    let words = |s: &str| -> Vec<String> {
        pytext::split(&pytext::rstrip(s).to_lowercase())
            .map(str::to_string)
            .collect()
    };
    let h = words(hyp);
    let mut best = usize::MAX;
    let mut lens = 0usize;
    for r in refs {
        let (e, l) = crate::ter::translation_edit_rate(&h, &words(r));
        lens += l;
        best = best.min(e);
    }
    (best, lens as f64 / refs.len().max(1) as f64)
}
