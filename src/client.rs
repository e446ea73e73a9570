//! A client-side proxy of `org.kata.KsmThrottler`, for the shim, the trigger, tools and tests.

use zbus::proxy;

#[proxy(
    interface = "org.kata.KsmThrottler",
    default_service = "org.kata.KsmThrottler",
    default_path = "/org/kata/KsmThrottler"
)]
pub trait KsmThrottler {
    fn kick(&self) -> zbus::Result<()>;
    fn set_mode(&self, mode: &str) -> zbus::Result<()>;

    #[zbus(property)]
    fn current_setting(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn mode(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn next_step_down(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn kick_count(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> zbus::Result<String>;
}
