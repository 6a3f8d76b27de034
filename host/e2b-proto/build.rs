//! Compiles E2B's service definitions (`proto/`) into message types (prost) with protobuf's JSON
//! mapping (pbjson), with no `protoc`: protox parses the files.

use std::path::PathBuf;

const FILES: [&str; 2] = [
    "proto/process/process.proto",
    "proto/filesystem/filesystem.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(FILES, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    // Timestamps as pbjson's, whose JSON form is RFC 3339 text as protobuf's mapping says.
    config.compile_well_known_types();
    config.extern_path(".google.protobuf", "::pbjson_types");
    config.btree_map(["."]);
    config.out_dir(&out);
    config.compile_fds(descriptors.clone())?;

    let encoded = prost::Message::encode_to_vec(&descriptors);
    pbjson_build::Builder::new()
        .out_dir(&out)
        .register_descriptors(&encoded)?
        .btree_map(["."])
        // A newer client may send fields these definitions do not have yet.
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
