//! The benchmark harness's pieces: a load generator, process helpers,
//! charts and the report. `src/main.rs` runs the benchmarks.

pub mod chart;
pub mod loadgen;
pub mod procs;
pub mod report;
