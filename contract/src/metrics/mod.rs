//! The throttler and KSM as Prometheus metrics, for `ksmtctl metrics` (node_exporter's textfile
//! collector) and the HTTP exporter (`metrics-exporter/`): one `GetAll` of
//! `org.kata.KsmThrottler` (public properties: any user may read them) and the world-readable
//! files of `/sys/kernel/mm/ksm` that have no property, encoded with the official
//! `prometheus-client` crate.
//!
//! A throttler that is down, a bus that is gone or a kernel file that is missing is a metric
//! saying so (`ksm_throttler_up`, `ksm_throttler_bus_up`, `ksm_sysfs_file_present`), never a
//! failed scrape. Reading never starts the throttler by D-Bus activation: a scrape every few
//! seconds would otherwise keep an idle-exited throttler alive for ever.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use prometheus_client::encoding::text;
use zbus::fdo::PropertiesProxy;
use zbus::proxy::MethodFlags;
use zbus::{Connection, OwnedVariant};

use crate::accounting::{parse_report, Report};
use crate::names::{BUS_NAME, INTERFACE, OBJECT_PATH};

pub mod ksm_files;
mod registry;
#[cfg(test)]
mod tests;
mod values;

pub use ksm_files::KsmFiles;
pub use registry::registry;
pub use values::KNOWN_PROPERTIES;

/// At most this many sandboxes get series of their own (the most saving first), so a host with
/// thousands of sandboxes cannot make a scrape's label values unbounded.
pub const MAX_SANDBOX_SERIES: usize = 32;

/// `Content-Type` of [`Format::OpenMetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`Format::Prometheus`] (text 0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The settings and modes the throttler has: each is a series of its state set, 1 for the one
/// in force and 0 for the others, so a graph shows every transition.
pub const SETTINGS: [&str; 5] = ["initial", "aggressive", "standard", "slow", "off"];
pub const MODES: [&str; 7] = ["throttle", "adaptive", "initial", "off", "aggressive", "standard", "slow"];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("encoding the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
    #[error("{path}: {what}: {source}")]
    Io { path: std::path::PathBuf, what: &'static str, source: std::io::Error },
}

/// The two text formats: OpenMetrics 1.0 (what Prometheus asks an HTTP exporter for) and the
/// Prometheus text format 0.0.4 (what node_exporter's textfile collector parses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
        }
    }

    /// What to answer an HTTP `Accept` header with: OpenMetrics when the scraper asks for it.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }
}

/// The throttler as one scrape found it.
#[derive(Debug)]
pub enum Throttler {
    /// No bus to ask (the reason, for a log line).
    NoBus(String),
    /// The bus answered, the throttler did not (not running, or the call failed).
    Down(String),
    /// Its properties, from one `GetAll`.
    Up(HashMap<String, OwnedVariant>),
}

/// Everything one scrape reads, as plain data: [`encode`] turns it into text.
#[derive(Debug)]
pub struct Snapshot {
    pub throttler: Throttler,
    /// Whether the bus would start the throttler on demand (`ListActivatableNames`); `None`
    /// when that could not be asked.
    pub activatable: Option<bool>,
    pub ksm: KsmFiles,
    pub page_size: u64,
    /// The Inspect interface's per-sandbox report, when asked for ([`gather_sandboxes`]): it
    /// needs the org.kata.KsmThrottler.inspect action (root has it), so the unprivileged HTTP
    /// exporter does not ask; `ksmtctl metrics` (the timer runs it as root) does.
    pub sandboxes: Option<Result<Report, String>>,
}

/// The per-sandbox report over `conn`, never activating the throttler nor asking for
/// interactive authentication.
pub async fn gather_sandboxes(conn: &Connection) -> Result<Report, String> {
    let proxy = crate::proxy::InspectProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let json = proxy
        .inner()
        .call_with_flags::<_, _, String>("Sandboxes", MethodFlags::NO_AUTO_START, &())
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "Sandboxes returned nothing".to_owned())?;
    parse_report(&json)
}

/// Reads the throttler over `conn` without ever activating it.
pub async fn read_throttler(conn: &Connection) -> (Throttler, Option<bool>) {
    let activatable = async {
        let dbus =
            zbus::fdo::DBusProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?;
        let names = dbus.list_activatable_names().await?;
        Ok::<_, zbus::Error>(names.iter().any(|n| n.as_str() == BUS_NAME))
    }
    .await
    .ok();
    let props = async {
        let proxy = PropertiesProxy::builder(conn)
            .destination(BUS_NAME)
            .path(OBJECT_PATH)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        // NO_AUTO_START: the bus answers ServiceUnknown for a throttler that is not running
        // instead of starting it.
        proxy
            .inner()
            .call_with_flags::<_, _, HashMap<String, OwnedVariant>>("GetAll", MethodFlags::NO_AUTO_START, &(INTERFACE,))
            .await
    }
    .await;
    let throttler = match props {
        Ok(Some(all)) => Throttler::Up(all),
        Ok(None) => Throttler::Down("GetAll returned nothing".into()),
        Err(e) => Throttler::Down(e.to_string()),
    };
    (throttler, activatable)
}

/// One scrape: the throttler over `conn` (or why there is no bus) and the files under `ksm_root`.
pub async fn gather(conn: Result<&Connection, String>, ksm_root: &Path) -> Snapshot {
    let (throttler, activatable) = match conn {
        Ok(conn) => read_throttler(conn).await,
        Err(reason) => (Throttler::NoBus(reason), None),
    };
    Snapshot { throttler, activatable, ksm: KsmFiles::read(ksm_root), page_size: page_size(), sandboxes: None }
}

pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// The text of one scrape.
pub fn encode(s: &Snapshot, format: Format) -> Result<String, MetricsError> {
    let reg = registry(s);
    let mut out = String::with_capacity(8 * 1024);
    match format {
        Format::OpenMetrics => text::encode(&mut out, &reg)?,
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)?,
    }
    Ok(out)
}

/// Writes `text` to `path` so that a reader (node_exporter) sees the old file or the new one,
/// never half of one: a temporary file in the same folder, synced, then renamed over it.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), MetricsError> {
    let io = |what| move |source| MetricsError::Io { path: path.to_owned(), what, source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".ksmtctl-metrics-")
        .tempfile_in(dir)
        .map_err(io("creating a temporary file beside it"))?;
    tmp.write_all(text.as_bytes()).map_err(io("writing"))?;
    // node_exporter runs as another user: the file is world-readable, as the metrics are public.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(io("setting its mode"))?;
    tmp.as_file().sync_all().map_err(io("syncing"))?;
    tmp.persist(path).map_err(|e| io("renaming it into place")(e.error))?;
    Ok(())
}
