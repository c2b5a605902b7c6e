//! Entry points for fuzzing the agent's parsers of outside input: its configuration file, the
//! control socket's request line, and a provider's check answer. Each must return without
//! panicking on any bytes; the cargo-fuzz targets in `fuzz/` and the corpus replay test call
//! them.
use prost::Message;

/// `agent.toml`.
pub fn config(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = toml::from_str::<crate::config::FileConfig>(s);
    }
}

/// One request line on the control socket.
pub fn control_request(data: &[u8]) {
    let _ = serde_json::from_slice::<crate::control::Request>(data);
}

/// A provider's answer to a check, as protobuf off the wire.
pub fn check_response(data: &[u8]) {
    if let Ok(r) = updraft_proto::v1::CheckResponse::decode(data) {
        for o in r.offers.iter().filter_map(|o| o.update.as_ref()) {
            let _ = updraft_core::hash::validate(&o.content_hash);
            let _ = o.version.parse::<updraft_core::Version>();
        }
    }
}

pub const TARGETS: [updraft_core::fuzzing::Target; 3] =
    [("config", config), ("control_request", control_request), ("check_response", check_response)];

#[cfg(test)]
mod tests {
    /// The agent's saved fuzz corpora, replayed (see `updraft_core::fuzzing::replay`).
    #[test]
    fn fuzz_corpus() {
        for (target, n) in updraft_core::fuzzing::replay(&super::TARGETS) {
            assert!(n > 0, "fuzz/corpus/{target} is empty");
        }
    }
}
