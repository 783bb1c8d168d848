//! The request cache: every answered request is appended to a journal as soon as its batch
//! finishes, keyed by a hash of (model, expert mask, request). A run that was killed resumes from
//! it, a later run with other tasks reuses the requests they share, and shard merging re-scores
//! from it without a model.
//!
//! Layout: `CACHE_ROOT/<scope>/<writer>.jsonl`, one JSON object per line. Each process appends only
//! to its own file (so shards on a shared file system never interleave writes) and reads them all.
//! A line cut short by a crash is dropped when the journal is read and trimmed before appending.
//!
//! A shard keeps its journal in its own folder (so the folder alone can be merged on another
//! machine) and borrows answers from the shared cache ([`RequestCache::borrow_from`]): a borrowed
//! answer is copied into the shard's journal when the shard uses it.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tasks::{
    AnsweringModel, Answers, GenerateRequest, LanguageModel, Loglikelihood, LoglikelihoodRequest,
    ModelError, Sources,
};

use crate::error::{file_err, io, Result};
use crate::fsutil::hex;

/// A cached answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Loglikelihood(Loglikelihood),
    Rolling(f64),
    Generate(String),
}

/// The folder name of a (model, mask) scope: short, stable, and safe as a path component.
pub fn scope_name(weights_hash: &str, allowed: &[usize]) -> String {
    let mask: Vec<String> = allowed.iter().map(usize::to_string).collect();
    let short: String = weights_hash.chars().take(16).collect();
    let m = hex(&Sha256::digest(mask.join(",").as_bytes()));
    format!("{short}-{}", &m[..8])
}

/// Answers already computed in one scope, and the journal new answers go to.
pub struct RequestCache {
    scope: String,
    answers: HashMap<String, Answer>,
    /// Answers read from other folders, moved into `answers` (and the journal) when first used.
    borrowed: HashMap<String, Answer>,
    journal: Option<(PathBuf, std::fs::File)>,
}

fn key(scope: &str, kind: &str, parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in [scope.as_bytes(), kind.as_bytes()].iter().chain(parts) {
        // Length-prefixed, so no two part lists hash the same bytes.
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex(&h.finalize())
}

fn ll_key(scope: &str, r: &LoglikelihoodRequest) -> String {
    key(
        scope,
        "loglikelihood",
        &[r.context.as_bytes(), r.continuation.as_bytes()],
    )
}

fn roll_key(scope: &str, text: &str) -> String {
    key(scope, "rolling", &[text.as_bytes()])
}

fn gen_key(scope: &str, g: &GenerateRequest) -> String {
    let mut settings = json!([
        g.until,
        g.max_gen_toks,
        g.temperature.to_bits(),
        g.top_p.map(f64::to_bits),
        g.seed
    ]);
    // Beam settings join the key only for beam search, so journals written before beams existed
    // still answer the same requests.
    if g.num_beams > 1 {
        if let Some(a) = settings.as_array_mut() {
            a.push(json!([
                g.num_beams,
                g.length_penalty.to_bits(),
                format!("{:?}", g.early_stopping)
            ]));
        }
    }
    let settings = settings.to_string();
    key(
        scope,
        "generate",
        &[g.context.as_bytes(), settings.as_bytes()],
    )
}

/// The identity of a request within a scope: the key its answer is journaled under. Everything that
/// changes the answer is in it (for generation: stop strings, token budget, temperature, top-p, seed
/// and beam settings), so it is also what anything else keyed by request (retrieval's attribution
/// records) uses.
pub fn request_key(scope: &str, r: &tasks::task::Request) -> String {
    match r {
        tasks::task::Request::Loglikelihood(l) => ll_key(scope, l),
        tasks::task::Request::Rolling(t) => roll_key(scope, t),
        tasks::task::Request::Generate(g) => gen_key(scope, g),
    }
}

fn parse_line(line: &str) -> Option<(String, Answer)> {
    let v: Value = serde_json::from_str(line).ok()?;
    let k = v.get("k")?.as_str()?.to_string();
    // Floats are stored as their bit patterns so a resumed run is bit-identical.
    let a = if let Some(ll) = v.get("ll") {
        Answer::Loglikelihood(Loglikelihood {
            logprob: f64::from_bits(ll.get(0)?.as_u64()?),
            is_greedy: ll.get(1)?.as_bool()?,
        })
    } else if let Some(r) = v.get("roll") {
        Answer::Rolling(f64::from_bits(r.as_u64()?))
    } else {
        Answer::Generate(v.get("gen")?.as_str()?.to_string())
    };
    Some((k, a))
}

fn line(k: &str, a: &Answer) -> String {
    let v = match a {
        Answer::Loglikelihood(l) => json!({"k": k, "ll": [l.logprob.to_bits(), l.is_greedy]}),
        Answer::Rolling(x) => json!({"k": k, "roll": x.to_bits()}),
        Answer::Generate(s) => json!({"k": k, "gen": s}),
    };
    let mut s = v.to_string();
    s.push('\n');
    s
}

impl RequestCache {
    /// Reads every journal in `dir` (created if missing). With a `writer`, new answers are appended
    /// to `dir/<writer>.jsonl`; without one the cache is read-only.
    pub fn open(dir: &Path, scope: &str, writer: Option<&str>) -> Result<RequestCache> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut answers = HashMap::new();
        read_journals(dir, &mut answers)?;
        let journal = match writer {
            Some(w) => {
                if w.is_empty() || w.contains(['/', '\\']) {
                    return Err(file_err(dir, format!("bad journal name `{w}`")));
                }
                let path = dir.join(format!("{w}.jsonl"));
                trim_partial_line(&path)?;
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io(&path))?;
                Some((path, f))
            }
            None => None,
        };
        Ok(RequestCache {
            scope: scope.to_string(),
            answers,
            borrowed: HashMap::new(),
            journal,
        })
    }

    /// Also answers from the journals in `dir` (when it exists), without writing there: an answer
    /// used from it is appended to this cache's own journal, which so holds every answer its run
    /// used.
    pub fn borrow_from(&mut self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            read_journals(dir, &mut self.borrowed)?;
            self.borrowed.retain(|k, _| !self.answers.contains_key(k));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Appends answers to the journal and syncs it, then makes them visible.
    fn record(&mut self, new: Vec<(String, Answer)>) -> Result<()> {
        if let Some((path, f)) = &mut self.journal {
            let text: String = new.iter().map(|(k, a)| line(k, a)).collect();
            // Two writes, so fault-injection tests can die between them and leave a torn line (a
            // process killed there leaves the first half in the page cache, as a crash would).
            let (head, tail) = text.as_bytes().split_at(text.len() / 2);
            f.write_all(head).map_err(io(path))?;
            durable::fault::point("eval.journal-torn");
            f.write_all(tail).map_err(io(path))?;
            f.sync_data().map_err(io(path))?;
            durable::fault::point("eval.journaled");
        }
        self.answers.extend(new);
        Ok(())
    }
}

/// Reads every `*.jsonl` journal in `dir` (in name order) into `answers`.
fn read_journals(dir: &Path, answers: &mut HashMap<String, Answer>) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    for f in &files {
        let r = std::io::BufReader::new(std::fs::File::open(f).map_err(io(f))?);
        for l in r.lines() {
            let l = l.map_err(io(f))?;
            // Unreadable lines can only be the tail of a write a crash cut short.
            if let Some((k, a)) = parse_line(&l) {
                answers.insert(k, a);
            }
        }
    }
    Ok(())
}

/// Cuts a journal back to its last complete line, so an append never continues a torn one.
fn trim_partial_line(path: &Path) -> Result<()> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(());
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(keep as u64).map_err(io(path))
}

/// A [`LanguageModel`] that answers from a [`RequestCache`] and sends only the missing requests
/// to the inner model (or fails, naming how many are missing, when there is none). Its
/// [`Answers`] say how many came from the cache; those route nothing, and carry the sources the
/// inner model reported only when this process computed them (the journal keeps values only).
pub struct CachedLm<'a> {
    inner: Option<&'a dyn LanguageModel>,
    cache: Mutex<RequestCache>,
    /// Sources of answers computed by this process, for requests asked again (another task).
    sources: Mutex<HashMap<String, Sources>>,
}

impl<'a> CachedLm<'a> {
    pub fn new(inner: Option<&'a dyn LanguageModel>, cache: RequestCache) -> Self {
        CachedLm {
            inner,
            cache: Mutex::new(cache),
            sources: Mutex::new(HashMap::new()),
        }
    }

    fn answer<R, T>(
        &self,
        requests: &[R],
        key: impl Fn(&str, &R) -> String,
        compute: impl FnOnce(&dyn LanguageModel, Vec<R>) -> Result<Answers<T>, ModelError>,
        wrap: impl Fn(T) -> Answer,
        unwrap: impl Fn(&Answer) -> Option<T>,
    ) -> Result<Answers<T>, ModelError>
    where
        R: Clone,
    {
        let mut cache = self.cache.lock().map_err(|_| "request cache poisoned")?;
        let mut known = self.sources.lock().map_err(|_| "request cache poisoned")?;
        let keys: Vec<String> = requests.iter().map(|r| key(&cache.scope, r)).collect();
        let mut adopted = Vec::new();
        for k in &keys {
            if !cache.answers.contains_key(k) {
                if let Some(a) = cache.borrowed.remove(k) {
                    adopted.push((k.clone(), a));
                }
            }
        }
        if !adopted.is_empty() {
            cache.record(adopted).map_err(|e| e.to_string())?;
        }
        let missing: Vec<usize> = (0..requests.len())
            .filter(|&i| !cache.answers.contains_key(&keys[i]))
            .collect();
        let mut routed = Vec::new();
        if !missing.is_empty() {
            let Some(inner) = self.inner else {
                return Err(format!(
                    "{} of {} requests are not in the request cache (is a shard missing or unfinished?)",
                    missing.len(),
                    requests.len()
                )
                .into());
            };
            let batch: Vec<R> = missing.iter().map(|&i| requests[i].clone()).collect();
            let got = compute(inner, batch)?;
            if got.values.len() != missing.len() {
                return Err(format!(
                    "{} answers for {} requests",
                    got.values.len(),
                    missing.len()
                )
                .into());
            }
            for (j, &i) in missing.iter().enumerate() {
                let s = got.sources_of(j);
                if s.units > 0 || !s.contributions.is_empty() {
                    known.insert(keys[i].clone(), s);
                }
            }
            routed = got.routed;
            let new: Vec<(String, Answer)> = missing
                .iter()
                .map(|&i| keys[i].clone())
                .zip(got.values.into_iter().map(wrap))
                .collect();
            cache.record(new).map_err(|e| e.to_string())?;
        }
        let values = keys
            .iter()
            .map(|k| unwrap(&cache.answers[k]).ok_or("request cache: wrong answer kind"))
            .collect::<Result<Vec<T>, _>>()?;
        let sources = if known.is_empty() {
            Vec::new()
        } else {
            keys.iter()
                .map(|k| known.get(k).cloned().unwrap_or_default())
                .collect()
        };
        Ok(Answers {
            values,
            sources,
            routed,
            cached: requests.len() - missing.len(),
        })
    }
}

impl AnsweringModel for CachedLm<'_> {
    fn answer_loglikelihood(
        &self,
        requests: &[LoglikelihoodRequest],
    ) -> Result<Answers<Loglikelihood>, ModelError> {
        self.answer(
            requests,
            ll_key,
            |m, b| m.loglikelihood_answers(&b),
            Answer::Loglikelihood,
            |a| match a {
                Answer::Loglikelihood(l) => Some(*l),
                _ => None,
            },
        )
    }

    fn answer_rolling(&self, texts: &[String]) -> Result<Answers<f64>, ModelError> {
        self.answer(
            texts,
            |s, t| roll_key(s, t),
            |m, b| m.loglikelihood_rolling_answers(&b),
            Answer::Rolling,
            |a| match a {
                Answer::Rolling(x) => Some(*x),
                _ => None,
            },
        )
    }

    fn answer_generate(&self, requests: &[GenerateRequest]) -> Result<Answers<String>, ModelError> {
        self.answer(
            requests,
            gen_key,
            |m, b| m.generate_until_answers(&b),
            Answer::Generate,
            |a| match a {
                Answer::Generate(s) => Some(s.clone()),
                _ => None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Counts the requests it is asked; log-likelihood = -(context length + continuation length).
    struct Counting(Cell<usize>);

    impl LanguageModel for Counting {
        fn loglikelihood(
            &self,
            r: &[LoglikelihoodRequest],
        ) -> Result<Vec<Loglikelihood>, ModelError> {
            self.0.set(self.0.get() + r.len());
            Ok(r.iter()
                .map(|q| Loglikelihood {
                    logprob: -((q.context.len() + q.continuation.len()) as f64) / 3.0,
                    is_greedy: q.continuation.len() % 2 == 0,
                })
                .collect())
        }
        fn loglikelihood_rolling(&self, t: &[String]) -> Result<Vec<f64>, ModelError> {
            self.0.set(self.0.get() + t.len());
            Ok(t.iter().map(|s| -(s.len() as f64).sqrt()).collect())
        }
        fn generate_until(&self, r: &[GenerateRequest]) -> Result<Vec<String>, ModelError> {
            self.0.set(self.0.get() + r.len());
            Ok(r.iter().map(|g| g.context.to_uppercase()).collect())
        }
    }

    fn req(c: &str, k: &str) -> LoglikelihoodRequest {
        LoglikelihoodRequest {
            context: c.into(),
            continuation: k.into(),
        }
    }

    #[test]
    fn request_identity_covers_every_generation_setting() {
        use tasks::task::Request;
        let g = GenerateRequest {
            context: "hi".into(),
            until: vec!["\n".into()],
            max_gen_toks: 3,
            temperature: 0.0,
            top_p: None,
            seed: 1,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: tasks::EarlyStopping::Heuristic,
        };
        let key = |g: &GenerateRequest| request_key("", &Request::Generate(g.clone()));
        let variants = [
            GenerateRequest {
                temperature: 0.7,
                ..g.clone()
            },
            GenerateRequest {
                top_p: Some(0.9),
                ..g.clone()
            },
            GenerateRequest {
                seed: 2,
                ..g.clone()
            },
            GenerateRequest {
                num_beams: 3,
                ..g.clone()
            },
        ];
        for v in &variants {
            assert_ne!(key(&g), key(v), "{v:?}");
        }
        assert_eq!(key(&g), gen_key("", &g));
    }

    #[test]
    fn answers_persist_and_only_missing_requests_are_computed() {
        let d = tempfile::tempdir().unwrap();
        let m = Counting(Cell::new(0));
        let a = {
            let lm = CachedLm::new(
                Some(&m),
                RequestCache::open(d.path(), "s", Some("w1")).unwrap(),
            );
            let a = lm
                .loglikelihood_answers(&[req("a", "b"), req("ab", "c")])
                .unwrap();
            assert_eq!(a.cached, 0);
            lm.loglikelihood_rolling(&["xyz".into()]).unwrap();
            a.values
        };
        assert_eq!(m.0.get(), 3);
        // A second process (another journal) sees the first one's answers.
        let lm = CachedLm::new(
            Some(&m),
            RequestCache::open(d.path(), "s", Some("w2")).unwrap(),
        );
        let b = lm
            .loglikelihood_answers(&[req("ab", "c"), req("new", "d"), req("a", "b")])
            .unwrap();
        assert_eq!(m.0.get(), 4, "only the new request is computed");
        assert_eq!((b.values[0], b.values[2]), (a[1], a[0]));
        assert_eq!(b.cached, 2);
        // Another scope (model or mask) shares nothing.
        let lm = CachedLm::new(None, RequestCache::open(d.path(), "t", None).unwrap());
        let e = lm.loglikelihood(&[req("a", "b")]).unwrap_err().to_string();
        assert!(e.contains("1 of 1 requests"), "{e}");
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_trimmed() {
        let d = tempfile::tempdir().unwrap();
        let m = Counting(Cell::new(0));
        {
            let lm = CachedLm::new(
                Some(&m),
                RequestCache::open(d.path(), "s", Some("w")).unwrap(),
            );
            lm.generate_until(&[GenerateRequest {
                context: "hi".into(),
                until: vec!["\n".into()],
                max_gen_toks: 3,
                temperature: 0.0,
                top_p: None,
                seed: 1,
                num_beams: 1,
                length_penalty: 1.0,
                early_stopping: tasks::EarlyStopping::Heuristic,
            }])
            .unwrap();
            lm.loglikelihood_rolling(&["abc".into()]).unwrap();
        }
        let j = d.path().join("w.jsonl");
        let text = std::fs::read_to_string(&j).unwrap();
        // Simulate kill -9 in the middle of the second line.
        std::fs::write(&j, &text[..text.len() - 10]).unwrap();
        let c = RequestCache::open(d.path(), "s", Some("w")).unwrap();
        assert_eq!(c.len(), 1);
        let lm = CachedLm::new(Some(&m), c);
        lm.loglikelihood_rolling(&["abc".into()]).unwrap();
        let after = std::fs::read_to_string(&j).unwrap();
        assert_eq!(after.lines().count(), 2);
        assert!(after.lines().all(|l| parse_line(l).is_some()), "{after}");
    }

    #[test]
    fn floats_round_trip_exactly() {
        let x = Answer::Rolling(-0.1 - 0.2);
        let l = line("k", &x);
        assert_eq!(parse_line(l.trim_end()).unwrap().1, x);
    }
}
