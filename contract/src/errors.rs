//! The error names a caller of the throttler sees: the standard D-Bus ones where one fits, the
//! service's own `org.kata.KsmThrottler.Error.*` for what only a KSM throttler can fail at. The
//! daemon's bus face answers with these names; clients sort failures by them.

/// The prefix of the service's own error names.
pub const PREFIX: &str = "org.kata.KsmThrottler.Error";

/// A KSM knob could not be read or written; the message names the path and errno.
pub const SYSFS: &str = "org.kata.KsmThrottler.Error.Sysfs";
/// /proc/meminfo could not be read.
pub const MEMINFO: &str = "org.kata.KsmThrottler.Error.Meminfo";
/// The crash-safe record of the initial settings could not be written.
pub const STATE_FILE: &str = "org.kata.KsmThrottler.Error.StateFile";
/// The throttler is exiting: a later call reaches the next one.
pub const SHUTTING_DOWN: &str = "org.kata.KsmThrottler.Error.ShuttingDown";
/// The /proc walk behind Sandboxes or Doctor failed as a whole.
pub const INSPECT: &str = "org.kata.KsmThrottler.Error.Inspect";

/// The standard names the throttler answers with.
pub const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
pub const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
pub const INTERACTIVE_AUTHORIZATION_REQUIRED: &str = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired";
pub const LIMITS_EXCEEDED: &str = "org.freedesktop.DBus.Error.LimitsExceeded";

/// The standard names the bus answers with when the throttler cannot be reached.
pub const SERVICE_UNKNOWN: &str = "org.freedesktop.DBus.Error.ServiceUnknown";
pub const NAME_HAS_NO_OWNER: &str = "org.freedesktop.DBus.Error.NameHasNoOwner";
pub const NO_REPLY: &str = "org.freedesktop.DBus.Error.NoReply";
pub const TIMEOUT: &str = "org.freedesktop.DBus.Error.Timeout";
pub const TIMED_OUT: &str = "org.freedesktop.DBus.Error.TimedOut";
pub const SPAWN_CHILD_EXITED: &str = "org.freedesktop.DBus.Error.Spawn.ChildExited";
pub const SPAWN_FAILED: &str = "org.freedesktop.DBus.Error.Spawn.Failed";
pub const DISCONNECTED: &str = "org.freedesktop.DBus.Error.Disconnected";
pub const NO_SERVER: &str = "org.freedesktop.DBus.Error.NoServer";

/// The error name and message of a failed call, or `None` for a failure that is no D-Bus error
/// (the connection itself).
#[cfg(feature = "client")]
pub fn name_and_message(e: &zbus::Error) -> Option<(String, String)> {
    match e {
        zbus::Error::MethodError(name, message, _) => Some((name.to_string(), message.clone().unwrap_or_default())),
        zbus::Error::FDO(e) => Some((
            zbus::DBusError::name(e.as_ref()).to_string(),
            zbus::DBusError::description(e.as_ref()).unwrap_or_default().to_owned(),
        )),
        _ => None,
    }
}
