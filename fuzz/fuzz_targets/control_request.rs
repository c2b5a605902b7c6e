//! Fuzz target: the agent's control_request parser (see updraft_agent::fuzzing::control_request).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| updraft_agent::fuzzing::control_request(data));
