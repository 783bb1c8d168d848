//! Super-NaturalInstructions task files (`taskNNN_name.json`: `Definition`, `Positive Examples` with
//! explanations, `Instances` with several reference outputs, `Reasoning`) read from a folder and
//! turned into prompts exactly as Tk-Instruct encodes them, in its three evaluation modes
//! (definition only; definition + 2 positive examples; the same with explanations). Scoring is
//! plain task data: SNI's exact match and ROUGE-L (rouge_score with the Porter stemmer), max
//! over the references.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::dataset::Doc;
use crate::error::{Error, Result};
use crate::pytext;
use crate::suites::{Spec, Suite};
use crate::task::LoadOptions;

/// How a prompt is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Definition + input.
    ZeroShot,
    /// Definition + k positive examples + input.
    FewShot,
    /// As few-shot, each example followed by its explanation.
    FewShotExplained,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "zero_shot" => Some(Mode::ZeroShot),
            "few_shot" => Some(Mode::FewShot),
            "few_shot_explained" => Some(Mode::FewShotExplained),
            _ => None,
        }
    }
}

/// A positive example of a task file.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub input: String,
    pub output: String,
    pub explanation: Option<String>,
}

/// One evaluation instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    pub id: String,
    pub input: String,
    pub outputs: Vec<String>,
}

/// A parsed task file.
#[derive(Clone, Debug, PartialEq)]
pub struct SniTask {
    /// The file name without `.json`.
    pub name: String,
    pub definition: String,
    pub positive: Vec<Example>,
    pub instances: Vec<Instance>,
    /// `Reasoning` labels (may be empty).
    pub reasoning: Vec<String>,
    pub categories: Vec<String>,
}

fn data_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A string, or a list of strings joined by newlines.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join("\n")),
        _ => None,
    }
}

fn strings(v: Option<&Value>) -> Option<Vec<String>> {
    match v {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

fn field<'a>(o: &'a Map<String, Value>, key: &str, path: &Path, what: &str) -> Result<&'a Value> {
    o.get(key)
        .ok_or_else(|| data_err(path, format!("{what}: missing `{key}`")))
}

/// Reads one task file.
pub fn read_task(path: &Path) -> Result<SniTask> {
    let bytes = std::fs::read(path).map_err(|e| data_err(path, format!("cannot read: {e}")))?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| data_err(path, format!("invalid JSON: {e}")))?;
    let o = v
        .as_object()
        .ok_or_else(|| data_err(path, "a task file must be a JSON object"))?;
    // Tk-Instruct uses the first string of a list.
    let definition = match field(o, "Definition", path, "task")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
    .ok_or_else(|| {
        data_err(
            path,
            "`Definition` must be a string or a non-empty list of strings",
        )
    })?;
    let mut positive = Vec::new();
    if let Some(p) = o.get("Positive Examples") {
        let a = p
            .as_array()
            .ok_or_else(|| data_err(path, "`Positive Examples` must be a list"))?;
        for (i, e) in a.iter().enumerate() {
            let what = format!("Positive Examples[{i}]");
            let e = e
                .as_object()
                .ok_or_else(|| data_err(path, format!("{what} must be an object")))?;
            let get = |k: &str| -> Result<String> {
                text(Some(field(e, k, path, &what)?))
                    .ok_or_else(|| data_err(path, format!("{what}.{k} must be a string")))
            };
            positive.push(Example {
                input: get("input")?,
                output: get("output")?,
                explanation: match e.get("explanation") {
                    None | Some(Value::Null) => None,
                    Some(x) => Some(text(Some(x)).ok_or_else(|| {
                        data_err(path, format!("{what}.explanation must be a string"))
                    })?),
                },
            });
        }
    }
    let inst = field(o, "Instances", path, "task")?
        .as_array()
        .ok_or_else(|| data_err(path, "`Instances` must be a list"))?;
    let mut instances = Vec::with_capacity(inst.len());
    for (i, e) in inst.iter().enumerate() {
        let what = format!("Instances[{i}]");
        let e = e
            .as_object()
            .ok_or_else(|| data_err(path, format!("{what} must be an object")))?;
        let outputs = strings(Some(field(e, "output", path, &what)?))
            .filter(|o| !o.is_empty())
            .ok_or_else(|| {
                data_err(
                    path,
                    format!("{what}.output must be a non-empty list of strings"),
                )
            })?;
        instances.push(Instance {
            id: e
                .get("id")
                .map(crate::dataset::as_text)
                .unwrap_or_else(|| i.to_string()),
            input: text(Some(field(e, "input", path, &what)?))
                .ok_or_else(|| data_err(path, format!("{what}.input must be a string")))?,
            outputs,
        });
    }
    let list = |k: &str| {
        strings(o.get(k)).ok_or_else(|| data_err(path, format!("`{k}` must be a list of strings")))
    };
    Ok(SniTask {
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        definition,
        positive,
        instances,
        reasoning: list("Reasoning")?,
        categories: list("Categories")?,
    })
}

/// Appends a period unless the text already ends with ASCII punctuation (Tk-Instruct's rule for
/// every field it writes).
fn end_sentence(s: &mut String) {
    if !s.chars().last().is_some_and(pytext::is_punct) {
        s.push('.');
    }
}

/// Tk-Instruct's token budget: a prompt may hold `max` tokens of the encoder's tokenizer (T5's,
/// `</s>` included). Examples that would pass it are dropped (from the first that does); a prompt
/// still too long is cut to `max` tokens and decoded back without special tokens.
pub struct Budget {
    path: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    max: usize,
    /// transformers' `clean_up_tokenization_spaces` after decoding a cut prompt.
    clean_up: bool,
}

impl Budget {
    /// The tokenizer of `path` (a `tokenizer.json`, or a model folder holding one and perhaps a
    /// `tokenizer_config.json` whose `clean_up_tokenization_spaces` is read; default true, as
    /// transformers 4.x and so Tk-Instruct decoded T5).
    pub fn load(path: &Path, max: usize) -> Result<Budget> {
        let file = crate::rouge::tokenizer_file(path);
        let config = path.is_dir().then(|| path.join("tokenizer_config.json"));
        let tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| data_err(&file, format!("cannot load the tokenizer: {e}")))?;
        let clean_up = match config.filter(|c| c.is_file()) {
            Some(c) => {
                let bytes = std::fs::read(&c).map_err(|e| data_err(&c, e.to_string()))?;
                let v: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| data_err(&c, format!("invalid JSON: {e}")))?;
                match v.get("clean_up_tokenization_spaces") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(data_err(
                            &c,
                            "`clean_up_tokenization_spaces` must be a boolean",
                        ))
                    }
                }
            }
            None => true,
        };
        Ok(Budget {
            path: file,
            tokenizer,
            max,
            clean_up,
        })
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| data_err(&self.path, format!("cannot tokenise a prompt: {e}")))
    }

    fn fits(&self, text: &str) -> Result<bool> {
        Ok(self.ids(text)?.len() <= self.max)
    }

    /// `text`, or its first `max` tokens decoded.
    fn cut(&self, text: String) -> Result<String> {
        let ids = self.ids(&text)?;
        if ids.len() <= self.max {
            return Ok(text);
        }
        let s = self
            .tokenizer
            .decode(&ids[..self.max], true)
            .map_err(|e| data_err(&self.path, format!("cannot decode a cut prompt: {e}")))?;
        Ok(if self.clean_up { clean_up(&s) } else { s })
    }
}

/// transformers' `clean_up_tokenization`: spaces before punctuation and English contractions go.
fn clean_up(s: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(s.to_string(), |s, (from, to)| s.replace(from, to))
}

/// The prompt of one input, byte for byte as Tk-Instruct's `DataCollatorForNI` encodes it
/// (no task name, no negative examples): the definition, up to `k` positive examples (with
/// their explanations in [`Mode::FewShotExplained`]), then the input, ending with `Output: `.
/// Each field is stripped and ends with a period unless it ends with punctuation; the example
/// blocks keep the reference's leading spaces (` Positive Example 1 -`, ` Output:`). No token
/// budget: see [`prompt_within`].
pub fn prompt(task: &SniTask, mode: Mode, k: usize, input: &str) -> String {
    let mut s = definition(task);
    if mode != Mode::ZeroShot {
        for i in 0..k.min(task.positive.len()) {
            s.push_str(&example(task, mode, i));
        }
    }
    s + &task_input(input)
}

/// [`prompt`] within a token budget, as the collator applies `max_source_length`: an example is
/// kept while definition, the examples kept so far (joined by a space, as the collator measures
/// them, although it joins them without one), the example and the input fit; then the prompt is
/// cut to the budget if it still passes it.
pub fn prompt_within(
    task: &SniTask,
    mode: Mode,
    k: usize,
    input: &str,
    budget: Option<&Budget>,
) -> Result<String> {
    let Some(b) = budget else {
        return Ok(prompt(task, mode, k, input));
    };
    let (def, tail) = (definition(task), task_input(input));
    let mut kept: Vec<String> = Vec::new();
    if mode != Mode::ZeroShot {
        for i in 0..k.min(task.positive.len()) {
            let e = example(task, mode, i);
            if !b.fits(&format!("{def}{}{e}{tail}", kept.join(" ")))? {
                break;
            }
            kept.push(e);
        }
    }
    b.cut(format!("{def}{}{tail}", kept.concat()))
}

fn definition(task: &SniTask) -> String {
    let mut s = format!("Definition: {}", pytext::strip(&task.definition));
    end_sentence(&mut s);
    s.push_str("\n\n");
    s
}

fn example(task: &SniTask, mode: Mode, i: usize) -> String {
    let e = &task.positive[i];
    let mut s = format!(
        " Positive Example {} -\nInput: {}",
        i + 1,
        pytext::strip(&e.input)
    );
    end_sentence(&mut s);
    s.push_str(&format!("\n Output: {}", pytext::strip(&e.output)));
    end_sentence(&mut s);
    s.push('\n');
    if let (Mode::FewShotExplained, Some(x)) = (mode, &e.explanation) {
        s.push_str(&format!(" Explanation: {}", pytext::strip(x)));
        end_sentence(&mut s);
        s.push('\n');
    }
    s.push('\n');
    s
}

fn task_input(input: &str) -> String {
    let mut s = format!(
        "Now complete the following example -\nInput: {}",
        pytext::strip(input)
    );
    end_sentence(&mut s);
    s.push_str("\nOutput: ");
    s
}

/// Task files of a folder (`*.json`, sorted by name), or the one file given.
fn task_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let rd = std::fs::read_dir(dir).map_err(|e| {
        data_err(
            dir,
            format!("cannot list Super-NaturalInstructions task files: {e}"),
        )
    })?;
    let mut files = Vec::new();
    for e in rd {
        let p = e.map_err(|e| data_err(dir, e.to_string()))?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "json") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Super-NaturalInstructions task files (`suite.kind: sni`).
pub(crate) struct Sni;

impl Suite for Sni {
    fn kinds(&self) -> &'static [&'static str] {
        &["sni"]
    }

    fn load(&self, spec: &Spec, _: &str, bases: &[&Path], opts: &LoadOptions) -> Result<Vec<Doc>> {
        load(spec, bases, opts)
    }
}

/// Builds documents `{prompt_text, outputs, sni_task, reasoning, category, id}` from the task files of
/// `suite.dir`: the first `max_instances` (100) instances of each file.
pub(crate) fn load(spec: &Spec, bases: &[&Path], opts: &LoadOptions) -> Result<Vec<Doc>> {
    spec.allow(&[
        "dir",
        "mode",
        "k",
        "max_instances",
        "tasks",
        "source_tokenizer",
        "max_source_length",
    ])?;
    let dir = spec.path("dir", bases, &opts.data_dir)?;
    // Tk-Instruct's budget: max_source_length 1024 tokens of the T5 tokenizer named here.
    let budget = if spec.has("source_tokenizer") {
        Some(Budget::load(
            &spec.path("source_tokenizer", bases, &opts.data_dir)?,
            spec.uint("max_source_length", 1024)? as usize,
        )?)
    } else if spec.has("max_source_length") {
        return Err(spec.err(
            "suite.max_source_length needs suite.source_tokenizer (the encoder's tokenizer.json, \
             e.g. a T5 model folder), which counts the tokens",
        ));
    } else {
        None
    };
    let mode_s = spec.str_or("mode", "few_shot_explained")?;
    let mode = Mode::parse(&mode_s).ok_or_else(|| {
        spec.err(format!(
            "suite.mode `{mode_s}` (use zero_shot, few_shot or few_shot_explained)"
        ))
    })?;
    // --num-fewshot overrides the number of positive examples.
    let k = opts.num_fewshot.unwrap_or(spec.uint("k", 2)? as usize);
    let max = spec.uint("max_instances", 100)? as usize;
    let only = spec.list("tasks")?;
    let mut files = task_files(&dir)?;
    if let Some(only) = &only {
        for name in only {
            if !files
                .iter()
                .any(|f| f.file_stem().is_some_and(|s| s == name.as_str()))
            {
                return Err(spec.err(format!(
                    "suite.tasks names `{name}`, which is not a task file in {}",
                    dir.display()
                )));
            }
        }
        files.retain(|f| {
            f.file_stem()
                .is_some_and(|s| only.iter().any(|n| s == n.as_str()))
        });
    }
    if files.is_empty() {
        return Err(data_err(
            &dir,
            "no Super-NaturalInstructions task files (*.json) here",
        ));
    }
    let mut docs = Vec::new();
    for f in files {
        let t = read_task(&f)?;
        if mode != Mode::ZeroShot && t.positive.len() < k {
            return Err(data_err(
                &f,
                format!(
                    "{k} positive examples requested but the file has {}",
                    t.positive.len()
                ),
            ));
        }
        if mode == Mode::FewShotExplained {
            if let Some(i) = t.positive[..k].iter().position(|e| e.explanation.is_none()) {
                return Err(data_err(
                    &f,
                    format!("Positive Examples[{i}] has no explanation (mode few_shot_explained)"),
                ));
            }
        }
        let first = |v: &[String]| v.first().cloned().unwrap_or_else(|| "none".into());
        for inst in t.instances.iter().take(max) {
            let mut d = Map::new();
            d.insert(
                "prompt_text".into(),
                prompt_within(&t, mode, k, &inst.input, budget.as_ref())?.into(),
            );
            d.insert(
                "outputs".into(),
                Value::Array(inst.outputs.iter().cloned().map(Value::String).collect()),
            );
            d.insert("sni_task".into(), t.name.clone().into());
            // The first label: a task counts once in the per-skill scores.
            d.insert("reasoning".into(), first(&t.reasoning).into());
            d.insert("category".into(), first(&t.categories).into());
            d.insert("id".into(), inst.id.clone().into());
            docs.push(d);
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> SniTask {
        SniTask {
            name: "task1_x".into(),
            definition: "Add the numbers.".into(),
            positive: vec![Example {
                input: "1 + 1".into(),
                output: "2".into(),
                explanation: Some("One and one make two.".into()),
            }],
            instances: vec![],
            reasoning: vec![],
            categories: vec![],
        }
    }

    #[test]
    fn three_modes() {
        let t = task();
        assert_eq!(
            prompt(&t, Mode::ZeroShot, 1, " 2 + 3 "),
            "Definition: Add the numbers.\n\nNow complete the following example -\n\
             Input: 2 + 3.\nOutput: "
        );
        let fs = prompt(&t, Mode::FewShot, 1, "2 + 3?");
        assert_eq!(
            fs,
            "Definition: Add the numbers.\n\n Positive Example 1 -\nInput: 1 + 1.\n Output: 2.\n\n\
             Now complete the following example -\nInput: 2 + 3?\nOutput: "
        );
        let fe = prompt(&t, Mode::FewShotExplained, 1, "2 + 3");
        assert!(fe.contains(" Output: 2.\n Explanation: One and one make two.\n\nNow complete"));
    }
}
