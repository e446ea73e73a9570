//! The vocabulary of the policy: what KSM may be set to and which mode drives it. Plain values.

use std::fmt;
use std::str::FromStr;

/// What the throttler has put in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    /// The administrator's own settings: the throttler has changed nothing (or put them back).
    Initial,
    Aggressive,
    Standard,
    Slow,
    /// ksmd stopped (`run` = 0), merged pages kept.
    Off,
}

impl Setting {
    pub const fn as_str(self) -> &'static str {
        match self {
            Setting::Initial => "initial",
            Setting::Aggressive => "aggressive",
            Setting::Standard => "standard",
            Setting::Slow => "slow",
            Setting::Off => "off",
        }
    }

    /// The scan profile of a throttling setting; `None` for the two that are not a profile.
    pub const fn profile(self) -> Option<Profile> {
        match self {
            Setting::Aggressive => Some(Profile::AGGRESSIVE),
            Setting::Standard => Some(Profile::STANDARD),
            Setting::Slow => Some(Profile::SLOW),
            Setting::Initial | Setting::Off => None,
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How fast ksmd scans in a throttling setting: `pages_to_scan` = AnonPages / `anon_divisor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub sleep_millisecs: u32,
    pub anon_divisor: u64,
}

impl Profile {
    pub const AGGRESSIVE: Profile = Profile { sleep_millisecs: 1, anon_divisor: 10 };
    pub const STANDARD: Profile = Profile { sleep_millisecs: 10, anon_divisor: 100 };
    pub const SLOW: Profile = Profile { sleep_millisecs: 100, anon_divisor: 500 };

    /// Pages a cycle for this many anonymous pages; never 0, which the kernel reads as "scan nothing".
    pub fn pages_to_scan(self, anon_pages: u64) -> u64 {
        (anon_pages / self.anon_divisor).max(1)
    }
}

/// Who decides the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Kicks go aggressive, timers step down (the Kata design).
    Throttle,
    /// Kicks go aggressive; steps down as soon as the KSM counters show merging has settled,
    /// with the throttle timeline as an upper bound.
    Adaptive,
    /// Hands off: the administrator's settings, kicks ignored.
    Initial,
    /// ksmd stopped.
    Off,
    /// One setting held until the mode changes.
    Pinned(Pinned),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pinned {
    Aggressive,
    Standard,
    Slow,
}

impl Pinned {
    pub const fn setting(self) -> Setting {
        match self {
            Pinned::Aggressive => Setting::Aggressive,
            Pinned::Standard => Setting::Standard,
            Pinned::Slow => Setting::Slow,
        }
    }
}

impl Mode {
    /// The names `SetMode` and `--mode` accept (plus the alias `auto` for `throttle`).
    pub const NAMES: &'static [&'static str] =
        &["throttle", "adaptive", "initial", "off", "aggressive", "standard", "slow"];

    /// Whether kicks drive this mode.
    pub const fn reacts_to_kicks(self) -> bool {
        matches!(self, Mode::Throttle | Mode::Adaptive)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Throttle => "throttle",
            Mode::Adaptive => "adaptive",
            Mode::Initial => "initial",
            Mode::Off => "off",
            Mode::Pinned(p) => p.setting().as_str(),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown mode {given:?}: valid modes are throttle (alias auto), adaptive, initial, off, aggressive, standard, slow"
)]
pub struct UnknownMode {
    /// What was asked for, cut short so a huge argument does not end up in logs and replies.
    pub given: String,
}

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "throttle" | "auto" => Mode::Throttle,
            "adaptive" => Mode::Adaptive,
            "initial" => Mode::Initial,
            "off" => Mode::Off,
            "aggressive" => Mode::Pinned(Pinned::Aggressive),
            "standard" => Mode::Pinned(Pinned::Standard),
            "slow" => Mode::Pinned(Pinned::Slow),
            _ => {
                let given: String = s.chars().take(64).collect();
                return Err(UnknownMode { given });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_mode_parses_and_prints_back() {
        for name in Mode::NAMES {
            let mode: Mode = name.parse().expect("listed mode parses");
            assert_eq!(mode.as_str(), *name);
        }
        assert_eq!("auto".parse::<Mode>(), Ok(Mode::Throttle));
    }

    #[test]
    fn unknown_mode_names_the_valid_ones_and_is_cut_short() {
        let long = "x".repeat(1 << 20);
        let err = long.parse::<Mode>().unwrap_err();
        assert_eq!(err.given.len(), 64);
        let msg = err.to_string();
        for name in Mode::NAMES {
            assert!(msg.contains(name), "{msg} lacks {name}");
        }
        assert!("Throttle".parse::<Mode>().is_err(), "modes are case-sensitive");
    }

    #[test]
    fn pages_to_scan_follows_anon_pages_and_never_reaches_zero() {
        assert_eq!(Profile::AGGRESSIVE.pages_to_scan(1_000_000), 100_000);
        assert_eq!(Profile::STANDARD.pages_to_scan(1_000_000), 10_000);
        assert_eq!(Profile::SLOW.pages_to_scan(1_000_000), 2_000);
        assert_eq!(Profile::SLOW.pages_to_scan(499), 1);
        assert_eq!(Profile::AGGRESSIVE.pages_to_scan(0), 1);
    }
}
