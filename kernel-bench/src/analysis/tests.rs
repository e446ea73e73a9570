//! The analysis on recorded and made-up samples.

use super::*;

fn s(t: f64, pages_sharing: u64, cpu_ms: u64, setting: &str, merging: &[u64]) -> Sample {
    Sample {
        t,
        pages_sharing,
        pages_shared: 0,
        full_scans: (t * 2.0) as u64,
        pages_unshared: 0,
        pages_volatile: 0,
        ksmd_cpu_ns: cpu_ms * 1_000_000,
        setting: setting.into(),
        run: 1,
        pages_to_scan: 100,
        sleep_millisecs: 20,
        anon_pages: 0,
        merging: merging.to_vec(),
        pages_scanned: None,
        ksm_zero_pages: None,
        pages_skipped: None,
    }
}

/// A sample with the visit counters: `scanned` pages visited so far, `zero` zero pages.
fn v(t: f64, pages_sharing: u64, scanned: u64, zero: u64) -> Sample {
    Sample {
        pages_scanned: Some(scanned),
        ksm_zero_pages: Some(zero),
        pages_skipped: Some(scanned / 10),
        ..s(t, pages_sharing, 0, "x", &[])
    }
}

const PAGE: u64 = 4096;
const PAGES_PER_MIB: u64 = 256;

fn scale(max: u64, window: f64) -> Scale {
    Scale { max_pages_sharing: max, shared_pages_per_process: 100, page_size: PAGE, window_s: window }
}

#[test]
fn times_to_merged_are_first_samples_at_or_over_the_fraction() {
    let samples = [
        s(0.0, 0, 0, "aggressive", &[]),
        s(1.0, 499, 100, "aggressive", &[]),
        s(2.0, 500, 200, "aggressive", &[]),
        s(3.0, 949, 300, "aggressive", &[]),
        s(4.0, 950, 400, "standard", &[]),
        s(5.0, 1000, 450, "initial", &[]),
    ];
    let sum = summarize(&samples, &[], scale(1000, 10.0));
    assert_eq!((sum.t50, sum.t90, sum.t95), (Some(2.0), Some(3.0), Some(4.0)));
    assert_eq!(sum.ksmd_cpu_to_t95_s, Some(0.4));
    assert_eq!(sum.max_merged, 1.0);
    let steps: Vec<_> = sum.steps.iter().map(|s| (s.t, s.setting.as_str())).collect();
    assert_eq!(steps, [(0.0, "aggressive"), (4.0, "standard"), (5.0, "initial")]);
    // Not reached inside the window: None, not a time past it.
    let sum = summarize(&samples, &[], scale(1000, 3.5));
    assert_eq!((sum.t90, sum.t95), (Some(3.0), None));
    assert_eq!(summarize(&samples, &[], scale(0, 10.0)).t50, None, "nothing to merge: no time");
}

#[test]
fn cpu_and_saved_memory_are_taken_over_the_window_exactly() {
    let samples = [s(0.0, 0, 0, "x", &[]), s(10.0, PAGES_PER_MIB * 100, 1000, "x", &[]), s(20.0, 0, 3000, "x", &[])];
    // Linear ramp to 100 MiB over 10 s: 500 MiB s; half-way down at 15 s: +375.
    assert!((saved_mib_s(&samples, PAGE, 10.0) - 500.0).abs() < 1e-9);
    assert!((saved_mib_s(&samples, PAGE, 15.0) - 875.0).abs() < 1e-9);
    assert!((saved_mib_s(&samples, PAGE, 100.0) - 1000.0).abs() < 1e-9, "sampling ended: no more area");
    let sum = summarize(&samples, &[], scale(1, 15.0));
    assert!((sum.ksmd_cpu_s - 2.0).abs() < 1e-9, "interpolated at 15 s: {}", sum.ksmd_cpu_s);
}

#[test]
fn only_what_live_processes_hold_counts_as_saved() {
    // Two guests share 1,000 KSM pages (1,000 sharing, 1,000 shared, 1,000 merged pages
    // each). One stops; ksmd does not run, so the counters stay; then the other stops.
    let merged = |t: f64, merging: &[u64]| Sample { pages_shared: 1000, ..s(t, 1000, 0, "initial", merging) };
    let samples = [merged(0.0, &[1000, 1000]), merged(10.0, &[1000, 0]), merged(20.0, &[0, 0])];
    assert_eq!(samples.iter().map(live_share).collect::<Vec<_>>(), [1.0, 0.5, 0.0]);
    // 1,000 pages are 3.9 MiB: 3.9 falling to 1.95 over 10 s, then to nothing.
    let mib = 1000.0 / PAGES_PER_MIB as f64;
    let want = (mib + mib / 2.0) / 2.0 * 10.0 + mib / 2.0 / 2.0 * 10.0;
    assert!((saved_mib_s(&samples, PAGE, 20.0) - want).abs() < 1e-9, "{}", saved_mib_s(&samples, PAGE, 20.0));
    // Read a moment apart from the counters, the processes may show more merged: at most all.
    assert_eq!(live_share(&merged(0.0, &[1500, 1000])), 1.0);
    // No process followed (a run of the modes bench with none): pages_sharing as it is.
    assert_eq!(live_share(&merged(0.0, &[])), 1.0);
}

#[test]
fn each_process_is_timed_from_its_own_start() {
    let samples = [
        s(0.0, 0, 0, "a", &[0, 0]),
        s(0.5, 0, 0, "a", &[50, 0]),
        s(1.0, 0, 0, "a", &[95, 0]),
        s(10.0, 0, 0, "a", &[100, 0]),
        s(10.5, 0, 0, "a", &[100, 94]),
        s(12.5, 0, 0, "a", &[100, 95]),
    ];
    let starts = [Start { index: 0, pid: 1, t: -0.3 }, Start { index: 1, pid: 2, t: 10.0 }];
    let sum = summarize(&samples, &starts, scale(1, 100.0));
    assert_eq!(sum.process_merged_s, [Some(1.0), Some(2.5)]);
    let unmerged = [s(0.0, 0, 0, "a", &[0]), s(1.0, 0, 0, "a", &[94])];
    let sum = summarize(&unmerged, &starts[..1], scale(1, 100.0));
    assert_eq!(sum.process_merged_s, [None]);
}

fn summary(t95: Option<f64>, cpu: f64, procs: &[Option<f64>]) -> Summary {
    Summary {
        t50: None,
        t90: None,
        t95,
        ksmd_cpu_to_t95_s: None,
        ksmd_cpu_s: cpu,
        saved_mib_s: 0.0,
        max_merged: 0.0,
        full_scans: 0,
        process_merged_s: procs.to_vec(),
        steps: vec![],
        pages_visited: None,
        pages_skipped: None,
        peak_merged_pages: 0,
        visits_per_merged: None,
        ksmd_cpu_s_per_saved_gib_min: None,
    }
}

#[test]
fn visits_are_counted_from_the_first_sample_to_the_window_end_per_peak_merged_page() {
    // pages_scanned starts at 5000 (earlier runs), then 1000 visits a second; the peak of
    // pages_sharing + zero pages is 300 + 100 at 2 s, more than the final 350 + 0.
    let samples = [v(0.0, 0, 5_000, 0), v(1.0, 100, 6_000, 0), v(2.0, 300, 7_000, 100), v(3.0, 350, 8_000, 0)];
    let sum = summarize(&samples, &[], scale(1000, 2.5));
    assert_eq!(sum.pages_visited, Some(2_500), "interpolated at the window's end, less the start");
    assert_eq!(sum.pages_skipped, Some(250));
    assert_eq!(sum.peak_merged_pages, 400);
    assert_eq!(sum.visits_per_merged, Some(2_500.0 / 400.0));
    let sum = summarize(&samples, &[], scale(1000, 10.0));
    assert_eq!(sum.pages_visited, Some(3_000), "sampling ended: the last sample's");
    assert_eq!(sum.peak_merged_pages, 400, "the peak, not the final 350");
    assert_eq!(sum.visits_per_merged.map(|x| x / VISIT_FLOOR), Some(3.75), "3.75 x the floor of 2");

    let old = [s(0.0, 0, 0, "x", &[]), s(1.0, 10, 0, "x", &[])];
    let sum = summarize(&old, &[], scale(1, 10.0));
    assert_eq!((sum.pages_visited, sum.visits_per_merged), (None, None), "no pages_scanned: unknown, not 0");
    assert_eq!(sum.peak_merged_pages, 10, "zero pages unknown: pages_sharing alone");
    let mut gap = samples.to_vec();
    gap[1].pages_scanned = None;
    assert_eq!(counted_over_window(&gap, 10.0, |s| s.pages_scanned), None, "a gap makes it unknown");
    let unmerged = [v(0.0, 0, 0, 0), v(1.0, 0, 900, 0)];
    assert_eq!(summarize(&unmerged, &[], scale(1, 10.0)).visits_per_merged, None, "nothing merged: no ratio");
    assert_eq!(per_merged_page(900, 0), None);
    assert_eq!(per_merged_page(900, 300), Some(3.0));
}

#[test]
fn ksmd_cpu_per_saved_gib_minute() {
    // 1 GiB held for a minute is 1024 x 60 MiB·s: 3 CPU-s for it is 3 per GiB·min.
    assert_eq!(cpu_per_saved_gib_min(3.0, 1024.0 * 60.0), Some(3.0));
    assert_eq!(cpu_per_saved_gib_min(3.0, 512.0 * 30.0), Some(12.0));
    assert_eq!(cpu_per_saved_gib_min(3.0, 0.0), None, "nothing saved: no ratio");
    // Through summarize: 100 MiB for 10 s after a linear ramp of 10 s = 1500 MiB·s, 2 CPU-s.
    let samples = [
        s(0.0, 0, 0, "x", &[]),
        s(10.0, PAGES_PER_MIB * 100, 1000, "x", &[]),
        s(20.0, PAGES_PER_MIB * 100, 2000, "x", &[]),
    ];
    let sum = summarize(&samples, &[], scale(1, 20.0));
    let want = 2.0 / (1500.0 / 1024.0 / 60.0);
    let got = sum.ksmd_cpu_s_per_saved_gib_min.expect("saved");
    assert!((got - want).abs() < 1e-9, "{got} != {want}");
}

#[test]
fn cores_left_guests_cores_and_the_ready_ratio() {
    assert_eq!(cores_left(4, 60.0, 240.0), Some(3.75));
    assert_eq!(cores_left(2, 0.0, 45.0), Some(2.0));
    assert_eq!(cores_left(0, 1.0, 45.0), None, "CPUs unknown");
    // Two guests of 30 and 90 CPU-s, one never launched, over 240 s: half a core.
    assert_eq!(guests_cores(&[Some(30.0), Some(90.0), None], 240.0), Some(0.5));
    assert_eq!(guests_cores(&[None, None], 240.0), None);
    assert_eq!(guests_cores(&[], 240.0), None);
    assert_eq!(mean_known(&[Some(10.0), Some(20.0), None]), Some(15.0), "the ones that became ready");
    assert_eq!(mean_known(&[None]), None);
    assert_eq!(ratio_to(Some(15.0), Some(12.0)), Some(1.25));
    assert_eq!(ratio_to(Some(15.0), None), None);
    assert_eq!(ratio_to(None, Some(12.0)), None);
    assert_eq!(ratio_to(Some(15.0), Some(0.0)), None);
}

type Run = (Summary, Footprint);

fn run(r: &Run) -> VmRun<'_> {
    VmRun { summary: &r.0, footprint: &r.1 }
}

fn vm(saved: f64, cpu: f64, cores_left: Option<f64>) -> Run {
    (Summary { saved_mib_s: saved, ..summary(None, cpu, &[]) }, Footprint { cores_left, ..Footprint::default() })
}

#[test]
fn vm_targets_are_judged_on_saved_memory_cpu_and_cores_against_throttle_and_the_advisor() {
    let throttle = vm(1000.0, 20.0, Some(1.9));
    let judge = |adaptive: Run, advisor: Option<Run>| -> Vec<bool> {
        vm_targets("v", run(&throttle), run(&adaptive), advisor.as_ref().map(run)).iter().map(|v| v.met).collect()
    };
    // [>= 100 % saved, >= 95 % saved, <= 50 % of throttle's CPU, beats the advisor,
    //  <= 50 % of the advisor's CPU, as many cores as the advisor]
    assert_eq!(
        judge(vm(1000.0, 10.0, Some(1.96)), Some(vm(900.0, 20.0, Some(2.0)))),
        [true, true, true, true, true, true]
    );
    assert_eq!(
        judge(vm(999.0, 10.1, Some(1.94)), Some(vm(998.0, 20.0, Some(2.0)))),
        [false, true, false, true, false, false],
        "99.9 % saved, 50.5 % of both CPUs, 0.06 fewer cores"
    );
    assert_eq!(
        judge(vm(949.0, 10.0, Some(1.91)), Some(vm(960.0, 5.0, Some(1.95)))),
        [false, false, true, false, false, true]
    );
    assert!(!judge(vm(1000.0, 1.0, None), Some(vm(1.0, 5.0, Some(2.0))))[5], "cores unknown: not met");
    let alone = vm(1.0, 1.0, Some(2.0));
    assert_eq!(vm_targets("v", run(&throttle), run(&alone), None).len(), 3, "no advisor run: no verdict on it");
    let (nothing, zero) = (vm(0.0, 1.0, Some(2.0)), vm(0.0, 0.0, Some(2.0)));
    let none_saved = vm_targets("v", run(&nothing), run(&zero), None);
    assert!(!none_saved[0].met && !none_saved[1].met, "nothing saved proves nothing");
    assert!(none_saved[0].target.contains("100 %") && none_saved[1].target.contains("95 %"));
}

#[test]
fn targets_are_judged_on_the_figures() {
    let throttle = summary(Some(3.0), 20.0, &[]);
    let met = targets("w", &throttle, &summary(Some(3.5), 5.0, &[]), false);
    assert_eq!(met.iter().map(|v| v.met).collect::<Vec<_>>(), [true, true]);
    let missed = targets("w", &throttle, &summary(Some(3.7), 5.1, &[]), false);
    assert_eq!(missed.iter().map(|v| v.met).collect::<Vec<_>>(), [false, false]);
    assert!(missed[1].measured.contains("25.5 %"), "{}", missed[1].measured);
    assert!(!targets("w", &throttle, &summary(None, 1.0, &[]), false)[0].met, "never merged is a miss");
}

#[test]
fn staggered_target_skips_the_first_process_and_fails_on_any_slow_or_unmerged_one() {
    let throttle = summary(Some(70.0), 100.0, &[]);
    let judge = |procs: &[Option<f64>]| targets("s", &throttle, &summary(Some(70.0), 1.0, procs), true)[2].met;
    assert!(judge(&[Some(12.0), Some(1.0), Some(3.0)]), "the first waits for a peer: not judged");
    assert!(!judge(&[Some(1.0), Some(1.0), Some(3.1)]));
    assert!(!judge(&[Some(1.0), None, Some(1.0)]));
    assert!(!judge(&[Some(1.0)]), "a single process proves nothing");
}
