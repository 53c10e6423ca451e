//! The benchmark harness's pieces: load generators (echo, IRC), process helpers,
//! charts and the report. `src/main.rs` runs the benchmarks.

pub mod chart;
pub mod irc;
pub mod loadgen;
pub mod procs;
pub mod profile;
pub mod report;
