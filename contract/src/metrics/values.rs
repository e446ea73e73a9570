//! What the scrape exports: the KSM files with their metric names, the throttler's properties
//! by version, and how a property's value is read.

use std::collections::HashMap;

use prometheus_client::registry::Unit;
use zbus::Variant as Value;

/// The longest label value taken from the bus (a setting or mode the exporter does not know).
pub(super) const MAX_LABEL: usize = 32;
/// At most this many causes of `TransitionCounts` get series (the throttler has 8), so a
/// throttler answering nonsense cannot make a scrape's label values unbounded.
pub(super) const MAX_CAUSES: usize = 16;

/// The KSM values: from the throttler's property when it is up (the value its clients see),
/// from the file otherwise (so the series go on while an idle throttler has exited); exported
/// only when the kernel has the file.
pub(super) struct KsmValue {
    pub(super) file: &'static str,
    pub(super) property: Option<&'static str>,
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) counter: bool,
    pub(super) unit: Option<Unit>,
    /// The file's value over this is the metric's, in base units (1000 for milliseconds).
    pub(super) per: f64,
}

fn value(file: &'static str, property: Option<&'static str>, name: &'static str, help: &'static str) -> KsmValue {
    KsmValue { file, property, name, help, counter: false, unit: None, per: 1.0 }
}

pub(super) fn ksm_values() -> Vec<KsmValue> {
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
pub(super) struct PropertyValue {
    pub(super) property: &'static str,
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) counter: bool,
    pub(super) unit: Option<Unit>,
}

pub(super) fn property_values() -> Vec<PropertyValue> {
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
pub(super) fn number(v: &Value<'_>) -> Option<f64> {
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
pub(super) fn transition_counts(v: &Value<'_>) -> Option<Vec<(String, u64)>> {
    let map = HashMap::<String, u64>::try_from(v.try_clone().ok()?).ok()?;
    let mut counts: Vec<(String, u64)> =
        map.into_iter().map(|(cause, n)| (cause.chars().take(MAX_LABEL).collect(), n)).collect();
    counts.sort();
    counts.dedup_by(|a, b| a.0 == b.0);
    counts.truncate(MAX_CAUSES);
    Some(counts)
}

pub(super) fn string(v: &Value<'_>) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.as_str().chars().take(MAX_LABEL).collect()),
        _ => None,
    }
}
