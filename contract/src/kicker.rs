//! `Kick` for the Kata-side binaries (the gRPC shim and the sandbox trigger): one bus connection,
//! made on first use and made again after it is lost, every call bounded in time, and failures
//! sorted into "the throttler cannot be reached" and the rest.

use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};

use crate::address::BusArg;
use crate::errors::{self, name_and_message};
use crate::proxy::KsmThrottlerProxy;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KickError {
    /// No bus, no throttler on it, or no answer in time: a later call may succeed.
    #[error("the throttler cannot be reached: {0}")]
    Unreachable(String),
    /// The throttler (polkit) refused this caller.
    #[error("the throttler refused the kick: {0}")]
    Denied(String),
    /// The throttler answered with an error of its own.
    #[error("the throttler failed to kick: {name}: {message}")]
    Failed { name: String, message: String },
}

/// `--bus private` starts a bus of one's own, where no throttler can be: refused up front.
#[derive(Debug, thiserror::Error)]
#[error("--bus private is the daemon's own bus: pass the address kata-ksm-throttler --bus private printed")]
pub struct PrivateBusRefused;

/// Calls on the bus at once. dbus-daemon refuses a connection more than 128 pending replies
/// (`max_replies_per_connection`, its default) with `LimitsExceeded`; the rest wait their turn.
pub const MAX_IN_FLIGHT: usize = 32;

pub struct Kicker {
    bus: BusArg,
    timeout: Duration,
    proxy: Mutex<Option<KsmThrottlerProxy<'static>>>,
    in_flight: Semaphore,
}

impl Kicker {
    /// Connects nothing yet: a throttler or bus that is down at start-up is not an error.
    pub fn new(bus: BusArg, timeout: Duration) -> Result<Kicker, PrivateBusRefused> {
        if bus == BusArg::Private {
            return Err(PrivateBusRefused);
        }
        Ok(Kicker { bus, timeout, proxy: Mutex::new(None), in_flight: Semaphore::new(MAX_IN_FLIGHT) })
    }

    /// One `Kick`, connecting first if needed, all (waiting for a turn included) within the timeout.
    pub async fn kick(&self) -> Result<(), KickError> {
        let turn_then_kick = async {
            // Never closed.
            let _turn = self.in_flight.acquire().await;
            self.try_kick().await
        };
        match tokio::time::timeout(self.timeout, turn_then_kick).await {
            Ok(result) => result,
            Err(_) => {
                Err(KickError::Unreachable(format!("no answer within {}", humantime::format_duration(self.timeout))))
            }
        }
    }

    async fn try_kick(&self) -> Result<(), KickError> {
        let (proxy, fresh) = self.proxy().await?;
        let Err(e) = kick_past_shutdowns(&proxy).await else { return Ok(()) };
        let (error, connection_lost) = classify(&e);
        if !connection_lost {
            return Err(error);
        }
        self.forget(&proxy).await;
        if fresh {
            return Err(error);
        }
        // A connection from before the bus restarted: the call deserves one on a new connection.
        let (proxy, _) = self.proxy().await?;
        let Err(e) = kick_past_shutdowns(&proxy).await else { return Ok(()) };
        let (error, connection_lost) = classify(&e);
        if connection_lost {
            self.forget(&proxy).await;
        }
        Err(error)
    }

    /// Drops `proxy`'s connection, unless another call has already put a new one in its place.
    async fn forget(&self, proxy: &KsmThrottlerProxy<'static>) {
        let mut slot = self.proxy.lock().await;
        let ours = proxy.inner().connection().unique_name();
        if slot.as_ref().is_some_and(|p| p.inner().connection().unique_name() == ours) {
            *slot = None;
        }
    }

    /// The proxy, and whether its connection was made just now.
    async fn proxy(&self) -> Result<(KsmThrottlerProxy<'static>, bool), KickError> {
        let mut slot = self.proxy.lock().await;
        if let Some(proxy) = slot.as_ref() {
            return Ok((proxy.clone(), false));
        }
        let unreachable = |e: zbus::Error| KickError::Unreachable(format!("cannot connect to the bus: {e}"));
        let conn = self.bus.builder().map_err(unreachable)?.build().await.map_err(unreachable)?;
        let proxy = KsmThrottlerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(unreachable)?;
        *slot = Some(proxy.clone());
        Ok((proxy, true))
    }
}

/// How long to wait before calling again a throttler that answered `ShuttingDown`.
pub const SHUTTING_DOWN_RETRY: Duration = Duration::from_millis(50);

/// `Kick`, called again while the throttler answers `ShuttingDown`: the instance the call reached
/// is exiting (a restart, an idle exit), and a later call reaches its successor or has the bus
/// start one. Bounded by [`Kicker::kick`]'s timeout. (A kick caught by a `systemctl restart`
/// under a live trigger failed so, in the end-to-end run.)
async fn kick_past_shutdowns(proxy: &KsmThrottlerProxy<'static>) -> zbus::Result<()> {
    loop {
        match proxy.kick().await {
            Err(e) if name_and_message(&e).is_some_and(|(name, _)| name == errors::SHUTTING_DOWN) => {
                tokio::time::sleep(SHUTTING_DOWN_RETRY).await;
            }
            result => return result,
        }
    }
}

/// The kick's failure, and whether the bus connection itself is gone.
fn classify(e: &zbus::Error) -> (KickError, bool) {
    let Some((name, message)) = name_and_message(e) else {
        return (KickError::Unreachable(format!("the bus connection failed: {e}")), true);
    };
    let error = match name.as_str() {
        errors::SERVICE_UNKNOWN
        | errors::NAME_HAS_NO_OWNER
        | errors::NO_REPLY
        | errors::TIMEOUT
        | errors::TIMED_OUT
        | errors::LIMITS_EXCEEDED
        | errors::SPAWN_CHILD_EXITED
        | errors::SPAWN_FAILED
        | errors::SHUTTING_DOWN => KickError::Unreachable(format!("{name}: {message}")),
        errors::DISCONNECTED | errors::NO_SERVER => {
            return (KickError::Unreachable(format!("{name}: {message}")), true)
        }
        errors::ACCESS_DENIED | errors::INTERACTIVE_AUTHORIZATION_REQUIRED => {
            KickError::Denied(format!("{name}: {message}"))
        }
        _ => KickError::Failed { name, message },
    };
    (error, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method_error(name: &'static str) -> zbus::Error {
        zbus::Error::MethodError(
            zbus::names::OwnedErrorName::try_from(name).expect("error name"),
            Some("why".into()),
            zbus::message::Message::method_call("/", "Ping").build(&()).expect("build"),
        )
    }

    #[test]
    fn failures_are_sorted_by_what_a_caller_can_do_about_them() {
        let (e, lost) = classify(&method_error("org.freedesktop.DBus.Error.ServiceUnknown"));
        assert!(matches!(e, KickError::Unreachable(ref m) if m.contains("ServiceUnknown: why")), "{e:?}");
        assert!(!lost, "the bus answered: the connection is fine");
        let (e, _) = classify(&method_error("org.freedesktop.DBus.Error.AccessDenied"));
        assert!(matches!(e, KickError::Denied(_)), "{e:?}");
        let (e, _) = classify(&method_error("org.kata.KsmThrottler.Error.Sysfs"));
        assert_eq!(e, KickError::Failed { name: "org.kata.KsmThrottler.Error.Sysfs".into(), message: "why".into() });
        let (e, lost) = classify(&zbus::Error::InputOutput(std::io::Error::other("broken pipe").into()));
        assert!(matches!(e, KickError::Unreachable(_)) && lost, "{e:?}");
    }

    #[test]
    fn a_private_bus_is_refused_up_front() {
        assert!(Kicker::new(BusArg::Private, Duration::from_secs(1)).is_err());
        assert!(Kicker::new(BusArg::System, Duration::from_secs(1)).is_ok());
    }
}
