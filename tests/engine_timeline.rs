//! The engine loop over a scratch sysfs with tokio's paused clock: the real timeline's minutes
//! pass in no time, and every step is checked at its instant.

use std::time::Duration;

use kata_ksm_throttler::core::setting::{Mode, Setting};
use kata_ksm_throttler_test_support::engine::Running;
use kata_ksm_throttler_test_support::scratch::{expected, Scratch, ANON_KB};
use tokio::time::sleep;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn the_documented_timeline_to_the_millisecond() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let r = Running::start(&scratch, Mode::Throttle);
    sleep(10 * S).await;
    assert_eq!(scratch.snapshot(), before, "throttle starts hands off");

    r.handle.kick().await.expect("kick");
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Aggressive, expected(10, 1)));

    sleep(30 * S - MS).await;
    assert_eq!(r.setting(), Setting::Aggressive, "still aggressive 1 ms before 30 s");
    sleep(2 * MS).await;
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Standard, expected(100, 10)));

    sleep(120 * S - 2 * MS).await;
    assert_eq!(r.setting(), Setting::Standard);
    sleep(2 * MS).await;
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Slow, expected(500, 100)));

    sleep(120 * S - 2 * MS).await;
    assert_eq!(r.setting(), Setting::Slow);
    sleep(2 * MS).await;
    assert_eq!(r.setting(), Setting::Initial);
    assert_eq!(scratch.snapshot(), before);
    assert_eq!(r.status.borrow().next_step_down_us, 0);

    r.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_kick_at_any_step_returns_to_aggressive_and_restarts_the_30_seconds() {
    let scratch = Scratch::fresh();
    let r = Running::start(&scratch, Mode::Throttle);
    r.handle.kick().await.expect("kick");
    sleep(31 * S).await;
    assert_eq!(r.setting(), Setting::Standard);
    r.handle.kick().await.expect("kick");
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Aggressive, expected(10, 1)));
    sleep(29 * S).await;
    r.handle.kick().await.expect("kick");
    sleep(29 * S).await;
    assert_eq!(r.setting(), Setting::Aggressive, "the second kick restarted the 30 s");
    sleep(2 * S).await;
    assert_eq!(r.setting(), Setting::Standard);
    assert_eq!(r.status.borrow().kick_count, 3);
}

#[tokio::test(start_paused = true)]
async fn settings_are_computed_from_anon_pages_when_applied() {
    let scratch = Scratch::fresh();
    let r = Running::start(&scratch, Mode::Throttle);
    r.handle.kick().await.expect("kick");
    assert_eq!(scratch.knobs(), expected(10, 1));
    // Merging shrinks AnonPages: the next step uses the new figure, and never goes below 1.
    std::fs::write(scratch.meminfo(), "AnonPages: 4 kB\n").expect("write");
    sleep(31 * S).await;
    assert_eq!(scratch.knobs(), (1, 1, 10));
}

#[tokio::test(start_paused = true)]
async fn pages_to_scan_follows_memory_that_arrives_after_the_kick() {
    let scratch = Scratch::fresh();
    let anon = |kb: u64| scratch.set_anon_kb(kb);
    let pages = |kb: u64, divisor: u64| kb * 1024 / kata_ksm_throttler::io::meminfo::page_size() / divisor;
    anon(1 << 20);
    let r = Running::start(&scratch, Mode::Throttle);
    r.handle.kick().await.expect("kick");
    assert_eq!(scratch.knobs(), (1, pages(1 << 20, 10), 1), "sized on the memory at the kick");
    // A guest boots: 1 GiB more arrives; the next size check (1 s after the kick) follows.
    anon(2 << 20);
    sleep(S + MS).await;
    assert_eq!(scratch.knobs(), (1, pages(2 << 20, 10), 1));
    // A move of a tenth is not worth a write: the marker stays.
    scratch.set("pages_to_scan", "3\n");
    anon((2 << 20) + (2 << 20) / 10);
    sleep(20 * S).await;
    assert_eq!(scratch.knob("pages_to_scan"), "3\n");
    // A kick reads it again at once (here, memory doubled since the last size): answered
    // without waiting, as it changes no setting, and taken in by the engine right after.
    anon(4 << 20);
    r.handle.kick().await.expect("kick");
    sleep(MS).await;
    assert_eq!(scratch.knobs(), (1, pages(4 << 20, 10), 1));
    assert_eq!(r.setting(), Setting::Aggressive);
    // Every later setting is sized when applied, and followed too.
    sleep(30 * S + MS).await;
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Standard, (1, pages(4 << 20, 100), 10)));
    // The step sized standard itself; the checks go on at the pace they had reached (at most
    // every RESIZE_AT_MOST_EVERY), not from 1 s again.
    anon(8 << 20);
    sleep(2 * S).await;
    assert_eq!(scratch.knobs(), (1, pages(4 << 20, 100), 10), "no check 2 s after the step");
    sleep(kata_ksm_throttler::core::policy::RESIZE_AT_MOST_EVERY).await;
    assert_eq!(scratch.knobs(), (1, pages(8 << 20, 100), 10));
    r.shut_down().await;
    assert_eq!(scratch.knobs(), (0, 100, 20), "restored on exit");
}

#[tokio::test(start_paused = true)]
async fn a_failed_step_down_is_retried_and_the_status_stays_true() {
    let scratch = Scratch::fresh();
    let r = Running::start(&scratch, Mode::Throttle);
    r.handle.kick().await.expect("kick");
    std::fs::write(scratch.meminfo(), "MemFree: 1 kB\n").expect("no AnonPages");
    sleep(31 * S).await;
    assert_eq!(r.setting(), Setting::Aggressive, "the step failed: still aggressive");
    scratch.set_anon_kb(ANON_KB);
    sleep(5 * S).await;
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Standard, expected(100, 10)), "retried after 5 s");
}

#[tokio::test(start_paused = true)]
async fn the_advisor_is_turned_off_while_driving_and_restored_last() {
    let scratch = Scratch::fresh();
    scratch.set("advisor_mode", "none [scan-time]\n");
    let r = Running::start(&scratch, Mode::Throttle);
    r.handle.kick().await.expect("kick");
    assert_eq!(scratch.knob("advisor_mode"), "none\n");
    r.handle.set_mode(Mode::Initial).await.expect("initial");
    assert_eq!(scratch.knob("advisor_mode"), "scan-time\n");
    assert_eq!(scratch.knobs(), (0, 100, 20));
}

#[tokio::test(start_paused = true)]
async fn stopping_restores_and_a_pinned_start_mode_applies_at_once() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let r = Running::start(&scratch, Mode::Off);
    sleep(MS).await;
    assert_eq!(r.setting(), Setting::Off);
    scratch.set("run", "1\n");
    r.handle.set_mode(Mode::Throttle).await.expect("throttle");
    assert_eq!(scratch.snapshot(), before, "the settings from before start-up come back, not the hand change");
    r.handle.set_mode(Mode::Throttle).await.expect("same mode again is fine");

    let r2_scratch = Scratch::fresh();
    let r2 = Running::start(&r2_scratch, Mode::Throttle);
    r2.handle.kick().await.expect("kick");
    r2.shut_down().await;
    assert_eq!(r2_scratch.knobs(), (0, 100, 20));
}

#[tokio::test(start_paused = true)]
async fn a_storm_of_kicks_costs_no_sysfs_write_after_the_first() {
    let scratch = Scratch::fresh();
    let r = Running::start(&scratch, Mode::Throttle);
    r.handle.kick().await.expect("kick");
    scratch.set("pages_to_scan", "3\n");
    for _ in 0..10_000 {
        r.handle.kick().await.expect("kick");
    }
    assert_eq!(scratch.knob("pages_to_scan"), "3\n");
    assert_eq!(r.handle.kick_count(), 10_001, "counted as answered");
    sleep(MS).await;
    assert_eq!(r.status.borrow().kick_count, 10_001, "and published once taken in");
}

#[tokio::test(start_paused = true)]
async fn adaptive_follows_the_counters_in_the_files() {
    let scratch = Scratch::fresh();
    // Merged pages leave pages_unshared for pages_sharing: what ksmd tracks in all only grows
    // when new memory arrives.
    let counters = |scans: u64, sharing: u64, tracked: u64| {
        scratch.set("full_scans", format!("{scans}\n"));
        scratch.set("pages_sharing", format!("{sharing}\n"));
        scratch.set("pages_unshared", format!("{}\n", tracked - sharing));
    };
    counters(0, 0, 0);
    let before = scratch.snapshot();
    let r = Running::start(&scratch, Mode::Adaptive);
    r.handle.kick().await.expect("kick");
    assert_eq!(scratch.knobs(), expected(10, 1));
    assert_eq!(scratch.knob("smart_scan"), "0\n", "every page visited every scan while aggressive");
    // Scans 1 to 3 (the second sees the new memory, the third merges it), then a quiet fourth:
    // standard within one sample.
    for (scans, sharing) in [(1, 0), (2, 0), (3, 500_000), (4, 500_100)] {
        counters(scans, sharing, if scans == 1 { 0 } else { 1_000_000 });
        sleep(100 * MS).await;
    }
    sleep(MS).await;
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Standard, expected(100, 10)));
    assert_eq!(scratch.knob("smart_scan"), "1\n", "the administrator's smart_scan back once stepped down");
    sleep(2 * S).await;
    assert_eq!(r.setting(), Setting::Standard, "no scan finished: nothing confirmed");
    // Memory arriving (the pages ksmd tracks grow, 100,000 a second): no confirmation.
    for (scans, tracked) in [(5, 1_100_000), (6, 1_200_000), (7, 1_300_000)] {
        counters(scans, 500_100, tracked);
        sleep(S).await;
    }
    assert_eq!(r.setting(), Setting::Standard, "arriving memory keeps the standard pace");
    // Settled scans at the standard pace for SETTLED_FOR confirm: back to the initial settings.
    for scans in 8..=9 {
        counters(scans, 500_100, 1_300_000);
        sleep(S).await;
    }
    assert_eq!(r.setting(), Setting::Standard, "two settled scans, but within SETTLED_FOR");
    for scans in 10..=11 {
        counters(scans, 500_100, 1_300_000);
        sleep(S).await;
    }
    assert_eq!(r.setting(), Setting::Initial);
    // The counter files are our own scratch ones: restore them to compare the knobs.
    counters(0, 0, 0);
    assert_eq!(scratch.snapshot(), before);
    r.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn smart_scan_is_off_only_while_adaptive_is_aggressive() {
    let scratch = Scratch::fresh();
    let r = Running::start(&scratch, Mode::Throttle);
    r.handle.kick().await.expect("kick");
    assert_eq!(scratch.knob("smart_scan"), "1\n", "the throttle timeline leaves it alone");
    r.handle.set_mode(Mode::Adaptive).await.expect("adaptive");
    assert_eq!((r.setting(), scratch.knob("smart_scan")), (Setting::Aggressive, "0\n".into()));
    r.handle.set_mode(Mode::Throttle).await.expect("throttle");
    assert_eq!((r.setting(), scratch.knob("smart_scan")), (Setting::Aggressive, "1\n".into()));
    r.handle.set_mode(Mode::Adaptive).await.expect("adaptive");
    r.handle.set_mode(Mode::Off).await.expect("off");
    assert_eq!((scratch.knobs().0, scratch.knob("smart_scan")), (0, "1\n".into()));
    r.handle.set_mode(Mode::Adaptive).await.expect("adaptive");
    r.handle.kick().await.expect("kick");
    assert_eq!(scratch.knob("smart_scan"), "0\n");
    sleep(30 * S + MS).await;
    assert_eq!((r.setting(), scratch.knob("smart_scan")), (Setting::Standard, "1\n".into()), "as found");
    r.shut_down().await;
    assert_eq!((scratch.knobs(), scratch.knob("smart_scan")), ((0, 100, 20), "1\n".into()), "restored on exit");
}

#[tokio::test(start_paused = true)]
async fn adaptive_with_unreadable_counters_falls_back_to_the_timeline() {
    let scratch = Scratch::fresh();
    std::fs::create_dir(scratch.ksm().join("full_scans")).expect("unreadable counter");
    let r = Running::start(&scratch, Mode::Adaptive);
    r.handle.kick().await.expect("kick");
    sleep(30 * S - MS).await;
    assert_eq!(r.setting(), Setting::Aggressive);
    sleep(2 * MS).await;
    assert_eq!(r.setting(), Setting::Standard);
    sleep(240 * S).await;
    assert_eq!(r.setting(), Setting::Initial);
    assert_eq!(scratch.knobs(), (0, 100, 20));
}

#[tokio::test(start_paused = true)]
async fn adaptive_keeps_smart_scan_on_while_aggressive_once_pages_are_merged() {
    // A new VM's pages merge against merged twins on their first visit, whatever the twins'
    // age; smart_scan then only spares visits to pages that do not merge.
    let scratch = Scratch::fresh();
    scratch.set("pages_shared", "1000\n");
    let r = Running::start(&scratch, Mode::Adaptive);
    r.handle.kick().await.expect("kick");
    assert_eq!((r.setting(), scratch.knob("smart_scan")), (Setting::Aggressive, "1\n".into()));
    // Nothing merged any more (all unmerged): the next aggressive setting turns it off.
    scratch.set("pages_shared", "0\n");
    r.handle.set_mode(Mode::Throttle).await.expect("throttle");
    r.handle.set_mode(Mode::Adaptive).await.expect("adaptive");
    assert_eq!((r.setting(), scratch.knob("smart_scan")), (Setting::Aggressive, "0\n".into()));
    scratch.set("pages_shared", "0\n");
    r.shut_down().await;
    assert_eq!(scratch.knob("smart_scan"), "1\n", "restored on exit");
}

/// Issue 28: a kick that changes nothing (aggressive already) is answered in its first poll,
/// before the engine's task has run at all; one that is a transition is answered only once the
/// transition is in force. The kick answered so still moves the deadline.
#[tokio::test(start_paused = true)]
async fn a_kick_that_changes_nothing_is_answered_without_the_engine_and_a_transition_after_it() {
    use std::task::Poll;
    let scratch = Scratch::fresh();
    let r = Running::start(&scratch, Mode::Throttle);
    sleep(MS).await;

    let mut first = std::pin::pin!(r.handle.kick());
    assert!(futures_util::poll!(first.as_mut()).is_pending(), "a transition waits for the engine");
    first.await.expect("kick");
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Aggressive, expected(10, 1)), "in force at the reply");

    sleep(20 * S).await;
    let mut again = std::pin::pin!(r.handle.kick());
    assert!(matches!(futures_util::poll!(again.as_mut()), Poll::Ready(Ok(()))), "answered without the engine");
    assert_eq!(r.handle.kick_count(), 2);
    // Taken in: 30 s from this kick, not from the first.
    sleep(30 * S - MS).await;
    assert_eq!(r.setting(), Setting::Aggressive, "the deadline moved with the kick answered at once");
    sleep(2 * MS).await;
    assert_eq!(r.setting(), Setting::Standard);

    // Standard: a kick is a transition again, answered once aggressive is back.
    let mut back = std::pin::pin!(r.handle.kick());
    assert!(futures_util::poll!(back.as_mut()).is_pending());
    back.await.expect("kick");
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Aggressive, expected(10, 1)));
}
