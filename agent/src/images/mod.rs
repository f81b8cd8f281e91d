//! Images: the content-addressed store (`store`), the registry client that
//! pulls into it and pushes Wasm (`registry`), the unpacking of compat
//! images' root filesystems (`rootfs`), and what a Wasm binary imports and
//! exports (`inspect`).

pub(crate) mod inspect;
pub(crate) mod registry;
pub(crate) mod rootfs;
pub(crate) mod store;
