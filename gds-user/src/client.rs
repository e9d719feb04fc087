//! A tiny HTTP client for talking to a running agent (`gds-agent stalls`, `gds-agent top`).
//! The agent serves plain HTTP/1.1 on loopback; a std TcpStream is all this needs.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::Duration,
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid agent address {0:?}: use host:port or http://host:port")]
    Address(String),
    #[error("cannot reach the agent at {addr}: {source} (is `gds-agent run` running? see --agent)")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("agent at {addr} answered {path} with: {status}")]
    Status {
        addr: String,
        path: String,
        status: String,
    },
    #[error("malformed answer from the agent at {addr}: {what}")]
    Malformed { addr: String, what: &'static str },
}

/// Resolves `http://127.0.0.1:9477`, `127.0.0.1:9477` or `localhost:9477`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, ClientError> {
    let hostport = s.trim_start_matches("http://").trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ClientError::Address(s.into()))
}

/// GET `path` and return the body (handles chunked transfer encoding).
pub fn get(addr: SocketAddr, path: &str) -> Result<String, ClientError> {
    let conn_err = |source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(conn_err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(conn_err)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(conn_err)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(conn_err)?;
    let text = String::from_utf8_lossy(&buf);
    let malformed = |what| ClientError::Malformed {
        addr: addr.to_string(),
        what,
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| malformed("no header end"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(ClientError::Status {
            addr: addr.to_string(),
            path: path.into(),
            status: status.into(),
        });
    }
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(body.to_owned());
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (len, tail) = rest
            .split_once("\r\n")
            .ok_or_else(|| malformed("chunk size"))?;
        let n = usize::from_str_radix(len.trim(), 16).map_err(|_| malformed("chunk size"))?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = tail.get(..n).ok_or_else(|| malformed("short chunk"))?;
        out.push_str(chunk);
        rest = tail.get(n + 2..).ok_or_else(|| malformed("chunk end"))?;
    }
}
