//! ksmtctl: read, drive and watch kata-ksm-throttler over D-Bus. It builds on the bus contract
//! (`ksm-throttler-contract`) and its own library (`ctl/`) alone: nothing of the daemon's crate
//! is linked in (it stays in this package so the daemon's tests can run it).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Parser;
use futures_util::StreamExt;
use ksm_throttler_contract::accounting::parse_report;
use ksm_throttler_contract::address::BusArg;
use ksm_throttler_contract::doctor::parse_doctor;
use ksm_throttler_contract::errors::name_and_message;
use ksm_throttler_contract::metrics;
use ksm_throttler_contract::names::{BUS_NAME, INTERFACE, OBJECT_PATH};
use ksm_throttler_contract::proxy::{InspectProxy, KsmThrottlerProxy};
use ksm_throttler_contract::status::{mib, Status};
use ksmtctl::cli::{self as ctl, exit, Cli, Command};
use ksmtctl::render;
use serde_json::json;
use zbus::fdo::PropertiesProxy;
use zbus::names::InterfaceName;
use zbus::proxy::MethodFlags;
use zbus::{Connection, OwnedVariant, Variant as Value};

/// A failure worth one line on stderr and a documented exit code.
struct Failure(u8, String);

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Self {
        let Some((name, message)) = name_and_message(&e) else { return Failure(exit::FAILED, e.to_string()) };
        let code = ctl::exit_code(&name);
        let message = match code {
            exit::NOT_RUNNING => format!("kata-ksm-throttler is not running ({message})"),
            exit::ACCESS_DENIED => format!("access denied: {message}"),
            _ => message,
        };
        Failure(code, message)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(Failure(exit::FAILED, format!("cannot start the async runtime: {e}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => fail(f),
    }
}

fn fail(Failure(code, message): Failure) -> ExitCode {
    eprintln!("ksmtctl: {message}");
    ExitCode::from(code)
}

async fn connect(bus: &BusArg) -> Result<Connection, Failure> {
    let builder = bus.builder().map_err(|_| {
        Failure(exit::FAILED, "--bus private is the daemon's own: pass the address it printed instead".into())
    })?;
    builder
        .build()
        .await
        .map_err(|e| Failure(exit::NOT_RUNNING, format!("cannot connect to the bus ({e}): is the throttler's bus up?")))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Metrics { output, sysfs_root, openmetrics } = &cli.command {
        return metrics(&cli.bus, output.as_deref(), sysfs_root, *openmetrics).await;
    }
    let conn = connect(&cli.bus).await?;
    let props = PropertiesProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(OBJECT_PATH)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let throttler =
        KsmThrottlerProxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?;
    match cli.command {
        Command::Status { json } => {
            let status = read_status(&props, MethodFlags::empty()).await?;
            if json {
                println!("{}", serde_json::to_string(&status).map_err(|e| Failure(exit::FAILED, e.to_string()))?);
            } else {
                print!("{}", status.render(SystemTime::now()));
            }
            if !status.unreadable.is_empty() {
                let knobs = status.unreadable.join(", ");
                return Err(Failure(exit::FAILED, format!("the throttler could not read {knobs} (see its log)")));
            }
        }
        Command::Kick => throttler.kick().await?,
        Command::SetMode { mode, no_ask } => {
            // Interactive authorization only when a person can answer a polkit agent's prompt.
            let flags = if !no_ask && std::io::stdin().is_terminal() {
                MethodFlags::ALLOW_INTERACTIVE_AUTH
            } else {
                MethodFlags::empty()
            };
            throttler.inner().call_with_flags::<_, _, ()>("SetMode", flags, &(mode.as_str(),)).await?;
        }
        Command::Watch { json, interval } => watch(&props, json, interval).await?,
        Command::Metrics { .. } => unreachable!("answered before connecting"),
        Command::Sandboxes { json } => {
            let answer = inspect_proxy(&conn).await?.sandboxes().await?;
            if json {
                println!("{answer}");
            } else {
                let report = parse_report(&answer).map_err(|e| Failure(exit::FAILED, e))?;
                print!("{}", render::render_sandboxes(&report, usize::MAX));
            }
        }
        Command::Top { interval, processes } => top(&conn, interval, processes).await?,
        Command::Doctor { json } => {
            let answer = inspect_proxy(&conn).await?.doctor().await?;
            let doctor = parse_doctor(&answer).map_err(|e| Failure(exit::FAILED, e))?;
            if json {
                println!("{answer}");
            } else {
                print!("{}", render::render_doctor(&doctor));
            }
            if doctor.failed {
                return Err(Failure(exit::DOCTOR_ERROR, "the doctor found an error (see above)".into()));
            }
        }
    }
    Ok(())
}

async fn inspect_proxy(conn: &Connection) -> Result<InspectProxy<'_>, Failure> {
    Ok(InspectProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?)
}

/// `sandboxes` again every `interval`, the screen cleared between, until Ctrl-C.
async fn top(conn: &Connection, interval: Duration, processes: usize) -> Result<(), Failure> {
    let proxy = inspect_proxy(conn).await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(interval);
    let terminal = std::io::stdout().is_terminal();
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tick.tick() => {
                let answer = proxy.sandboxes().await?;
                let report = parse_report(&answer).map_err(|e| Failure(exit::FAILED, e))?;
                if terminal {
                    print!("\x1b[H\x1b[2J");
                }
                println!("{}  (every {}; Ctrl-C ends)", now_stamp(), humantime::format_duration(interval));
                print!("{}", render::render_sandboxes(&report, processes));
            }
        }
    }
}

async fn read_status(props: &PropertiesProxy<'_>, flags: MethodFlags) -> Result<Status, Failure> {
    let all: HashMap<String, OwnedVariant> = props
        .inner()
        .call_with_flags("GetAll", flags, &(INTERFACE,))
        .await?
        .ok_or_else(|| Failure(exit::FAILED, "GetAll returned nothing".into()))?;
    Ok(Status::from_properties(&all))
}

/// `ksmtctl metrics`: no bus or no throttler is a metric saying so, and still exit 0, so that a
/// timer's file keeps saying what is known.
async fn metrics(bus: &BusArg, output: Option<&Path>, sysfs_root: &Path, openmetrics: bool) -> Result<(), Failure> {
    let conn = connect(bus).await.map_err(|Failure(_, message)| message);
    let mut snapshot = metrics::gather(conn.as_ref().map_err(Clone::clone), sysfs_root).await;
    // Per sandbox when the throttler answers and lets this caller inspect (root does: the timer).
    if let (Ok(conn), metrics::Throttler::Up(_)) = (&conn, &snapshot.throttler) {
        snapshot.sandboxes = Some(metrics::gather_sandboxes(conn).await);
    }
    let format = if openmetrics { metrics::Format::OpenMetrics } else { metrics::Format::Prometheus };
    let text = metrics::encode(&snapshot, format).map_err(|e| Failure(exit::FAILED, e.to_string()))?;
    match output {
        Some(path) => metrics::write_atomically(path, &text).map_err(|e| Failure(exit::FAILED, e.to_string())),
        None => {
            use std::io::Write;
            std::io::stdout().write_all(text.as_bytes()).map_err(|e| Failure(exit::FAILED, format!("writing: {e}")))
        }
    }
}

fn now_stamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn value_json(v: &Value<'_>) -> serde_json::Value {
    match v {
        Value::Str(s) => json!(s.as_str()),
        Value::U64(n) => json!(n),
        Value::U32(n) => json!(n),
        Value::I64(n) => json!(n),
        Value::F64(n) => json!(n),
        other => json!(other.to_string()),
    }
}

async fn watch(props: &PropertiesProxy<'_>, json: bool, interval: Duration) -> Result<(), Failure> {
    let mut changes = props.receive_properties_changed().await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(interval);
    let iface = InterfaceName::from_static_str_unchecked(INTERFACE);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            signal = changes.next() => {
                let Some(signal) = signal else { return Err(Failure(exit::FAILED, "the bus connection closed".into())) };
                let Ok(args) = signal.args() else { continue };
                if args.interface_name() != &iface {
                    continue;
                }
                let mut changed: Vec<_> = args.changed_properties().iter().map(|(k, v)| (k.to_string(), value_json(v))).collect();
                changed.sort_by(|a, b| a.0.cmp(&b.0));
                if json {
                    let map: serde_json::Map<_, _> = changed.into_iter().collect();
                    println!("{}", json!({"time": now_stamp(), "event": "changed", "properties": map}));
                } else {
                    let text: Vec<_> = changed.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("{} {}", now_stamp(), text.join(" "));
                }
            }
            _ = tick.tick() => {
                // Reading must not start an idle-exited throttler again every few seconds.
                match read_status(props, MethodFlags::NO_AUTO_START).await {
                    Ok(s) if json => println!("{}", json!({"time": now_stamp(), "event": "stats", "status": s})),
                    Ok(s) => println!(
                        "{} stats mode={} setting={} saved={} pages_sharing={} full_scans={} {} ksmd: {}",
                        now_stamp(), s.mode, s.current_setting, mib(s.saved_bytes as f64), s.pages_sharing,
                        s.full_scans, s.knobs_line(), s.ksmd_line(),
                    ),
                    Err(Failure(_, message)) if json => println!("{}", json!({"time": now_stamp(), "event": "unavailable", "reason": message})),
                    Err(Failure(_, message)) => println!("{} unavailable: {message}", now_stamp()),
                }
            }
        }
    }
}
