//! The kicks, one at a time: requests that come while a Kick is on the bus are folded into one
//! more Kick after it, so a burst of sandboxes costs at most two calls and the last sandbox still
//! restarts the throttler's aggressive period.

use std::sync::Arc;

use ksm_throttler_contract::kicker::Kicker;
use tokio::sync::Notify;

#[derive(Clone)]
pub struct Requests(Arc<Notify>);

impl Requests {
    pub fn kick(&self) {
        // Stores at most one permit: requests while one is pending are folded into it.
        self.0.notify_one();
    }
}

/// The task that calls Kick for the requests; failures are logged and the next request tries again.
pub fn spawn(kicker: Kicker) -> Requests {
    let wanted = Arc::new(Notify::new());
    let requests = Requests(wanted.clone());
    tokio::spawn(async move {
        loop {
            wanted.notified().await;
            match kicker.kick().await {
                Ok(()) => tracing::info!("kicked the throttler"),
                Err(e) => tracing::warn!("{e}; still watching"),
            }
        }
    });
    requests
}
