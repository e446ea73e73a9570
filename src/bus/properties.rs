//! `org.freedesktop.DBus.Properties` on the throttler's objects, in place of zbus's own. Any local
//! user may call it, and zbus's copies what it is sent: its error for an unknown property echoes
//! the name, however long, and `Set` deserializes its value whole before it looks at the name
//! (what that cost: docs/performance.md, "Hostile callers"). Here a name is borrowed from the
//! message, never echoed when longer than any D-Bus name, and `Set`, which has no writable property
//! to reach, is answered without reading its value.
//!
//! zbus's object server finds an interface only by its Rust type (`ObjectServer::interface::<_, I>`;
//! the lookup by name its own `Properties` uses is private to the crate, and upstream added a
//! by-name `remove_named` alone: <https://github.com/z-galaxy/zbus/pull/1810>, with the trait's
//! future in <https://github.com/z-galaxy/zbus/issues/674>). So the interfaces with properties are
//! named here once, in the one table `own_interfaces!` makes, and every method dispatches through it.

use std::collections::HashMap;
use std::fmt::Write;

use async_trait::async_trait;
use zbus::fdo;
use zbus::message::{Header, Message};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::zvariant::Type;
use zbus::{BoxDBusError, Connection, ObjectPath, ObjectServer, OwnedVariant, Variant};

use crate::bus::inspect::Inspector;
use crate::bus::service::Throttler;

/// The longest interface or member name D-Bus allows; a longer one names nothing here.
pub const MAX_NAME: usize = 255;

const NAME: &str = "org.freedesktop.DBus.Properties";

/// The interfaces every object has, with no properties.
const STANDARD: [&str; 3] = ["org.freedesktop.DBus.Peer", "org.freedesktop.DBus.Introspectable", NAME];

pub struct Properties;

/// Puts [`Properties`] in place of zbus's on `path` and on each object above it (zbus makes them
/// to lead to it), so that no object of this connection answers with zbus's.
pub async fn install(server: &ObjectServer, path: &str) -> zbus::Result<()> {
    let mut at = String::new();
    let mut paths = vec!["/".to_owned()];
    for part in path.split('/').filter(|p| !p.is_empty()) {
        at.push('/');
        at.push_str(part);
        paths.push(at.clone());
    }
    for p in paths {
        server.remove::<fdo::Properties, _>(p.as_str()).await?;
        server.at(p.as_str(), Properties).await?;
    }
    Ok(())
}

/// A name as an error may show it: whole when it could be a name, else only its length.
fn shown(name: &str) -> String {
    if name.len() <= MAX_NAME {
        format!("'{name}'")
    } else {
        format!("of {} bytes (longer than any D-Bus name)", name.len())
    }
}

fn unknown_interface(name: &str) -> fdo::Error {
    fdo::Error::UnknownInterface(format!("Unknown interface {}", shown(name)))
}

fn unknown_property(name: &str) -> fdo::Error {
    fdo::Error::UnknownProperty(format!("Unknown property {}", shown(name)))
}

/// The one table of this daemon's interfaces that have properties: `Get`, `GetAll` and `Set` all
/// dispatch through the `Own` it defines, so an interface added here is served by each of them.
macro_rules! own_interfaces {
    ($($iface:ident),+ $(,)?) => {
        /// One of this daemon's interfaces with properties.
        #[derive(Clone, Copy)]
        enum Own {
            $($iface),+
        }

        impl Own {
            /// Every entry of the table, in the order an empty interface name searches them.
            const ALL: &'static [Own] = &[$(Own::$iface),+];

            fn name(self) -> InterfaceName<'static> {
                match self {
                    $(Own::$iface => <$iface as Interface>::name()),+
                }
            }

            /// Whether the object at `path` has this interface.
            async fn at(self, server: &ObjectServer, path: &ObjectPath<'_>) -> bool {
                match self {
                    $(Own::$iface => server.interface::<_, $iface>(path).await.is_ok()),+
                }
            }

            async fn get(
                self,
                server: &ObjectServer,
                conn: &Connection,
                header: &Header<'_>,
                path: &ObjectPath<'_>,
                name: &str,
            ) -> Option<Result<OwnedVariant, BoxDBusError>> {
                match self {
                    $(Own::$iface => get_of::<$iface>(server, conn, header, path, name).await),+
                }
            }

            async fn get_all(
                self,
                server: &ObjectServer,
                conn: &Connection,
                header: &Header<'_>,
                path: &ObjectPath<'_>,
            ) -> fdo::Result<HashMap<String, OwnedVariant>> {
                match self {
                    $(Own::$iface => get_all_of::<$iface>(server, conn, header, path).await),+
                }
            }
        }
    };
}

own_interfaces!(Throttler, Inspector);

/// What a name found at the path: one of this daemon's interfaces, a standard one (no
/// properties), or nothing.
enum Target {
    Own(Own),
    Standard,
}

async fn target(server: &ObjectServer, path: &ObjectPath<'_>, interface: &str) -> Result<Target, fdo::Error> {
    if let Some(own) = Own::ALL.iter().copied().find(|own| own.name().as_str() == interface) {
        if own.at(server, path).await {
            return Ok(Target::Own(own));
        }
    } else if STANDARD.contains(&interface) && server.interface::<_, Properties>(path).await.is_ok() {
        return Ok(Target::Standard);
    }
    Err(unknown_interface(interface))
}

/// Property `name` of interface `I` at `path`; `None` where `I` has no such property.
async fn get_of<I: Interface>(
    server: &ObjectServer,
    conn: &Connection,
    header: &Header<'_>,
    path: &ObjectPath<'_>,
    name: &str,
) -> Option<Result<OwnedVariant, BoxDBusError>> {
    let iface = server.interface::<_, I>(path).await.ok()?;
    let emitter = SignalEmitter::new(conn, path.clone()).ok()?;
    let guard = iface.get().await;
    <I as Interface>::get(&*guard, name, server, conn, Some(header), &emitter).await
}

async fn get_all_of<I: Interface>(
    server: &ObjectServer,
    conn: &Connection,
    header: &Header<'_>,
    path: &ObjectPath<'_>,
) -> fdo::Result<HashMap<String, OwnedVariant>> {
    let iface = server.interface::<_, I>(path).await.map_err(|_| unknown_interface(I::name().as_str()))?;
    let emitter = SignalEmitter::new(conn, path.clone()).map_err(|e| fdo::Error::Failed(e.to_string()))?;
    let guard = iface.get().await;
    <I as Interface>::get_all(&*guard, server, conn, Some(header), &emitter).await
}

/// `Get`: an empty interface name, as the specification allows, looks in each of this daemon's
/// interfaces in turn.
async fn get(
    server: &ObjectServer,
    conn: &Connection,
    header: &Header<'_>,
    path: &ObjectPath<'_>,
    interface: &str,
    name: &str,
) -> Result<OwnedVariant, BoxDBusError> {
    let found = if interface.is_empty() {
        let mut found = None;
        for own in Own::ALL {
            found = own.get(server, conn, header, path, name).await;
            if found.is_some() {
                break;
            }
        }
        found
    } else {
        match target(server, path, interface).await? {
            Target::Own(own) => own.get(server, conn, header, path, name).await,
            Target::Standard => None,
        }
    };
    found.unwrap_or_else(|| Err(Box::new(unknown_property(name))))
}

async fn get_all(
    server: &ObjectServer,
    conn: &Connection,
    header: &Header<'_>,
    path: &ObjectPath<'_>,
    interface: &str,
) -> fdo::Result<HashMap<String, OwnedVariant>> {
    match target(server, path, interface).await? {
        Target::Own(own) => own.get_all(server, conn, header, path).await,
        Target::Standard => Ok(HashMap::new()),
    }
}

/// `Set`: every property here is read-only. Whether `name` is one is learnt by reading it, which
/// no value sent can make costly.
async fn set(
    server: &ObjectServer,
    conn: &Connection,
    header: &Header<'_>,
    path: &ObjectPath<'_>,
    interface: &str,
    name: &str,
) -> fdo::Result<()> {
    let exists = match target(server, path, interface).await? {
        Target::Own(own) => own.get(server, conn, header, path, name).await.is_some(),
        Target::Standard => false,
    };
    Err(if exists {
        fdo::Error::PropertyReadOnly(format!("Property {} is read-only", shown(name)))
    } else {
        unknown_property(name)
    })
}

/// The arguments must be of type `T`; the caller's are named (a signature is short).
fn arguments_are<T: Type>(msg: &Message) -> fdo::Result<()> {
    let body = msg.body();
    let got = body.signature();
    if got == T::SIGNATURE {
        Ok(())
    } else {
        Err(fdo::Error::InvalidArgs(format!("Signature mismatch: got `{got}`, expected `{}`", T::SIGNATURE)))
    }
}

async fn call(server: &ObjectServer, conn: &Connection, msg: &Message, member: &str) -> Result<Reply, BoxDBusError> {
    let header = msg.header();
    let path = header.path().ok_or_else(|| fdo::Error::Failed("Missing object path".into()))?.clone();
    let body = msg.body();
    match member {
        "Get" => {
            arguments_are::<(&str, &str)>(msg)?;
            let (interface, name): (&str, &str) = body.deserialize().map_err(invalid)?;
            Ok(Reply::Value(get(server, conn, &header, &path, interface, name).await?))
        }
        "GetAll" => {
            arguments_are::<&str>(msg)?;
            let (interface,): (&str,) = body.deserialize().map_err(invalid)?;
            Ok(Reply::All(get_all(server, conn, &header, &path, interface).await?))
        }
        _ => {
            arguments_are::<(&str, &str, Variant<'_>)>(msg)?;
            // The two names only: the value (which may be megabytes of array) is never decoded.
            let (interface, name): (&str, &str) = body.deserialize_ignore_signature().map_err(invalid)?;
            set(server, conn, &header, &path, interface, name).await?;
            Ok(Reply::None)
        }
    }
}

fn invalid(e: zbus::Error) -> fdo::Error {
    fdo::Error::InvalidArgs(e.to_string())
}

/// A method's answer, serialized as its own type.
enum Reply {
    Value(OwnedVariant),
    All(HashMap<String, OwnedVariant>),
    None,
}

async fn answer(conn: &Connection, msg: &Message, reply: Result<Reply, BoxDBusError>) -> Result<(), BoxDBusError> {
    let header = msg.header();
    if header.primary().flags().contains(zbus::message::Flags::NO_REPLY_EXPECTED) {
        return Ok(());
    }
    let sent = match reply {
        Ok(Reply::Value(v)) => conn.reply(&header, &v).await,
        Ok(Reply::All(all)) => conn.reply(&header, &all).await,
        Ok(Reply::None) => conn.reply(&header, &()).await,
        Err(e) => conn.reply_dbus_error(&header, e).await,
    };
    sent.map(drop).map_err(|e| Box::new(fdo::Error::Failed(e.to_string())) as BoxDBusError)
}

#[async_trait]
impl Interface for Properties {
    fn name() -> InterfaceName<'static> {
        InterfaceName::from_static_str_unchecked(NAME)
    }

    async fn get(
        &self,
        _property_name: &str,
        _server: &ObjectServer,
        _connection: &Connection,
        _header: Option<&Header<'_>>,
        _emitter: &SignalEmitter<'_>,
    ) -> Option<Result<OwnedVariant, BoxDBusError>> {
        None
    }

    async fn get_all(
        &self,
        _server: &ObjectServer,
        _connection: &Connection,
        _header: Option<&Header<'_>>,
        _emitter: &SignalEmitter<'_>,
    ) -> fdo::Result<HashMap<String, OwnedVariant>> {
        Ok(HashMap::new())
    }

    async fn set_mut(
        &mut self,
        _property_name: &str,
        _value: &Variant<'_>,
        _server: &ObjectServer,
        _connection: &Connection,
        _header: Option<&Header<'_>>,
        _emitter: &SignalEmitter<'_>,
    ) -> Option<Result<(), BoxDBusError>> {
        None
    }

    fn call<'call>(
        &'call self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        let member = match name.as_str() {
            "Get" => "Get",
            "GetAll" => "GetAll",
            "Set" => "Set",
            _ => return DispatchResult::NotFound,
        };
        DispatchResult::Async(Box::pin(async move {
            let reply = call(server, connection, msg, member).await;
            answer(connection, msg, reply).await
        }))
    }

    fn call_mut<'call>(
        &'call mut self,
        _server: &'call ObjectServer,
        _connection: &'call Connection,
        _msg: &'call Message,
        _name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        DispatchResult::NotFound
    }

    fn introspect_to_writer(&self, writer: &mut dyn Write, level: usize) {
        // The same contract as zbus's, as zbus writes it.
        fdo::Properties.introspect_to_writer(writer, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_longer_than_any_is_shown_by_its_length() {
        assert_eq!(shown("Mode"), "'Mode'");
        let long = "x".repeat(MAX_NAME + 1);
        assert_eq!(shown(&long), "of 256 bytes (longer than any D-Bus name)");
        assert_eq!(shown(&"y".repeat(MAX_NAME)).len(), MAX_NAME + 2);
    }
}
