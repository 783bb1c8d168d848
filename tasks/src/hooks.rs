//! Python hooks: a task's `!function` code (lm-evaluation-harness's `process_docs`, `doc_to_text` /
//! `doc_to_target` / `doc_to_choice`, `process_results`, metric, aggregation and filter functions),
//! run in one long-lived Python worker per [`Hooks`] handle.
//!
//! Invariants:
//! - Python starts only for tasks that have hooks: when [`Hooks::warm`] is given their functions
//!   (in the background, while data and the model load) or at the first hook call, so everything
//!   without hooks runs with no Python installed.
//! - One worker per handle (clones share it): each module is imported once, and each call is one
//!   request and one reply however many documents it carries, so a document costs microseconds of
//!   transport, not a process.
//! - A failed call is an [`Error::Hook`] naming the task file, the task, the field, the function and
//!   its file, the document (or split) and the Python traceback. A worker that died is started
//!   again by the next call.
//! - Documents keep their key order both ways (serde_json `preserve_order`, Python dicts).
//!
//! The interpreter is `--python PATH`, else `MOEVAL_PYTHON`, else `python3` on `PATH`: the
//! environment that holds the task's own dependencies (`datasets` for `process_docs`), as any
//! lm-evaluation-harness user's does. The protocol is JSON lines (see `hooks_worker.py`).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Function;
use crate::dataset::Doc;
use crate::error::{Error, HookFailure, Result};

/// The environment variable naming the Python interpreter (overridden by `--python`).
pub const PYTHON_ENV: &str = "MOEVAL_PYTHON";

/// The worker's source, run with `python -u -c`.
const WORKER: &str = include_str!("hooks_worker.py");

/// What to do when the interpreter is missing or wrong, appended to those errors.
const HOW_TO_CHOOSE: &str =
    "name the Python that has your task's dependencies with `--python PATH` \
     or the MOEVAL_PYTHON environment variable";

/// Lines of the worker's stderr kept for the message when it dies.
const STDERR_TAIL: usize = 40;

/// A handle on the Python hook worker: the interpreter to use and, once a hook has run, the
/// worker process. Cheap to clone; clones share the worker, which ends when the last one is
/// dropped.
#[derive(Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

struct Inner {
    python: PathBuf,
    /// How the interpreter was chosen, for error messages.
    chosen_by: &'static str,
    worker: Mutex<Option<Worker>>,
    stats: Mutex<HookStats>,
}

/// Time spent in hook calls so far (transport, Python and conversions), for cost reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HookStats {
    /// Calls answered (one per batch).
    pub calls: usize,
    /// Items (documents, pairs, values) those calls carried.
    pub items: usize,
    /// Wall time of those calls (worker start-up included when no [`Hooks::warm`] did it).
    pub seconds: f64,
    /// Wall time of [`Hooks::warm`]'s background start-up and imports, which overlaps loading.
    pub warm_seconds: f64,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("python", &self.inner.python)
            .field("chosen_by", &self.inner.chosen_by)
            .field("started", &self.started())
            .finish()
    }
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks::new(None)
    }
}

/// Where a batch comes from, for error messages.
#[derive(Clone, Copy, Debug)]
pub struct Site<'a> {
    /// The task's YAML file.
    pub file: &'a Path,
    pub task: &'a str,
    /// The field that names the hook: `process_docs`, `doc_to_text`, `metric`, `filter`, ...
    pub field: &'a str,
    pub items: Items<'a>,
}

/// What a batch's items are, so an error can name the one that failed.
#[derive(Clone, Copy, Debug)]
pub enum Items<'a> {
    /// Documents (or one value per document): `label` names one (`doc`, `few-shot doc`), `ids`
    /// are their ids in batch order (empty: item i is document i). An error names `doc 17`.
    Docs { label: &'a str, ids: &'a [usize] },
    /// What the call covers as a whole (`split `test``, `metric `acc``), named as it is.
    Whole(&'a str),
}

impl<'a> Site<'a> {
    /// A site whose items are the task's documents in order (item i is doc i).
    pub fn docs(file: &'a Path, task: &'a str, field: &'a str) -> Site<'a> {
        Site {
            file,
            task,
            field,
            items: Items::Docs {
                label: "doc",
                ids: &[],
            },
        }
    }

    /// `index`: the failing item, if the worker knows it; `n`: the batch's items.
    fn at(&self, index: Option<usize>, n: usize) -> String {
        match (self.items, index) {
            (Items::Whole(w), _) => w.to_string(),
            (Items::Docs { label, ids }, Some(i)) => {
                format!("{label} {}", ids.get(i).copied().unwrap_or(i))
            }
            (Items::Docs { label, ids }, None) if n == 1 => {
                format!("{label} {}", ids.first().copied().unwrap_or(0))
            }
            (Items::Docs { label, .. }, None) => format!("{n} {label}s"),
        }
    }

    fn error(&self, f: &Function, index: Option<usize>, n: usize, msg: impl Into<String>) -> Error {
        Error::Hook(Box::new(HookFailure {
            file: self.file.to_path_buf(),
            task: self.task.to_string(),
            field: self.field.to_string(),
            function: f.to_string(),
            at: self.at(index, n),
            msg: msg.into(),
        }))
    }
}

/// One request to the worker; `args` holds the operation's own keys.
#[derive(Serialize)]
struct Request<'a, A: Serialize> {
    op: &'a str,
    file: String,
    module: &'a str,
    name: &'a str,
    #[serde(flatten)]
    args: A,
}

#[derive(Deserialize)]
struct Reply {
    ok: Option<Value>,
    error: Option<ReplyError>,
}

#[derive(Deserialize)]
struct ReplyError {
    /// The failing item, when the failure is one item's.
    index: Option<usize>,
    /// `load` (module or function), `raised` (`text` is the traceback), `result` (an unusable
    /// return value), `missing` (a package; `text` says how to install it), `worker` (a bug).
    stage: String,
    text: String,
}

#[derive(Deserialize)]
struct Ready {
    ready: bool,
    python: String,
}

impl Hooks {
    /// A handle for `python` (`--python`), else `MOEVAL_PYTHON`, else `python3` on `PATH`. Starts
    /// nothing.
    pub fn new(python: Option<PathBuf>) -> Hooks {
        let (python, chosen_by) = match python {
            Some(p) => (p, "--python"),
            None => match std::env::var_os(PYTHON_ENV).filter(|v| !v.is_empty()) {
                Some(p) => (PathBuf::from(p), "MOEVAL_PYTHON"),
                None => (PathBuf::from("python3"), "the default, python3 on PATH"),
            },
        };
        Hooks {
            inner: Arc::new(Inner {
                python,
                chosen_by,
                worker: Mutex::new(None),
                stats: Mutex::new(HookStats::default()),
            }),
        }
    }

    /// The interpreter hooks run in.
    pub fn python(&self) -> &Path {
        &self.inner.python
    }

    /// Whether the worker process is running (it starts on the first hook call).
    pub fn started(&self) -> bool {
        lock(&self.inner.worker).is_some()
    }

    /// Calls, items and time so far.
    pub fn stats(&self) -> HookStats {
        *lock(&self.inner.stats)
    }

    /// Starts the worker in the background and imports the modules of `functions` (and `datasets`
    /// when `datasets`: `process_docs` hooks get a `datasets.Dataset`), so Python's start-up and
    /// imports overlap with loading data and the model. Hook calls wait for it; a failure is left
    /// to the first call that needs the module, which reports it as usual. Does nothing when
    /// `functions` is empty.
    pub fn warm<'a>(&self, functions: impl IntoIterator<Item = &'a Function>, datasets: bool) {
        #[derive(Serialize)]
        struct Preload {
            op: &'static str,
            /// `[module name, file]` pairs, each file once.
            modules: Vec<(String, String)>,
            datasets: bool,
        }
        let mut modules: Vec<(String, String)> = functions
            .into_iter()
            .map(|f| (f.module.clone(), f.file().to_string_lossy().into_owned()))
            .collect();
        if modules.is_empty() {
            return;
        }
        modules.sort_by(|a, b| a.1.cmp(&b.1));
        modules.dedup_by(|a, b| a.1 == b.1);
        let req = Preload {
            op: "preload",
            modules,
            datasets,
        };
        let hooks = self.clone();
        std::thread::spawn(move || {
            let mut slot = lock(&hooks.inner.worker);
            let t0 = Instant::now();
            if slot.is_none() {
                match hooks.start() {
                    Ok(w) => *slot = Some(w),
                    Err(_) => return, // the first call starts it again and says why
                }
            }
            if let Some(w) = slot.as_mut() {
                if w.exchange(&req).is_err() {
                    slot.take().map(Worker::end);
                }
            }
            drop(slot);
            lock(&hooks.inner.stats).warm_seconds += t0.elapsed().as_secs_f64();
        });
    }

    /// `process_docs` on one split: the worker builds `datasets.Dataset.from_list(docs)`, calls the
    /// hook and returns its rows (`Dataset.to_list()`, or the list it returned).
    pub fn process_docs(&self, f: &Function, docs: &[Doc], site: &Site) -> Result<Vec<Doc>> {
        #[derive(Serialize)]
        struct A<'a> {
            docs: &'a [Doc],
        }
        let out = self.call("process_docs", f, A { docs }, docs.len(), site)?;
        match out {
            Value::Array(rows) => rows
                .into_iter()
                .map(|r| match r {
                    Value::Object(d) => Ok(d),
                    other => Err(site.error(
                        f,
                        None,
                        docs.len(),
                        format!("returned a row that is not a mapping: {other}"),
                    )),
                })
                .collect(),
            other => Err(site.error(
                f,
                None,
                docs.len(),
                format!("returned {other}, not a list of rows"),
            )),
        }
    }

    /// A per-document hook (`doc_to_text`, `doc_to_target`, `doc_to_choice`): one value per
    /// document, as the function returned it (tuples as lists, numpy values as numbers).
    pub fn doc_field(&self, f: &Function, docs: &[&Doc], site: &Site) -> Result<Vec<Value>> {
        #[derive(Serialize)]
        struct A<'a> {
            docs: &'a [&'a Doc],
        }
        let out = self.call("map", f, A { docs }, docs.len(), site)?;
        list_of(out, docs.len(), f, site)
    }

    /// `process_results(doc, results)` per document: one mapping of metric name to value each.
    /// Non-finite floats come back as the strings `NaN`, `Infinity`, `-Infinity` (read them with
    /// [`number`]).
    pub fn process_results(
        &self,
        f: &Function,
        items: &[(&Doc, Value)],
        site: &Site,
    ) -> Result<Vec<Map<String, Value>>> {
        #[derive(Serialize)]
        struct A<'a> {
            items: &'a [(&'a Doc, Value)],
        }
        let out = self.call("process_results", f, A { items }, items.len(), site)?;
        list_of(out, items.len(), f, site)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(m) => Ok(m),
                other => Err(site.error(
                    f,
                    Some(i),
                    items.len(),
                    format!("returned {other}, not a dict"),
                )),
            })
            .collect()
    }

    /// A `metric: !function` per document, called as lm-evaluation-harness calls it:
    /// `f(references=[gold], predictions=[result], **kwargs)`, or `f([gold, result])` when that
    /// raises `TypeError`. Each value is a number or a mapping of metric names to numbers
    /// (non-finite floats as in [`Hooks::process_results`]).
    pub fn metric(
        &self,
        f: &Function,
        items: &[(Value, Value)],
        kwargs: &Map<String, Value>,
        site: &Site,
    ) -> Result<Vec<Value>> {
        #[derive(Serialize)]
        struct A<'a> {
            items: &'a [(Value, Value)],
            kwargs: &'a Map<String, Value>,
        }
        let out = self.call("metric", f, A { items, kwargs }, items.len(), site)?;
        list_of(out, items.len(), f, site)
    }

    /// An `aggregation: !function` over a metric's per-document values: `f(items)`, a number.
    pub fn aggregation(&self, f: &Function, items: &[Value], site: &Site) -> Result<f64> {
        #[derive(Serialize)]
        struct A<'a> {
            items: &'a [Value],
        }
        let out = self.call("aggregation", f, A { items }, items.len(), site)?;
        number(&out).ok_or_else(|| {
            site.error(
                f,
                None,
                items.len(),
                format!("returned {out}, not a number"),
            )
        })
    }

    /// A Python filter over every document's responses at once, one filtered entry per document:
    /// a `function: custom` filter's `filter_fn(resps, docs)` (`class_kwargs: None`), or a filter
    /// class as lm-evaluation-harness runs it, `Class(**class_kwargs).apply(resps, docs)`.
    pub fn filter(
        &self,
        f: &Function,
        class_kwargs: Option<&Map<String, Value>>,
        resps: &[Value],
        docs: &[&Doc],
        site: &Site,
    ) -> Result<Vec<Value>> {
        #[derive(Serialize)]
        struct A<'a> {
            resps: &'a [Value],
            docs: &'a [&'a Doc],
            #[serde(skip_serializing_if = "Option::is_none")]
            class_kwargs: Option<&'a Map<String, Value>>,
        }
        let args = A {
            resps,
            docs,
            class_kwargs,
        };
        let out = self.call("filter", f, args, resps.len(), site)?;
        list_of(out, resps.len(), f, site)
    }

    /// Sends one request and reads its reply, starting the worker if needed.
    fn call<A: Serialize>(
        &self,
        op: &str,
        f: &Function,
        args: A,
        items: usize,
        site: &Site,
    ) -> Result<Value> {
        let req = Request {
            op,
            file: f.file().to_string_lossy().into_owned(),
            module: &f.module,
            name: &f.name,
            args,
        };
        let mut slot = lock(&self.inner.worker);
        // Timed from here: waiting for a background start-up is counted by `warm_seconds`.
        let t0 = Instant::now();
        let worker = match &mut *slot {
            Some(w) => w,
            empty => empty.insert(self.start().map_err(|m| site.error(f, None, items, m))?),
        };
        let reply = match worker.exchange(&req) {
            Ok(r) => r,
            Err(problem) => {
                // The worker is unusable: end it and say why, with what it last wrote.
                let dead = slot.take().map(Worker::end).unwrap_or_default();
                return Err(site.error(
                    f,
                    None,
                    items,
                    format!(
                        "the Python hook worker ({}) {problem}{dead}",
                        self.inner.python.display()
                    ),
                ));
            }
        };
        drop(slot);
        {
            let mut s = lock(&self.inner.stats);
            s.calls += 1;
            s.items += items;
            s.seconds += t0.elapsed().as_secs_f64();
        }
        match reply {
            Reply { ok: Some(v), .. } => Ok(v),
            Reply { error: Some(e), .. } => {
                let text = e.text.trim_end();
                let msg = match e.stage.as_str() {
                    "load" => format!("cannot load the hook: {text}"),
                    "raised" => format!("the hook raised an exception:\n{text}"),
                    "worker" => format!("the hook worker failed (a moeval bug):\n{text}"),
                    _ => text.to_string(),
                };
                Err(site.error(f, e.index, items, msg))
            }
            Reply { .. } => Err(site.error(f, None, items, "the hook worker sent an empty reply")),
        }
    }

    /// Starts the worker and waits for its greeting.
    fn start(&self) -> std::result::Result<Worker, String> {
        let python = &self.inner.python;
        let who = || {
            format!(
                "Python interpreter `{}` (chosen by {})",
                python.display(),
                self.inner.chosen_by
            )
        };
        let mut child = Command::new(python)
            .arg("-u")
            .arg("-c")
            .arg(WORKER)
            // Importing a hook module must not write __pycache__ into the task's folder.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the {}: {e}; {HOW_TO_CHOOSE}", who()))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("cannot talk to the {}", who()));
        };
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_thread = Some(spawn_stderr_echo(stderr, Arc::clone(&tail)));
        let mut worker = Worker {
            child,
            stdin: Some(BufWriter::new(stdin)),
            stdout: BufReader::new(stdout),
            tail,
            stderr_thread,
        };
        let mut line = String::new();
        let greeting = match worker.stdout.read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str::<Ready>(&line).ok(),
            _ => None,
        };
        match greeting {
            Some(r) if r.ready && python_version_ok(&r.python) => Ok(worker),
            Some(r) => {
                let _ = worker.end();
                Err(format!(
                    "the {} is Python {}; hooks need Python 3.8 or newer; {HOW_TO_CHOOSE}",
                    who(),
                    r.python
                ))
            }
            None => {
                let dead = worker.end();
                Err(format!(
                    "the {} did not start the hook worker (is it Python 3?){dead}; {HOW_TO_CHOOSE}",
                    who()
                ))
            }
        }
    }
}

fn python_version_ok(v: &str) -> bool {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (3, 8)
}

/// A reply's list, checked to hold one entry per item.
fn list_of(v: Value, n: usize, f: &Function, site: &Site) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) if a.len() == n => Ok(a),
        Value::Array(a) => Err(site.error(
            f,
            None,
            n,
            format!("returned {} entries for {n} items", a.len()),
        )),
        other => Err(site.error(f, None, n, format!("returned {other}, not a list"))),
    }
}

/// A hook's number: a JSON number, a boolean (Python's `True` is 1), or one of the strings the
/// worker writes for non-finite floats (`NaN`, `Infinity`, `-Infinity`).
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// The worker process and its pipes.
struct Worker {
    child: Child,
    /// `None` once closed (which ends the worker's loop).
    stdin: Option<BufWriter<ChildStdin>>,
    stdout: BufReader<ChildStdout>,
    /// The last lines the worker wrote to stderr (all of them are echoed to ours).
    tail: Arc<Mutex<VecDeque<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Writes a request line and reads the reply line; `Err` says what went wrong with the worker
    /// (not with the hook).
    fn exchange(&mut self, req: &impl Serialize) -> std::result::Result<Reply, String> {
        let Some(w) = self.stdin.as_mut() else {
            return Err("was shut down".into());
        };
        let sent = serde_json::to_writer(&mut *w, req)
            .map_err(std::io::Error::from)
            .and_then(|()| w.write_all(b"\n"))
            .and_then(|()| w.flush());
        if let Err(e) = sent {
            return Err(format!("stopped reading requests ({e})"));
        }
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err("exited during the call".into()),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| format!("sent a reply moeval cannot read ({e})")),
            Err(e) => Err(format!("could not be read from ({e})")),
        }
    }

    /// Ends the worker (closing its input ends its loop; one still busy is killed after a grace
    /// period) and describes how it ended, with its last stderr lines.
    fn end(mut self) -> String {
        self.shut_down()
    }

    fn shut_down(&mut self) -> String {
        // Dropping the writer closes the pipe.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
            }
        };
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let tail: Vec<String> = lock(&self.tail).iter().cloned().collect();
        let mut out = String::new();
        if let Some(s) = status.filter(|s| !s.success()) {
            out.push_str(&format!(" ({s})"));
        }
        if !tail.is_empty() {
            out.push_str(&format!("; its last output:\n{}\n", tail.join("\n")));
        }
        out
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // `end` has already shut it down when the echo thread is gone.
        if self.stderr_thread.is_some() {
            let _ = self.shut_down();
        }
    }
}

/// Echoes the worker's stderr (hooks' prints, warnings) to ours, keeping the last lines.
fn spawn_stderr_echo(
    stderr: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stderr);
        let mut buf = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf);
            eprint!("{line}");
            let mut t = lock(&tail);
            if t.len() == STDERR_TAIL {
                t.pop_front();
            }
            t.push_back(line.trim_end().chars().take(2000).collect());
            buf.clear();
        }
    })
}

/// A mutex's data, also after a panic elsewhere (the data stay consistent: every update is one
/// assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Hook modules used below, written to a temporary folder.
    const MODULE: &str = r#"
import os
try:
    import numpy as np
except ImportError:  # numpy values are converted when numpy exists; plain Python 3 runs the rest
    np = None

IMPORTS = globals().get("IMPORTS", 0) + 1

def text(doc):
    print("hooks may print; the protocol does not notice")
    return "Q: " + doc["q"]

def target(doc):
    return np.int64(doc["label"]) if np else doc["label"]

def choices(doc):
    return tuple(doc["options"])

def whole(doc):
    return doc

def imports(doc):
    return IMPORTS

def results(doc, results):
    ll, greedy = results[0]
    acc = 1.0 if greedy else 0.0
    return {"acc": np.float64(acc) if np else acc, "ll": ll, "nan": float("nan"), "pair": (doc["label"], 1)}

def em(references, predictions, ignore_case=False):
    r, p = references[0], predictions[0]
    if ignore_case:
        r, p = r.lower(), p.lower()
    return float(r == p)

def positional(items):
    gold, result = items
    return {"same": int(gold == result)}

def total(items):
    return np.mean(items) if np else sum(items) / len(items)

def nothing(items):
    return float("nan")

def first_word(resps, docs):
    return ([r[0].split()[0]] for r in resps)

def explode(doc):
    if doc["label"] == 2:
        return 1 / 0
    return "fine"

def die(doc):
    os._exit(3)

def ds_type(ds):
    return [{"type": type(ds).__name__}]
"#;

    fn module(dir: &Path) -> impl Fn(&str) -> Function + '_ {
        std::fs::write(dir.join("hookmod.py"), MODULE).unwrap();
        move |name: &str| Function {
            dir: dir.to_path_buf(),
            module: "hookmod".into(),
            name: name.into(),
        }
    }

    fn site<'a>(field: &'a str, ids: &'a [usize]) -> Site<'a> {
        Site {
            items: Items::Docs { label: "doc", ids },
            ..Site::docs(Path::new("tasks/t.yaml"), "t", field)
        }
    }

    fn docs() -> Vec<Doc> {
        (0..4)
            .map(|i| {
                json!({"q": format!("q{i}"), "label": i, "options": ["a", "b"]})
                    .as_object()
                    .unwrap()
                    .clone()
            })
            .collect()
    }

    fn python3() -> Hooks {
        Hooks::new(Some("python3".into()))
    }

    #[test]
    fn field_hooks_run_in_one_batch_per_call_and_keep_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = module(dir.path());
        let hooks = python3();
        assert!(!hooks.started());
        let docs = docs();
        let refs: Vec<&Doc> = docs.iter().collect();
        let texts = hooks
            .doc_field(&f("text"), &refs, &site("doc_to_text", &[]))
            .unwrap();
        assert!(hooks.started());
        assert_eq!(
            texts,
            vec![
                json!("Q: q0"),
                json!("Q: q1"),
                json!("Q: q2"),
                json!("Q: q3")
            ]
        );
        let targets = hooks
            .doc_field(&f("target"), &refs, &site("doc_to_target", &[]))
            .unwrap();
        assert_eq!(targets, vec![json!(0), json!(1), json!(2), json!(3)]);
        let choices = hooks
            .doc_field(&f("choices"), &refs, &site("doc_to_choice", &[]))
            .unwrap();
        assert_eq!(choices[0], json!(["a", "b"]));
        let back = hooks
            .doc_field(&f("whole"), &refs, &site("doc_to_target", &[]))
            .unwrap();
        let keys: Vec<&String> = back[0].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["q", "label", "options"]);
        // Each module is imported once per worker.
        let n = hooks
            .doc_field(&f("imports"), &refs, &site("doc_to_text", &[]))
            .unwrap();
        assert_eq!(n[3], json!(1));
        let s = hooks.stats();
        assert_eq!((s.calls, s.items), (5, 20));
    }

    #[test]
    fn scoring_hooks_process_results_metrics_aggregations_filters() {
        let dir = tempfile::tempdir().unwrap();
        let f = module(dir.path());
        let hooks = python3();
        let docs = docs();
        let items = vec![
            (&docs[0], json!([[-1.5, true]])),
            (&docs[1], json!([[-2.0, false]])),
        ];
        let r = hooks
            .process_results(&f("results"), &items, &site("process_results", &[]))
            .unwrap();
        assert_eq!(r[0]["acc"], json!(1.0));
        assert_eq!(r[1]["acc"], json!(0.0));
        assert_eq!(r[1]["ll"], json!(-2.0));
        assert!(number(&r[0]["nan"]).unwrap().is_nan());
        assert_eq!(r[1]["pair"], json!([1, 1]));
        let pairs = vec![
            (json!("Paris"), json!("paris")),
            (json!("Rome"), json!("Rome")),
        ];
        let mut kw = Map::new();
        let m = hooks
            .metric(&f("em"), &pairs, &kw, &site("metric", &[]))
            .unwrap();
        assert_eq!(m, vec![json!(0.0), json!(1.0)]);
        kw.insert("ignore_case".into(), json!(true));
        let m = hooks
            .metric(&f("em"), &pairs, &kw, &site("metric", &[]))
            .unwrap();
        assert_eq!(m, vec![json!(1.0), json!(1.0)]);
        // A function of one `[gold, result]` list, as the harness falls back to.
        let m = hooks
            .metric(&f("positional"), &pairs, &Map::new(), &site("metric", &[]))
            .unwrap();
        assert_eq!(m, vec![json!({"same": 0}), json!({"same": 1})]);
        let agg = hooks
            .aggregation(
                &f("total"),
                &[json!(1), json!(0), json!(1), json!(1)],
                &site("aggregation", &[]),
            )
            .unwrap();
        assert_eq!(agg, 0.75);
        let nan = hooks
            .aggregation(&f("nothing"), &[], &site("aggregation", &[]))
            .unwrap();
        assert!(nan.is_nan());
        let resps = vec![json!(["hello world"]), json!(["bye now"])];
        let refs: Vec<&Doc> = docs[..2].iter().collect();
        let out = hooks
            .filter(&f("first_word"), None, &resps, &refs, &site("filter", &[]))
            .unwrap();
        assert_eq!(out, vec![json!(["hello"]), json!(["bye"])]);
    }

    #[test]
    fn a_raising_hook_names_task_function_document_and_traceback() {
        let dir = tempfile::tempdir().unwrap();
        let f = module(dir.path());
        let hooks = python3();
        let docs = docs();
        let refs: Vec<&Doc> = docs.iter().collect();
        // Item 2 of the batch is document 12.
        let e = hooks
            .doc_field(
                &f("explode"),
                &refs,
                &site("doc_to_text", &[10, 11, 12, 13]),
            )
            .unwrap_err()
            .to_string();
        for want in [
            "tasks/t.yaml",
            "task `t`",
            "doc_to_text",
            "hookmod.explode",
            "hookmod.py",
            "doc 12",
            "Traceback (most recent call last)",
            "in explode",
            "ZeroDivisionError: division by zero",
        ] {
            assert!(e.contains(want), "`{want}` missing from: {e}");
        }
        // The worker survives a hook's exception.
        let ok = hooks
            .doc_field(&f("text"), &refs[..1], &site("doc_to_text", &[]))
            .unwrap();
        assert_eq!(ok, vec![json!("Q: q0")]);
        let e = hooks
            .doc_field(&f("missing_fn"), &refs, &site("doc_to_text", &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("defines no function `missing_fn`"), "{e}");
    }

    #[test]
    fn a_dead_worker_is_reported_and_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let f = module(dir.path());
        let hooks = python3();
        let docs = docs();
        let refs: Vec<&Doc> = docs.iter().collect();
        let e = hooks
            .doc_field(&f("die"), &refs, &site("doc_to_text", &[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exited during the call") && e.contains("exit status: 3"),
            "{e}"
        );
        assert!(!hooks.started());
        let ok = hooks
            .doc_field(&f("text"), &refs[..1], &site("doc_to_text", &[]))
            .unwrap();
        assert_eq!(ok, vec![json!("Q: q0")]);
    }

    #[test]
    fn a_missing_interpreter_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = module(dir.path());
        let hooks = Hooks::new(Some("/nonexistent/python9".into()));
        let docs = docs();
        let e = hooks
            .doc_field(&f("text"), &[&docs[0]], &site("doc_to_text", &[]))
            .unwrap_err()
            .to_string();
        for want in [
            "/nonexistent/python9",
            "--python",
            "MOEVAL_PYTHON",
            "task `t`",
            "hookmod.text",
        ] {
            assert!(e.contains(want), "`{want}` missing from: {e}");
        }
        // Something that is not Python.
        let hooks = Hooks::new(Some("/bin/false".into()));
        let e = hooks
            .doc_field(&f("text"), &[&docs[0]], &site("doc_to_text", &[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("did not start the hook worker") && e.contains("/bin/false"),
            "{e}"
        );
    }

    #[test]
    fn process_docs_without_datasets_says_how_to_fix_it() {
        let has_datasets = Command::new("python3")
            .args(["-c", "import datasets"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if has_datasets {
            eprintln!("skipped: this python3 has `datasets`");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = module(dir.path());
        let s = Site {
            items: Items::Whole("split `test`"),
            ..site("process_docs", &[])
        };
        let e = python3()
            .process_docs(&f("ds_type"), &docs(), &s)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot import `datasets`")
                && e.contains("pip install datasets")
                && e.contains("split `test`"),
            "{e}"
        );
    }

    /// Runs with the interpreter in `MOEVAL_LM_EVAL_PYTHON` (a venv with `datasets`); CI sets it.
    #[test]
    fn process_docs_gets_a_real_dataset() {
        let Some(python) = std::env::var_os("MOEVAL_LM_EVAL_PYTHON") else {
            eprintln!("skipped: set MOEVAL_LM_EVAL_PYTHON to a Python with `datasets`");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("prep.py"),
            r#"
import datasets

def process(ds):
    assert isinstance(ds, datasets.Dataset), type(ds)
    ds = ds.filter(lambda d: d["label"] != 1)
    return ds.map(lambda d: {"upper": d["q"].upper()})

def as_list(ds):
    return [dict(d, n=i) for i, d in enumerate(ds)]
"#,
        )
        .unwrap();
        let f = |name: &str| Function {
            dir: dir.path().to_path_buf(),
            module: "prep".into(),
            name: name.into(),
        };
        let hooks = Hooks::new(Some(PathBuf::from(python)));
        let s = Site {
            items: Items::Whole("split `test`"),
            ..site("process_docs", &[])
        };
        let out = hooks.process_docs(&f("process"), &docs(), &s).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1]["upper"], json!("Q2"));
        let keys: Vec<&String> = out[0].keys().collect();
        assert_eq!(keys, ["q", "label", "options", "upper"]);
        let out = hooks.process_docs(&f("as_list"), &docs(), &s).unwrap();
        assert_eq!(out[3]["n"], json!(3));
    }
}
