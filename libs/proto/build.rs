//! Compiles the claudecluster.v1 protos with protox, so no system `protoc` is needed.

use std::path::PathBuf;

use protox::prost::Message;

const PROTO_ROOT: &str = "../../proto";
const PROTO_FILES: &[&str] = &[
    "claudecluster/v1/types.proto",
    "claudecluster/v1/driver.proto",
    "claudecluster/v1/scheduler.proto",
    "claudecluster/v1/worker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves the same descriptors the code was generated from.
    std::fs::write(
        out_dir.join("claudecluster_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
