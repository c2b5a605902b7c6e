//! Fuzz target: the agent's config parser (see updraft_agent::fuzzing::config).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| updraft_agent::fuzzing::config(data));
