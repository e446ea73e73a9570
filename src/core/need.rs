//! The need gate: whether the host is short of memory, decided from plain readings and the
//! time they were taken. No files: the engine reads meminfo and PSI and hands the figures in.
//!
//! - `always`: KSM is driven on kicks, as the Kata original does (the default).
//! - `when-needed`: memory is needed when MemAvailable is under a share of RAM, or PSI memory
//!   `some avg10` is over a percentage (each optional; either is enough). Need appears at once
//!   (a shortage is no time to wait) and goes only once every figure used is past its threshold
//!   by the hysteresis and it has lasted at least the minimum dwell, so a host near a threshold
//!   does not flap (the peers: zramdedup goes up at once and down after ≥ 30 s).
//! - A figure that cannot be read (garbled meminfo or PSI) keeps the last decision; a kernel
//!   without PSI uses MemAvailable alone, and the reason says so.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// How kicks are gated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gate {
    /// Every kick drives KSM (today's behaviour).
    Always,
    /// Kicks drive KSM only while memory is needed, and need alone drives it too.
    WhenNeeded,
}

impl Gate {
    pub const NAMES: [&'static str; 2] = ["always", "when-needed"];

    pub const fn as_str(self) -> &'static str {
        match self {
            Gate::Always => "always",
            Gate::WhenNeeded => "when-needed",
        }
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown need gate {0:?}; valid gates: always, when-needed")]
pub struct UnknownGate(pub String);

impl FromStr for Gate {
    type Err = UnknownGate;
    fn from_str(s: &str) -> Result<Gate, UnknownGate> {
        match s {
            "always" => Ok(Gate::Always),
            "when-needed" => Ok(Gate::WhenNeeded),
            // Bounded: a huge name is not echoed back whole.
            other => Err(UnknownGate(other.chars().take(64).collect())),
        }
    }
}

/// The thresholds of `when-needed` and how often they are read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Needed when MemAvailable / MemTotal is under this (0 turns the figure off).
    pub mem_available_below: f64,
    /// Needed when PSI memory some avg10 (percent) is over this (0 turns the figure off).
    pub psi_some_above: f64,
    /// Need goes only once each figure is this share past its threshold: MemAvailable over
    /// `below × (1 + h)`, PSI under `above × (1 − h)`.
    pub hysteresis: f64,
    /// Need lasts at least this long once it appeared.
    pub min_dwell: Duration,
    /// How often meminfo and PSI are read while the gate is `when-needed`.
    pub poll_interval: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            mem_available_below: 0.2,
            psi_some_above: 5.0,
            hysteresis: 0.25,
            min_dwell: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// A figure as read: its value, not there (no PSI), or unreadable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Figure {
    Value(f64),
    Absent,
    Garbled,
}

/// One reading of the figures the gate decides on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Readings {
    /// MemAvailable / MemTotal.
    pub mem_available: Figure,
    /// PSI memory some avg10, percent.
    pub psi_some: Figure,
}

/// The gate's state, as the bus shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Need {
    /// The gate is `always` (or the mode ignores it).
    NotGated,
    Needed,
    NotNeeded,
}

impl Need {
    pub const fn as_str(self) -> &'static str {
        match self {
            Need::NotGated => "not-gated",
            Need::Needed => "needed",
            Need::NotNeeded => "not-needed",
        }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one reading did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Need appeared (`Some(true)`) or went (`Some(false)`).
    pub changed: Option<bool>,
    /// A figure used could not be read: the last decision is kept.
    pub garbled: bool,
}

/// The `when-needed` decision with its hysteresis and dwell.
#[derive(Debug, Clone, PartialEq)]
pub struct NeedGate {
    thresholds: Thresholds,
    needed: bool,
    /// When need last appeared.
    since: Option<Instant>,
    /// The figure that decided, for the bus ("MemAvailable 12.0% < 20%").
    reason: String,
    /// A reading has been decided on.
    read: bool,
}

impl NeedGate {
    pub fn new(thresholds: Thresholds) -> NeedGate {
        NeedGate { thresholds, needed: false, since: None, reason: "not read yet".into(), read: false }
    }

    pub fn needed(&self) -> bool {
        self.needed
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    /// New thresholds (a reload); the decision stands until the next reading.
    pub fn set_thresholds(&mut self, thresholds: Thresholds) {
        self.thresholds = thresholds;
    }

    /// Decides on a reading taken at `now`.
    pub fn observe(&mut self, now: Instant, r: Readings) -> Observed {
        let t = self.thresholds;
        let mem_on = t.mem_available_below > 0.0;
        let psi_on = t.psi_some_above > 0.0;
        let garbled = (mem_on && r.mem_available == Figure::Garbled) || (psi_on && r.psi_some == Figure::Garbled);
        if garbled {
            return Observed { changed: None, garbled: true };
        }
        let pct = |share: f64| share * 100.0;
        // Each figure in use: (over its on-threshold, past its off-threshold, how it reads).
        let mut figures: Vec<(bool, bool, String)> = vec![];
        if let (true, Figure::Value(v)) = (mem_on, r.mem_available) {
            let off_at = (t.mem_available_below * (1.0 + t.hysteresis)).min(1.0);
            let on = v < t.mem_available_below;
            let text = if on {
                format!("MemAvailable {:.1}% < {:.1}%", pct(v), pct(t.mem_available_below))
            } else if v >= off_at {
                format!("MemAvailable {:.1}% >= {:.1}%", pct(v), pct(off_at))
            } else {
                format!("MemAvailable {:.1}% within the hysteresis (< {:.1}%)", pct(v), pct(off_at))
            };
            figures.push((on, v >= off_at, text));
        }
        if let (true, Figure::Value(v)) = (psi_on, r.psi_some) {
            let off_at = t.psi_some_above * (1.0 - t.hysteresis);
            let on = v > t.psi_some_above;
            let text = if on {
                format!("PSI some {v:.2}% > {:.2}%", t.psi_some_above)
            } else if v <= off_at {
                format!("PSI some {v:.2}% <= {off_at:.2}%")
            } else {
                format!("PSI some {v:.2}% within the hysteresis (> {off_at:.2}%)")
            };
            figures.push((on, v <= off_at, text));
        }
        let no_psi = psi_on && r.psi_some == Figure::Absent;
        let suffix = if no_psi && mem_on { " (no PSI: MemAvailable only)" } else { "" };
        if figures.is_empty() {
            // Only PSI was asked for and the kernel has none: nothing can say memory is needed.
            let changed = self.needed.then_some(false);
            self.needed = false;
            self.since = None;
            self.reason = "no figure to decide on (no PSI, MemAvailable threshold off)".into();
            self.read = true;
            return Observed { changed, garbled: false };
        }
        let join = |pick: &dyn Fn(&(bool, bool, String)) -> bool| {
            figures.iter().filter(|f| pick(f)).map(|f| f.2.as_str()).collect::<Vec<_>>().join(", ")
        };
        let any_on = figures.iter().any(|f| f.0);
        let all_off = figures.iter().all(|f| f.1);
        let first = !self.read;
        self.read = true;
        let changed = if !self.needed && any_on {
            self.needed = true;
            self.since = Some(now);
            self.reason = format!("{}{suffix}", join(&|f| f.0));
            Some(true)
        } else if self.needed {
            let dwelt = self.since.is_none_or(|s| now.saturating_duration_since(s) >= t.min_dwell);
            (all_off && dwelt).then(|| {
                self.needed = false;
                self.since = None;
                self.reason = format!("{}{suffix}", join(&|_| true));
                false
            })
        } else {
            None
        };
        // The reason is the figure that decided, kept until the next decision: live figures
        // have their own properties, and a reason that moved at every reading would be a
        // signal at every reading.
        if first && changed.is_none() {
            self.reason = format!("{}{suffix}", join(&|_| true));
        }
        Observed { changed, garbled: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn read(mem: f64, psi: Figure) -> Readings {
        Readings { mem_available: Figure::Value(mem), psi_some: psi }
    }

    fn gate() -> (NeedGate, Instant) {
        (NeedGate::new(Thresholds::default()), Instant::now())
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for name in Gate::NAMES {
            assert_eq!(name.parse::<Gate>().expect("parses").as_str(), name);
        }
        let e = "sometimes".parse::<Gate>().unwrap_err();
        assert!(e.to_string().contains("always, when-needed"), "{e}");
        assert_eq!("x".repeat(10_000).parse::<Gate>().unwrap_err().0.len(), 64, "bounded");
    }

    #[test]
    fn need_appears_at_once_and_names_the_figure() {
        let (mut g, t0) = gate();
        let o = g.observe(t0, read(0.5, Figure::Value(0.0)));
        assert_eq!(o, Observed { changed: None, garbled: false });
        assert!(!g.needed());
        assert!(g.reason().contains("MemAvailable 50.0% >= 25.0%"), "{}", g.reason());
        let o = g.observe(t0 + S, read(0.12, Figure::Value(0.0)));
        assert_eq!(o.changed, Some(true));
        assert_eq!(g.reason(), "MemAvailable 12.0% < 20.0%");
        // PSI alone is enough.
        let (mut g, t0) = gate();
        assert_eq!(g.observe(t0, read(0.9, Figure::Value(6.0))).changed, Some(true));
        assert_eq!(g.reason(), "PSI some 6.00% > 5.00%");
    }

    #[test]
    fn hysteresis_and_dwell_hold_need_until_both_pass() {
        let (mut g, t0) = gate();
        assert_eq!(g.observe(t0, read(0.19, Figure::Absent)).changed, Some(true));
        // Back over 20 % but under 25 %: within the hysteresis, still needed.
        assert_eq!(g.observe(t0 + 60 * S, read(0.22, Figure::Absent)).changed, None);
        assert!(g.needed());
        assert_eq!(g.reason(), "MemAvailable 19.0% < 20.0% (no PSI: MemAvailable only)", "what decided");
        // Past 25 %, but only 10 s after need appeared: held by the dwell.
        let (mut g, t0) = gate();
        g.observe(t0, read(0.19, Figure::Absent));
        assert_eq!(g.observe(t0 + 10 * S, read(0.3, Figure::Absent)).changed, None);
        assert!(g.needed());
        assert_eq!(g.observe(t0 + 30 * S, read(0.3, Figure::Absent)).changed, Some(false));
        assert!(!g.needed());
        assert!(g.reason().contains("no PSI: MemAvailable only"), "{}", g.reason());
        // It can come back at once.
        assert_eq!(g.observe(t0 + 31 * S, read(0.1, Figure::Absent)).changed, Some(true));
    }

    #[test]
    fn need_goes_only_when_every_figure_is_past_its_threshold() {
        let (mut g, t0) = gate();
        g.observe(t0, read(0.1, Figure::Value(0.0)));
        // MemAvailable fine, but PSI within its hysteresis (> 3.75 %).
        assert_eq!(g.observe(t0 + 60 * S, read(0.5, Figure::Value(4.0))).changed, None);
        assert!(g.needed());
        assert_eq!(g.observe(t0 + 61 * S, read(0.5, Figure::Value(3.0))).changed, Some(false));
        assert_eq!(g.reason(), "MemAvailable 50.0% >= 25.0%, PSI some 3.00% <= 3.75%");
    }

    #[test]
    fn a_garbled_figure_keeps_the_last_decision() {
        let (mut g, t0) = gate();
        g.observe(t0, read(0.1, Figure::Absent));
        let garbled = Readings { mem_available: Figure::Garbled, psi_some: Figure::Absent };
        assert_eq!(g.observe(t0 + 100 * S, garbled), Observed { changed: None, garbled: true });
        assert!(g.needed());
        let psi_garbled = read(0.9, Figure::Garbled);
        assert_eq!(g.observe(t0 + 100 * S, psi_garbled), Observed { changed: None, garbled: true });
        assert!(g.needed(), "not turned off by a figure that cannot be read");
        // A figure turned off is not read at all: garbage there does not matter.
        let mut g = NeedGate::new(Thresholds { psi_some_above: 0.0, ..Thresholds::default() });
        assert_eq!(g.observe(t0, read(0.1, Figure::Garbled)).changed, Some(true));
    }

    #[test]
    fn psi_only_on_a_kernel_without_psi_is_never_needed() {
        let mut g = NeedGate::new(Thresholds { mem_available_below: 0.0, ..Thresholds::default() });
        let t0 = Instant::now();
        assert_eq!(g.observe(t0, read(0.01, Figure::Absent)).changed, None);
        assert!(!g.needed());
        assert!(g.reason().contains("no PSI"), "{}", g.reason());
    }
}
