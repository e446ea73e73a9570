//! The `org.kata.KsmThrottler` object: a thin layer that checks the caller, parses the input,
//! hands the command to the engine and reports the result. The engine's published [`Status`]
//! backs the properties; a task turns its changes into `PropertiesChanged` signals.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use zbus::fdo::Properties;
use zbus::message::Header;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, Variant};

use crate::authorize::{Action, Authority};
use crate::bus_error::BusError;
use crate::engine::{Handle, Status};
use crate::idle_exit::CallTracker;
use crate::setting::Mode;

pub const BUS_NAME: &str = "org.kata.KsmThrottler";
pub const OBJECT_PATH: &str = "/org/kata/KsmThrottler";
pub const INTERFACE: &str = "org.kata.KsmThrottler";

pub struct Throttler {
    engine: Handle,
    status: watch::Receiver<Status>,
    authority: Authority,
    calls: Arc<CallTracker>,
}

impl Throttler {
    pub fn new(engine: Handle, status: watch::Receiver<Status>, authority: Authority) -> Self {
        Throttler { engine, status, authority, calls: CallTracker::new() }
    }

    /// The count of `Kick` and `SetMode` calls in flight, for exiting on idle.
    pub fn calls(&self) -> Arc<CallTracker> {
        Arc::clone(&self.calls)
    }
}

/// Controls the Linux KSM daemon (ksmd) for hosts that start many similar virtual machines.
#[interface(name = "org.kata.KsmThrottler", spawn = true)]
impl Throttler {
    /// New virtual machines are starting: scan aggressively now, then step down.
    async fn kick(&self, #[zbus(header)] header: Header<'_>) -> Result<(), BusError> {
        let _call = self.calls.enter(&header);
        self.authority.check(&header, Action::Kick).await?;
        Ok(self.engine.kick().await?)
    }

    /// Changes how KSM is driven: throttle (alias auto), initial, off, aggressive, standard, slow.
    async fn set_mode(&self, mode: &str, #[zbus(header)] header: Header<'_>) -> Result<(), BusError> {
        let _call = self.calls.enter(&header);
        let mode: Mode = mode.parse()?;
        self.authority.check(&header, Action::SetMode).await?;
        Ok(self.engine.set_mode(mode).await?)
    }

    /// The setting in force: initial, aggressive, standard, slow or off.
    #[zbus(property)]
    fn current_setting(&self) -> String {
        self.status.borrow().setting.as_str().to_owned()
    }

    /// How KSM is driven: throttle, initial, off, aggressive, standard or slow.
    #[zbus(property)]
    fn mode(&self) -> String {
        self.status.borrow().mode.as_str().to_owned()
    }

    /// CLOCK_REALTIME microseconds of the next scheduled step down; 0 when none.
    #[zbus(property)]
    fn next_step_down(&self) -> u64 {
        self.status.borrow().next_step_down_us
    }

    /// Kicks received since start-up. Not signalled: it changes with every kick.
    #[zbus(property(emits_changed_signal = "false"))]
    fn kick_count(&self) -> u64 {
        self.status.borrow().kick_count
    }

    /// The throttler's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }
}

/// Emits one `PropertiesChanged` per published change, holding every property that changed.
pub async fn signal_changes(conn: Connection, mut status: watch::Receiver<Status>) -> zbus::Result<()> {
    let emitter = SignalEmitter::new(&conn, OBJECT_PATH)?;
    let iface = InterfaceName::from_static_str_unchecked(INTERFACE);
    let mut last = status.borrow_and_update().clone();
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().clone();
        let mut changed: HashMap<&str, Variant<'_>> = HashMap::new();
        if now.setting != last.setting {
            changed.insert("CurrentSetting", Variant::from(now.setting.as_str()));
        }
        if now.mode != last.mode {
            changed.insert("Mode", Variant::from(now.mode.as_str()));
        }
        if now.next_step_down_us != last.next_step_down_us {
            changed.insert("NextStepDown", Variant::from(now.next_step_down_us));
        }
        if !changed.is_empty() {
            if let Err(e) = Properties::properties_changed(&emitter, iface.clone(), changed, Cow::Borrowed(&[])).await {
                tracing::warn!("emitting PropertiesChanged: {e}");
            }
        }
        last = now;
    }
    Ok(())
}
