//! The daemon's objects on the bus, exported in one place: the throttler, its Inspect interface
//! and the project's own Properties (which lists the other two), all at [`OBJECT_PATH`].

use anyhow::Context;
use zbus::Connection;

use crate::bus::inspect::Inspector;
use crate::bus::properties;
use crate::bus::service::Throttler;
use crate::names::OBJECT_PATH;

/// Exports every object; before the name is requested, so that the first call routed here finds
/// them all.
pub async fn export(conn: &Connection, throttler: Throttler, inspector: Inspector) -> anyhow::Result<()> {
    let server = conn.object_server();
    server.at(OBJECT_PATH, throttler).await.context("exporting the object")?;
    server.at(OBJECT_PATH, inspector).await.context("exporting the Inspect interface")?;
    properties::install(server, OBJECT_PATH).await.context("exporting the Properties interface")?;
    Ok(())
}
