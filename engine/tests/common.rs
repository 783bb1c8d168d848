//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `shared/fixtures` beside the repository (override with `MOEVAL_FIXTURES`). Missing fixtures fail the
/// test: a parity test that silently skips proves nothing.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("MOEVAL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    assert!(
        dir.join("tiny-flexolmo/config.json").exists(),
        "reference fixtures not found at {}; set MOEVAL_FIXTURES",
        dir.display()
    );
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A writable copy of a fixture directory, for tests that damage it.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        let dst = tmp.path().join(entry.file_name());
        std::fs::copy(entry.path(), &dst).unwrap();
        let mut perms = std::fs::metadata(&dst).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&dst, perms).unwrap();
    }
    tmp
}

/// Logits of `tokens` fed to one cache in pieces of `steps` tokens (prefill, then small steps), and the
/// cache's length at the end.
pub fn logits_in_steps(model: &engine::Model, tokens: &[u32], steps: &[usize]) -> (Tensor, usize) {
    let mut cache = model.new_cache();
    let mut rows = Vec::new();
    let mut at = 0;
    for &step in steps {
        let end = (at + step).min(tokens.len());
        if at == end {
            break;
        }
        let fwd = model
            .forward(
                &mut [engine::SeqInput {
                    tokens: &tokens[at..end],
                    cache: &mut cache,
                    mask: None,
                }],
                false,
            )
            .unwrap();
        rows.push(model.logits(&fwd.hidden).unwrap());
        at = end;
    }
    (Tensor::cat(&rows, 0).unwrap(), cache.len())
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    max_abs_diff(t, &t.zeros_like().unwrap())
}
