//! The D-Bus face of the engine: it turns calls into engine commands and the engine's status
//! into properties and signals, and decides nothing itself.

pub mod authorize;
pub mod calls;
pub mod error;
pub mod idle_exit;
pub mod inspect;
pub mod objects;
/// A `dbus-daemon` of our own (`--bus private`): the contract's, shared with the tests.
pub use ksm_throttler_contract::private_bus as private;
pub mod properties;
pub mod service;
