//! Static checks of a parsed task: every template compiles, `filter_list` parses, and every
//! `!function` resolves to a definition in its module, without reading data or starting Python (what the conformance test over
//! lm-evaluation-harness's task library runs, and what a user can run before a long evaluation).

use crate::config::{Field, Function, TaskConfig};
use crate::error::{Error, Result};
use crate::template;

/// Checks `cfg`'s templates and hook references; the error names the file, task and field.
pub fn check(cfg: &TaskConfig) -> Result<()> {
    let env = template::environment();
    let err = |field: &str, msg: String| Error::Config {
        file: cfg.file.clone(),
        msg: format!("task `{}`, field `{field}`: {msg}", cfg.name),
    };
    for (name, f) in document_fields(cfg) {
        if let Some(Field::Template(t)) = f {
            env.template_from_str(t)
                .map_err(|e| err(name, format!("template does not compile: {e}")))?;
        }
    }
    if let Some(d) = &cfg.description {
        env.template_from_str(d)
            .map_err(|e| err("description", format!("template does not compile: {e}")))?;
    }
    for (name, f) in hook_functions(cfg)? {
        resolve(&f).map_err(|m| err(name, m))?;
    }
    Ok(())
}

/// The fields that hold a template or a hook, with their names.
fn document_fields(cfg: &TaskConfig) -> [(&'static str, Option<&Field>); 6] {
    [
        ("doc_to_text", Some(&cfg.doc_to_text)),
        ("doc_to_target", Some(&cfg.doc_to_target)),
        ("doc_to_choice", cfg.doc_to_choice.as_ref()),
        ("fewshot_config.doc_to_text", Some(&cfg.fewshot.doc_to_text)),
        (
            "fewshot_config.doc_to_target",
            Some(&cfg.fewshot.doc_to_target),
        ),
        (
            "fewshot_config.doc_to_choice",
            cfg.fewshot.doc_to_choice.as_ref(),
        ),
    ]
}

/// Every `!function` hook `cfg` names, with the field naming it: the document fields,
/// `process_docs`, `process_results`, `metric_list` and `filter_list`'s Python steps.
pub fn hook_functions(cfg: &TaskConfig) -> Result<Vec<(&'static str, Function)>> {
    let mut out = Vec::new();
    for (name, f) in document_fields(cfg) {
        if let Some(Field::Function(f)) = f {
            out.push((name, f.clone()));
        }
    }
    for (name, f) in [
        ("process_docs", &cfg.process_docs),
        ("process_results", &cfg.process_results),
        ("fewshot_config.process_docs", &cfg.fewshot.process_docs),
    ] {
        out.extend(f.iter().map(|f| (name, f.clone())));
    }
    for m in &cfg.metric_list {
        out.extend(
            m.function
                .iter()
                .chain(&m.aggregation)
                .map(|f| ("metric_list", f.clone())),
        );
    }
    let pipelines =
        crate::filters::parse_filter_list(cfg.filter_list.as_ref()).map_err(|e| Error::Config {
            file: cfg.file.clone(),
            msg: format!("task `{}`, field `filter_list`: {e}", cfg.name),
        })?;
    for step in pipelines.iter().flat_map(|p| &p.steps) {
        if let crate::filters::Step::Python(py) = step {
            out.push(("filter_list", py.function().clone()));
        }
    }
    Ok(out)
}

/// `Ok` when `f`'s module file exists and binds `f.name` at top level (a `def`, `class`, assignment
/// or import), which is what importing it would look up.
pub fn resolve(f: &Function) -> std::result::Result<(), String> {
    let path = f.file();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{f}: cannot read {}: {e}", path.display()))?;
    let n = f.name.as_str();
    let binds = |line: &str| {
        let rest = |p: &str| line.strip_prefix(p).map(str::trim_start);
        let starts_name = |r: Option<&str>| {
            r.and_then(|r| r.strip_prefix(n))
                .is_some_and(|t| t.starts_with(['(', ':', ' ', '=', '[']))
        };
        starts_name(rest("def "))
            || starts_name(rest("async def "))
            || starts_name(rest("class "))
            || starts_name(Some(line))
            || ((line.starts_with("from ") || line.starts_with("import "))
                && line
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .any(|w| w == n))
    };
    // Modules that bind names in a loop (`globals().update(...)`, `globals()[name] = ...`, as
    // lm-eval's per-subject tasks do) can only be resolved by importing them.
    if text.lines().any(binds) || text.contains("globals().update(") || text.contains("globals()[")
    {
        Ok(())
    } else {
        Err(format!("{f}: `{n}` is not defined in {}", path.display()))
    }
}
