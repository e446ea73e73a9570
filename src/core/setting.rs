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
    /// Every setting: a new one is added here and to [`Setting::as_str`]'s match.
    pub const ALL: [Setting; 5] =
        [Setting::Initial, Setting::Aggressive, Setting::Standard, Setting::Slow, Setting::Off];

    pub const fn as_str(self) -> &'static str {
        match self {
            Setting::Initial => "initial",
            Setting::Aggressive => "aggressive",
            Setting::Standard => "standard",
            Setting::Slow => "slow",
            Setting::Off => "off",
        }
    }

    /// The setting named `name` (as [`Setting::as_str`] prints it).
    pub fn from_name(name: &str) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.as_str() == name)
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

    /// Pages a cycle for this many anonymous pages; never 0, which the kernel reads as "scan
    /// nothing", and never more than the kernel's knob holds (32 bits).
    pub fn pages_to_scan(self, anon_pages: u64) -> u64 {
        (anon_pages / self.anon_divisor.max(1)).clamp(1, u64::from(u32::MAX))
    }
}

/// The scan profile of each throttling setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profiles {
    pub aggressive: Profile,
    pub standard: Profile,
    pub slow: Profile,
}

impl Default for Profiles {
    fn default() -> Self {
        Profiles { aggressive: Profile::AGGRESSIVE, standard: Profile::STANDARD, slow: Profile::SLOW }
    }
}

impl Profiles {
    pub fn get(&self, setting: Setting) -> Option<Profile> {
        match setting {
            Setting::Aggressive => Some(self.aggressive),
            Setting::Standard => Some(self.standard),
            Setting::Slow => Some(self.slow),
            Setting::Initial | Setting::Off => None,
        }
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
    /// Every mode: a new one is added here and to [`Mode::as_str`]'s match.
    pub const ALL: [Mode; 7] = [
        Mode::Throttle,
        Mode::Adaptive,
        Mode::Initial,
        Mode::Off,
        Mode::Pinned(Pinned::Aggressive),
        Mode::Pinned(Pinned::Standard),
        Mode::Pinned(Pinned::Slow),
    ];

    /// The names `SetMode` and `--mode` accept, besides [`Mode::ALIASES`]; every message and help
    /// text that lists the modes is made from it.
    pub const NAMES: [&'static str; Mode::ALL.len()] = {
        let mut names = [""; Mode::ALL.len()];
        let mut i = 0;
        while i < names.len() {
            names[i] = Mode::ALL[i].as_str();
            i += 1;
        }
        names
    };

    /// Other names a mode answers to: the Go throttler's `auto`.
    pub const ALIASES: [(&'static str, Mode); 1] = [("auto", Mode::Throttle)];

    /// The modes as one line for messages: `throttle (alias auto), adaptive, ...`.
    pub fn listed() -> String {
        let name = |m: Mode| match Mode::ALIASES.iter().find(|(_, to)| *to == m) {
            Some((alias, _)) => format!("{} (alias {alias})", m.as_str()),
            None => m.as_str().to_owned(),
        };
        Mode::ALL.into_iter().map(name).collect::<Vec<_>>().join(", ")
    }

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
#[error("unknown mode {given:?}: valid modes are {}", Mode::listed())]
pub struct UnknownMode {
    /// What was asked for, cut short so a huge argument does not end up in logs and replies.
    pub given: String,
}

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let named = Mode::ALL.into_iter().find(|m| m.as_str() == s);
        let aliased = || Mode::ALIASES.iter().find(|(alias, _)| *alias == s).map(|&(_, m)| m);
        named.or_else(aliased).ok_or_else(|| UnknownMode { given: s.chars().take(64).collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_mode_parses_and_prints_back() {
        for name in Mode::NAMES {
            let mode: Mode = name.parse().expect("listed mode parses");
            assert_eq!(mode.as_str(), name);
        }
        assert_eq!("auto".parse::<Mode>(), Ok(Mode::Throttle));
    }

    /// Adding a variant breaks these matches: the place to add it to `ALL` as well.
    #[test]
    fn all_lists_every_variant_once() {
        let mode_at = |m: Mode| match m {
            Mode::Throttle => 0,
            Mode::Adaptive => 1,
            Mode::Initial => 2,
            Mode::Off => 3,
            Mode::Pinned(Pinned::Aggressive) => 4,
            Mode::Pinned(Pinned::Standard) => 5,
            Mode::Pinned(Pinned::Slow) => 6,
        };
        assert_eq!(Mode::ALL.map(mode_at), [0, 1, 2, 3, 4, 5, 6]);
        let setting_at = |s: Setting| match s {
            Setting::Initial => 0,
            Setting::Aggressive => 1,
            Setting::Standard => 2,
            Setting::Slow => 3,
            Setting::Off => 4,
        };
        assert_eq!(Setting::ALL.map(setting_at), [0, 1, 2, 3, 4]);
        assert_eq!(Mode::listed(), "throttle (alias auto), adaptive, initial, off, aggressive, standard, slow");
    }

    #[test]
    fn settings_parse_back_from_their_names() {
        for s in Setting::ALL {
            assert_eq!(Setting::from_name(s.as_str()), Some(s));
        }
        assert_eq!(Setting::from_name("Aggressive"), None);
        assert_eq!(Setting::from_name(""), None);
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
        assert_eq!(Profile::AGGRESSIVE.pages_to_scan(u64::MAX), u64::from(u32::MAX), "the kernel's knob is 32 bits");
        assert_eq!(Profile::AGGRESSIVE.pages_to_scan(0), 1);
    }
}
