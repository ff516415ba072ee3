//! The client tells "nothing at this URL answers as kumo" apart from an
//! error kumo answered, against small local servers.

use kumo_client::{Client, Error, NotKumo};
use std::io::{Read, Write};
use std::net::TcpListener;

/// A server on a random local port that answers every request with
/// `reply` (a whole HTTP/1.1 response) and closes; its URL.
fn server(reply: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            // The client's requests here have no body: the head is all.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            stream.write_all(reply.as_bytes()).unwrap();
        }
    });
    url
}

fn response(status: &str, content_type: &str, body: &str) -> &'static str {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .leak()
}

/// Why the client found no kumo controller (fails on any other error).
fn why(e: &Error) -> &NotKumo {
    match e {
        Error::NotKumo { why, .. } => why,
        _ => panic!("not a NotKumo error: {e:?}"),
    }
}

/// The error and its causes, as the CLI prints them.
fn chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    text
}

#[tokio::test]
async fn a_closed_port_is_no_kumo_controller() {
    let url = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let err = Client::new(&url, "t").zones().await.unwrap_err();
    assert!(matches!(why(&err), NotKumo::Refused), "{err:?}");
    assert_eq!(
        chain(&err),
        format!("no kumo controller answers at {url}: connection refused")
    );
}

#[tokio::test]
async fn another_web_servers_404_page_is_no_kumo_controller() {
    let url = server(response(
        "404 Not Found",
        "text/html",
        "<html><body>Not Found</body></html>",
    ));
    let err = Client::new(&url, "t").vm("web").await.unwrap_err();
    assert_eq!(err.code(), None);
    assert_eq!(
        chain(&err),
        format!("no kumo controller answers at {url}: HTTP 404 Not Found (text/html) is not a kumo reply")
    );
}

#[tokio::test]
async fn a_success_that_is_not_json_is_no_kumo_controller() {
    let url = server(response("200 OK", "text/html", "<html>welcome</html>"));
    let err = Client::new(&url, "t").hosts().await.unwrap_err();
    assert!(matches!(why(&err), NotKumo::Reply { .. }), "{err:?}");
}

#[tokio::test]
async fn kumos_own_error_body_stays_an_api_error() {
    let url = server(response(
        "404 Not Found",
        "application/json",
        r#"{"code":"not_found","message":"no VM named web","field":"name"}"#,
    ));
    let err = Client::new(&url, "t").vm("web").await.unwrap_err();
    assert_eq!(err.code(), Some(kumo_api::ErrorCode::NotFound));
    assert_eq!(err.to_string(), "no VM named web");
}

#[tokio::test]
async fn a_listener_that_never_accepts_times_out() {
    // A backlog of 0 holds one unaccepted connection; with it taken, the
    // kernel drops further SYNs, as a vanished address would.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let _queued: Vec<_> = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).ok()
        })
        .collect();
    let url = format!("http://{addr}");
    let err = Client::new(&url, "t").zones().await.unwrap_err();
    assert!(matches!(why(&err), NotKumo::ConnectTimeout), "{err:?}");
    assert_eq!(
        chain(&err),
        format!("no kumo controller answers at {url}: no connection within 5 s")
    );
}
