//! Real guests: the image is built from Debian packages (or taken from the cache, which is what
//! CI wants: `/var/cache/kata-ksm-throttler-bench/guest`, or `KSMBENCH_GUEST_CACHE`), booted in
//! QEMU under TCG, and QEMU's memory checked as KSM sees it. Every QEMU is ended by its PID, by
//! the test or, on failure, by the `Vm`'s drop.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use kata_ksm_throttler_test_support::eventually_blocking;
use kernel_bench::guest::{GuestImage, GuestSpec, DEFAULT_CACHE_DIR};
use kernel_bench::vm::{Memory, Vm, VmError, VmSpec};

const PAYLOAD_MIB: u64 = 16;
const MEM_MIB: u64 = 192;
/// TCG on a loaded 2-core CI machine: a small guest is ready in about 10 s.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;

fn cache_dir() -> PathBuf {
    std::env::var_os("KSMBENCH_GUEST_CACHE").map_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR), PathBuf::from)
}

/// Built once per test binary: the tests run in parallel and would otherwise all build it.
fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let image = GuestImage::ensure(&GuestSpec { payload_mib: PAYLOAD_MIB }, &cache_dir()).expect("guest image");
        let info = image.info();
        eprintln!(
            "image {}: payload {} files, {} bytes; initrd {} bytes; {}",
            image.dir().display(),
            info.payload_files,
            info.payload_bytes,
            info.initrd_bytes,
            image.built_in().map_or("from the cache".into(), |d| format!("built in {d:.1?}")),
        );
        image
    })
}

/// One mapping of /proc/<pid>/smaps.
#[derive(Debug)]
struct Vma {
    path: String,
    size: u64,
    rss: u64,
    /// Resident in transparent huge pages (QEMU madvises guest RAM MADV_HUGEPAGE).
    huge: u64,
    flags: Vec<String>,
}

fn smaps(pid: u32) -> Vec<Vma> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut vmas: Vec<Vma> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        let kib = |w: Option<&str>| w.and_then(|n| n.parse::<u64>().ok()).map_or(0, |n| n * 1024);
        match first {
            "Size:" => vmas.last_mut().expect("a VMA").size = kib(words.next()),
            "Rss:" => vmas.last_mut().expect("a VMA").rss = kib(words.next()),
            "AnonHugePages:" => vmas.last_mut().expect("a VMA").huge = kib(words.next()),
            "VmFlags:" => vmas.last_mut().expect("a VMA").flags = words.map(String::from).collect(),
            // A mapping's header: "start-end perms offset dev inode [path]".
            _ if first.contains('-') && !first.ends_with(':') => {
                let path = words.skip(4).collect::<Vec<_>>().join(" ");
                vmas.push(Vma { path, size: 0, rss: 0, huge: 0, flags: Vec::new() });
            }
            _ => {}
        }
    }
    vmas
}

/// Guest RAM: one mapping of the RAM's size (QEMU may round it up by an alignment page or two).
fn is_guest_ram(vma: &Vma, mem_mib: u64) -> bool {
    (mem_mib * MIB..=(mem_mib + 4) * MIB).contains(&vma.size)
}

fn boot(spec: &VmSpec) -> (Vm, Duration) {
    let mut vm = Vm::launch(image(), spec).expect("launch QEMU");
    let ready = vm.wait_ready(BOOT_LIMIT).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}: ready {ready:.1?} after launch", vm.name());
    (vm, ready)
}

/// Stops it by PID and checks it is gone.
fn stop(mut vm: Vm) {
    let pid = vm.pid().expect("running");
    vm.stop().expect("stop QEMU");
    assert!(vm.pid().is_none(), "reaped");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} is gone");
}

#[test]
fn a_private_guest_fills_mergeable_memory() {
    let (vm, _) = boot(&VmSpec::new("private-test", MEM_MIB, Memory::Private));
    let pid = vm.pid().expect("running");
    let vmas = smaps(pid);
    let ram = vmas
        .iter()
        .find(|v| is_guest_ram(v, MEM_MIB) && v.flags.iter().any(|f| f == "mg"))
        .unwrap_or_else(|| panic!("no mergeable VMA of {MEM_MIB} MiB in QEMU's smaps: {vmas:#?}"));
    // The initramfs unpacked, then copied to /data, then the guest's own 12 MiB.
    assert!(ram.rss > PAYLOAD_MIB * MIB, "guest RAM resident {} bytes, payload {PAYLOAD_MIB} MiB", ram.rss);
    eprintln!(
        "guest RAM {} MiB resident ({} MiB in huge pages) of {} MiB",
        ram.rss / MIB,
        ram.huge / MIB,
        ram.size / MIB
    );
    stop(vm);
}

#[test]
fn a_shared_memfd_guest_is_not_mergeable() {
    let (vm, _) = boot(&VmSpec::new("memfd-test", MEM_MIB, Memory::SharedMemfd));
    let vmas = smaps(vm.pid().expect("running"));
    let merge = vmas.iter().find(|v| is_guest_ram(v, MEM_MIB) && v.flags.iter().any(|f| f == "mg"));
    assert!(merge.is_none(), "a mergeable guest-RAM-sized VMA: {merge:?}");
    let memfd = vmas.iter().find(|v| is_guest_ram(v, MEM_MIB) && v.path.starts_with("/memfd:"));
    let memfd = memfd.unwrap_or_else(|| panic!("no memfd mapping of {MEM_MIB} MiB: {vmas:#?}"));
    assert!(memfd.flags.iter().any(|f| f == "sh"), "shared: {memfd:?}");
    assert!(memfd.rss > PAYLOAD_MIB * MIB, "memfd resident {} bytes", memfd.rss);
    stop(vm);
}

#[test]
fn a_guest_that_cannot_fill_its_memory_says_so_and_ends() {
    let mut spec = VmSpec::new("failing-test", MEM_MIB, Memory::Private);
    spec.own_mib = 4 * MEM_MIB;
    let mut vm = Vm::launch(image(), &spec).expect("launch QEMU");
    let pid = vm.pid().expect("running");
    match vm.wait_ready(BOOT_LIMIT) {
        Err(VmError::Failed { what, .. }) => assert_eq!(what, "write /data/own"),
        other => panic!("expected the guest's failure, got {other:?}"),
    }
    // It powered itself off: QEMU ends without being signalled. The bound is only there so
    // that a QEMU that never ends fails the test (one did, while its /data could take all its
    // RAM: the guest keeps 16 MiB free since).
    let what = format!("QEMU {pid} to end after the guest powered off");
    eventually_blocking(BOOT_LIMIT, what, || vm.try_wait().expect("try_wait").is_some() || vm.pid().is_none());
    assert!(vm.pid().is_none(), "QEMU {pid} reaped");
}

#[test]
fn a_missing_qemu_is_a_spawn_error() {
    let err = Vm::launch_with(
        std::path::Path::new("/nonexistent/qemu"),
        image(),
        &VmSpec::new("x", MEM_MIB, Memory::Private),
    );
    assert!(matches!(err, Err(VmError::Spawn { .. })), "{err:?}");
    let bad = Vm::launch(image(), &VmSpec::new("a,b", MEM_MIB, Memory::Private));
    assert!(matches!(bad, Err(VmError::Spec(_))), "{bad:?}");
}

/// By hand (`cargo test -p kernel-bench --test guest -- --ignored --nocapture`): the
/// benchmark's own size of guest, timed from launch to ready.
#[test]
#[ignore = "a minute or two of TCG and a 120 MiB image; run by hand for the boot time"]
fn a_benchmark_sized_guest_boots() {
    let spec = GuestSpec { payload_mib: 120 };
    let image = GuestImage::ensure(&spec, &cache_dir()).expect("guest image");
    eprintln!("image {:?}, built in {:?}", image.info(), image.built_in());
    let mut vm = Vm::launch(&image, &VmSpec::new("big", 512, Memory::Private)).expect("launch QEMU");
    let ready = vm.wait_ready(Duration::from_secs(600)).unwrap_or_else(|e| panic!("{e}"));
    let ram = smaps(vm.pid().expect("running")).into_iter().find(|v| is_guest_ram(v, 512)).expect("guest RAM");
    eprintln!("ready {ready:.1?} after launch; guest RAM resident {} MiB ({} MiB huge)", ram.rss / MIB, ram.huge / MIB);
    stop(vm);
}
