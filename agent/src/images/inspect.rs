//! What a Wasm binary is, read without compiling it: module or component,
//! what it imports (the host interfaces it needs) and exports (what it
//! offers), for the admin API's image inspection.

use wasmparser::{ComponentTypeRef, Encoding, Parser, Payload, TypeRef};

use crate::model::image::WasmKind;

/// One import of a module (`module` and `name`) or component (`name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmImport {
    /// Empty for a component's imports.
    pub module: String,
    pub name: String,
    pub kind: &'static str,
}

/// The outer shape of a Wasm binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmDescription {
    pub kind: WasmKind,
    pub imports: Vec<WasmImport>,
    pub exports: Vec<String>,
    /// Exports `wasi:http/incoming-handler`.
    pub http_function: bool,
}

/// Bytes that are not a WebAssembly binary, and where the parser gave up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not valid Wasm: {detail}")]
pub struct InvalidWasm {
    pub detail: String,
}

impl From<wasmparser::BinaryReaderError> for InvalidWasm {
    fn from(e: wasmparser::BinaryReaderError) -> Self {
        InvalidWasm {
            detail: e.to_string(),
        }
    }
}

/// Reads the top level of `bytes` (a component's nested modules and
/// components are its own business). Fails on anything that is not Wasm.
pub fn describe(bytes: &[u8]) -> Result<WasmDescription, InvalidWasm> {
    let mut kind = None;
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload?;
        match payload {
            Payload::Version { encoding, .. } if depth == 0 && kind.is_none() => {
                kind = Some(match encoding {
                    Encoding::Module => WasmKind::Module,
                    Encoding::Component => WasmKind::Component,
                });
            }
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ImportSection(reader) if depth == 0 => {
                for import in reader.into_imports() {
                    let import = import?;
                    imports.push(WasmImport {
                        module: import.module.to_owned(),
                        name: import.name.to_owned(),
                        kind: match import.ty {
                            TypeRef::Func(_) | TypeRef::FuncExact(_) => "func",
                            TypeRef::Table(_) => "table",
                            TypeRef::Memory(_) => "memory",
                            TypeRef::Global(_) => "global",
                            TypeRef::Tag(_) => "tag",
                        },
                    });
                }
            }
            Payload::ExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export?;
                    exports.push(export.name.to_owned());
                }
            }
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import?;
                    imports.push(WasmImport {
                        module: String::new(),
                        name: import.name.name.to_owned(),
                        kind: match import.ty {
                            ComponentTypeRef::Module(_) => "module",
                            ComponentTypeRef::Func(_) => "func",
                            ComponentTypeRef::Value(_) => "value",
                            ComponentTypeRef::Type(_) => "type",
                            ComponentTypeRef::Instance(_) => "instance",
                            ComponentTypeRef::Component(_) => "component",
                        },
                    });
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export?;
                    exports.push(export.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    let kind = kind.ok_or_else(|| InvalidWasm {
        detail: "empty".to_owned(),
    })?;
    let http_function = kind == WasmKind::Component
        && exports
            .iter()
            .any(|e| e.starts_with("wasi:http/incoming-handler@"));
    Ok(WasmDescription {
        kind,
        imports,
        exports,
        http_function,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_lists_its_imports_and_exports() {
        let module = wat::parse_str(
            r#"(module
                 (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                 (import "env" "mem" (memory 1))
                 (func (export "_start"))
                 (global (export "g") i32 (i32.const 0)))"#,
        )
        .unwrap();
        let d = describe(&module).unwrap();
        assert_eq!(d.kind, WasmKind::Module);
        assert_eq!(
            d.imports,
            vec![
                WasmImport {
                    module: "wasi_snapshot_preview1".into(),
                    name: "fd_write".into(),
                    kind: "func"
                },
                WasmImport {
                    module: "env".into(),
                    name: "mem".into(),
                    kind: "memory"
                },
            ]
        );
        assert_eq!(d.exports, vec!["_start", "g"]);
        assert!(!d.http_function);
    }

    #[test]
    fn a_component_lists_its_interfaces_not_its_inner_modules() {
        let component = std::fs::read(wasm_samples::HELLO_HTTP_P2).unwrap();
        let d = describe(&component).unwrap();
        assert_eq!(d.kind, WasmKind::Component);
        assert!(d.http_function);
        assert!(
            d.imports
                .iter()
                .all(|i| i.module.is_empty() && i.name.starts_with("wasi:")),
            "{:?}",
            d.imports
        );
        assert!(
            d.imports.iter().any(|i| i.name.starts_with("wasi:cli/")),
            "{:?}",
            d.imports
        );
    }

    #[test]
    fn anything_else_is_refused() {
        assert!(describe(b"#!/bin/sh\n").is_err());
        assert!(describe(b"").is_err());
    }
}
