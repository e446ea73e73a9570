//! The XML in dbus/ is the contract: the live object must introspect to exactly it (docs aside).

use kata_ksm_throttler::bus::error::BusError;
use kata_ksm_throttler::names::{BUS_NAME, INSPECT_INTERFACE, INTERFACE, OBJECT_PATH};
use kata_ksm_throttler_test_support::*;
use zbus_xml::{Interface, Node};

/// Everything a caller depends on, in a comparable form: members, signatures, directions,
/// access and change-signal annotations. Doc strings are left out.
fn shape(iface: &Interface<'_>) -> Vec<String> {
    let mut out = vec![];
    let kept = |name: &str| name != "org.gtk.GDBus.DocString";
    for a in iface.annotations().filter(|a| kept(a.name())) {
        out.push(format!("annotation {}={}", a.name(), a.value()));
    }
    for m in iface.methods() {
        let args: Vec<_> = m.args().iter().map(|a| format!("{:?} {:?} {}", a.name(), a.direction(), a.ty())).collect();
        out.push(format!("method {} ({})", m.name(), args.join(", ")));
        for a in m.annotations().iter().filter(|a| kept(a.name())) {
            out.push(format!("  annotation {}={}", a.name(), a.value()));
        }
    }
    for s in iface.signals() {
        let args: Vec<_> = s.args().iter().map(|a| format!("{:?} {}", a.name(), a.ty())).collect();
        out.push(format!("signal {} ({})", s.name(), args.join(", ")));
    }
    for p in iface.properties() {
        out.push(format!("property {} {} {:?}", p.name(), p.ty(), p.access()));
        for a in p.annotations().iter().filter(|a| kept(a.name())) {
            out.push(format!("  annotation {}={}", a.name(), a.value()));
        }
    }
    out.sort();
    out
}

fn find<'a>(node: &'a Node<'a>, name: &str) -> &'a Interface<'a> {
    node.interfaces().iter().find(|i| i.name() == name).unwrap_or_else(|| panic!("{name} is there"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_introspection_matches_the_xml_contract() {
    let s = setup(&[]).await;
    let introspectable = zbus::fdo::IntrospectableProxy::builder(&s.conn)
        .destination(BUS_NAME)
        .path(OBJECT_PATH)
        .build()
        .await
        .expect("proxy");
    let live = introspectable.introspect().await.expect("Introspect");
    let live = Node::from_reader(live.as_bytes()).expect("live XML parses");
    let file = std::fs::read(project_file("dbus/org.kata.KsmThrottler.xml")).expect("contract file");
    let contract = Node::from_reader(&file[..]).expect("contract parses");

    for name in [INTERFACE, INSPECT_INTERFACE] {
        let (live, contract) = (shape(find(&live, name)), shape(find(&contract, name)));
        assert!(contract.len() >= 2, "the contract of {name} is not empty: {contract:#?}");
        assert_eq!(live, contract, "{name}");
    }
}

#[test]
fn the_contract_documents_every_error_the_service_answers_with() {
    let file = std::fs::read_to_string(project_file("dbus/org.kata.KsmThrottler.xml")).expect("contract file");
    for e in BusError::ALL {
        assert!(file.contains(e.name_str()), "dbus/org.kata.KsmThrottler.xml does not name {}", e.name_str());
    }
}
