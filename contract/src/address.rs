//! `--bus`: which bus to serve on or call; every binary shares it.

use std::str::FromStr;

/// Which bus to serve on or call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusArg {
    System,
    Session,
    /// A `dbus-daemon` of our own, for hosts with no system bus.
    Private,
    /// Any D-Bus address, e.g. `unix:path=/run/dbus/system_bus_socket`.
    Address(String),
}

impl FromStr for BusArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "system" => BusArg::System,
            "session" => BusArg::Session,
            "private" => BusArg::Private,
            a if a.contains(':') => BusArg::Address(a.to_owned()),
            _ => return Err(format!("{s:?} is not system, session, private or a D-Bus address such as unix:path=/run/dbus/system_bus_socket")),
        })
    }
}

impl BusArg {
    /// The address of an existing bus (`Private` has none until the caller starts it).
    pub fn address(&self) -> zbus::Result<zbus::Address> {
        match self {
            BusArg::System => zbus::Address::system(),
            BusArg::Session => zbus::Address::session(),
            BusArg::Address(a) => a.parse(),
            BusArg::Private => Err(zbus::Error::Address("a private bus has no address until it is started".into())),
        }
    }

    /// A connection builder for an existing bus (`Private` has none: the caller starts it).
    pub fn builder(&self) -> zbus::Result<zbus::connection::Builder<'static>> {
        Ok(match self {
            BusArg::System => zbus::connection::Builder::system(),
            BusArg::Session => zbus::connection::Builder::session(),
            BusArg::Address(a) => zbus::connection::Builder::address(a.as_str()),
            BusArg::Private => {
                return Err(zbus::Error::Address("a private bus has no address until it is started".into()))
            }
        })
    }
}
