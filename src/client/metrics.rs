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
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use zbus::fdo::PropertiesProxy;
use zbus::proxy::MethodFlags;
use zbus::{Connection, OwnedVariant, Variant as Value};

use crate::client::inspect;
use crate::client::ksm_files::{self, KsmFiles};
use crate::core::accounting::Report;
use crate::names::{BUS_NAME, INTERFACE, OBJECT_PATH};

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

/// The longest label value taken from the bus (a setting or mode the exporter does not know).
const MAX_LABEL: usize = 32;
/// At most this many causes of `TransitionCounts` get series (the throttler has 8), so a
/// throttler answering nonsense cannot make a scrape's label values unbounded.
const MAX_CAUSES: usize = 16;

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
    let proxy = crate::client::proxy::InspectProxy::builder(conn)
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
    inspect::parse_report(&json)
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

/// The KSM values: from the throttler's property when it is up (the value its clients see),
/// from the file otherwise (so the series go on while an idle throttler has exited); exported
/// only when the kernel has the file.
struct KsmValue {
    file: &'static str,
    property: Option<&'static str>,
    name: &'static str,
    help: &'static str,
    counter: bool,
    unit: Option<Unit>,
    /// The file's value over this is the metric's, in base units (1000 for milliseconds).
    per: f64,
}

fn value(file: &'static str, property: Option<&'static str>, name: &'static str, help: &'static str) -> KsmValue {
    KsmValue { file, property, name, help, counter: false, unit: None, per: 1.0 }
}

fn ksm_values() -> Vec<KsmValue> {
    let counter = |v: KsmValue| KsmValue { counter: true, ..v };
    let unit = |v: KsmValue, unit: Unit, per: f64| KsmValue { unit: Some(unit), per, ..v };
    vec![
        counter(value(
            "full_scans",
            Some("FullScans"),
            "ksm_full_scans",
            "Full scans of all mergeable memory completed (full_scans)",
        )),
        counter(value("pages_scanned", None, "ksm_pages_scanned", "Pages ksmd has scanned since boot (pages_scanned)")),
        counter(value(
            "pages_skipped",
            None,
            "ksm_pages_skipped",
            "Pages smart_scan skipped since boot (pages_skipped)",
        )),
        value(
            "pages_shared",
            Some("PagesShared"),
            "ksm_pages_shared",
            "KSM pages in use, each backing several mappings (pages_shared)",
        ),
        value(
            "pages_sharing",
            Some("PagesSharing"),
            "ksm_pages_sharing",
            "Mappings sharing a KSM page: the pages saved (pages_sharing)",
        ),
        value(
            "pages_unshared",
            Some("PagesUnshared"),
            "ksm_pages_unshared",
            "Pages unique but repeatedly checked for merging (pages_unshared)",
        ),
        value(
            "pages_volatile",
            Some("PagesVolatile"),
            "ksm_pages_volatile",
            "Pages changing too fast to merge (pages_volatile)",
        ),
        value(
            "ksm_zero_pages",
            Some("KsmZeroPages"),
            "ksm_zero_pages",
            "Empty pages merged with the kernel zero page (ksm_zero_pages)",
        ),
        unit(
            value(
                "general_profit",
                Some("GeneralProfit"),
                "ksm_general_profit",
                "Memory KSM saves net of its own metadata, may be negative (general_profit)",
            ),
            Unit::Bytes,
            1.0,
        ),
        value(
            "stable_node_chains",
            None,
            "ksm_stable_node_chains",
            "KSM pages that hit max_page_sharing and were chained (stable_node_chains)",
        ),
        value(
            "stable_node_dups",
            None,
            "ksm_stable_node_dups",
            "Duplicated KSM pages of the chains (stable_node_dups)",
        ),
        value("run", Some("Run"), "ksm_run", "The run knob in force: 0 stopped, 1 running, 2 unmerging"),
        value(
            "pages_to_scan",
            Some("PagesToScan"),
            "ksm_pages_to_scan",
            "The pages_to_scan knob in force: pages scanned per batch",
        ),
        unit(
            value(
                "sleep_millisecs",
                Some("SleepMillisecs"),
                "ksm_sleep",
                "The sleep_millisecs knob in force: ksmd's sleep between batches",
            ),
            Unit::Seconds,
            1000.0,
        ),
        value("max_page_sharing", None, "ksm_max_page_sharing", "Mappings one KSM page may back (max_page_sharing)"),
        value(
            "merge_across_nodes",
            None,
            "ksm_merge_across_nodes",
            "Whether pages of different NUMA nodes merge (merge_across_nodes)",
        ),
        value(
            "use_zero_pages",
            None,
            "ksm_use_zero_pages",
            "Whether empty pages merge with the zero page (use_zero_pages)",
        ),
        value("smart_scan", None, "ksm_smart_scan", "Whether ksmd skips pages that did not merge lately (smart_scan)"),
        unit(
            value(
                "stable_node_chains_prune_millisecs",
                None,
                "ksm_stable_node_chains_prune",
                "How often the chains are pruned (stable_node_chains_prune_millisecs)",
            ),
            Unit::Seconds,
            1000.0,
        ),
        value(
            "advisor_max_cpu",
            None,
            "ksm_advisor_max_cpu_ratio",
            "The scan-time advisor's CPU ceiling, as a share of one CPU (advisor_max_cpu / 100)",
        )
        .per(100.0),
        value(
            "advisor_min_pages_to_scan",
            None,
            "ksm_advisor_min_pages_to_scan",
            "The scan-time advisor's lowest pages_to_scan",
        ),
        value(
            "advisor_max_pages_to_scan",
            None,
            "ksm_advisor_max_pages_to_scan",
            "The scan-time advisor's highest pages_to_scan",
        ),
        unit(
            value(
                "advisor_target_scan_time",
                None,
                "ksm_advisor_target_scan_time",
                "The scan-time advisor's target time for a full scan",
            ),
            Unit::Seconds,
            1.0,
        ),
    ]
}

impl KsmValue {
    fn per(self, per: f64) -> KsmValue {
        KsmValue { per, ..self }
    }
}

/// Properties the throttler may have, by version (issue 15 adds the need and ksmd's cost):
/// each is exported when present, and `ksm_throttler_property_present` says which are.
struct PropertyValue {
    property: &'static str,
    name: &'static str,
    help: &'static str,
    counter: bool,
    unit: Option<Unit>,
}

fn property_values() -> Vec<PropertyValue> {
    let p = |property, name, help, counter, unit| PropertyValue { property, name, help, counter, unit };
    vec![
        p("KickCount", "ksm_throttler_kicks", "Kicks the throttler received since it started", true, None),
        p("KsmdCpuSeconds", "ksm_ksmd_cpu", "CPU time ksmd used, as the throttler read it", true, Some(Unit::Seconds)),
        p(
            "KsmdCpuShare",
            "ksm_ksmd_cpu_share",
            "Share of one CPU ksmd used over the last cycle, as the throttler gives it",
            false,
            None,
        ),
        p(
            "KsmdCycleCpuSeconds",
            "ksm_ksmd_cycle_cpu",
            "CPU time ksmd used over the throttler's cycle under way or its last one (what the cycle's savings cost)",
            false,
            Some(Unit::Seconds),
        ),
        p(
            "MemAvailableRatio",
            "ksm_memory_available_ratio",
            "MemAvailable over MemTotal, as the throttler read it",
            false,
            None,
        ),
        p(
            "MemoryPressureSome",
            "ksm_memory_pressure_some",
            "Memory pressure, some, avg10 (PSI), as the throttler read it",
            false,
            None,
        ),
        p(
            "MemoryPressureFull",
            "ksm_memory_pressure_full",
            "Memory pressure, full, avg10 (PSI), as the throttler read it",
            false,
            None,
        ),
    ]
}

/// Every property the exporter reads, for `ksm_throttler_property_present`.
pub const KNOWN_PROPERTIES: [&str; 26] = [
    "CurrentSetting",
    "Mode",
    "NextStepDown",
    "KickCount",
    "TransitionCounts",
    "Version",
    "PagesShared",
    "PagesSharing",
    "PagesUnshared",
    "PagesVolatile",
    "FullScans",
    "KsmZeroPages",
    "GeneralProfit",
    "SavedBytes",
    "Run",
    "PagesToScan",
    "SleepMillisecs",
    "KsmdCpuSeconds",
    "KsmdCpuShare",
    "KsmdCycleCpuSeconds",
    "MemAvailableRatio",
    "MemoryPressureSome",
    "MemoryPressureFull",
    "NeedGate",
    "Need",
    "NeedReason",
];

/// A number out of a property of any numeric D-Bus type.
fn number(v: &Value<'_>) -> Option<f64> {
    Some(match v {
        Value::U8(n) => f64::from(*n),
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::I16(n) => f64::from(*n),
        Value::U16(n) => f64::from(*n),
        Value::I32(n) => f64::from(*n),
        Value::U32(n) => f64::from(*n),
        Value::I64(n) => *n as f64,
        Value::U64(n) => *n as f64,
        Value::F64(n) => *n,
        _ => return None,
    })
}

/// `TransitionCounts` (`a{st}`): cause and count, the names cut to [`MAX_LABEL`] characters and
/// at most [`MAX_CAUSES`] of them, in the order of their names.
fn transition_counts(v: &Value<'_>) -> Option<Vec<(String, u64)>> {
    let map = HashMap::<String, u64>::try_from(v.try_clone().ok()?).ok()?;
    let mut counts: Vec<(String, u64)> =
        map.into_iter().map(|(cause, n)| (cause.chars().take(MAX_LABEL).collect(), n)).collect();
    counts.sort();
    counts.dedup_by(|a, b| a.0 == b.0);
    counts.truncate(MAX_CAUSES);
    Some(counts)
}

fn string(v: &Value<'_>) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.as_str().chars().take(MAX_LABEL).collect()),
        _ => None,
    }
}

type Labels = Vec<(&'static str, String)>;

fn register_number(reg: &mut Registry, name: &str, help: &str, counter: bool, unit: Option<Unit>, v: f64) {
    let integral = v.fract() == 0.0 && v.abs() < 9.0e15;
    match (counter, integral) {
        (true, true) => {
            let c: Counter<u64> = Counter::default();
            c.inc_by(v.max(0.0) as u64);
            register(reg, name, help, unit, c);
        }
        (true, false) => {
            let c: Counter<f64, AtomicU64> = Counter::default();
            c.inc_by(v.max(0.0));
            register(reg, name, help, unit, c);
        }
        (false, true) => {
            let g: Gauge<i64> = Gauge::default();
            g.set(v as i64);
            register(reg, name, help, unit, g);
        }
        (false, false) => {
            let g: Gauge<f64, AtomicU64> = Gauge::default();
            g.set(v);
            register(reg, name, help, unit, g);
        }
    }
}

fn register(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: impl prometheus_client::registry::Metric,
) {
    match unit {
        Some(unit) => reg.register_with_unit(name, help, unit, metric),
        None => reg.register(name, help, metric),
    }
}

fn flag(reg: &mut Registry, name: &str, help: &str, on: bool) {
    let g: Gauge<i64> = Gauge::default();
    g.set(i64::from(on));
    reg.register(name, help, g);
}

/// A state set: one series per state, 1 for `current` and 0 for the others. A state the
/// exporter does not know (a newer throttler's) is added, cut to [`MAX_LABEL`] characters.
fn state_set(reg: &mut Registry, name: &str, help: &str, label: &'static str, states: &[&str], current: Option<&str>) {
    let family: Family<Labels, Gauge<i64>> = Family::default();
    for s in states {
        family.get_or_create(&vec![(label, (*s).to_owned())]).set(i64::from(current == Some(*s)));
    }
    if let Some(c) = current.filter(|c| !states.contains(c)) {
        family.get_or_create(&vec![(label, c.to_owned())]).set(1);
    }
    reg.register(name, help, family);
}

/// Savings per Kata sandbox, the [`MAX_SANDBOX_SERIES`] saving most, from the Inspect report.
fn register_sandboxes(reg: &mut Registry, report: Option<&Report>) {
    flag(
        reg,
        "ksm_sandbox_metrics_available",
        "Whether the per-sandbox figures could be read (the Inspect interface, which needs org.kata.KsmThrottler.inspect)",
        report.is_some(),
    );
    let Some(report) = report else { return };
    let mut rows: Vec<_> = report.sandboxes.iter().collect();
    rows.sort_by(|a, b| b.saved_bytes.cmp(&a.saved_bytes).then_with(|| a.id.cmp(&b.id)));
    let saved: Family<Labels, Gauge<i64>> = Family::default();
    let profit: Family<Labels, Gauge<i64>> = Family::default();
    let mergeable: Family<Labels, Gauge<i64>> = Family::default();
    let ram: Family<Labels, Gauge<i64>> = Family::default();
    for row in rows.iter().take(MAX_SANDBOX_SERIES) {
        let vmm = row.vmm.map_or("none", |v| v.as_str()).to_owned();
        // Kata ids are 64 hex digits; the walk takes only valid ids, so this bound never bites.
        let labels: Labels = vec![("sandbox", row.id.chars().take(128).collect()), ("vmm", vmm)];
        saved.get_or_create(&labels).set(i64::try_from(row.saved_bytes).unwrap_or(i64::MAX));
        profit.get_or_create(&labels).set(row.profit_bytes);
        mergeable.get_or_create(&labels).set(i64::try_from(row.mergeable_bytes).unwrap_or(i64::MAX));
        if let Some(r) = &row.guest_ram {
            let state = if r.hugetlb {
                "hugetlb"
            } else if r.shared {
                "shared"
            } else if r.mergeable {
                "mergeable"
            } else {
                "not-madvised"
            };
            let mut l = labels.clone();
            l.push(("guest_ram", state.to_owned()));
            ram.get_or_create(&l).set(i64::try_from(r.size_bytes).unwrap_or(i64::MAX));
        }
    }
    reg.register_with_unit(
        "ksm_sandbox_saved",
        "Bytes KSM saves in the sandbox's processes ((merged + zero pages) x page size, ksm_stat)",
        Unit::Bytes,
        saved,
    );
    reg.register_with_unit(
        "ksm_sandbox_profit",
        "The sandbox's processes' ksm_process_profit (may add up to ~20 % more than general_profit)",
        Unit::Bytes,
        profit,
    );
    reg.register_with_unit(
        "ksm_sandbox_mergeable",
        "Bytes of the sandbox's mappings madvised mergeable (smaps VmFlags mg)",
        Unit::Bytes,
        mergeable,
    );
    reg.register_with_unit(
        "ksm_sandbox_guest_ram",
        "The size of the sandbox's guest RAM, labelled with whether KSM can merge it (shared: virtio-fs's share=on)",
        Unit::Bytes,
        ram,
    );
    let total: Gauge<i64> = Gauge::default();
    total.set(i64::try_from(report.sandboxes.len()).unwrap_or(i64::MAX));
    reg.register("ksm_sandboxes", "Kata sandboxes found (series are kept for the 32 saving most)", total);
}

/// The registry of one scrape.
pub fn registry(s: &Snapshot) -> Registry {
    let mut reg = Registry::default();
    let props = match &s.throttler {
        Throttler::Up(all) => Some(all),
        _ => None,
    };
    flag(
        &mut reg,
        "ksm_throttler_bus_up",
        "Whether the exporter reached the system bus (0: no bus, nothing of the throttler is known)",
        !matches!(s.throttler, Throttler::NoBus(_)),
    );
    flag(
        &mut reg,
        "ksm_throttler_up",
        "Whether kata-ksm-throttler answered on the bus (0: not running, e.g. exited on idle; it is never started by a scrape)",
        props.is_some(),
    );
    if let Some(a) = s.activatable {
        flag(
            &mut reg,
            "ksm_throttler_activatable",
            "Whether the bus starts the throttler on demand (D-Bus activation): a throttler down but activatable is idle, not lost",
            a,
        );
    }
    let prop = |name: &str| props.and_then(|all| all.get(name)).map(|v| &**v);

    let present: Family<Labels, Gauge<i64>> = Family::default();
    if props.is_some() {
        for name in KNOWN_PROPERTIES {
            present.get_or_create(&vec![("property", name.to_owned())]).set(i64::from(prop(name).is_some()));
        }
        reg.register(
            "ksm_throttler_property_present",
            "Whether the throttler has this property (older throttlers lack the newer ones; their metrics are then absent)",
            present,
        );
    }

    if let Some(version) = prop("Version").and_then(string) {
        reg.register("ksm_throttler", "The throttler's version", Info::new(vec![("version", version)]));
    }
    if props.is_some() {
        let setting = prop("CurrentSetting").and_then(string);
        state_set(
            &mut reg,
            "ksm_throttler_setting",
            "The setting in force (1) and the others (0)",
            "setting",
            &SETTINGS,
            setting.as_deref(),
        );
        let mode = prop("Mode").and_then(string);
        state_set(
            &mut reg,
            "ksm_throttler_mode",
            "How the throttler drives KSM (1) and the other modes (0)",
            "mode",
            &MODES,
            mode.as_deref(),
        );
    }
    if let Some(us) = prop("NextStepDown").and_then(number) {
        register_number(
            &mut reg,
            "ksm_throttler_next_step_down_timestamp",
            "When the next scheduled step down happens, seconds since the epoch; 0 when none is scheduled",
            false,
            Some(Unit::Seconds),
            us / 1e6,
        );
    }
    for p in property_values() {
        if let Some(v) = prop(p.property).and_then(number) {
            register_number(&mut reg, p.name, p.help, p.counter, p.unit, v);
        }
    }
    if let Some(counts) = prop("TransitionCounts").and_then(transition_counts) {
        let family: Family<Labels, Counter<u64>> = Family::default();
        for (cause, n) in counts {
            family.get_or_create(&vec![("cause", cause)]).inc_by(n);
        }
        reg.register(
            "ksm_throttler_transitions",
            "Setting changes the throttler applied since it started, by cause (kick, timer, mode-change for SetMode, startup, merging-settled, memory-needed, no-profit, merging-stalled, memory-arriving, memory-arrived)",
            family,
        );
    }
    // A string on the bus: a state set here (a number for it would never have been exported).
    if let Some(need) = prop("Need").and_then(string) {
        state_set(
            &mut reg,
            "ksm_throttler_need",
            "The need gate's decision: not-gated (gate always), needed or not-needed (memory short or not)",
            "need",
            &["not-gated", "needed", "not-needed"],
            Some(&need),
        );
    }
    if let Some(gate) = prop("NeedGate").and_then(string) {
        let family: Family<Labels, Gauge<i64>> = Family::default();
        family.get_or_create(&vec![("gate", gate)]).set(1);
        reg.register("ksm_throttler_need_gate", "The state of the throttler's need gate, as a label", family);
    }

    if let Some(sandboxes) = &s.sandboxes {
        register_sandboxes(&mut reg, sandboxes.as_ref().ok());
    }

    // The kernel.
    let files: Family<Labels, Gauge<i64>> = Family::default();
    for name in ksm_files::FILES {
        files.get_or_create(&vec![("file", name.to_owned())]).set(i64::from(s.ksm.text(name).is_some()));
    }
    reg.register(
        "ksm_sysfs_file_present",
        "Whether the kernel has this file of /sys/kernel/mm/ksm and it could be read (its metric is absent otherwise)",
        files,
    );
    for v in ksm_values() {
        let Some(file_value) = s.ksm.number(v.file) else { continue };
        let from_bus = v.property.and_then(prop).and_then(number);
        let raw = from_bus.unwrap_or(file_value as f64);
        register_number(&mut reg, v.name, v.help, v.counter, v.unit, raw / v.per);
    }
    if let Some((modes, current)) = s.ksm.text("advisor_mode").and_then(ksm_files::parse_choice) {
        let modes: Vec<&str> = modes.iter().map(String::as_str).collect();
        state_set(
            &mut reg,
            "ksm_advisor_mode",
            "The KSM advisor in force (1) and the others (0) (advisor_mode)",
            "mode",
            &modes,
            Some(&current),
        );
    }
    let saved = prop("SavedBytes").and_then(number).or_else(|| {
        let sharing = s.ksm.number("pages_sharing")?;
        let zero = s.ksm.number("ksm_zero_pages").unwrap_or(0);
        Some(((sharing + zero).max(0) as u64 * s.page_size) as f64)
    });
    if let Some(saved) = saved {
        register_number(
            &mut reg,
            "ksm_saved",
            "Memory KSM saves: (pages_sharing + ksm_zero_pages) times the page size",
            false,
            Some(Unit::Bytes),
            saved,
        );
    }
    reg
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

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, Value<'static>)]) -> HashMap<String, OwnedVariant> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OwnedVariant::try_from(v.try_clone().expect("clone")).expect("owned")))
            .collect()
    }

    fn files(pairs: &[(&'static str, &str)]) -> KsmFiles {
        KsmFiles(pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect())
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn a_running_throttler_its_states_and_the_kernel() {
        let s = Snapshot {
            sandboxes: None,
            throttler: Throttler::Up(props(&[
                ("CurrentSetting", "standard".into()),
                ("Mode", "throttle".into()),
                ("KickCount", 3u64.into()),
                ("NextStepDown", 1_700_000_000_500_000u64.into()),
                ("Version", "0.1.0".into()),
                ("PagesSharing", 2000u64.into()),
                ("SleepMillisecs", 10u64.into()),
                ("GeneralProfit", (-4096i64).into()),
                ("SavedBytes", 8_192_000u64.into()),
            ])),
            activatable: Some(true),
            ksm: files(&[
                ("pages_sharing", "1999"),
                ("sleep_millisecs", "10"),
                ("general_profit", "0"),
                ("pages_scanned", "77"),
                ("advisor_mode", "[none] scan-time"),
            ]),
            page_size: 4096,
        };
        let text = encode(&s, Format::OpenMetrics).expect("encode");
        let l = lines(&text);
        for want in [
            "ksm_throttler_up 1",
            "ksm_throttler_bus_up 1",
            "ksm_throttler_activatable 1",
            "ksm_throttler_setting{setting=\"standard\"} 1",
            "ksm_throttler_setting{setting=\"aggressive\"} 0",
            "ksm_throttler_mode{mode=\"throttle\"} 1",
            "ksm_throttler_kicks_total 3",
            "ksm_throttler_next_step_down_timestamp_seconds 1700000000.5",
            "ksm_throttler_info{version=\"0.1.0\"} 1",
            "ksm_pages_sharing 2000",
            "ksm_sleep_seconds 0.01",
            "ksm_general_profit_bytes -4096",
            "ksm_pages_scanned_total 77",
            "ksm_saved_bytes 8192000",
            "ksm_advisor_mode{mode=\"none\"} 1",
            "ksm_advisor_mode{mode=\"scan-time\"} 0",
            "ksm_sysfs_file_present{file=\"pages_scanned\"} 1",
            "ksm_sysfs_file_present{file=\"use_zero_pages\"} 0",
            "ksm_throttler_property_present{property=\"KsmdCpuSeconds\"} 0",
            "ksm_throttler_property_present{property=\"KickCount\"} 1",
        ] {
            assert!(l.contains(&want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("ksm_use_zero_pages "), "absent file, absent metric:\n{text}");
        assert!(!text.contains("ksm_ksmd_cpu_seconds"), "absent property, absent metric:\n{text}");
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# HELP ksm_throttler_kicks Kicks"), "{text}");
    }

    #[test]
    fn transitions_by_cause_are_one_counter_family_bounded_and_ignored_when_mistyped() {
        let mut counts: HashMap<String, u64> = [("kick", 2u64), ("timer", 6), ("merging-stalled", 1)]
            .into_iter()
            .map(|(c, n)| (c.to_owned(), n))
            .collect();
        counts.insert("y".repeat(500), 1);
        for i in 0..40 {
            counts.insert(format!("z{i:02}"), 0);
        }
        let snapshot = |v: Value<'static>| Snapshot {
            sandboxes: None,
            throttler: Throttler::Up(props(&[("TransitionCounts", v)])),
            activatable: None,
            ksm: files(&[]),
            page_size: 4096,
        };
        let text = encode(&snapshot(Value::from(counts)), Format::OpenMetrics).expect("encode");
        let l = lines(&text);
        for want in [
            "ksm_throttler_transitions_total{cause=\"kick\"} 2",
            "ksm_throttler_transitions_total{cause=\"timer\"} 6",
            "ksm_throttler_transitions_total{cause=\"merging-stalled\"} 1",
            "ksm_throttler_property_present{property=\"TransitionCounts\"} 1",
        ] {
            assert!(l.contains(&want), "{want:?} missing from:\n{text}");
        }
        assert!(text.contains("# TYPE ksm_throttler_transitions counter"), "{text}");
        let series = l.iter().filter(|l| l.starts_with("ksm_throttler_transitions_total{")).count();
        assert_eq!(series, MAX_CAUSES, "{text}");
        assert!(!text.contains(&"y".repeat(MAX_LABEL + 1)), "a long cause is cut:\n{text}");

        let text = encode(&snapshot(Value::from(7u64)), Format::OpenMetrics).expect("encode");
        assert!(!text.contains("ksm_throttler_transitions"), "a mistyped property is no metric:\n{text}");
    }

    #[test]
    fn a_throttler_down_is_a_metric_and_the_kernel_is_read_from_sysfs() {
        let s = Snapshot {
            sandboxes: None,
            throttler: Throttler::Down("org.freedesktop.DBus.Error.ServiceUnknown".into()),
            activatable: Some(false),
            ksm: files(&[("pages_sharing", "10"), ("ksm_zero_pages", "2"), ("run", "1")]),
            page_size: 4096,
        };
        let text = encode(&s, Format::Prometheus).expect("encode");
        let l = lines(&text);
        for want in [
            "ksm_throttler_up 0",
            "ksm_throttler_activatable 0",
            "ksm_pages_sharing 10",
            "ksm_run 1",
            "ksm_saved_bytes 49152",
        ] {
            assert!(l.contains(&want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("ksm_throttler_setting"), "nothing is known of the setting:\n{text}");
        assert!(!text.contains("# EOF"), "the 0.0.4 text format has no EOF marker");
    }

    #[test]
    fn newer_properties_are_exported_when_present_and_unknown_states_are_bounded() {
        let long = "x".repeat(500);
        let s = Snapshot {
            sandboxes: None,
            throttler: Throttler::Up(props(&[
                ("CurrentSetting", Value::from(long.clone())),
                ("KsmdCpuSeconds", 12.5f64.into()),
                ("MemAvailableRatio", 0.25f64.into()),
                ("NeedGate", "open".into()),
            ])),
            activatable: None,
            ksm: KsmFiles::default(),
            page_size: 4096,
        };
        let text = encode(&s, Format::OpenMetrics).expect("encode");
        let l = lines(&text);
        assert!(l.contains(&"ksm_ksmd_cpu_seconds_total 12.5"), "{text}");
        assert!(l.contains(&"ksm_memory_available_ratio 0.25"), "{text}");
        assert!(l.contains(&"ksm_throttler_need_gate{gate=\"open\"} 1"), "{text}");
        let cut = format!("ksm_throttler_setting{{setting=\"{}\"}} 1", "x".repeat(MAX_LABEL));
        assert!(l.contains(&cut.as_str()), "{text}");
        assert!(!text.contains("ksm_throttler_activatable"), "unknown: absent");
    }

    #[test]
    fn no_bus_is_a_scrape_too() {
        let s = Snapshot {
            sandboxes: None,
            throttler: Throttler::NoBus("no socket".into()),
            activatable: None,
            ksm: KsmFiles::default(),
            page_size: 4096,
        };
        let text = encode(&s, Format::OpenMetrics).expect("encode");
        assert!(
            lines(&text).contains(&"ksm_throttler_bus_up 0") && lines(&text).contains(&"ksm_throttler_up 0"),
            "{text}"
        );
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ksm.prom");
        write_atomically(&path, "a 1\n").expect("first");
        write_atomically(&path, "a 2\n").expect("second");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o644);
        let err = write_atomically(&dir.path().join("missing/ksm.prom"), "a 1\n").unwrap_err();
        assert!(err.to_string().contains("missing/ksm.prom"), "{err}");
    }
}
