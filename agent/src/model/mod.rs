//! Plain data: ids, timestamps, sandboxes and containers (their specs,
//! records, state machines and filters), resources, images as recorded,
//! lifecycle events, a pod's network as recorded, and usage readings.
//!
//! A leaf: nothing here knows the store, the engine or the network.

pub mod container;
pub mod events;
pub mod ids;
pub mod image;
pub mod network;
pub mod resources;
pub mod sandbox;
pub mod time;
pub mod usage;
