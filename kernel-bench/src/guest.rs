//! The benchmark's guest image, built from Debian packages (never from the host's own files, so
//! every machine builds the same image) and cached: the Debian cloud kernel and an initramfs of
//! static busybox, an `/init` that fills the guest's memory after boot, and a payload of real
//! files that is the same in every guest, as identical container images are.
//!
//! The cache key names every input that shapes the image (package versions, payload size,
//! [`FORMAT_VERSION`]); an image is built in a temporary directory beside the cache entry and
//! renamed into place, so an interrupted build never leaves a half image behind; a lock in the
//! cache makes concurrent runs build it once.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::cpio::{CpioError, CpioWriter};

/// Bump when the image's layout or `/init` changes: cached images of other formats are ignored.
pub const FORMAT_VERSION: u32 = 2;
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/kata-ksm-throttler-bench/guest";
const KERNEL_META: &str = "linux-image-cloud-amd64";
const KERNEL_FLAVOUR: &str = "cloud-amd64";
const BUSYBOX: &str = "busybox-static";
const MIB: u64 = 1 << 20;
/// The applets `/init` runs, linked to busybox in `/bin`.
const APPLETS: [&str; 8] = ["sh", "mount", "mkdir", "cp", "dd", "sleep", "poweroff", "cat"];
const INFO: &str = "image.json";
const BUILD_PREFIX: &str = ".build-";
const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "initrd.cpio";

/// The guest's init: parameters from the kernel command line (`ksmb.*`), the payload copied to a
/// tmpfs as a container start copies its image, `own_mib` of data unique to this guest, then a
/// `dirty_kib` share rewritten every `dirty_every` seconds, for ever.
pub const INIT: &str = r#"#!/bin/sh
# The guest of kata-ksm-throttler's kernel benchmark (kernel-bench/src/guest.rs).
PATH=/bin
fail() {
	echo "KSMBENCH FAILED $*" >/dev/console
	poweroff -f
}
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
own_mib=12
dirty_kib=256
dirty_every=5
read -r cmdline </proc/cmdline || fail "read /proc/cmdline"
for arg in $cmdline; do
	case "$arg" in
	ksmb.own_mib=*) own_mib=${arg#*=} ;;
	ksmb.dirty_kib=*) dirty_kib=${arg#*=} ;;
	ksmb.dirty_every=*) dirty_every=${arg#*=} ;;
	esac
done
for n in "$own_mib" "$dirty_kib" "$dirty_every"; do
	case "$n" in
	'' | *[!0-9]*) fail "ksmb.* wants a number, not '$n'" ;;
	esac
done
# /data may take all the memory free now but 16 MiB: a guest whose data does not fit gets ENOSPC
# and can still say so and power off (a tmpfs of all RAM left it thrashing in the OOM killer).
free_kib=
while read -r key kib _; do
	[ "$key" = MemAvailable: ] && free_kib=$kib
done </proc/meminfo
[ -n "$free_kib" ] && [ "$free_kib" -gt 32768 ] || fail "MemAvailable '$free_kib' kB: too little to boot"
mount -t tmpfs -o size=$((free_kib - 16384))k tmpfs /data || fail "mount /data"
cp -a /payload /data/ || fail "copy /payload to /data"
dd if=/dev/urandom of=/data/own bs=1M count="$own_mib" iflag=fullblock 2>/dev/null || fail "write /data/own"
dd if=/dev/urandom of=/data/dirty bs=1K count="$dirty_kib" iflag=fullblock 2>/dev/null || fail "write /data/dirty"
echo "KSMBENCH READY"
while :; do
	sleep "$dirty_every" || fail "sleep"
	dd if=/dev/urandom of=/data/dirty bs=1K count="$dirty_kib" iflag=fullblock conv=notrunc 2>/dev/null ||
		fail "dirty /data/dirty"
done
"#;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("running {cmd}: {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error("{cmd} failed ({status}): {stderr}")]
    Command { cmd: String, status: std::process::ExitStatus, stderr: String },
    #[error("downloading {package}: {source}")]
    Download { package: String, source: Box<GuestError> },
    #[error("apt has no candidate for {0} (even after apt-get update)")]
    NoCandidate(String),
    #[error("{KERNEL_META} depends on no versioned linux-image-*-{KERNEL_FLAVOUR}: {0:?}")]
    NoKernelDependency(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("building the initramfs: {0}")]
    Cpio(#[from] CpioError),
    #[error("a {wanted_mib} MiB payload is more than the packages' {available} bytes of files")]
    PayloadTooBig { wanted_mib: u64, available: u64 },
    #[error("the guest cache {0} is inside the repository: pass one outside it")]
    CacheInRepo(PathBuf),
    #[error("{package}: expected one {what}, found {found}")]
    Layout { package: String, what: &'static str, found: usize },
    #[error("{path} is not UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("image description {path}: {source}")]
    Info { path: PathBuf, source: serde_json::Error },
}

/// What shapes a guest image besides the packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSpec {
    /// The size of the identical files every guest holds (its "container image").
    pub payload_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// The packages an image is built from, as apt resolves them now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sources {
    pub kernel: Package,
    /// Payload beyond the kernel's module tree (which alone is under 90 MiB).
    pub headers: Package,
    pub busybox: Package,
}

/// Written beside the image: what it was built from and how big it came out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub format: u32,
    pub sources: Sources,
    pub payload_bytes: u64,
    pub payload_files: u64,
    pub initrd_bytes: u64,
    pub build_secs: f64,
}

/// A built image in the cache: a kernel and an uncompressed initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    dir: PathBuf,
    info: ImageInfo,
    built_in: Option<Duration>,
}

impl GuestImage {
    /// The image for `spec` from `cache_dir`, built first if the cache has none for the packages
    /// apt resolves now. May run `apt-get update` (once) if the package lists are missing or stale.
    pub fn ensure(spec: &GuestSpec, cache_dir: &Path) -> Result<GuestImage, GuestError> {
        refuse_repo(cache_dir)?;
        std::fs::create_dir_all(cache_dir).map_err(io_at(cache_dir))?;
        let _lock = lock(cache_dir)?;
        let mut updated = false;
        loop {
            let sources = match resolve() {
                Ok(s) => s,
                Err(_) if !updated => {
                    apt_update()?;
                    updated = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let dir = cache_dir.join(cache_key(spec, &sources));
            if let Some(image) = GuestImage::load(&dir)? {
                return Ok(image);
            }
            match build(spec, &sources, cache_dir, &dir) {
                Ok(image) => return Ok(image),
                // A version the mirror no longer has: the lists are stale.
                Err(GuestError::Download { .. }) if !updated => {
                    apt_update()?;
                    updated = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A complete image at `dir`, or `None` if there is none (or one of another format).
    fn load(dir: &Path) -> Result<Option<GuestImage>, GuestError> {
        let path = dir.join(INFO);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(GuestError::Io { path, source: e }),
        };
        let info: ImageInfo = serde_json::from_str(&text).map_err(|source| GuestError::Info { path, source })?;
        let complete = dir.join(KERNEL_FILE).is_file() && dir.join(INITRD_FILE).is_file();
        if info.format != FORMAT_VERSION || !complete {
            return Ok(None);
        }
        Ok(Some(GuestImage { dir: dir.to_owned(), info, built_in: None }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kernel(&self) -> PathBuf {
        self.dir.join(KERNEL_FILE)
    }

    pub fn initrd(&self) -> PathBuf {
        self.dir.join(INITRD_FILE)
    }

    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    /// How long this call took to build it; `None` if it came from the cache.
    pub fn built_in(&self) -> Option<Duration> {
        self.built_in
    }
}

/// The cache entry's name: readable, and different whenever an input differs.
pub fn cache_key(spec: &GuestSpec, s: &Sources) -> String {
    let raw = format!(
        "v{FORMAT_VERSION}-{}_{}-{}_{}-{}_{}-payload{}M",
        s.kernel.name,
        s.kernel.version,
        s.headers.name,
        s.headers.version,
        s.busybox.name,
        s.busybox.version,
        spec.payload_mib
    );
    raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._+-".contains(c) { c } else { '_' }).collect()
}

/// The packages apt would download now: the versioned kernel behind the cloud metapackage, its
/// headers, and busybox.
pub fn resolve() -> Result<Sources, GuestError> {
    let (_, depends) = candidate(KERNEL_META)?;
    let kernel_name = depends
        .split([',', '|'])
        .filter_map(|alt| alt.split_whitespace().next())
        .find(|name| name.starts_with("linux-image-") && name.ends_with(&format!("-{KERNEL_FLAVOUR}")))
        .ok_or_else(|| GuestError::NoKernelDependency(depends.clone()))?
        .to_owned();
    let abi = kernel_name
        .strip_prefix("linux-image-")
        .and_then(|n| n.strip_suffix(&format!("-{KERNEL_FLAVOUR}")))
        .ok_or_else(|| GuestError::NoKernelDependency(depends.clone()))?;
    let headers_name = format!("linux-headers-{abi}-common");
    let package = |name: String| -> Result<Package, GuestError> {
        let (version, _) = candidate(&name)?;
        Ok(Package { name, version })
    };
    Ok(Sources { headers: package(headers_name)?, kernel: package(kernel_name)?, busybox: package(BUSYBOX.into())? })
}

/// The candidate's `Version` and `Depends` from the local package lists.
fn candidate(package: &str) -> Result<(String, String), GuestError> {
    let out = run(Command::new("apt-cache").args(["show", "--no-all-versions", package]))?;
    let field = |name: &str| {
        out.lines().take_while(|l| !l.is_empty()).find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned())
    };
    let version = field("Version:").ok_or_else(|| GuestError::NoCandidate(package.to_owned()))?;
    Ok((version, field("Depends:").unwrap_or_default()))
}

fn apt_update() -> Result<(), GuestError> {
    eprintln!("guest image: refreshing the package lists (apt-get update)");
    run(Command::new("apt-get").args(["update", "-q"])).map(drop)
}

fn build(spec: &GuestSpec, sources: &Sources, cache_dir: &Path, dest: &Path) -> Result<GuestImage, GuestError> {
    let start = Instant::now();
    eprintln!("guest image: building {}", dest.display());
    remove_leftovers(cache_dir)?;
    let tmp = tempfile::Builder::new().prefix(BUILD_PREFIX).tempdir_in(cache_dir).map_err(io_at(cache_dir))?;
    let root = |p: &Package| -> Result<PathBuf, GuestError> {
        let debs = tmp.path().join("debs").join(&p.name);
        std::fs::create_dir_all(&debs).map_err(io_at(&debs))?;
        // As root, apt warns that its sandbox user cannot write a private temp dir; say it is fine.
        run(Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{}={}", p.name, p.version))
            .current_dir(&debs))
        .map_err(|e| GuestError::Download { package: format!("{}={}", p.name, p.version), source: Box::new(e) })?;
        let deb = only_one(&debs, &p.name, "downloaded .deb", |n| n.ends_with(".deb"))?;
        let into = tmp.path().join("root").join(&p.name);
        std::fs::create_dir_all(&into).map_err(io_at(&into))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&into))?;
        Ok(into)
    };
    let kernel_root = root(&sources.kernel)?;
    let headers_root = root(&sources.headers)?;
    let busybox_root = root(&sources.busybox)?;

    let image = tmp.path().join("image");
    std::fs::create_dir(&image).map_err(io_at(&image))?;
    let boot = kernel_root.join("boot");
    let vmlinuz = only_one(&boot, &sources.kernel.name, "boot/vmlinuz-*", |n| n.starts_with("vmlinuz-"))?;
    std::fs::copy(&vmlinuz, image.join(KERNEL_FILE)).map_err(io_at(&vmlinuz))?;

    let mut files = Vec::new();
    collect(&kernel_root, Path::new("lib/modules"), &mut files)?;
    collect(&headers_root, Path::new("usr/src"), &mut files)?;
    files.sort();
    let initrd_path = image.join(INITRD_FILE);
    let out = File::create(&initrd_path).map_err(io_at(&initrd_path))?;
    let mut w = CpioWriter::new(BufWriter::with_capacity(MIB as usize, out));
    for dir in ["bin", "dev", "proc", "sys", "data"] {
        w.dir(dir, 0o755)?;
    }
    w.file_from_path("bin/busybox", 0o755, &busybox_root.join("bin/busybox"), None)?;
    for applet in APPLETS {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    w.file("init", 0o755, INIT.as_bytes())?;
    let (payload_bytes, payload_files) = write_payload(&mut w, spec.payload_mib, &files)?;
    let file =
        w.finish()?.into_inner().map_err(|e| GuestError::Io { path: initrd_path.clone(), source: e.into_error() })?;
    let initrd_bytes = file.metadata().map_err(io_at(&initrd_path))?.len();

    let built_in = start.elapsed();
    let info = ImageInfo {
        format: FORMAT_VERSION,
        sources: sources.clone(),
        payload_bytes,
        payload_files,
        initrd_bytes,
        build_secs: built_in.as_secs_f64(),
    };
    let info_path = image.join(INFO);
    let json =
        serde_json::to_string_pretty(&info).map_err(|source| GuestError::Info { path: info_path.clone(), source })?;
    std::fs::write(&info_path, json).map_err(io_at(&info_path))?;
    if dest.exists() {
        // An entry without a complete image (`load` turned it down): replace it.
        std::fs::remove_dir_all(dest).map_err(io_at(dest))?;
    }
    std::fs::rename(&image, dest).map_err(io_at(dest))?;
    eprintln!("guest image: built in {built_in:.1?}, initrd {:.1} MiB", initrd_bytes as f64 / MIB as f64);
    Ok(GuestImage { dir: dest.to_owned(), info, built_in: Some(built_in) })
}

/// A payload file: its path in the image (under `payload/`), size, and where it is on the host.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PayloadFile {
    rel: String,
    size: u64,
    host: PathBuf,
}

/// Every regular file under `root/sub`, with its path relative to `root`.
fn collect(root: &Path, sub: &Path, files: &mut Vec<PayloadFile>) -> Result<(), GuestError> {
    let dir = root.join(sub);
    for entry in std::fs::read_dir(&dir).map_err(io_at(&dir))? {
        let entry = entry.map_err(io_at(&dir))?;
        let host = entry.path();
        let meta = std::fs::symlink_metadata(&host).map_err(io_at(&host))?;
        let rel = sub.join(entry.file_name());
        if meta.is_dir() {
            collect(root, &rel, files)?;
        } else if meta.is_file() {
            let rel = rel.to_str().ok_or_else(|| GuestError::NotUtf8 { path: host.clone() })?.to_owned();
            files.push(PayloadFile { rel, size: meta.len(), host });
        }
    }
    Ok(())
}

/// Exactly `mib` MiB of `files` (sorted), whole files in order and the last one cut to fit, with
/// their parent directories. Returns the bytes and files written.
fn write_payload<W: io::Write>(
    w: &mut CpioWriter<W>,
    mib: u64,
    files: &[PayloadFile],
) -> Result<(u64, u64), GuestError> {
    let wanted = mib * MIB;
    let available: u64 = files.iter().map(|f| f.size).sum();
    if available < wanted {
        return Err(GuestError::PayloadTooBig { wanted_mib: mib, available });
    }
    w.dir("payload", 0o755)?;
    let mut dirs = BTreeSet::new();
    let (mut bytes, mut count) = (0, 0);
    for f in files {
        if bytes >= wanted {
            break;
        }
        let path = format!("payload/{}", f.rel);
        let mut parent = String::from("payload");
        if let Some((parents, _)) = f.rel.rsplit_once('/') {
            for component in parents.split('/') {
                parent = format!("{parent}/{component}");
                if dirs.insert(parent.clone()) {
                    w.dir(&parent, 0o755)?;
                }
            }
        }
        let size = f.size.min(wanted - bytes);
        w.file_from_path(&path, 0o644, &f.host, Some(size))?;
        bytes += size;
        count += 1;
    }
    Ok((bytes, count))
}

fn only_one(dir: &Path, package: &str, what: &'static str, pick: impl Fn(&str) -> bool) -> Result<PathBuf, GuestError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        if entry.file_name().to_str().is_some_and(&pick) {
            found.push(entry.path());
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(found) => Err(GuestError::Layout { package: package.to_owned(), what, found: found.len() }),
    }
}

/// Runs a command to completion (stdin closed), returning its standard output.
fn run(cmd: &mut Command) -> Result<String, GuestError> {
    let name = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| GuestError::Spawn { cmd: name.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(GuestError::Command { cmd: name, status: out.status, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Held while an image is looked up and built: concurrent runs build it once, and a build
/// directory seen under the lock is a killed build's leftover.
fn lock(cache_dir: &Path) -> Result<File, GuestError> {
    let path = cache_dir.join(".lock");
    let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(io_at(&path))?;
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        eprintln!("guest image: waiting for {} (another build)", path.display());
        flock(&file, FlockOperation::LockExclusive).map_err(|e| GuestError::Io { path, source: e.into() })?;
    }
    Ok(file)
}

fn remove_leftovers(cache_dir: &Path) -> Result<(), GuestError> {
    for entry in std::fs::read_dir(cache_dir).map_err(io_at(cache_dir))? {
        let path = entry.map_err(io_at(cache_dir))?.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(BUILD_PREFIX)) {
            std::fs::remove_dir_all(&path).map_err(io_at(&path))?;
        }
    }
    Ok(())
}

/// The cache is rebuilt material of hundreds of MiB: it has no place in the source tree.
fn refuse_repo(cache_dir: &Path) -> Result<(), GuestError> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")));
    let repo = repo.canonicalize().unwrap_or_else(|_| repo.to_owned());
    let cache = std::path::absolute(cache_dir).map_err(io_at(cache_dir))?;
    // The nearest existing ancestor, resolved, tells where a not-yet-created cache would land.
    let mut probe = cache.as_path();
    let resolved = loop {
        if let Ok(real) = probe.canonicalize() {
            break real.join(cache.strip_prefix(probe).unwrap_or(Path::new("")));
        }
        match probe.parent() {
            Some(p) => probe = p,
            None => break cache.clone(),
        }
    };
    if resolved.starts_with(&repo) {
        return Err(GuestError::CacheInRepo(resolved));
    }
    Ok(())
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> GuestError + '_ {
    move |source| GuestError::Io { path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Sources {
        let p = |n: &str, v: &str| Package { name: n.into(), version: v.into() };
        Sources {
            kernel: p("linux-image-6.1.0-57-cloud-amd64", "6.1.192-3"),
            headers: p("linux-headers-6.1.0-57-common", "6.1.192-3"),
            busybox: p("busybox-static", "1:1.35.0-4+deb12u1+b1"),
        }
    }

    #[test]
    fn the_cache_key_changes_with_every_input() {
        let spec = GuestSpec { payload_mib: 16 };
        let key = cache_key(&spec, &sources());
        assert_eq!(
            key,
            "v2-linux-image-6.1.0-57-cloud-amd64_6.1.192-3-linux-headers-6.1.0-57-common_6.1.192-3-\
             busybox-static_1_1.35.0-4+deb12u1+b1-payload16M"
        );
        assert_ne!(key, cache_key(&GuestSpec { payload_mib: 17 }, &sources()));
        let mut other = sources();
        other.kernel.version = "6.1.192-4".into();
        assert_ne!(key, cache_key(&spec, &other));
        let mut other = sources();
        other.busybox.version = "1:1.36".into();
        assert_ne!(key, cache_key(&spec, &other));
    }

    #[test]
    fn the_payload_is_exact_and_its_last_file_cut() {
        let dir = tempfile::tempdir().unwrap();
        for (name, len) in [("a/x", 700_000), ("a/y", 300_000), ("b/z", 500_000)] {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, vec![b'q'; len]).unwrap();
        }
        let mut files = Vec::new();
        collect(dir.path(), Path::new("a"), &mut files).unwrap();
        collect(dir.path(), Path::new("b"), &mut files).unwrap();
        files.sort();
        let mut w = CpioWriter::new(Vec::new());
        assert_eq!(write_payload(&mut w, 1, &files).unwrap(), (MIB, 3));
        assert!(matches!(
            write_payload(&mut CpioWriter::new(Vec::new()), 2, &files),
            Err(GuestError::PayloadTooBig { wanted_mib: 2, available: 1_500_000 })
        ));
    }

    #[test]
    fn a_cache_inside_the_repository_is_refused() {
        let inside = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/not-yet/guest");
        assert!(matches!(refuse_repo(&inside), Err(GuestError::CacheInRepo(_))));
        assert!(refuse_repo(Path::new(DEFAULT_CACHE_DIR)).is_ok());
    }
}
