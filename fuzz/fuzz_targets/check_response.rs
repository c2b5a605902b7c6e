//! Fuzz target: the agent's check_response parser (see updraft_agent::fuzzing::check_response).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| updraft_agent::fuzzing::check_response(data));
