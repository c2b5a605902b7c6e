//! Compiles proto/updraft/v1/*.proto with protox (pure Rust, no protoc) and generates tonic code.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files =
        ["common", "agent", "replication", "admin", "enrollment"].map(|f| root.join(format!("updraft/v1/{f}.proto")));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    // For gRPC server reflection (`updraft_proto::FILE_DESCRIPTOR_SET`).
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("updraft.fds.bin"), prost::Message::encode_to_vec(&fds))?;
    // Download chunks carry `Bytes`, so a provider can send file data without copying it.
    // Every client and server uses `crate::codec::Codec` (prost with small initial buffers).
    tonic_prost_build::configure()
        .bytes(".updraft.v1.Chunk.data")
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
