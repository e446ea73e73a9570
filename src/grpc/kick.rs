//! What a gRPC Kick is handed to: the engine itself (the daemon serving `--grpc-uri`), or the
//! bus (the shim's [`Kicker`]). Both answer with the same [`KickError`], so the gRPC status a
//! client sees does not depend on who serves it.

use std::future::Future;

use crate::engine::{EngineError, Handle};
use ksm_throttler_contract::kicker::{KickError, Kicker};

pub trait Kick: Send + Sync + 'static {
    fn kick(&self) -> impl Future<Output = Result<(), KickError>> + Send;
}

impl Kick for Kicker {
    fn kick(&self) -> impl Future<Output = Result<(), KickError>> + Send {
        Kicker::kick(self)
    }
}

/// In the daemon: no bus, no polkit (the socket's permissions are the gate, as they were the
/// original's), the kick straight to the engine. Errors carry the name a D-Bus caller would get.
impl Kick for Handle {
    async fn kick(&self) -> Result<(), KickError> {
        match Handle::kick(self).await {
            Ok(()) => Ok(()),
            Err(e @ EngineError::ShuttingDown) => Err(KickError::Unreachable(e.to_string())),
            Err(e) => Err(KickError::Failed { name: e.error_name().to_owned(), message: e.to_string() }),
        }
    }
}
