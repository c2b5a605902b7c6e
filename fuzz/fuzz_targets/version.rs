//! Fuzz target: the core's version parser (see updraft_core::fuzzing::version).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| updraft_core::fuzzing::version(data));
