//! Fuzz target: the core's manifest parser (see updraft_core::fuzzing::manifest).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| updraft_core::fuzzing::manifest(data));
