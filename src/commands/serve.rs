//! `moeval serve` and `moeval serve-bench`: the server lives in `crate::serve`.

pub use crate::serve::bench::{run as run_bench, Args as BenchArgs};
pub use crate::serve::{run, Args};
