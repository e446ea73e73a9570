//! ksmtctl: read, drive and watch kata-ksm-throttler over D-Bus.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Parser;
use futures_util::StreamExt;
use kata_ksm_throttler::client::address::BusArg;
use kata_ksm_throttler::client::ctl::{self, exit, Cli, Command, Status};
use kata_ksm_throttler::names::{BUS_NAME, INTERFACE, OBJECT_PATH};
use serde_json::json;
use zbus::fdo::PropertiesProxy;
use zbus::names::InterfaceName;
use zbus::proxy::MethodFlags;
use zbus::{Connection, OwnedVariant, Variant as Value};

/// A failure worth one line on stderr and a documented exit code.
struct Failure(u8, String);

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Self {
        let (name, message) = match &e {
            zbus::Error::MethodError(name, desc, _) => (name.to_string(), desc.clone().unwrap_or_default()),
            zbus::Error::FDO(f) => (
                zbus::DBusError::name(f.as_ref()).to_string(),
                zbus::DBusError::description(f.as_ref()).unwrap_or_default().to_owned(),
            ),
            other => return Failure(exit::FAILED, other.to_string()),
        };
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
    let conn = connect(&cli.bus).await?;
    let props = PropertiesProxy::builder(&conn)
        .destination(BUS_NAME)
        .path(OBJECT_PATH)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let throttler = kata_ksm_throttler::client::proxy::KsmThrottlerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    match cli.command {
        Command::Status { json } => {
            let status = read_status(&props, MethodFlags::empty()).await?;
            if json {
                println!("{}", serde_json::to_string(&status).map_err(|e| Failure(exit::FAILED, e.to_string()))?);
            } else {
                print!("{}", status.render(SystemTime::now()));
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
    }
    Ok(())
}

async fn read_status(props: &PropertiesProxy<'_>, flags: MethodFlags) -> Result<Status, Failure> {
    let all: HashMap<String, OwnedVariant> = props
        .inner()
        .call_with_flags("GetAll", flags, &(INTERFACE,))
        .await?
        .ok_or_else(|| Failure(exit::FAILED, "GetAll returned nothing".into()))?;
    Ok(Status::from_properties(&all))
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
                        "{} stats mode={} setting={} saved={} pages_sharing={} full_scans={} run={} pages_to_scan={} sleep_millisecs={} ksmd: {}",
                        now_stamp(), s.mode, s.current_setting, ctl::mib(s.saved_bytes as f64), s.pages_sharing,
                        s.full_scans, s.run, s.pages_to_scan, s.sleep_millisecs, s.ksmd_line(),
                    ),
                    Err(Failure(_, message)) if json => println!("{}", json!({"time": now_stamp(), "event": "unavailable", "reason": message})),
                    Err(Failure(_, message)) => println!("{} unavailable: {message}", now_stamp()),
                }
            }
        }
    }
}
