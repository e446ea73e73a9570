//! `ksmtctl status`: what one `GetAll` of `org.kata.KsmThrottler` says, and how it shows it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use zbus::OwnedVariant;

use crate::knobs;

/// Everything `status` shows, as read in one `GetAll`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    pub mode: String,
    pub current_setting: String,
    /// CLOCK_REALTIME microseconds; 0 when nothing is scheduled.
    pub next_step_down_us: u64,
    pub kick_count: u64,
    pub version: String,
    /// The knobs; `None` (JSON `null`) where the throttler could not read one (then listed in
    /// `unreadable`): a reader must never take an unknown for a value.
    pub run: Option<u32>,
    pub pages_to_scan: Option<u64>,
    pub sleep_millisecs: Option<u64>,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub full_scans: u64,
    pub ksm_zero_pages: u64,
    pub general_profit: i64,
    pub saved_bytes: u64,
    /// -1 where ksmd cannot be found (or an older throttler that lacks it).
    pub ksmd_cpu_seconds: f64,
    pub ksmd_cpu_share: f64,
    /// ksmd's CPU-s over the cycle (what its savings cost); -1 where unknown or not given.
    pub ksmd_cycle_cpu_seconds: f64,
    pub mem_available_ratio: f64,
    pub memory_pressure_some: f64,
    pub memory_pressure_full: f64,
    pub need_gate: String,
    pub need: String,
    pub need_reason: String,
    /// Knobs every throttler has that the answer left out (zbus's `GetAll` skips a property
    /// whose read failed: a knob gone or unreadable): shown as unknown, never as 0.
    pub unreadable: Vec<&'static str>,
}

/// The knob properties every throttler answers; one missing means it could not read it.
const KNOBS: [&str; 3] = [knobs::RUN, knobs::PAGES_TO_SCAN, knobs::SLEEP_MILLISECS];

fn get<T: TryFrom<OwnedVariant>>(all: &HashMap<String, OwnedVariant>, name: &str) -> Option<T> {
    all.get(name).and_then(|v| v.try_clone().ok()).and_then(|v| T::try_from(v).ok())
}

impl Status {
    /// From the answer of `Properties.GetAll`; absent or mistyped properties read as 0 / "".
    pub fn from_properties(all: &HashMap<String, OwnedVariant>) -> Status {
        let (run, pages_to_scan, sleep_millisecs) =
            (get::<u32>(all, "Run"), get::<u64>(all, "PagesToScan"), get::<u64>(all, "SleepMillisecs"));
        let read = [run.is_some(), pages_to_scan.is_some(), sleep_millisecs.is_some()];
        Status {
            mode: get(all, "Mode").unwrap_or_default(),
            current_setting: get(all, "CurrentSetting").unwrap_or_default(),
            next_step_down_us: get(all, "NextStepDown").unwrap_or_default(),
            kick_count: get(all, "KickCount").unwrap_or_default(),
            version: get(all, "Version").unwrap_or_default(),
            run,
            pages_to_scan,
            sleep_millisecs,
            pages_shared: get(all, "PagesShared").unwrap_or_default(),
            pages_sharing: get(all, "PagesSharing").unwrap_or_default(),
            pages_unshared: get(all, "PagesUnshared").unwrap_or_default(),
            pages_volatile: get(all, "PagesVolatile").unwrap_or_default(),
            full_scans: get(all, "FullScans").unwrap_or_default(),
            ksm_zero_pages: get(all, "KsmZeroPages").unwrap_or_default(),
            general_profit: get(all, "GeneralProfit").unwrap_or_default(),
            saved_bytes: get(all, "SavedBytes").unwrap_or_default(),
            ksmd_cpu_seconds: get(all, "KsmdCpuSeconds").unwrap_or(-1.0),
            ksmd_cpu_share: get(all, "KsmdCpuShare").unwrap_or(-1.0),
            ksmd_cycle_cpu_seconds: get(all, "KsmdCycleCpuSeconds").unwrap_or(-1.0),
            mem_available_ratio: get(all, "MemAvailableRatio").unwrap_or(-1.0),
            memory_pressure_some: get(all, "MemoryPressureSome").unwrap_or(-1.0),
            memory_pressure_full: get(all, "MemoryPressureFull").unwrap_or(-1.0),
            need_gate: get(all, "NeedGate").unwrap_or_default(),
            need: get(all, "Need").unwrap_or_default(),
            need_reason: get(all, "NeedReason").unwrap_or_default(),
            unreadable: KNOBS.into_iter().zip(read).filter(|&(_, read)| !read).map(|(knob, _)| knob).collect(),
        }
    }

    /// The knobs as shown: each value, or `unknown` where the throttler could not read it.
    pub fn knobs_line(&self) -> String {
        fn shown(value: Option<u64>) -> String {
            value.map_or_else(|| "unknown".to_owned(), |v| v.to_string())
        }
        format!(
            "run={} pages_to_scan={} sleep_millisecs={}",
            shown(self.run.map(u64::from)),
            shown(self.pages_to_scan),
            shown(self.sleep_millisecs)
        )
    }

    /// ksmd's cost beside what it saved: its share of a CPU over the cycle, and MiB saved now
    /// per CPU-second ksmd used over the cycle (since boot from a throttler that does not say);
    /// says so where ksmd cannot be found.
    pub fn ksmd_line(&self) -> String {
        if self.ksmd_cpu_seconds < 0.0 {
            return "ksmd not found (no KSM, or another pid namespace)".into();
        }
        let share = if self.ksmd_cpu_share < 0.0 {
            "CPU share unknown".to_owned()
        } else {
            format!("{:.1} % of a CPU", self.ksmd_cpu_share * 100.0)
        };
        let (cpu, over) = if self.ksmd_cycle_cpu_seconds >= 0.0 {
            (self.ksmd_cycle_cpu_seconds, "the cycle")
        } else {
            (self.ksmd_cpu_seconds, "boot")
        };
        let per_s = if cpu > 0.0 {
            format!("{:.1} MiB saved per CPU-s of {over}", self.saved_bytes as f64 / (1024.0 * 1024.0) / cpu)
        } else {
            format!("no CPU used over {over}")
        };
        let cycle = if self.ksmd_cycle_cpu_seconds >= 0.0 {
            format!("{:.1} in the cycle, ", self.ksmd_cycle_cpu_seconds)
        } else {
            String::new()
        };
        format!("{share}, {cycle}{:.1} CPU-s since boot, {per_s}", self.ksmd_cpu_seconds)
    }

    /// MemAvailable's share of RAM and the PSI figures, or that they are unknown.
    pub fn memory_line(&self) -> String {
        let avail = if self.mem_available_ratio < 0.0 {
            "MemAvailable unknown".to_owned()
        } else {
            format!("MemAvailable {:.1} % of RAM", self.mem_available_ratio * 100.0)
        };
        let psi = if self.memory_pressure_some < 0.0 {
            "no PSI".to_owned()
        } else {
            format!("pressure some {:.2} % full {:.2} %", self.memory_pressure_some, self.memory_pressure_full)
        };
        format!("{avail}, {psi}")
    }

    /// The human form of `status`.
    pub fn render(&self, now: SystemTime) -> String {
        let next = match until(self.next_step_down_us, now) {
            Some(d) => format!(" (next step in {})", human(d)),
            None => String::new(),
        };
        format!(
            "mode:     {}\nsetting:  {}{next}\nknobs:    {}\n\
             saved:    {} (pages_sharing {}, ksm_zero_pages {})\nksmd:     {}\nprofit:   {}\nmemory:   {}\nneed:     {} (gate {}: {})\n\
             scanning: {} full scans; pages shared {}, unshared {}, volatile {}\n\
             kicks:    {}\nversion:  {}\n",
            self.mode,
            self.current_setting,
            self.knobs_line(),
            mib(self.saved_bytes as f64),
            self.pages_sharing,
            self.ksm_zero_pages,
            self.ksmd_line(),
            mib(self.general_profit as f64),
            self.memory_line(),
            self.need,
            self.need_gate,
            self.need_reason,
            self.full_scans,
            self.pages_shared,
            self.pages_unshared,
            self.pages_volatile,
            self.kick_count,
            self.version,
        )
    }
}

/// Time left until a CLOCK_REALTIME microsecond stamp; `None` for 0 (nothing scheduled).
pub fn until(stamp_us: u64, now: SystemTime) -> Option<Duration> {
    if stamp_us == 0 {
        return None;
    }
    let at = UNIX_EPOCH + Duration::from_micros(stamp_us);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whole seconds, as an operator reads them: `45s`, `2m 5s`, `1h 2m`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 if s.is_multiple_of(60) => format!("{}m", s / 60),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(human(Duration::from_millis(400)), "0s");
        assert_eq!(human(Duration::from_secs(45)), "45s");
        assert_eq!(human(Duration::from_secs(120)), "2m");
        assert_eq!(human(Duration::from_secs(125)), "2m 5s");
        assert_eq!(human(Duration::from_secs(3720)), "1h 2m");
    }

    #[test]
    fn until_handles_nothing_scheduled_and_the_past() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(until(0, now), None);
        assert_eq!(until(1_030_000_000, now), Some(Duration::from_secs(30)));
        assert_eq!(until(999_000_000, now), Some(Duration::ZERO));
    }

    #[test]
    fn status_from_properties_and_rendered() {
        let mut all = HashMap::new();
        let put = |all: &mut HashMap<String, OwnedVariant>, k: &str, v: zbus::Variant<'static>| {
            all.insert(k.to_owned(), OwnedVariant::try_from(v).expect("owned"));
        };
        put(&mut all, "Mode", "throttle".into());
        put(&mut all, "CurrentSetting", "standard".into());
        put(&mut all, "NextStepDown", 1_125_000_000u64.into());
        put(&mut all, "SavedBytes", (3u64 * 1024 * 1024).into());
        put(&mut all, "GeneralProfit", (-1048576i64).into());
        put(&mut all, "Run", 1u32.into());
        let st = Status::from_properties(&all);
        assert_eq!((st.mode.as_str(), st.run, st.general_profit), ("throttle", Some(1), -1_048_576));
        assert_eq!(st.unreadable, ["pages_to_scan", "sleep_millisecs"]);
        let json = serde_json::to_value(&st).expect("JSON");
        assert_eq!((&json["run"], &json["pages_to_scan"]), (&serde_json::json!(1), &serde_json::Value::Null));
        let text = st.render(UNIX_EPOCH + Duration::from_secs(1000));
        assert!(text.contains("setting:  standard (next step in 2m 5s)"), "{text}");
        assert!(text.contains("saved:    3.0 MiB"), "{text}");
        assert!(text.contains("profit:   -1.0 MiB"), "{text}");
        assert!(text.contains("ksmd:     ksmd not found"), "absent is said, never 0: {text}");
        assert!(text.contains("memory:   MemAvailable unknown, no PSI"), "{text}");
        put(&mut all, "KsmdCpuSeconds", 1.5f64.into());
        put(&mut all, "KsmdCpuShare", 0.25f64.into());
        put(&mut all, "MemAvailableRatio", 0.125f64.into());
        put(&mut all, "MemoryPressureSome", 5.5f64.into());
        put(&mut all, "MemoryPressureFull", 0.0f64.into());
        put(&mut all, "NeedGate", "when-needed".into());
        put(&mut all, "Need", "needed".into());
        put(&mut all, "NeedReason", "MemAvailable 12.5% < 20.0%".into());
        let text = Status::from_properties(&all).render(UNIX_EPOCH);
        assert!(
            text.contains("ksmd:     25.0 % of a CPU, 1.5 CPU-s since boot, 2.0 MiB saved per CPU-s of boot"),
            "{text}"
        );
        put(&mut all, "KsmdCycleCpuSeconds", 0.5f64.into());
        let text = Status::from_properties(&all).render(UNIX_EPOCH);
        assert!(
            text.contains("ksmd:     25.0 % of a CPU, 0.5 in the cycle, 1.5 CPU-s since boot, 6.0 MiB saved per CPU-s of the cycle"),
            "{text}"
        );
        assert!(text.contains("memory:   MemAvailable 12.5 % of RAM, pressure some 5.50 % full 0.00 %"), "{text}");
        assert!(text.contains("need:     needed (gate when-needed: MemAvailable 12.5% < 20.0%)"), "{text}");
    }
}
