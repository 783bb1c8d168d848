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
