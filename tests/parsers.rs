//! Property tests of everything that parses input: meminfo, the state file, sysfs values,
//! durations (flags and configuration files). Arbitrary input never panics; well-formed input
//! always reads back exactly; input that cannot be trusted is refused, never half-used.

use std::time::Duration;

use clap::Parser;
use kata_ksm_throttler::core::knobs::Knobs;
use kata_ksm_throttler::core::policy::{Durations, Policy};
use kata_ksm_throttler::core::setting::Mode;
use kata_ksm_throttler::io::meminfo::parse_anon_kb;
use kata_ksm_throttler::io::state_file::{StateError, StateFile};
use kata_ksm_throttler::io::sysfs::{parse_advisor, Ksm};
use kata_ksm_throttler::startup::cli::Args;
use kata_ksm_throttler::startup::config::Settings;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    // File-system cases are slower: enough to find edge cases, few enough for CI.
    ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
}

/// Lines of a meminfo file other than AnonPages.
fn other_line() -> impl Strategy<Value = String> {
    ("[A-Z][A-Za-z_()]{1,15}", any::<u32>(), prop::option::of(Just(" kB")))
        .prop_filter("not AnonPages", |(k, _, _)| k != "AnonPages")
        .prop_map(|(k, v, unit)| format!("{k}: {v:>12}{}", unit.unwrap_or("")))
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (
        0u8..=2,
        0..=u64::from(u32::MAX),
        0..=u64::from(u32::MAX),
        prop::option::of("[a-z-]{1,32}"),
        prop::option::of(0u8..=1),
    )
        .prop_map(|(run, pages_to_scan, sleep_millisecs, advisor_mode, smart_scan)| Knobs {
            run,
            pages_to_scan,
            sleep_millisecs,
            advisor_mode,
            smart_scan,
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn meminfo_never_panics(text in ".*") {
        let _ = parse_anon_kb(&text);
    }

    #[test]
    fn meminfo_finds_anon_pages_anywhere(
        before in prop::collection::vec(other_line(), 0..40),
        after in prop::collection::vec(other_line(), 0..40),
        kb in any::<u64>(),
        spaces in 0usize..12,
        unit in prop::option::of(Just(" kB")),
    ) {
        let line = format!("AnonPages:{}{kb}{}", " ".repeat(spaces), unit.unwrap_or(""));
        let text = before.iter().chain([&line]).chain(&after).cloned().collect::<Vec<_>>().join("\n");
        prop_assert_eq!(parse_anon_kb(&text), Some(kb));
        let without = before.iter().chain(&after).cloned().collect::<Vec<_>>().join("\n");
        prop_assert_eq!(parse_anon_kb(&without), None);
    }

    #[test]
    fn meminfo_refuses_a_value_that_is_not_a_count_of_kb(
        value in "[^0-9+\\s][^\n]{0,10}|[0-9]{1,5}[.,x-][0-9]{1,3}|[0-9]{1,5} (MB|kb|pages)",
    ) {
        prop_assert_eq!(parse_anon_kb(&format!("AnonPages: {value}\n")), None, "{:?}", value);
    }

    #[test]
    fn advisor_never_panics(text in "\\PC*") {
        if let Some(mode) = parse_advisor(&text) {
            prop_assert!(!mode.is_empty());
        }
    }

    #[test]
    fn advisor_reads_the_bracketed_choice(
        names in prop::collection::vec("[a-z][a-z-]{0,12}", 1..5),
        pick in any::<prop::sample::Index>(),
    ) {
        let chosen = pick.index(names.len());
        let line = names
            .iter()
            .enumerate()
            .map(|(i, n)| if i == chosen { format!("[{n}]") } else { n.clone() })
            .collect::<Vec<_>>()
            .join(" ");
        prop_assert_eq!(parse_advisor(&format!("{line}\n")), Some(names[chosen].clone()));
    }

    #[test]
    fn sysfs_values_read_exactly_or_are_refused(
        run in "[0-9]{1,4}|[^\n]{0,6}",
        pages in "[0-9]{1,20}|[^\n]{0,6}",
        sleep in any::<u64>(),
        newline in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let nl = if newline { "\n" } else { "" };
        std::fs::write(dir.path().join("run"), format!("{run}{nl}")).expect("write");
        std::fs::write(dir.path().join("pages_to_scan"), format!("{pages}{nl}")).expect("write");
        std::fs::write(dir.path().join("sleep_millisecs"), format!("{sleep}{nl}")).expect("write");
        let ksm = Ksm::open(dir.path()).expect("open");
        let want_run = run.trim().parse::<u8>().ok();
        let want_pages = pages.trim().parse::<u64>().ok();
        match ksm.read() {
            Ok(k) => {
                prop_assert_eq!(Some(k.run), want_run);
                prop_assert_eq!(Some(k.pages_to_scan), want_pages);
                prop_assert_eq!(k.sleep_millisecs, sleep);
                prop_assert_eq!(k.advisor_mode, None);
            }
            Err(e) => {
                prop_assert!(want_run.is_none() || want_pages.is_none(), "refused good values: {}", e);
                let names = if want_run.is_none() { "run" } else { "pages_to_scan" };
                prop_assert!(e.to_string().contains(names), "{} does not name {}", e, names);
            }
        }
    }

    #[test]
    fn the_state_file_round_trips_every_valid_record(k in knobs()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        state.save(&k).expect("save");
        prop_assert_eq!(state.load().expect("load"), Some(k));
    }

    #[test]
    fn the_state_file_never_hands_back_garbage(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        std::fs::write(state.path(), &bytes).expect("write");
        match state.load() {
            Ok(Some(k)) => {
                prop_assert_eq!(k.validate(), Ok(()));
                prop_assert!(state.path().exists(), "a good record stays until restored");
            }
            Ok(None) => prop_assert!(false, "an existing file read as absent"),
            Err(StateError::Corrupt { kept_as, .. }) => {
                prop_assert_eq!(std::fs::read(&kept_as).expect("kept"), bytes);
                prop_assert!(!state.path().exists());
            }
            Err(e) => prop_assert!(false, "{}", e),
        }
    }

    #[test]
    fn the_state_file_refuses_every_cut_or_changed_byte(k in knobs(), cut in any::<prop::sample::Index>(), flip in any::<u8>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateFile::new(dir.path());
        state.save(&k).expect("save");
        let good = std::fs::read(state.path()).expect("read");
        let at = cut.index(good.len());
        // The record cut short anywhere: its backup stands in, never a (different) record.
        std::fs::write(state.path(), &good[..at]).expect("write");
        prop_assert_eq!(state.load().expect("from the backup"), Some(k.clone()), "cut at {}", at);
        // Both cut short: refused.
        std::fs::write(state.path(), &good[..at]).expect("write");
        std::fs::write(state.backup_path(), &good[..at]).expect("write");
        let refused = matches!(state.load(), Err(StateError::Corrupt { .. }));
        prop_assert!(refused, "cut at {}", at);
        // One byte changed in both: refused, or a record that is still valid.
        let mut changed = good.clone();
        changed[at] ^= flip.max(1);
        std::fs::write(state.path(), &changed).expect("write");
        std::fs::write(state.backup_path(), &changed).expect("write");
        match state.load() {
            Ok(Some(other)) => prop_assert_eq!(other.validate(), Ok(())),
            Ok(None) => prop_assert!(false, "read as absent"),
            Err(StateError::Corrupt { .. }) => {}
            Err(e) => prop_assert!(false, "{}", e),
        }
    }

    #[test]
    fn duration_flags_never_panic_and_every_accepted_one_drives_the_policy(text in "\\PC{0,24}|[0-9]{1,25}[a-z]{1,7}|[0-9]{1,20}(s|m|h|d|w|y|ms|us|ns|min|sec|years)") {
        match Args::try_parse_from(["kata-ksm-throttler".to_owned(), format!("--aggressive-duration={text}")]) {
            Ok(args) => {
                let d = args.aggressive_duration.expect("set");
                // An accepted duration must be usable: a kick schedules the step down.
                let mut p = Policy::new(Mode::Throttle, Durations { aggressive: d, ..Durations::default() });
                let now = std::time::Instant::now();
                p.start(now);
                p.kick(now);
                prop_assert!(p.deadline().is_some());
            }
            Err(e) => prop_assert!(e.to_string().contains("examples"), "{}", e),
        }
    }

    #[test]
    fn durations_read_back_exactly(secs in 0u64..(365 * 86_400), millis in 0u32..1000) {
        let d = Duration::new(secs, millis * 1_000_000);
        let text = humantime::format_duration(d).to_string();
        let args = Args::try_parse_from(["x", "--slow-duration", &text]).expect("parse");
        prop_assert_eq!(args.slow_duration, Some(d));
        let mut s = Settings::default();
        s.apply_toml(std::path::Path::new("t.toml"), &format!("[slow]\nduration = \"{text}\"\n")).expect("toml");
        prop_assert_eq!(s.durations.slow, d);
    }

    #[test]
    fn configuration_files_never_panic(text in "\\PC{0,200}") {
        let mut s = Settings::default();
        let _ = s.apply_toml(std::path::Path::new("t.toml"), &text);
    }

    #[test]
    fn configuration_durations_never_panic(value in "\\PC{0,24}|[0-9]{1,25}[a-z]{1,7}|[0-9]{1,20}(s|m|h|d|w|y|ms|us|ns|min|sec|years)") {
        let mut s = Settings::default();
        let text = format!("[aggressive]\nduration = {}\n", toml_string(&value));
        if s.apply_toml(std::path::Path::new("t.toml"), &text).is_ok() {
            let mut p = Policy::new(Mode::Throttle, s.durations);
            let now = std::time::Instant::now();
            p.start(now);
            p.kick(now);
            prop_assert!(p.deadline().is_some());
        }
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
