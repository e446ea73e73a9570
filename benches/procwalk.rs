//! The Inspect interface's /proc walk on a host with 10,000 processes: `cargo bench --bench
//! procwalk` (`-- --smoke` for one round). The tree is a fake /proc on tmpfs (test-support's
//! `fakeproc`), built like a busy Kata host: 10,000 pids, of which 100 are sandbox QEMUs with a
//! QEMU-sized smaps (300 mappings, guest RAM mergeable), 100 other processes with mergeable
//! memory (50 mappings), the rest with nothing mergeable (their smaps is never read), and 10,000
//! sandbox folders. The same walk over this machine's real /proc is printed beside it. The
//! target (issue 16): 10,000 processes answered in <= 250 ms.

use std::path::Path;
use std::time::{Duration, Instant};

use kata_ksm_throttler::io::procwalk::{walk, Roots};
use kata_ksm_throttler_test_support::fakeproc::{ksm_stat, smaps_entry, FakeProc};

const PIDS: u32 = 10_000;
const VMS: u32 = 100;
const MERGEABLE: u32 = 100;
const FOLDERS: u32 = 10_000;

fn smaps(entries: u64, ram_flags: &str) -> String {
    let mut text = smaps_entry(0x7f00_0000_0000, 2 << 30, "rw-p", ram_flags, "");
    for i in 0..entries {
        text.push_str(&smaps_entry(
            0x5500_0000_0000 + i * 0x10_0000,
            0x1000,
            "r--p",
            "",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ));
    }
    text
}

fn build(proc: &FakeProc, sandboxes: &Path) {
    let vm_smaps = smaps(300, "ac hg mg");
    let work_smaps = smaps(50, "mg");
    for i in 0..FOLDERS {
        std::fs::create_dir_all(sandboxes.join("sbs").join(format!("{i:064x}"))).expect("sandbox folder");
    }
    for pid in 1..=PIDS {
        if pid <= VMS {
            let name = format!("sandbox-{:064x}", pid - 1);
            let argv = ["/opt/kata/bin/qemu-system-x86_64", "-name", &name, "-uuid", "x", "-machine", "q35,accel=kvm"];
            proc.add(pid, "qemu-system-x86", &argv, Some(&ksm_stat(5000, 10, 20_000_000, true)), &vm_smaps);
        } else if pid <= VMS + MERGEABLE {
            proc.add(pid, "worker", &["/usr/bin/worker", "--flag"], Some(&ksm_stat(10, 0, 1000, true)), &work_smaps);
        } else {
            let argv = [
                "/usr/bin/containerd-shim-runc-v2",
                "-namespace",
                "k8s.io",
                "-id",
                "abc",
                "-address",
                "/run/containerd/containerd.sock",
            ];
            proc.add(pid, "shim", &argv, Some(&ksm_stat(0, 0, 0, false)), "");
        }
    }
}

fn rounds(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let n = if smoke { 1 } else { 11 };
    let proc = FakeProc::new();
    let folders = tempfile::tempdir_in(proc.path().parent().unwrap_or(Path::new("/tmp"))).expect("folders");
    let built = Instant::now();
    build(&proc, folders.path());
    println!("fake /proc: {PIDS} pids ({VMS} sandbox QEMUs, {MERGEABLE} other mergeable), {FOLDERS} sandbox folders; built in {}", ms(built.elapsed()));
    let roots = Roots { vc_root: Some(folders.path().into()), kata_root: None };
    let mut last = None;
    let times = rounds(n, || last = Some(walk(proc.path(), &roots, 4096)));
    let report = last.expect("a round");
    assert_eq!(report.walked, u64::from(PIDS), "every pid walked");
    assert_eq!(report.processes.len() as u32, VMS + MERGEABLE, "the mergeable ones listed");
    assert_eq!(report.sandboxes.iter().filter(|s| s.vmm_pid.is_some()).count() as u32, VMS, "every VM matched");
    println!(
        "walk of 10,000 processes: median {}, min {}, max {} over {n} rounds (target <= 250 ms)",
        ms(times[n / 2]),
        ms(times[0]),
        ms(times[n - 1])
    );
    let mut real_last = None;
    let real = rounds(n, || real_last = Some(walk(Path::new("/proc"), &Roots::default(), 4096)));
    let r = real_last.expect("a round");
    println!(
        "walk of this machine's /proc ({} processes, {} listed): median {}",
        r.walked,
        r.processes.len(),
        ms(real[n / 2])
    );
}
