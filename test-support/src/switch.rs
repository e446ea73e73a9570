//! The environment switches of the test suite (CONTRIBUTING.md lists them), and how a test that
//! a switch turns off says so.

use std::io::Write;

/// Set: the tests and CI steps that drive the real `/sys/kernel/mm/ksm` skip it (for a machine
/// with no KSM). Unset, they run, and fail without root or KSM.
pub const SKIP_REAL_KSM: &str = "KSM_THROTTLER_SKIP_REAL_KSM";

/// Set to 1: the polkit tests may install the project's actions in `/usr/share/polkit-1` and a
/// test rule in `/etc/polkit-1` on this host (CI sets it). Unset, they skip, saying so.
pub const EDIT_HOST_POLKIT: &str = "KSM_THROTTLER_EDIT_HOST_POLKIT";

/// Whether `var` is set to 1.
pub fn enabled(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == "1")
}

/// Says on the terminal that `test` was skipped and why. Written straight to stderr, past the
/// test harness's capture (which would hide it for a passing test).
pub fn skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// Whether a test that runs only when asked was asked: `var` set to 1. If not, says that
/// `test` was skipped, naming what it would have done and the switch.
pub fn asked(var: &str, test: &str, what_it_does: &str) -> bool {
    if enabled(var) {
        return true;
    }
    skipped(test, &format!("it {what_it_does}; set {var}=1 to run it"));
    false
}
