//! Generates the ksm.KSMThrottler code with the protoc vendored in `protoc-bin-vendored`, so that
//! building needs cargo alone (no protoc on the machine).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    tonic_prost_build::configure()
        // The tests' client runs over any tower service (a Unix socket), not tonic's TCP channel.
        .build_transport(false)
        .compile_with_config(config, &[PathBuf::from("proto/ksm.proto")], &includes)?;
    Ok(())
}
