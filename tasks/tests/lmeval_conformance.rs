//! Conformance over lm-evaluation-harness 0.4.13's own task library: every task, group and tag its
//! `TaskManager` lists (what `lm_eval --tasks list` prints) must load here, its templates compile and
//! its `!function` hooks resolve. Needs the harness installed: the interpreter in
//! `MOEVAL_LM_EVAL_PYTHON` (CI sets it to its venv); without it the test says so and passes.
//! `MOEVAL_CONFORMANCE_REPORT=FILE` writes the failure table (docs/tasks.md quotes it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tasks::Registry;

/// The share of listed tasks that must load; raised as support grows, never lowered.
const MIN_TASK_SHARE: f64 = 0.97;

const LIST: &str = r#"
import json, os, lm_eval
from lm_eval.tasks import TaskManager
tm = TaskManager()
print(json.dumps({
    "dir": os.path.join(os.path.dirname(lm_eval.__file__), "tasks"),
    "version": lm_eval.__version__,
    "tasks": sorted(tm.all_subtasks),
    "groups": sorted(tm.all_groups),
    "tags": sorted(tm.all_tags),
}))
"#;

#[test]
fn lm_eval_task_library_loads() {
    let Ok(python) = std::env::var("MOEVAL_LM_EVAL_PYTHON") else {
        eprintln!("skipped: set MOEVAL_LM_EVAL_PYTHON to a Python with lm-eval 0.4.13 installed");
        return;
    };
    let out = Command::new(&python).args(["-c", LIST]).output().unwrap();
    assert!(
        out.status.success(),
        "{python} could not list lm-eval's tasks: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names = |k: &str| -> Vec<String> {
        listed[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let dir = PathBuf::from(listed["dir"].as_str().unwrap());
    let reg = Registry::scan(std::slice::from_ref(&dir)).unwrap();
    let family = |file: &Path| -> String {
        file.strip_prefix(&dir)
            .ok()
            .and_then(|p| p.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_else(|| "?".into())
    };
    // (family, reason) -> failing task names.
    let mut failures: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let tasks = names("tasks");
    let files: BTreeMap<String, PathBuf> = reg
        .listing()
        .tasks
        .into_iter()
        .map(|(n, f, _)| (n, f))
        .collect();
    let mut ok = 0usize;
    for t in &tasks {
        let res = reg
            .task_config(t, Path::new("."))
            .and_then(|cfg| tasks::check::check(&cfg).map(|_| cfg));
        match res {
            Ok(_) => ok += 1,
            Err(e) => {
                let fam = files
                    .get(t)
                    .map(|f| family(f))
                    .unwrap_or_else(|| "(not found)".into());
                failures
                    .entry((fam, reason(&e.to_string())))
                    .or_default()
                    .push(t.clone());
            }
        }
    }
    let mut groups_ok = 0;
    let groups = names("groups");
    for g in &groups {
        match reg.resolve(std::slice::from_ref(g)) {
            Ok(_) if reg.group(g).is_some() => groups_ok += 1,
            Ok(_) => {
                failures
                    .entry((
                        "(groups)".into(),
                        "listed as a group, found as a tag".into(),
                    ))
                    .or_default()
                    .push(g.clone());
            }
            Err(e) => failures
                .entry(("(groups)".into(), reason(&e.to_string())))
                .or_default()
                .push(g.clone()),
        }
    }
    let tags = names("tags");
    let tags_ok = tags
        .iter()
        .filter(|t| reg.resolve(std::slice::from_ref(t)).is_ok())
        .count();
    let share = ok as f64 / tasks.len() as f64;
    let mut report = format!(
        "lm-eval {}: {ok} of {} tasks load ({:.1}%), {groups_ok} of {} groups, {tags_ok} of {} tags\n\n| family | reason | tasks | e.g. |\n|---|---|---|---|\n",
        listed["version"].as_str().unwrap_or("?"),
        tasks.len(),
        100.0 * share,
        groups.len(),
        tags.len()
    );
    let mut rows: Vec<_> = failures.iter().collect();
    rows.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
    for ((fam, why), v) in rows {
        report.push_str(&format!("| {fam} | {why} | {} | {} |\n", v.len(), v[0]));
    }
    eprintln!("{report}");
    if let Ok(f) = std::env::var("MOEVAL_CONFORMANCE_REPORT") {
        std::fs::write(f, &report).unwrap();
    }
    assert!(
        share >= MIN_TASK_SHARE,
        "{:.1}% of lm-eval's tasks load, below {:.0}%",
        100.0 * share,
        100.0 * MIN_TASK_SHARE
    );
}

/// An error message without the file, task and document names, so failures group by cause.
fn reason(msg: &str) -> String {
    let msg = msg.split_once(": task `").map_or(msg, |(_, r)| r);
    let msg = msg.split_once("`: ").map_or(msg, |(_, r)| r);
    let msg = msg.split_once("`, field ").map_or(msg, |(_, r)| r);
    let mut out: String = msg.chars().take(110).collect();
    out = out.replace('|', "\\|").replace('\n', " ");
    out
}
