//! Issue 30, item 4: method calls without an INTERFACE field (optional in the D-Bus
//! specification) are answered as it says: a member that one interface of the object has is
//! that interface's; `Ping` and `Introspect` work. zbus refused them all ("Missing interface"):
//! the carried patch in third_party/zbus fixes it.
//!
//! dbus-daemon itself refuses such a call under the shipped policy, whoever sends it: an
//! `allow` rule that names an interface never matches a message without one (bus/policy.c). The
//! daemon is tested on a bus that lets them through (as dbus-daemon does for a policy without
//! interface rules), and the refusal under the shipped policy is checked too.

use kata_ksm_throttler::bus::private::BusConfig;
use kata_ksm_throttler::names::{BUS_NAME, INTERFACE, OBJECT_PATH};
use kata_ksm_throttler_test_support::*;
use zbus::message::Message;
use zbus::OwnedVariant;

/// One call with no INTERFACE field, sent as a raw message; the reply, or the error's name.
async fn call_without_interface<B>(s: &Setup, member: &str, body: &B) -> Result<Message, String>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    // No interface given: zbus leaves the field out of the message.
    s.conn
        .call_method(Some(BUS_NAME), OBJECT_PATH, None::<&str>, member, body)
        .await
        .map_err(|e| format!("{} {}", error_name(&e), error_message(&e)))
}

/// A bus that delivers every method call, so that only the object server decides.
const ANY_METHOD_CALL: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="default">
    <allow send_type="method_call"/>
  </policy>
</busconfig>
"#;

/// The project's policy, plus calls to the throttler with no INTERFACE field.
const NO_INTERFACE_TO_THE_THROTTLER: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="default">
    <allow send_destination="org.kata.KsmThrottler"/>
  </policy>
</busconfig>
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_an_interface_reach_the_one_interface_with_that_member() {
    let bus =
        start_bus_with(BusConfig { policy_texts: vec![NO_INTERFACE_TO_THE_THROTTLER.into()], ..BusConfig::default() });
    let scratch = Scratch::fresh();
    let daemon = Daemon::spawn(&bus, &scratch, &[]);
    let s = daemon::serve(bus, scratch, daemon).await;

    call_without_interface(&s, "Ping", &()).await.expect("Ping (org.freedesktop.DBus.Peer)");
    let xml: String = call_without_interface(&s, "Introspect", &())
        .await
        .expect("Introspect")
        .body()
        .deserialize()
        .expect("a string");
    assert!(xml.contains(&format!("<interface name=\"{INTERFACE}\">")), "{xml}");

    let mode: OwnedVariant = call_without_interface(&s, "Get", &(INTERFACE, "Mode"))
        .await
        .expect("Properties.Get")
        .body()
        .deserialize()
        .expect("a variant");
    assert_eq!(String::try_from(mode).expect("a string"), "throttle");

    // The throttler's own method: it acts, as with the field.
    call_without_interface(&s, "Kick", &()).await.expect("Kick");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive");
    assert_eq!(s.scratch.knobs(), expected(10, 1));
    call_without_interface(&s, "SetMode", &("off",)).await.expect("SetMode");
    assert_eq!(s.proxy.mode().await.expect("get"), "off");

    // A member no interface has, and bad arguments, get the usual errors.
    let unknown = call_without_interface(&s, "NoSuchMethod", &()).await.expect_err("unknown");
    assert!(unknown.starts_with("org.freedesktop.DBus.Error.UnknownMethod"), "{unknown}");
    let bad = call_without_interface(&s, "SetMode", &(42u32,)).await.expect_err("bad signature");
    assert!(bad.starts_with("org.freedesktop.DBus.Error.InvalidArgs"), "{bad}");
    assert_eq!(s.proxy.mode().await.expect("get"), "off", "nothing changed");
}

/// Under the shipped policy alone the bus answers for the daemon: refused, and nothing done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_policy_refuses_calls_without_an_interface_at_the_bus() {
    let s = setup(&[]).await;
    let e = call_without_interface(&s, "Kick", &()).await.expect_err("refused by dbus-daemon");
    assert!(e.starts_with("org.freedesktop.DBus.Error.AccessDenied") && e.contains("interface=\"(unset)\""), "{e}");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "initial");
}

/// Two interfaces with the same method on one object: the call must name one (the
/// specification lets an implementation refuse); a method only one has is called. Checks the
/// patched object server itself, on a bus of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_several_interfaces_is_refused_and_a_unique_one_called() {
    struct First;
    #[zbus::interface(name = "org.example.First")]
    impl First {
        fn same(&self) -> &'static str {
            "first"
        }
        fn only_first(&self) -> &'static str {
            "only first"
        }
    }
    struct Second;
    #[zbus::interface(name = "org.example.Second")]
    impl Second {
        fn same(&self) -> &'static str {
            "second"
        }
    }

    let bus = start_bus_with(BusConfig { policy_texts: vec![ANY_METHOD_CALL.into()], ..BusConfig::default() });
    let server = connect(&bus).await;
    server.object_server().at("/o", First).await.expect("first");
    server.object_server().at("/o", Second).await.expect("second");
    let client = connect(&bus).await;
    let to = server.unique_name().expect("a unique name").to_owned();
    let call = |member: &'static str| {
        let (client, to) = (client.clone(), to.clone());
        async move { client.call_method(Some(to.as_str()), "/o", None::<&str>, member, &()).await }
    };
    let reply: String = call("OnlyFirst").await.expect("unique").body().deserialize().expect("string");
    assert_eq!(reply, "only first");
    let e = call("Same").await.expect_err("ambiguous");
    assert_eq!(error_name(&e), "org.freedesktop.DBus.Error.UnknownMethod", "{e}");
    assert!(error_message(&e).contains("org.example.First, org.example.Second"), "{e}");
    call("Ping").await.expect("Peer on any path");
}
