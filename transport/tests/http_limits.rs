//! Bad and idle clients of the HTTPS endpoint are cut off without disturbing a good one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod http_support;

use std::time::Duration;

use http_support::{register_path, sas, Server};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use zerotouch_transport::limits::Limits;

/// Reads until the server closes the connection; fails the test if it takes longer than `within`.
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(mut tcp: S, within: Duration) {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes the connection");
}

#[tokio::test]
async fn silent_and_garbage_connections_are_cut_off_while_a_device_registers() {
    let limits = Limits {
        connect_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = Server::start_with(limits).await;
    let key = server.enroll_symmetric("sensor-20");

    let silent = TcpStream::connect(server.addr).await.unwrap();
    let mut garbage = TcpStream::connect(server.addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: plain-text-on-a-tls-port\r\n\r\n").await.unwrap();

    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-20" }).to_string();
    let reply =
        client.send("PUT", &register_path("sensor-20"), Some(&sas(&key, "sensor-20")), body.as_bytes()).await;
    assert_eq!(reply.status, 202, "{}", reply.body);

    closed_by_server(garbage, Duration::from_secs(5)).await;
    closed_by_server(silent, Duration::from_secs(5)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_completes_the_handshake_but_sends_no_request_is_cut_off() {
    let limits = Limits { request_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = Server::start_with(limits).await;
    let key = server.enroll_symmetric("sensor-22");
    let silent = server.connect(None).await;
    // A device that does send its request in time is served.
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-22" }).to_string();
    let reply =
        client.send("PUT", &register_path("sensor-22"), Some(&sas(&key, "sensor-22")), body.as_bytes()).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    tokio::time::timeout(Duration::from_secs(5), silent.closed()).await.expect("silent connection closed");
    server.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_request_timeout() {
    let limits = Limits { request_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = Server::start_with(limits).await;
    let key = server.enroll_symmetric("sensor-21");
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-21" }).to_string();
    let reply =
        client.send("PUT", &register_path("sensor-21"), Some(&sas(&key, "sensor-21")), body.as_bytes()).await;
    assert_eq!(reply.status, 202);
    tokio::time::timeout(Duration::from_secs(5), client.closed()).await.expect("idle connection closed");
}

#[tokio::test]
async fn requests_sent_too_slowly_are_cut_off_while_a_device_registers() {
    let limits = Limits { request_timeout: Duration::from_millis(400), ..Limits::default() };
    let server = Server::start_with(limits).await;
    let key = server.enroll_symmetric("sensor-23");
    let path = register_path("sensor-23");
    let stalled: [&[u8]; 5] = [
        // Headers begun and never finished.
        format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\n").leak().as_bytes(),
        // A body announced and never sent in full.
        format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\n\r\n{{\"reg")
            .leak()
            .as_bytes(),
        // One byte, then nothing.
        b"P",
        // HTTP/2 with prior knowledge, then silence.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        // Half the HTTP/2 preface.
        b"PRI * HTTP/2.0\r\n",
    ];
    let mut held = Vec::new();
    for bytes in stalled {
        let mut tls = server.connect_raw().await;
        tls.write_all(bytes).await.unwrap();
        tls.flush().await.unwrap();
        held.push(tls);
    }
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-23" }).to_string();
    let reply = client.send("PUT", &path, Some(&sas(&key, "sensor-23")), body.as_bytes()).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    for tls in held {
        closed_by_server(tls, Duration::from_secs(5)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_answered_408_and_the_connection_closed() {
    let limits = Limits { request_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = Server::start_with(limits).await;
    let mut tls = server.connect_raw().await;
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\n\r\n{{",
        register_path("sensor-24")
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut reply)).await.unwrap().ok();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"errorCode\":408000"), "{reply}");
    server.stop().await;
}

#[tokio::test]
async fn oversized_request_headers_are_refused_at_once() {
    // Default limits: the request timeout (10 s) is not what cuts this client off.
    let server = Server::start().await;
    let mut tls = server.connect_raw().await;
    tls.write_all(b"PUT /x HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
    // 64 KiB of headers, never finished: a SAS token is under 1 KiB, so no device sends this.
    let header = format!("x-filler: {}\r\n", "a".repeat(4000));
    for _ in 0..16 {
        if tls.write_all(header.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = tls.flush().await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), tls.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the server kept buffering 64 KiB of headers");
    let text = String::from_utf8_lossy(&reply);
    assert!(reply.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn a_body_larger_than_the_header_buffer_is_still_served() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-23");
    let mut client = server.connect(None).await;
    let body =
        json!({ "registrationId": "sensor-23", "payload": { "blob": "b".repeat(64 * 1024) } }).to_string();
    let reply =
        client.send("PUT", &register_path("sensor-23"), Some(&sas(&key, "sensor-23")), body.as_bytes()).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    server.stop().await;
}

#[tokio::test]
async fn the_https_listener_speaks_http_1_1_and_refuses_clients_that_offer_only_other_protocols() {
    let server = Server::start().await;
    let handshake = |alpn: Vec<Vec<u8>>| {
        let mut config = server.client_config(None);
        config.alpn_protocols = alpn;
        let addr = server.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await.map(|tls| tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        }
    };
    assert_eq!(
        handshake(vec![b"h2".to_vec(), b"http/1.1".to_vec()]).await.unwrap(),
        Some(b"http/1.1".to_vec())
    );
    assert_eq!(handshake(Vec::new()).await.unwrap(), None, "a client offering nothing is served");
    // What an operator sees of it, at info.
    let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let writer = CapturedLog(captured.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    assert!(handshake(vec![b"h2".to_vec()]).await.is_err(), "an h2-only client got a connection");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(guard);
    let logged = String::from_utf8_lossy(&captured.lock().unwrap()).into_owned();
    assert!(logged.contains("TLS handshake refused"), "{logged}");
    server.stop().await;
}

/// Log output gathered by a test's subscriber.
#[derive(Clone)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
