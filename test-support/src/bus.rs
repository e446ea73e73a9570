//! Private system-like buses loaded with the project's own policy, and a zbus client on them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ksm_throttler_contract::names::BUS_NAME;
use ksm_throttler_contract::private_bus::{BusConfig, PrivateBus};
use ksm_throttler_contract::proxy::KsmThrottlerProxy;
use zbus::names::BusName;
use zbus::Connection;

use crate::eventually::{eventually, What};

/// The stock system bus allows 256 connections per uid; a thousand root clients need more.
pub const MANY_CONNECTIONS: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <limit name="max_completed_connections">4096</limit>
  <limit name="max_incomplete_connections">4096</limit>
  <limit name="max_connections_per_user">4096</limit>
</busconfig>
"#;

/// How long a fixture waits for a process to come up on the bus before the test fails.
pub const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// The workspace's root: the folder that has the project's bus policy.
pub fn project_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().find(|dir| dir.join("dbus/org.kata.KsmThrottler.conf").is_file()).unwrap_or(here).to_owned()
}

/// A file of the workspace, by its path from the root.
pub fn project_file(rel: &str) -> PathBuf {
    project_root().join(rel)
}

/// A private system-like bus with the project's policy file included.
pub fn start_bus() -> PrivateBus {
    start_bus_with(BusConfig::default())
}

/// [`start_bus`] with more policy, activation folders and the like.
pub fn start_bus_with(mut config: BusConfig) -> PrivateBus {
    config.policy_files.push(project_file("dbus/org.kata.KsmThrottler.conf"));
    PrivateBus::start(&config).unwrap_or_else(|e| panic!("starting a private dbus-daemon: {e}"))
}

pub async fn connect(bus: &PrivateBus) -> Connection {
    zbus::connection::Builder::address(bus.address())
        .build()
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", bus.address()))
}

/// A client of the throttler that reads every property afresh.
pub async fn proxy(conn: &Connection) -> KsmThrottlerProxy<'static> {
    proxy_result(conn).await.unwrap_or_else(|e| panic!("a throttler proxy: {e}"))
}

/// [`proxy`] for code that reports errors rather than panicking (a child process's client).
pub async fn proxy_result(conn: &Connection) -> zbus::Result<KsmThrottlerProxy<'static>> {
    KsmThrottlerProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await
}

/// Whether `name` has an owner on `conn`'s bus.
pub async fn has_owner(conn: &Connection, name: &str) -> bool {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.unwrap_or_else(|e| panic!("the bus's own proxy: {e}"));
    let name = BusName::try_from(name).unwrap_or_else(|e| panic!("bus name {name}: {e}"));
    dbus.name_has_owner(name).await.unwrap_or_else(|e| panic!("NameHasOwner: {e}"))
}

/// The PID of `name`'s owner, if it has one.
pub async fn owner_pid(conn: &Connection, name: &str) -> Option<u32> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.unwrap_or_else(|e| panic!("the bus's own proxy: {e}"));
    let name = BusName::try_from(name).unwrap_or_else(|e| panic!("bus name {name}: {e}"));
    dbus.get_connection_unix_process_id(name).await.ok()
}

/// Waits ([`STARTUP_LIMIT`]) until `name` has an owner; `what` tells about the failure.
pub async fn wait_for_owner(conn: &Connection, name: &str, what: impl What) {
    eventually(STARTUP_LIMIT, what, async || has_owner(conn, name).await).await;
}

/// Waits ([`STARTUP_LIMIT`]) until the throttler owns its name.
pub async fn wait_for_throttler(conn: &Connection, what: impl What) {
    wait_for_owner(conn, BUS_NAME, what).await;
}

/// The D-Bus error name of a failed call.
pub fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(e) => zbus::DBusError::name(e.as_ref()).to_string(),
        other => format!("not a D-Bus error: {other}"),
    }
}

/// The message of a failed call.
pub fn error_message(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(m), _) => m.clone(),
        zbus::Error::FDO(e) => zbus::DBusError::description(e.as_ref()).unwrap_or_default().to_owned(),
        other => other.to_string(),
    }
}
