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
    fn set_need_gate(&self, gate: &str) -> zbus::Result<()>;

    #[zbus(property)]
    fn need_gate(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn need(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn need_reason(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn current_setting(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn mode(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn next_step_down(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn kick_count(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn transition_counts(&self) -> zbus::Result<std::collections::HashMap<String, u64>>;
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> zbus::Result<String>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_shared(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_sharing(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_unshared(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_volatile(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn full_scans(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn ksm_zero_pages(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn general_profit(&self) -> zbus::Result<i64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn saved_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn run(&self) -> zbus::Result<u32>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_to_scan(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn sleep_millisecs(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn ksmd_cpu_seconds(&self) -> zbus::Result<f64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn ksmd_cpu_share(&self) -> zbus::Result<f64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn ksmd_cycle_cpu_seconds(&self) -> zbus::Result<f64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn mem_available_ratio(&self) -> zbus::Result<f64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn memory_pressure_some(&self) -> zbus::Result<f64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn memory_pressure_full(&self) -> zbus::Result<f64>;
}

/// `org.kata.KsmThrottler.Inspect` on the same object: the answers are JSON (see the XML).
#[proxy(
    interface = "org.kata.KsmThrottler.Inspect",
    default_service = "org.kata.KsmThrottler",
    default_path = "/org/kata/KsmThrottler"
)]
pub trait Inspect {
    fn sandboxes(&self) -> zbus::Result<String>;
    fn doctor(&self) -> zbus::Result<String>;
}
