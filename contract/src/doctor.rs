//! The answer of `Doctor()`: findings with a severity, what was seen and what to do. The
//! daemon's rules make them; clients parse them with [`parse_doctor`].

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    /// A stable name for scripts: `sandbox-shared-memory`, `ksm-missing`, …
    pub code: String,
    /// The sandbox it is about, if any.
    pub sandbox: Option<String>,
    pub message: String,
    /// What to do, and what it costs; empty when nothing needs doing.
    pub fix: String,
}

/// The answer of `Doctor()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorAnswer {
    /// Whether a finding is an error (ksmtctl doctor then exits non-zero).
    pub failed: bool,
    pub findings: Vec<Finding>,
}

/// The answer of `Doctor()`, from its JSON.
pub fn parse_doctor(json: &str) -> Result<DoctorAnswer, String> {
    serde_json::from_str(json).map_err(|e| format!("the throttler's Doctor answer does not parse: {e}"))
}
