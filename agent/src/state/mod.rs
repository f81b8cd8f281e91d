//! The node's persistent state: the redb database (`store`), the one way a
//! record held under its lock is changed and committed (`update`), and the
//! lifecycle events announcing changes (`events`).

pub(crate) mod events;
pub(crate) mod store;
pub(crate) mod update;

pub(crate) use store::{Change, StateStore};
