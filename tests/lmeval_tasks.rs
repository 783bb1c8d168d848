//! Parity with lm-evaluation-harness 0.4.13 on eight of its own, unchanged task files (arc_easy,
//! hellaswag, winogrande, gsm8k with both filters, mmlu_abstract_algebra, lambada_openai, piqa,
//! truthfulqa_mc2): `scripts/lmeval_tasks_compare.py` runs `moeval eval` on the committed Hub cache
//! (tests/data/hub-cache, offline) and the tiny-flexolmo fixture and compares every request's
//! arguments and log-likelihood, every filtered generation and every metric with the numbers the
//! harness itself produced (tests/data/lmeval_tasks/reference.json). Needs the harness's task folder
//! and a Python with `datasets` and pyarrow (the hooks run there): `MOEVAL_LM_EVAL_PYTHON`, which CI
//! sets; without it the test says so and passes.

use std::path::Path;
use std::process::Command;

#[test]
fn lm_eval_task_files_give_lm_evals_numbers() {
    let Ok(python) = std::env::var("MOEVAL_LM_EVAL_PYTHON") else {
        eprintln!("skipped: set MOEVAL_LM_EVAL_PYTHON to a Python with lm-eval 0.4.13 installed");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("../shared/fixtures/tiny-flexolmo").exists() {
        eprintln!("skipped: ../shared/fixtures/tiny-flexolmo is missing");
        return;
    }
    let out = Command::new(&python)
        .current_dir(root)
        .arg("scripts/lmeval_tasks_compare.py")
        .args(["--moeval", env!("CARGO_BIN_EXE_moeval")])
        .args(["--hooks-python", &python, "--lmeval-python", &python])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\"differences\": 0"), "{text}");
}
