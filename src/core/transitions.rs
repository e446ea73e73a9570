//! Transitions counted by their cause, for the bus (`TransitionCounts`) and the metrics
//! (`ksm_throttler_transitions_total{cause}`): which rule moves KSM on a host, and how often.

use crate::core::policy::Cause;

impl Cause {
    /// Every cause, in the order the counts are shown.
    pub const ALL: [Cause; 11] = [
        Cause::Kick,
        Cause::Timer,
        Cause::ModeChange,
        Cause::Startup,
        Cause::Settled,
        Cause::Need,
        Cause::Unprofitable,
        Cause::Stalled,
        Cause::Arriving,
        Cause::Arrived,
        Cause::ModeRewrite,
    ];

    /// Where the cause is counted: exhaustive, so a new cause cannot be left out of [`Cause::ALL`]
    /// without the build (or [`tests::every_cause_has_its_own_slot`]) saying so.
    fn slot(self) -> usize {
        match self {
            Cause::Kick => 0,
            Cause::Timer => 1,
            Cause::ModeChange => 2,
            Cause::Startup => 3,
            Cause::Settled => 4,
            Cause::Need => 5,
            Cause::Unprofitable => 6,
            Cause::Stalled => 7,
            Cause::Arriving => 8,
            Cause::Arrived => 9,
            Cause::ModeRewrite => 10,
        }
    }
}

/// Transitions applied since start-up, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransitionCounts([u64; Cause::ALL.len()]);

impl TransitionCounts {
    pub fn record(&mut self, cause: Cause) {
        let n = &mut self.0[cause.slot()];
        *n = n.saturating_add(1);
    }

    pub fn get(&self, cause: Cause) -> u64 {
        self.0[cause.slot()]
    }

    /// Every cause with its count, zeros included (a series that exists from the start is what
    /// Prometheus's `increase()` needs to see the first one).
    pub fn iter(&self) -> impl Iterator<Item = (Cause, u64)> + '_ {
        Cause::ALL.into_iter().map(|c| (c, self.get(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_has_its_own_slot() {
        let mut slots: Vec<usize> = Cause::ALL.iter().map(|c| c.slot()).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..Cause::ALL.len()).collect::<Vec<_>>());
    }

    #[test]
    fn counts_each_cause_apart_and_lists_them_all() {
        let mut t = TransitionCounts::default();
        t.record(Cause::Kick);
        t.record(Cause::Kick);
        t.record(Cause::Stalled);
        assert_eq!(t.get(Cause::Kick), 2);
        assert_eq!(t.get(Cause::Stalled), 1);
        assert_eq!(t.get(Cause::Timer), 0);
        let all: Vec<(String, u64)> = t.iter().map(|(c, n)| (c.to_string(), n)).collect();
        assert_eq!(all.len(), 11);
        assert_eq!(all[0], ("kick".to_owned(), 2));
        assert_eq!(all[7], ("merging-stalled".to_owned(), 1));
    }
}
