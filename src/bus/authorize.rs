//! Who may drive KSM. Root (by the caller's bus credentials) always may; anyone else is asked
//! about through polkit with the caller's unique bus name as the subject, which cannot be raced
//! the way a pid can. polkit unreachable means no (fail closed).

use std::collections::HashMap;
use std::sync::Mutex;

use zbus::fdo::DBusProxy;
use zbus::message::{Flags, Header};
use zbus::names::{BusName, UniqueName};
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use crate::bus::error::BusError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kick,
    SetMode,
    /// Sandboxes and Doctor: read-only, but they tell what merged in whose memory.
    Inspect,
}

impl Action {
    pub const fn id(self) -> &'static str {
        match self {
            Action::Kick => "org.kata.KsmThrottler.kick",
            Action::SetMode => "org.kata.KsmThrottler.set-mode",
            Action::Inspect => "org.kata.KsmThrottler.inspect",
        }
    }
}

/// Unique names are never reused on a bus, so a caller's uid can be remembered; the bound only
/// keeps a long-lived daemon's memory flat.
const UID_CACHE_MAX: usize = 4096;

/// A unique name as dbus-daemon and dbus-broker hand them out (`:1.42`), packed into the key so
/// that remembering a caller allocates nothing. Each name kept as a string was allocated in the
/// middle of a burst's short-lived buffers and pinned a heap page once they were freed, which
/// `malloc_trim` cannot give back (docs/performance.md, "The heap after a burst").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CallerId(u64, u64);

impl CallerId {
    /// `None` for any other shape (such a caller is asked about on every call). Only canonical
    /// decimals are accepted (no sign, no leading zero), so two names never share a key.
    fn parse(name: &str) -> Option<Self> {
        fn number(s: &str) -> Option<u64> {
            let canonical = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
            canonical.then(|| s.parse().ok()).flatten()
        }
        let (major, minor) = name.strip_prefix(':')?.split_once('.')?;
        Some(CallerId(number(major)?, number(minor)?))
    }
}

/// How long polkit may take to answer a check that asks nobody anything.
pub const POLKIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a check that lets polkit ask the caller's user to authenticate may take: longer, as
/// a person may be typing a password, and still inside the 25 s a libdbus or sd-bus caller waits
/// for a reply by default, so that the refusal reaches it.
pub const POLKIT_INTERACTIVE_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);
/// Checks one caller (one unique name) may have waiting for polkit at once; more are refused at
/// once, so that a caller cannot pile up work behind a slow or hung polkitd.
pub const POLKIT_PENDING_PER_CALLER: usize = 8;

pub struct Authority {
    dbus: DBusProxy<'static>,
    polkit: AuthorityProxy<'static>,
    uids: Mutex<HashMap<CallerId, u32>>,
    /// Checks waiting for polkit, per caller; a caller leaves the map with its last check.
    pending: Mutex<HashMap<String, usize>>,
}

/// One check counted in [`Authority::pending`] until dropped (answered, timed out, or the call
/// dropped).
struct Pending<'a> {
    pending: &'a Mutex<HashMap<String, usize>>,
    caller: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut pending = lock(self.pending);
        if let Some(n) = pending.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.caller);
            }
        }
    }
}

/// A panic while holding one of these locks cannot leave its map inconsistent: keep using it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Authority {
    /// Long-lived proxies on the daemon's own connection; nothing is asked of polkit until a
    /// non-root caller shows up, so a host without polkit still serves root.
    pub async fn new(conn: &Connection) -> zbus::Result<Self> {
        let dbus = DBusProxy::new(conn).await?;
        let polkit = AuthorityProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?;
        Ok(Authority { dbus, polkit, uids: Mutex::new(HashMap::new()), pending: Mutex::new(HashMap::new()) })
    }

    pub async fn check(&self, header: &Header<'_>, action: Action) -> Result<(), BusError> {
        let sender =
            header.sender().ok_or_else(|| BusError::AccessDenied("the call has no sender to authorize".into()))?;
        if self.uid_of(sender).await? == 0 {
            return Ok(());
        }
        let interactive = header.primary().flags().contains(Flags::ALLOW_INTERACTIVE_AUTH);
        let flags = if interactive {
            CheckAuthorizationFlags::ALLOW_USER_INTERACTION
        } else {
            CheckAuthorizationFlags::empty()
        };
        let _pending = self.enter(sender, action)?;
        let subject = Subject::new_for_message_header(header)
            .map_err(|e| BusError::AccessDenied(format!("cannot name the caller to polkit: {e}")))?;
        // A hung polkitd must not hold callers forever: denied once the wait is over (a person
        // authenticating gets longer). Root never waits here.
        let limit = if interactive { POLKIT_INTERACTIVE_LIMIT } else { POLKIT_LIMIT };
        let details = HashMap::new();
        let asked = self.polkit.check_authorization(&subject, action.id(), &details, flags, "");
        let result = match tokio::time::timeout(limit, asked).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => {
                tracing::warn!(action = action.id(), caller = %sender, "polkit unreachable, denying: {e}");
                return Err(BusError::AccessDenied(format!(
                    "{} needs authorization, and polkit could not be asked: {e}",
                    action.id()
                )));
            }
            Err(_) => {
                tracing::warn!(action = action.id(), caller = %sender, "polkit did not answer in {}s, denying", limit.as_secs());
                return Err(BusError::AccessDenied(format!(
                    "{} needs authorization, and polkit did not answer within {}s",
                    action.id(),
                    limit.as_secs()
                )));
            }
        };
        if result.is_authorized {
            Ok(())
        } else if result.is_challenge && !interactive {
            Err(BusError::InteractiveAuthorizationRequired(format!(
                "{} needs authentication: call again allowing interactive authorization",
                action.id()
            )))
        } else {
            Err(BusError::AccessDenied(format!("not authorized for {}", action.id())))
        }
    }

    /// Counts a check of `caller`'s, or refuses it with `LimitsExceeded` if it has too many
    /// waiting already.
    fn enter(&self, caller: &UniqueName<'_>, action: Action) -> Result<Pending<'_>, BusError> {
        let mut pending = lock(&self.pending);
        let n = pending.entry(caller.as_str().to_owned()).or_insert(0);
        if *n >= POLKIT_PENDING_PER_CALLER {
            tracing::warn!(action = action.id(), caller = %caller, "{n} authorization checks already waiting for polkit: refused");
            return Err(BusError::LimitsExceeded(format!(
                "{caller} has {n} authorization checks waiting for polkit already, the most allowed; \
                 call again once they are answered"
            )));
        }
        *n += 1;
        Ok(Pending { pending: &self.pending, caller: caller.as_str().to_owned() })
    }

    async fn uid_of(&self, sender: &UniqueName<'_>) -> Result<u32, BusError> {
        let id = CallerId::parse(sender.as_str());
        if let Some(uid) = id.and_then(|id| self.cache().get(&id).copied()) {
            return Ok(uid);
        }
        let uid = self
            .dbus
            .get_connection_unix_user(BusName::Unique(sender.as_ref()))
            .await
            .map_err(|e| BusError::AccessDenied(format!("cannot tell who {sender} is: {e}")))?;
        if let Some(id) = id {
            let mut cache = self.cache();
            if cache.len() >= UID_CACHE_MAX {
                cache.clear();
            }
            cache.insert(id, uid);
        }
        Ok(uid)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<CallerId, u32>> {
        lock(&self.uids)
    }
}

#[cfg(test)]
mod tests {
    use super::CallerId;

    #[test]
    fn unique_names_pack_one_to_one() {
        assert_eq!(CallerId::parse(":1.42"), Some(CallerId(1, 42)));
        assert_eq!(CallerId::parse(":0.0"), Some(CallerId(0, 0)));
        assert_eq!(CallerId::parse(":1.18446744073709551615"), Some(CallerId(1, u64::MAX)));
        assert_ne!(CallerId::parse(":1.42"), CallerId::parse(":1.43"));
        assert_ne!(CallerId::parse(":1.42"), CallerId::parse(":2.42"));
    }

    #[test]
    fn other_shapes_are_not_packed() {
        // Each of these would alias a canonical name, overflow, or is not a unique name at all.
        for name in [
            ":1.042",
            ":01.42",
            ":1.+42",
            ":+1.42",
            ":1.",
            ":.42",
            ":1",
            ":1.4.2",
            "1.42",
            ":1.18446744073709551616",
            ":a.b",
            "",
        ] {
            assert_eq!(CallerId::parse(name), None, "{name:?}");
        }
    }
}
