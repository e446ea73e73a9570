//! End to end on the real kernel: the daemon drives /sys/kernel/mm/ksm through a compressed
//! cycle and puts it back exactly as found. Needs root and a KSM kernel; set
//! KSM_THROTTLER_SKIP_REAL_KSM=1 to skip it knowingly (it fails otherwise, rather than pass
//! without having run).

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use kata_ksm_throttler::core::knobs::{Knobs, Target};
use kata_ksm_throttler::io::meminfo;
use kata_ksm_throttler::io::sysfs::Ksm;
use kata_ksm_throttler_test_support::real_ksm::{self, REAL_KSM as REAL};
use kata_ksm_throttler_test_support::*;

/// Puts the real KSM back as it was found, even if the test panics.
struct Restore {
    ksm: Ksm,
    found: Knobs,
    _lock: File,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = self.ksm.apply(&Target::from(&self.found)) {
            eprintln!("could not restore the real KSM to {:?}: {e}", self.found);
        }
    }
}

fn take_real_ksm(test: &str) -> Option<Restore> {
    if real_ksm::skip_real_ksm(test) {
        return None;
    }
    // Bounded: a long real-KSM benchmark holds the lock for many minutes.
    let lock = real_ksm::lock_within(Duration::from_secs(120));
    let ksm = Ksm::open(REAL).expect("open real KSM");
    let found = ksm.read().expect("read real KSM");
    Some(Restore { ksm, found, _lock: lock })
}

fn anon_pages() -> u64 {
    meminfo::anon_pages(Path::new("/proc/meminfo"), meminfo::page_size()).expect("meminfo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drives_the_real_ksm_through_a_cycle_and_leaves_it_as_found() {
    let Some(guard) = take_real_ksm("drives_the_real_ksm_through_a_cycle_and_leaves_it_as_found") else { return };
    let real = &guard.ksm;
    // Start from the advisor scanning by time where the kernel has it: pages_to_scan refuses
    // writes then, so this proves the advisor is switched off first and put back last.
    let has_advisor = real.has_advisor();
    if has_advisor {
        real.apply(&Target { advisor_mode: Some("scan-time".into()), ..Target::default() }).expect("advisor on");
    }
    let before = real.read().expect("read");

    let bus = start_bus();
    let scratch = Scratch::fresh();
    let state = scratch.state_dir();
    let mut daemon = Daemon::spawn_on(
        &bus,
        Path::new(REAL),
        Path::new("/proc/meminfo"),
        &state,
        &["--aggressive-duration", "300ms", "--standard-duration", "300ms", "--slow-duration", "300ms"],
        &scratch,
    );
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    let proxy = proxy(&conn).await;
    let props = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination(kata_ksm_throttler::names::BUS_NAME)
        .path(kata_ksm_throttler::names::OBJECT_PATH)
        .build()
        .await
        .expect("properties proxy");
    let mut changes = props.receive_properties_changed().await.expect("subscribe");

    let low = anon_pages();
    proxy.kick().await.expect("kick");
    let high = anon_pages();
    let now = real.read().expect("read");
    assert_eq!((now.run, now.sleep_millisecs), (1, 1), "aggressive: {now:?}");
    let (lo, hi) = (low.min(high) / 10, low.max(high) / 10);
    assert!(
        now.pages_to_scan >= (lo * 9 / 10).max(1) && now.pages_to_scan <= (hi * 11 / 10).max(1),
        "pages_to_scan {} vs AnonPages/10 in {lo}..{hi}",
        now.pages_to_scan
    );
    if has_advisor {
        assert_eq!(now.advisor_mode.as_deref(), Some("none"), "advisor off while driving");
    }

    let mut order: Vec<String> = vec![];
    while order.last().map(String::as_str) != Some("initial") {
        let signal = tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .expect("a step within 10 s")
            .expect("open");
        let args = signal.args().expect("args");
        let Some(v) = args.changed_properties().get("CurrentSetting") else { continue };
        let setting: String = v.try_clone().expect("clone").try_into().expect("string");
        let knobs = real.read().expect("read");
        match setting.as_str() {
            "aggressive" => assert_eq!(knobs.sleep_millisecs, 1),
            "standard" => assert_eq!((knobs.run, knobs.sleep_millisecs), (1, 10)),
            "slow" => assert_eq!((knobs.run, knobs.sleep_millisecs), (1, 100)),
            _ => {}
        }
        order.push(setting);
    }
    assert_eq!(order, ["aggressive", "standard", "slow", "initial"], "steps seen");
    assert_eq!(real.read().expect("read"), before, "the real KSM is back as it was before the kick");

    // Adaptive mode turns the kernel's smart_scan (6.7+) off while aggressive with nothing
    // merged yet (pages merged by other processes keep it on), and back.
    proxy.set_mode("adaptive").await.expect("adaptive");
    let merged = real.read_counter("pages_shared").expect("pages_shared").is_some_and(|n| n > 0);
    proxy.kick().await.expect("kick");
    let now = real.read().expect("read");
    assert_eq!((now.run, now.sleep_millisecs), (1, 1), "aggressive: {now:?}");
    let want = if merged { before.smart_scan } else { before.smart_scan.map(|_| 0) };
    assert_eq!(now.smart_scan, want, "smart_scan while adaptive is aggressive (merged pages: {merged})");
    proxy.set_mode("initial").await.expect("initial");
    assert_eq!(real.read().expect("read"), before, "back as before, smart_scan included");

    let status = daemon.terminate();
    assert!(status.success(), "{}", daemon.log_text());
    assert_eq!(real.read().expect("read"), before, "and stays so after the daemon exits");
    let found = guard.found.clone();
    drop(guard);
    assert_eq!(Ksm::open(REAL).expect("open").read().expect("read"), found, "left exactly as found");
}
