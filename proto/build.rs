//! Generates the CRI v1 messages, clients and servers from the vendored
//! `proto/runtime/v1/api.proto` (k8s.io/cri-api v0.35.7, the API of the
//! kubelet 1.35 the tests run), and wasmlet's admin API from
//! `proto/wasmlet/admin/v1/admin.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/runtime/v1/api.proto",
        "proto/wasmlet/admin/v1/admin.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    Ok(())
}
