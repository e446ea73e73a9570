//! The KSM knobs the throttler changes, as plain values: what the kernel has ([`Knobs`]) and
//! what to write ([`Target`]).

use serde::{Deserialize, Serialize};

pub use ksm_throttler_contract::knobs::{ADVISOR_MODE, ADVISOR_NONE, PAGES_TO_SCAN, RUN, SLEEP_MILLISECS, SMART_SCAN};

/// Every knob the throttler may change, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knobs {
    pub run: u8,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
    /// `None` on kernels without the advisor.
    pub advisor_mode: Option<String>,
    /// `None` on kernels without it (before 6.7), and in records written before it was managed.
    #[serde(default)]
    pub smart_scan: Option<u8>,
}

impl Knobs {
    /// Whether these values could have come from the kernel: what a state file must pass before
    /// anything in it is written back.
    pub fn validate(&self) -> Result<(), String> {
        if self.run > 2 {
            return Err(format!("run must be 0, 1 or 2, not {}", self.run));
        }
        if self.pages_to_scan > u64::from(u32::MAX) || self.sleep_millisecs > u64::from(u32::MAX) {
            return Err("pages_to_scan and sleep_millisecs must fit in 32 bits".into());
        }
        if let Some(smart) = self.smart_scan.filter(|&v| v > 1) {
            return Err(format!("smart_scan must be 0 or 1, not {smart}"));
        }
        if let Some(mode) = &self.advisor_mode {
            if mode.is_empty() || mode.len() > 32 || !mode.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
                return Err(format!("advisor_mode {mode:?} is not a kernel advisor name"));
            }
        }
        Ok(())
    }
}

/// What to write; `None` leaves a knob as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub run: Option<u8>,
    pub pages_to_scan: Option<u64>,
    pub sleep_millisecs: Option<u64>,
    pub advisor_mode: Option<String>,
    pub smart_scan: Option<u8>,
}

impl From<&Knobs> for Target {
    fn from(k: &Knobs) -> Self {
        Target {
            run: Some(k.run),
            pages_to_scan: Some(k.pages_to_scan),
            sleep_millisecs: Some(k.sleep_millisecs),
            advisor_mode: k.advisor_mode.clone(),
            smart_scan: k.smart_scan,
        }
    }
}
