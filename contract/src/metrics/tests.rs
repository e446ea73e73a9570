//! The scrape's text from plain snapshots: no bus, no files.

use super::values::{MAX_CAUSES, MAX_LABEL};
use super::*;
use zbus::Variant as Value;

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
    let mut counts: HashMap<String, u64> =
        [("kick", 2u64), ("timer", 6), ("merging-stalled", 1)].into_iter().map(|(c, n)| (c.to_owned(), n)).collect();
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
    assert!(lines(&text).contains(&"ksm_throttler_bus_up 0") && lines(&text).contains(&"ksm_throttler_up 0"), "{text}");
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
