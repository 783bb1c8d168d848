//! Translation edit rate as sacreBLEU computes it (its Tercom port): a beam-limited word edit
//! distance, plus greedy block shifts that each lower it, with Tercom's limits on shift size,
//! distance and the number of candidates tried. The limits and tie-breaks are part of the
//! number, so they are kept exactly.

const MAX_SHIFT_SIZE: usize = 10;
const MAX_SHIFT_DIST: usize = 50;
const BEAM_WIDTH: usize = 25;
const MAX_SHIFT_CANDIDATES: usize = 1000;
const INF: i64 = 10_000_000_000_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Nop,
    Sub,
    Ins,
    Del,
    Undef,
}

/// (edits, reference length) for one hypothesis against one reference.
pub fn translation_edit_rate(hyp: &[String], reference: &[String]) -> (usize, usize) {
    if reference.is_empty() {
        return (hyp.len(), 0);
    }
    let mut shifts = 0;
    let mut input = hyp.to_vec();
    let mut checked = 0;
    loop {
        let (delta, shifted, c) = shift(&input, reference, checked);
        checked = c;
        if checked >= MAX_SHIFT_CANDIDATES || delta <= 0 {
            break;
        }
        shifts += 1;
        input = shifted;
    }
    let (d, _) = edit_distance(&input, reference);
    (shifts + d as usize, reference.len())
}

/// The best single shift: (edit distance gained, shifted words, candidates checked so far).
fn shift(words_h: &[String], words_r: &[String], mut checked: usize) -> (i64, Vec<String>, usize) {
    let (pre, trace) = edit_distance(words_h, words_r);
    // The trace is from the reference's side; the alignment wants the hypothesis's.
    let trace: Vec<Op> = trace
        .into_iter()
        .map(|o| match o {
            Op::Ins => Op::Del,
            Op::Del => Op::Ins,
            o => o,
        })
        .collect();
    let (align, ref_err, hyp_err) = alignment(&trace);
    let mut best: Option<(i64, usize, i64, i64, Vec<String>)> = None;
    'pairs: for (start_h, start_r, len) in shifted_pairs(words_h, words_r) {
        if hyp_err[start_h..start_h + len].iter().sum::<usize>() == 0
            || ref_err[start_r..start_r + len].iter().sum::<usize>() == 0
        {
            continue;
        }
        let a = align[start_r];
        if start_h as i64 <= a && a < (start_h + len) as i64 {
            continue;
        }
        let mut prev: i64 = -1;
        for offset in -1..len as i64 {
            let r = start_r as i64 + offset;
            let idx = if r == -1 {
                0
            } else {
                match align.get(r as usize) {
                    Some(a) => a + 1,
                    None => break,
                }
            };
            if idx == prev {
                continue;
            }
            prev = idx;
            let shifted = perform_shift(words_h, start_h, len, idx as usize);
            let cand = (
                pre - edit_distance(&shifted, words_r).0,
                len,
                -(start_h as i64),
                -idx,
                shifted,
            );
            checked += 1;
            if best.as_ref().is_none_or(|b| cand > *b) {
                best = Some(cand);
            }
        }
        if checked >= MAX_SHIFT_CANDIDATES {
            break 'pairs;
        }
    }
    match best {
        None => (0, words_h.to_vec(), checked),
        Some((gain, _, _, _, shifted)) => (gain, shifted, checked),
    }
}

fn perform_shift(w: &[String], start: usize, len: usize, target: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(w.len());
    if target < start {
        out.extend_from_slice(&w[..target]);
        out.extend_from_slice(&w[start..start + len]);
        out.extend_from_slice(&w[target..start]);
        out.extend_from_slice(&w[start + len..]);
    } else if target > start + len {
        out.extend_from_slice(&w[..start]);
        out.extend_from_slice(&w[start + len..target]);
        out.extend_from_slice(&w[start..start + len]);
        out.extend_from_slice(&w[target..]);
    } else {
        // Tercom's third case (a target inside the block): its slice bounds, kept as they are.
        let cut = (len + target).min(w.len());
        out.extend_from_slice(&w[..start]);
        out.extend_from_slice(&w[(start + len).min(cut)..cut]);
        out.extend_from_slice(&w[start..start + len]);
        out.extend_from_slice(&w[cut..]);
    }
    out
}

/// Matching word blocks (start in hypothesis, start in reference, length), growing one word
/// at a time, in Tercom's order.
fn shifted_pairs(h: &[String], r: &[String]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for sh in 0..h.len() {
        for sr in 0..r.len() {
            if sr.abs_diff(sh) > MAX_SHIFT_DIST {
                continue;
            }
            let mut len = 0;
            while h[sh + len] == r[sr + len] && len < MAX_SHIFT_SIZE {
                len += 1;
                out.push((sh, sr, len));
                if h.len() == sh + len || r.len() == sr + len {
                    break;
                }
            }
        }
    }
    out
}

/// Reference position -> hypothesis position (-1 before the first hypothesis word), and the
/// error flags of reference and hypothesis words.
fn alignment(trace: &[Op]) -> (Vec<i64>, Vec<usize>, Vec<usize>) {
    let mut ph = -1i64;
    let (mut align, mut ref_err, mut hyp_err) = (Vec::new(), Vec::new(), Vec::new());
    for &op in trace {
        match op {
            Op::Nop | Op::Sub => {
                ph += 1;
                align.push(ph);
                let e = usize::from(op == Op::Sub);
                hyp_err.push(e);
                ref_err.push(e);
            }
            Op::Ins => {
                ph += 1;
                hyp_err.push(1);
            }
            Op::Del => {
                align.push(ph);
                ref_err.push(1);
            }
            Op::Undef => {}
        }
    }
    (align, ref_err, hyp_err)
}

/// Beam-limited edit distance of `h` against `r`, and its trace (from the reference's side).
fn edit_distance(h: &[String], r: &[String]) -> (i64, Vec<Op>) {
    let (nh, nr) = (h.len(), r.len());
    let mut dist = vec![vec![(INF, Op::Undef); nr + 1]; nh + 1];
    for (j, cell) in dist[0].iter_mut().enumerate() {
        *cell = (j as i64, Op::Ins);
    }
    let ratio = if nh > 0 { nr as f64 / nh as f64 } else { 1.0 };
    let beam = if (BEAM_WIDTH as f64) < ratio / 2.0 {
        (ratio / 2.0 + BEAM_WIDTH as f64).ceil() as i64
    } else {
        BEAM_WIDTH as i64
    };
    for i in 1..=nh {
        let diag = (i as f64 * ratio).floor() as i64;
        let min_j = (diag - beam).max(0) as usize;
        let max_j = if i == nh {
            nr + 1
        } else {
            (diag + beam).clamp(0, nr as i64 + 1) as usize
        };
        for j in min_j..max_j {
            if j == 0 {
                dist[i][0] = (dist[i - 1][0].0 + 1, Op::Del);
                continue;
            }
            let (cost_sub, op_sub) = if h[i - 1] == r[j - 1] {
                (0, Op::Nop)
            } else {
                (1, Op::Sub)
            };
            let ops = [
                (dist[i - 1][j - 1].0 + cost_sub, op_sub),
                (dist[i - 1][j].0 + 1, Op::Del),
                (dist[i][j - 1].0 + 1, Op::Ins),
            ];
            for (cost, op) in ops {
                if dist[i][j].0 > cost {
                    dist[i][j] = (cost, op);
                }
            }
        }
    }
    let mut trace = Vec::new();
    let (mut i, mut j) = (nh, nr);
    while i > 0 || j > 0 {
        let op = dist[i][j].1;
        trace.push(op);
        match op {
            Op::Sub | Op::Nop => {
                i -= 1;
                j -= 1;
            }
            Op::Ins => j -= 1,
            Op::Del => i -= 1,
            // Outside the beam: cannot happen on the path back from the full last row.
            Op::Undef => break,
        }
    }
    trace.reverse();
    (dist[nh][nr].0, trace)
}
