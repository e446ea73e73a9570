//! Who may drive KSM. Root (by the caller's bus credentials) always may; anyone else is asked
//! about through polkit with the caller's unique bus name as the subject, which cannot be raced
//! the way a pid can. polkit unreachable means no (fail closed).

use std::collections::HashMap;
use std::sync::Mutex;

use zbus::fdo::DBusProxy;
use zbus::message::{Flags, Header};
use zbus::names::{BusName, OwnedUniqueName};
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use crate::bus_error::BusError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kick,
    SetMode,
}

impl Action {
    pub const fn id(self) -> &'static str {
        match self {
            Action::Kick => "org.kata.KsmThrottler.kick",
            Action::SetMode => "org.kata.KsmThrottler.set-mode",
        }
    }
}

/// Unique names are never reused on a bus, so a caller's uid can be remembered; the bound only
/// keeps a long-lived daemon's memory flat.
const UID_CACHE_MAX: usize = 4096;

pub struct Authority {
    dbus: DBusProxy<'static>,
    polkit: AuthorityProxy<'static>,
    uids: Mutex<HashMap<OwnedUniqueName, u32>>,
}

impl Authority {
    /// Long-lived proxies on the daemon's own connection; nothing is asked of polkit until a
    /// non-root caller shows up, so a host without polkit still serves root.
    pub async fn new(conn: &Connection) -> zbus::Result<Self> {
        let dbus = DBusProxy::new(conn).await?;
        let polkit = AuthorityProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?;
        Ok(Authority { dbus, polkit, uids: Mutex::new(HashMap::new()) })
    }

    pub async fn check(&self, header: &Header<'_>, action: Action) -> Result<(), BusError> {
        let sender =
            header.sender().ok_or_else(|| BusError::AccessDenied("the call has no sender to authorize".into()))?;
        if self.uid_of(sender.to_owned().into()).await? == 0 {
            return Ok(());
        }
        let interactive = header.primary().flags().contains(Flags::ALLOW_INTERACTIVE_AUTH);
        let flags = if interactive {
            CheckAuthorizationFlags::ALLOW_USER_INTERACTION
        } else {
            CheckAuthorizationFlags::empty()
        };
        let subject = Subject::new_for_message_header(header)
            .map_err(|e| BusError::AccessDenied(format!("cannot name the caller to polkit: {e}")))?;
        let result =
            self.polkit.check_authorization(&subject, action.id(), &HashMap::new(), flags, "").await.map_err(|e| {
                tracing::warn!(action = action.id(), caller = %sender, "polkit unreachable, denying: {e}");
                BusError::AccessDenied(format!(
                    "{} needs authorization, and polkit could not be asked: {e}",
                    action.id()
                ))
            })?;
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

    async fn uid_of(&self, sender: OwnedUniqueName) -> Result<u32, BusError> {
        if let Some(uid) = self.cache().get(&sender) {
            return Ok(*uid);
        }
        let uid = self
            .dbus
            .get_connection_unix_user(BusName::Unique(sender.as_ref()))
            .await
            .map_err(|e| BusError::AccessDenied(format!("cannot tell who {sender} is: {e}")))?;
        let mut cache = self.cache();
        if cache.len() >= UID_CACHE_MAX {
            cache.clear();
        }
        cache.insert(sender, uid);
        Ok(uid)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<OwnedUniqueName, u32>> {
        // A panic while holding this lock cannot leave the map inconsistent: keep using it.
        self.uids.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
