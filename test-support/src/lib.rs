//! What the tests and benchmarks of every crate in this workspace share, defined once:
//!
//! - [`child`]: child processes ended by their PID when their guard goes;
//! - [`eventually`](mod@eventually): the one bounded polling loop (a time-out against a hung test, not a claim
//!   about speed);
//! - [`scratch`]: a scratch sysfs laid out like `/sys/kernel/mm/ksm`;
//! - [`bus`] and [`daemon`]: private buses with the project's policy, and the real daemon
//!   binary on one;
//! - [`engine`]: the engine loop on a task, for tests on tokio's paused clock;
//! - [`fakeproc`]: a fake `/proc` for the Inspect interface's walk;
//! - [`procfs`]: memory, threads, context switches and CPU time of a process;
//! - [`http`] and [`prometheus`]: a plain HTTP/1.1 client, and a real Prometheus server with its
//!   query API (the metrics exporter's tests);
//! - [`writes`]: sysfs writes counted with inotify;
//! - [`real_ksm`] and [`switch`]: the real KSM's lock, and the environment switches.

pub mod bench;
pub mod bus;
pub mod child;
pub mod daemon;
#[cfg(feature = "engine")]
pub mod engine;
pub mod eventually;
pub mod fakeproc;
pub mod http;
pub mod http_fire;
pub mod procfs;
pub mod prometheus;
pub mod real_ksm;
pub mod scratch;
pub mod switch;
pub mod writes;

pub use bus::{connect, error_message, error_name, project_file, proxy, start_bus, start_bus_with};
pub use child::Guarded;
pub use daemon::{daemon_binary, setup, try_daemon_binary, wait_for_name, Daemon, Setup};
pub use eventually::{eventually, eventually_blocking, eventually_some, eventually_some_blocking};
pub use scratch::{expected, Scratch, ANON_KB};
