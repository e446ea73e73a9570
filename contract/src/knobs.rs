//! The names of the KSM knobs (files of `/sys/kernel/mm/ksm`) the throttler changes and reports:
//! the daemon writes them, ksmtctl names the ones the throttler could not read.

pub const RUN: &str = "run";
pub const PAGES_TO_SCAN: &str = "pages_to_scan";
pub const SLEEP_MILLISECS: &str = "sleep_millisecs";
pub const ADVISOR_MODE: &str = "advisor_mode";
pub const SMART_SCAN: &str = "smart_scan";

/// The advisor value that leaves pages_to_scan to the throttler (Linux 6.8+; absent before).
pub const ADVISOR_NONE: &str = "none";
