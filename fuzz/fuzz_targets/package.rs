//! Fuzz target: the core's package parser (see updraft_core::fuzzing::package).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| updraft_core::fuzzing::package(data));
