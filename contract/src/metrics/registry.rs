//! The registry of one scrape: each snapshot's value as a counter, gauge, state set or info.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::values::{ksm_values, number, property_values, string, transition_counts, KNOWN_PROPERTIES};
use super::{ksm_files, Snapshot, Throttler, MAX_SANDBOX_SERIES, MODES, SETTINGS};
use crate::accounting::{saved_bytes, Report};

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
            "Setting changes the throttler applied since it started, by cause (kick, timer, mode-change for SetMode, mode-rewrite for a SetMode that kept the setting, startup, merging-settled, memory-needed, no-profit, merging-stalled, memory-arriving, memory-arrived)",
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
        let count = |name| s.ksm.number(name).map(|n| n.max(0) as u64);
        Some(saved_bytes(count("pages_sharing")?, count("ksm_zero_pages").unwrap_or(0), s.page_size) as f64)
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
