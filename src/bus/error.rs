//! Errors as callers on the bus see them, under the names the contract crate states
//! (`ksm_throttler_contract::errors`): the standard ones where one fits, the service's own
//! `org.kata.KsmThrottler.Error.*` for what only a KSM throttler can fail at.

use ksm_throttler_contract::errors;
use zbus::message::{Header, Message};
use zbus::names::ErrorName;
use zbus::DBusError;

use crate::core::setting::UnknownMode;
use crate::engine::EngineError;

pub use ksm_throttler_contract::errors::PREFIX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusError {
    InvalidArgs(String),
    AccessDenied(String),
    InteractiveAuthorizationRequired(String),
    /// Too many calls of one caller waiting (for polkit).
    LimitsExceeded(String),
    /// A KSM knob could not be read or written; the message names the path and errno.
    Sysfs(String),
    /// /proc/meminfo could not be read.
    Meminfo(String),
    /// The crash-safe record of the initial settings could not be written.
    StateFile(String),
    ShuttingDown(String),
    /// The /proc walk behind Sandboxes or Doctor failed as a whole (not one process: those are
    /// skipped rows).
    Inspect(String),
}

impl BusError {
    /// Every error, with an empty message: for lists that must not miss one (the contract's
    /// documentation, the tests). `all_lists_every_variant_once` fails when a variant is added
    /// here and not there.
    pub const ALL: [BusError; 9] = [
        BusError::InvalidArgs(String::new()),
        BusError::AccessDenied(String::new()),
        BusError::InteractiveAuthorizationRequired(String::new()),
        BusError::Sysfs(String::new()),
        BusError::Meminfo(String::new()),
        BusError::StateFile(String::new()),
        BusError::ShuttingDown(String::new()),
        BusError::Inspect(String::new()),
        BusError::LimitsExceeded(String::new()),
    ];

    pub fn message(&self) -> &str {
        match self {
            BusError::InvalidArgs(m)
            | BusError::AccessDenied(m)
            | BusError::InteractiveAuthorizationRequired(m)
            | BusError::Sysfs(m)
            | BusError::Meminfo(m)
            | BusError::StateFile(m)
            | BusError::ShuttingDown(m)
            | BusError::Inspect(m)
            | BusError::LimitsExceeded(m) => m,
        }
    }

    pub fn name_str(&self) -> &'static str {
        match self {
            BusError::InvalidArgs(_) => errors::INVALID_ARGS,
            BusError::AccessDenied(_) => errors::ACCESS_DENIED,
            BusError::InteractiveAuthorizationRequired(_) => errors::INTERACTIVE_AUTHORIZATION_REQUIRED,
            BusError::Sysfs(_) => errors::SYSFS,
            BusError::Meminfo(_) => errors::MEMINFO,
            BusError::StateFile(_) => errors::STATE_FILE,
            BusError::ShuttingDown(_) => errors::SHUTTING_DOWN,
            BusError::Inspect(_) => errors::INSPECT,
            BusError::LimitsExceeded(_) => errors::LIMITS_EXCEEDED,
        }
    }
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name_str(), self.message())
    }
}

impl std::error::Error for BusError {}

impl DBusError for BusError {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name()).build(&(self.message(),))
    }

    fn name(&self) -> ErrorName<'_> {
        ErrorName::from_static_str_unchecked(self.name_str())
    }

    fn description(&self) -> Option<&str> {
        Some(self.message())
    }
}

impl From<EngineError> for BusError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::Sysfs(_) => BusError::Sysfs(msg),
            EngineError::Meminfo(_) => BusError::Meminfo(msg),
            EngineError::State(_) => BusError::StateFile(msg),
            EngineError::ShuttingDown => BusError::ShuttingDown(msg),
        }
    }
}

impl From<crate::core::need::UnknownGate> for BusError {
    fn from(e: crate::core::need::UnknownGate) -> Self {
        BusError::InvalidArgs(e.to_string())
    }
}

impl From<UnknownMode> for BusError {
    fn from(e: UnknownMode) -> Self {
        BusError::InvalidArgs(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_error_has_one_name_whichever_face_answers() {
        use crate::io::sysfs::SysfsError;
        let sysfs = EngineError::Sysfs(SysfsError::Read {
            path: "/sys/kernel/mm/ksm/run".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        for e in [sysfs, EngineError::ShuttingDown] {
            let name = e.error_name();
            assert_eq!(BusError::from(e).name_str(), name);
        }
    }

    #[test]
    fn every_error_is_a_standard_one_or_under_the_service_prefix() {
        for e in BusError::ALL {
            let standard = e.name_str().starts_with("org.freedesktop.DBus.Error.");
            assert!(standard || e.name_str().starts_with(&format!("{PREFIX}.")), "{e}");
            ErrorName::try_from(e.name_str()).expect("a valid error name");
        }
    }

    /// Adding a variant breaks this match: the place to add it to `ALL` as well.
    #[test]
    fn all_lists_every_variant_once() {
        let at = |e: &BusError| match e {
            BusError::InvalidArgs(_) => 0,
            BusError::AccessDenied(_) => 1,
            BusError::InteractiveAuthorizationRequired(_) => 2,
            BusError::Sysfs(_) => 3,
            BusError::Meminfo(_) => 4,
            BusError::StateFile(_) => 5,
            BusError::ShuttingDown(_) => 6,
            BusError::Inspect(_) => 7,
            BusError::LimitsExceeded(_) => 8,
        };
        assert_eq!(BusError::ALL.each_ref().map(at), [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
