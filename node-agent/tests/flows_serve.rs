//! The records' two doors: `GET /flows` on the health server (the contract the
//! cluster path reads: path, query names, `application/x-ndjson`, one record per
//! line with exactly the record's fields) and the node-local API's `flows` op.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sluice_agent::flows::{FlowStore, NflogPacket};
use sluice_agent::health::Health;
use sluice_agent::metrics::Metrics;
use sluice_node_files::flows::{FlowQuery, FlowRecord};

fn syn(src: [u8; 4], dst: [u8; 4], port: u16, sport: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
    p.extend(src);
    p.extend(dst);
    p.extend(sport.to_be_bytes());
    p.extend(port.to_be_bytes());
    p.extend([0u8; 16]);
    p
}

fn store() -> Arc<FlowStore> {
    let s = FlowStore::new("node-1", 16, Arc::new(Metrics::new()));
    s.set_context(
        [
            ("10.0.0.2".parse().unwrap(), "prod/db".to_string()),
            ("10.0.0.3".parse().unwrap(), "dev/app".to_string()),
        ]
        .into(),
        [("G".to_string(), vec!["prod/deny-all".to_string()])].into(),
    );
    s
}

fn deny(s: &FlowStore, dst: [u8; 4], port: u16) {
    s.ingest(
        &NflogPacket {
            prefix: "slc:iso:i:G".into(),
            payload: syn([10, 0, 0, 1], dst, port, 40000 + port),
        },
        SystemTime::now(),
    );
}

fn get(addr: std::net::SocketAddr, path: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_flows_answers_ndjson_records_filtered_and_followed() {
    let flows = store();
    deny(&flows, [10, 0, 0, 2], 80);
    deny(&flows, [10, 0, 0, 3], 81);
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sluice_agent::health::serve_with_flows(
        listener,
        Arc::new(Health::new(Duration::from_secs(60))),
        metrics,
        Some(flows.clone()),
    ));

    let text = tokio::task::spawn_blocking(move || {
        let mut s = get(addr, "/flows?namespace=prod&denied=1&limit=5");
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/x-ndjson"),
        "{head}"
    );
    let line = body
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no record in {body:?}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    let mut want = [
        "time",
        "node",
        "verdict",
        "direction",
        "src",
        "dst",
        "protocol",
        "port",
        "reason",
        "policies",
    ];
    want.sort();
    assert_eq!(keys, want);
    let r: FlowRecord = serde_json::from_value(v).unwrap();
    assert_eq!(
        (r.dst.as_str(), r.port, r.reason.as_str()),
        ("prod/db", 80, "isolated")
    );
    assert_eq!(r.policies, ["prod/deny-all"]);
    assert_eq!(body.matches("\"port\"").count(), 1, "dev/app filtered out");

    let bad = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        get(addr, "/flows?since=yesterday")
            .read_to_string(&mut out)
            .unwrap();
        out
    })
    .await
    .unwrap();
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");

    // follow=1: the answer stays open and a new record arrives on it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = get(addr, "/flows?follow=1&limit=0");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("\"port\":82") {
                let _ = tx.send(true);
                return;
            }
        }
        let _ = tx.send(false);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    deny(&flows, [10, 0, 0, 2], 82);
    let followed = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(followed, Ok(true), "the followed answer got the new record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_flows_op_answers_the_same_records() {
    let flows = store();
    deny(&flows, [10, 0, 0, 2], 80);
    deny(&flows, [10, 0, 0, 2], 80); // the same 5-tuple again: one connection
    deny(&flows, [10, 0, 0, 3], 81);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let api = sluice_agent::local_api::LocalApi::new(rx, Arc::new(Metrics::new()))
        .with_flows(flows.clone());
    let listener = sluice_agent::local_api::bind(&path).unwrap();
    tokio::spawn(sluice_agent::local_api::serve(listener, api));
    let got = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        sluice_node_files::local_api::flows(
            &path,
            &FlowQuery::default(),
            Duration::from_secs(5),
            |r| {
                got.push(r);
                true
            },
        )
        .unwrap();
        got
    })
    .await
    .unwrap();
    let ports: Vec<u16> = got.iter().map(|r| r.port).collect();
    assert_eq!(ports, [80, 81]);
}
