//! lm-evaluation-harness 0.4.13's `local-completions` against `moeval serve` on the shipped model: every
//! request's log-likelihood equals `moeval eval`'s within 1e-4 (loglikelihood, multiple choice with
//! few-shot, loglikelihood_rolling) and greedy generations are identical (generate_until). The work is
//! in `scripts/lmeval_serve_parity.py`; this test runs it with the Python that
//! `MOEVAL_LM_EVAL_PYTHON` names (CI sets it to its virtualenv, which has lm-eval installed).

use std::path::Path;
use std::process::Command;

#[test]
fn lm_eval_local_completions_matches_moeval_eval() {
    let Some(python) = std::env::var_os("MOEVAL_LM_EVAL_PYTHON") else {
        eprintln!(
            "skipped: set MOEVAL_LM_EVAL_PYTHON to a Python with lm-eval[api]==0.4.13, transformers \
             and pyarrow (.ci/run does)"
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(root.join("scripts/lmeval_serve_parity.py"))
        .arg("--moeval")
        .arg(env!("CARGO_BIN_EXE_moeval"))
        .arg("--model")
        .arg(root.join("assets/default-model"))
        .output()
        .expect("the Python in MOEVAL_LM_EVAL_PYTHON runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["ok"], true, "{summary}");
    for task in ["srv_ll", "srv_mc", "srv_rolling", "srv_gen"] {
        assert!(
            summary["requests_compared"][task].as_u64().unwrap() >= 8,
            "{summary}"
        );
    }
}
