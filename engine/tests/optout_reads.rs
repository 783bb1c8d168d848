//! An opted-out expert's weights are never read, its router row included.

mod common;

use common::*;
use engine::{LoadOptions, Model};

#[test]
fn opted_out_router_row_is_never_read() {
    // NaN in expert 2's router row of every layer: loading without expert 2 must not notice, in the
    // logits or in the router logits a forward pass reports.
    let dir = copy_fixture("tiny-flexolmo");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut hit = 0;
    for (name, info) in header.as_object().unwrap() {
        if name.ends_with(".mlp.gate.weight") {
            let shape = &info["shape"];
            let (rows, cols) = (
                shape[0].as_u64().unwrap() as usize,
                shape[1].as_u64().unwrap() as usize,
            );
            let width = (info["data_offsets"][1].as_u64().unwrap()
                - info["data_offsets"][0].as_u64().unwrap()) as usize
                / (rows * cols);
            let a = info["data_offsets"][0].as_u64().unwrap() as usize + 2 * cols * width;
            bytes[8 + n + a..8 + n + a + cols * width].fill(0xff); // NaNs
            hit += 1;
        }
    }
    assert_eq!(hit, 2, "one router per layer");
    std::fs::write(&path, &bytes).unwrap();
    let model = Model::load(dir.path(), &LoadOptions::opting_out(&[2])).unwrap();
    let reference = reference("tiny-flexolmo");
    let tokens = ids(&reference["input_ids.2"]);
    let mut cache = model.new_cache();
    let fwd = model
        .forward(
            &mut [engine::SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                mask: None,
            }],
            true,
        )
        .unwrap();
    let logits = model.logits(&fwd.hidden).unwrap();
    let d = max_abs_diff(&logits, &reference["optout2.logits.2"]);
    assert!(d <= 1e-5, "differs by {d}");
    for layer in fwd.router_logits.unwrap() {
        let v = layer.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().all(|x| !x.is_nan()),
            "NaN reached the router logits"
        );
        let experts = layer.dims()[1];
        assert!(v
            .chunks_exact(experts)
            .all(|row| row[2] == f32::NEG_INFINITY));
    }
}
