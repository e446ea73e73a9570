//! The bus side of exiting on idle (`--exit-idle-after`), after systemd's `bus_event_loop_with_idle`:
//! release the name, serve whatever the bus had already routed here, then let the engine decide
//! (see [`crate::engine`]). What makes "already routed" exact is [`CallTracker`]'s fence.
//! Another way in to the engine (the gRPC socket systemd passes) is closed first, as an
//! [`Intake`]: nothing more is accepted, and the connections already accepted must have closed,
//! else the throttler stays. What arrives meanwhile waits in the socket's backlog, which systemd
//! keeps: served by this instance if it stays, or by the one systemd starts on it next.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use zbus::fdo::DBusProxy;
use zbus::message::{Flags, Message};
use zbus::Connection;

use crate::bus::calls::CallTracker;
use crate::engine::{Drain, EngineError, Handle, Intake, Verdict};
use crate::names::BUS_NAME;

/// How long the calls routed before the release may take to finish (a polkit check is
/// milliseconds; one waiting for a person to authenticate is not worth waiting for: the throttler
/// stays up instead).
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Bounds the whole exchange with the bus, so a stop signal held back meanwhile is not held long.
pub const PROTOCOL_LIMIT: Duration = Duration::from_secs(10);

/// Answers the engine's idle notices until it ends; an error means the name could not be taken
/// back, and the throttler can no longer be reached.
pub async fn serve(
    conn: Connection,
    engine: Handle,
    mut notices: mpsc::Receiver<()>,
    calls: Arc<CallTracker>,
    intake: Option<Arc<dyn Intake>>,
) -> anyhow::Result<()> {
    while notices.recv().await.is_some() {
        let drain = match close_intake(intake.as_deref()).await {
            false => Drain::Unsure,
            true => match tokio::time::timeout(PROTOCOL_LIMIT, release_and_drain(&conn, &calls)).await {
                Ok(drain) => drain,
                Err(_) => {
                    tracing::warn!("the bus did not answer within {}s: staying", PROTOCOL_LIMIT.as_secs());
                    Drain::Unsure
                }
            },
        };
        match engine.conclude_idle(drain).await {
            Ok(Verdict::Exit) | Err(EngineError::ShuttingDown) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(Verdict::Stay) => {
                if let Some(intake) = &intake {
                    intake.resume();
                }
                conn.request_name(BUS_NAME)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot take {BUS_NAME} back after an aborted idle exit: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Stops `intake` accepting and waits (up to [`DRAIN_LIMIT`]) for what it accepted to close;
/// `false` if something is still open.
async fn close_intake(intake: Option<&dyn Intake>) -> bool {
    let Some(intake) = intake else { return true };
    intake.pause();
    if tokio::time::timeout(DRAIN_LIMIT, intake.quiet()).await.is_err() {
        tracing::info!("gRPC connections still open after {}s: staying", DRAIN_LIMIT.as_secs());
        return false;
    }
    true
}

async fn release_and_drain(conn: &Connection, calls: &CallTracker) -> Drain {
    if calls.in_flight() > 0 {
        tracing::debug!("{} call(s) in flight: not idle", calls.in_flight());
        return Drain::Unsure;
    }
    if let Err(e) = conn.release_name(BUS_NAME).await {
        tracing::warn!("releasing {BUS_NAME}: {e}");
        return Drain::Unsure;
    }
    if let Err(e) = calls.fence(conn).await {
        tracing::warn!("asking the bus after releasing {BUS_NAME}: {e}");
        return Drain::Unsure;
    }
    if tokio::time::timeout(DRAIN_LIMIT, calls.drained()).await.is_err() {
        tracing::info!("calls still in flight after {}s: staying", DRAIN_LIMIT.as_secs());
        return Drain::Unsure;
    }
    let successor = match activatable(conn).await {
        Ok(yes) => yes,
        Err(e) => {
            tracing::warn!("asking the bus whether {BUS_NAME} is activatable: {e}");
            false
        }
    };
    Drain::Done { successor }
}

async fn activatable(conn: &Connection) -> zbus::Result<bool> {
    let names = DBusProxy::new(conn).await?.list_activatable_names().await?;
    Ok(names.iter().any(|n| n.as_str() == BUS_NAME))
}

/// Asks the bus to start the next instance, without waiting: it cannot start before this one
/// has exited and released the state directory's lock. Under systemd the start is queued behind
/// this unit's stop.
pub async fn start_successor(conn: &Connection) -> zbus::Result<()> {
    let msg = Message::method_call("/org/freedesktop/DBus", "StartServiceByName")
        .destination("org.freedesktop.DBus")
        .interface("org.freedesktop.DBus")
        .with_flags(Flags::NO_REPLY_EXPECTED)
        .build(&(BUS_NAME, 0u32))?;
    conn.send(&msg).await
}

/// How long a stop waits for the calls routed here before the name was given up to be answered.
pub const STOP_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// On a stop, once the engine has ended: gives the name up, then waits until every call the bus
/// had routed here before that is answered (with `ShuttingDown`, the engine being gone). Without
/// it, a call still queued when the connection closes gets the bus's `NoReply`; calls made after
/// the release find the name free, as after any exit.
pub async fn release_and_answer(conn: &Connection, calls: &CallTracker) {
    let answered = async {
        conn.release_name(BUS_NAME).await?;
        calls.fence(conn).await?;
        calls.drained().await;
        Ok::<_, zbus::Error>(())
    };
    match tokio::time::timeout(STOP_DRAIN_LIMIT, answered).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("giving {BUS_NAME} up before exiting: {e}"),
        Err(_) => tracing::info!("calls still in flight after {}s: exiting", STOP_DRAIN_LIMIT.as_secs()),
    }
}

/// One round trip to the bus: replies that handlers were sending when the engine ended have been
/// written by the time it returns (writes go out in the order they were started).
pub async fn flush(conn: &Connection) {
    if let Err(e) = conn
        .call_method(Some("org.freedesktop.DBus"), "/org/freedesktop/DBus", Some("org.freedesktop.DBus"), "GetId", &())
        .await
    {
        tracing::debug!("flushing before exit: {e}");
    }
}
