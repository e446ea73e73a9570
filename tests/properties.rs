//! The daemon's own `org.freedesktop.DBus.Properties` (`src/bus/properties.rs`) against the
//! contract: `GetAll` on the live object answers for every interface the XML in dbus/ declares,
//! with exactly the properties it declares, so an interface added to the contract but left out of
//! the Properties table fails here.

use std::collections::BTreeSet;

use kata_ksm_throttler::names::{BUS_NAME, OBJECT_PATH};
use kata_ksm_throttler_test_support::*;
use zbus::fdo::PropertiesProxy;
use zbus::names::InterfaceName;
use zbus_xml::Node;

/// Each interface of every `dbus/*.xml`, with the names of its properties.
fn declared() -> Vec<(String, BTreeSet<String>)> {
    let dir = project_file("dbus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("dbus/ is there")
        .map(|e| e.expect("dbus/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no XML in {}", dir.display());
    let mut out = vec![];
    for file in files {
        let text = std::fs::read(&file).expect("contract file");
        let node = Node::from_reader(&text[..]).unwrap_or_else(|e| panic!("{} parses: {e}", file.display()));
        for iface in node.interfaces() {
            let props = iface.properties().map(|p| p.name().to_string()).collect();
            out.push((iface.name().to_string(), props));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_all_answers_for_every_interface_of_the_contract() {
    let declared = declared();
    assert!(declared.len() >= 2, "the contract declares the throttler and Inspect: {declared:?}");
    let s = setup(&[]).await;
    let props = PropertiesProxy::builder(&s.conn)
        .destination(BUS_NAME)
        .path(OBJECT_PATH)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("Properties proxy");
    for (name, want) in declared {
        let iface = InterfaceName::try_from(name.as_str()).expect("an interface name");
        let all = props.get_all(iface).await.unwrap_or_else(|e| panic!("GetAll({name}): {e}"));
        let got: BTreeSet<String> = all.keys().cloned().collect();
        assert_eq!(got, want, "GetAll({name}) answers with the properties the contract declares");
    }
}
