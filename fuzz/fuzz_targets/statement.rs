//! Fuzz target: the core's statement parser (see updraft_core::fuzzing::statement).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| updraft_core::fuzzing::statement(data));
