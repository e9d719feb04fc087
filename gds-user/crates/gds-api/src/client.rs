//! The one HTTP client for talking to a running agent: `gds-agent stalls` and `gds-agent top`,
//! the end-to-end tests, the VM scenarios and xtask (which also asks its local Prometheus).
//! HTTP itself is ureq's (plain HTTP/1.1, no TLS: the agent serves loopback); what is gds's
//! here is what a client of a possibly stuck or hostile server must bound — one deadline for
//! the whole answer and a size cap — and errors that say which peer, what happened and what to
//! do.

use std::{
    io::{ErrorKind, Read as _},
    net::{SocketAddr, ToSocketAddrs},
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

use thiserror::Error;

/// How long a request may wait for the agent to answer, unless [`TIMEOUT_ENV`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take, from connecting to the last byte of the answer: a duration as
/// every gds flag takes it (`10s`, `500ms`; a bare number is seconds).
pub const TIMEOUT_ENV: &str = "GDS_CLIENT_TIMEOUT";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest answer read, head and body together; a longer one is refused, not buffered.
///
/// The agent's largest body, `/debug/snapshot`, is bounded by its `SNAPSHOT_*` list limits: tens
/// of KiB on a busy host, 2.9 MB with a full cuFile file table. Prometheus answers that xtask
/// reads are of the same order. 64 MiB is 20 times the largest seen and still a bounded cost
/// (the body is held about twice while decoded); a 3 GiB answer once took `top` to 9.4 GB.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Who is asked; the messages name it.
pub const AGENT: &str = "the agent";

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid agent address {0:?}: use host:port or http://host:port")]
    Address(String),
    #[error("{TIMEOUT_ENV}={value:?}: {why}")]
    Timeout { value: String, why: String },
    #[error("cannot reach {peer} at {addr}: {source}{}", unreachable_hint(peer))]
    Connect {
        peer: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The answer did not come whole within the timeout: the peer took the connection and
    /// then stayed silent, or sent it too slowly.
    #[error(
        "{peer} at {addr} accepted the connection but sent {} within {} (is it stuck?)",
        if *.received > 0 {
            format!("only {} bytes of its answer", .received)
        } else {
            "no answer".to_owned()
        },
        seconds(*.timeout)
    )]
    NoAnswer {
        peer: &'static str,
        addr: SocketAddr,
        timeout: Duration,
        /// Bytes of the answer that came before the silence.
        received: usize,
    },
    #[error("{peer} at {addr} answered {path} with: {status}")]
    Status {
        peer: &'static str,
        addr: SocketAddr,
        path: String,
        status: String,
    },
    #[error(
        "{peer} at {addr} sent an answer of more than {} MiB, the most this client reads \
         (is that really {peer}?)",
        MAX_ANSWER_BYTES >> 20
    )]
    TooBig {
        peer: &'static str,
        addr: SocketAddr,
    },
    #[error("malformed answer from {peer} at {addr}: {what}")]
    Malformed {
        peer: &'static str,
        addr: SocketAddr,
        what: String,
    },
    #[error("gds-agent exited ({status}) before it served http://{addr}/metrics")]
    Exited {
        addr: SocketAddr,
        status: ExitStatus,
    },
    #[error("gds-agent did not serve http://{addr}/metrics within {}: {last}", seconds(*.timeout))]
    NotServing {
        addr: SocketAddr,
        timeout: Duration,
        last: Box<ClientError>,
    },
}

fn unreachable_hint(peer: &str) -> &'static str {
    if peer == AGENT {
        " (is `gds-agent run` running? see --agent)"
    } else {
        ""
    }
}

/// `10 s`, `1.5 s`, `250 ms`.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 || d >= Duration::from_secs(10) {
        format!("{} s", d.as_secs_f64())
    } else if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
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

/// The answer timeout: [`TIMEOUT_ENV`] when set, else [`DEFAULT_TIMEOUT`].
pub fn timeout_from_env() -> Result<Duration, ClientError> {
    match std::env::var(TIMEOUT_ENV) {
        Ok(value) => gds_host::units::parse_duration(&value)
            .map_err(|why| ClientError::Timeout { value, why }),
        Err(_) => Ok(DEFAULT_TIMEOUT),
    }
}

/// One HTTP answer, whatever its status.
#[derive(Debug)]
pub struct Response {
    /// 200, 404, …
    pub code: u16,
    /// The whole status line, e.g. `HTTP/1.1 404 Not Found`.
    pub status: String,
    /// Dechunked when the server sent it chunked.
    pub body: String,
}

/// GETs from one server: the agent, or (xtask) another one named by `peer`.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub peer: &'static str,
    pub addr: SocketAddr,
    /// How long a whole request may take, from connecting to the answer's last byte;
    /// [`ClientError::NoAnswer`] after that.
    pub timeout: Duration,
}

impl Client {
    /// The agent at `addr`, with [`timeout_from_env`].
    pub fn agent(addr: SocketAddr) -> Result<Client, ClientError> {
        Ok(Client {
            peer: AGENT,
            addr,
            timeout: timeout_from_env()?,
        })
    }

    /// GET `path`: the body of a 200 answer; any other status is [`ClientError::Status`].
    pub fn get(&self, path: &str) -> Result<String, ClientError> {
        let r = self.request(path)?;
        if r.code != 200 {
            return Err(ClientError::Status {
                peer: self.peer,
                addr: self.addr,
                path: path.into(),
                status: r.status,
            });
        }
        Ok(r.body)
    }

    /// GET `path` over a fresh connection, whatever the answer's status. The whole exchange
    /// takes at most [`Client::timeout`] and reads at most [`MAX_ANSWER_BYTES`].
    pub fn request(&self, path: &str) -> Result<Response, ClientError> {
        let (peer, addr) = (self.peer, self.addr);
        let no_answer = |received: usize| ClientError::NoAnswer {
            peer,
            addr,
            timeout: self.timeout,
            received,
        };
        // One deadline for the whole answer (ureq's global timeout runs from the call to the
        // body's last byte): a per-read timeout lets a peer that trickles a byte now and then
        // hold the client forever.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .timeout_connect(Some(CONNECT_TIMEOUT.min(self.timeout)))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("gds/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let err = |e: ureq::Error, received: usize| match e {
            ureq::Error::Timeout(_) => no_answer(received),
            ureq::Error::Io(source)
                if matches!(source.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) =>
            {
                no_answer(received)
            }
            ureq::Error::Io(source) => ClientError::Connect { peer, addr, source },
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => ClientError::Connect {
                peer,
                addr,
                source: std::io::Error::from(ErrorKind::ConnectionRefused),
            },
            ureq::Error::BodyExceedsLimit(_) => ClientError::TooBig { peer, addr },
            e => ClientError::Malformed {
                peer,
                addr,
                what: e.to_string(),
            },
        };
        let mut answer = agent
            .get(format!("http://{addr}{path}"))
            .call()
            .map_err(|e| err(e, 0))?;
        let code = answer.status().as_u16();
        let status = format!(
            "{:?} {code} {}",
            answer.version(),
            answer.status().canonical_reason().unwrap_or_default()
        );
        // Read in pieces to tell how much came before a deadline cut it.
        let mut body = Vec::new();
        let mut reader = answer
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES as u64)
            .reader();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let received = body.len();
                    return Err(match e.downcast::<ureq::Error>() {
                        Ok(e) => err(e, received),
                        Err(e) => err(ureq::Error::Io(e), received),
                    });
                }
            }
        }
        Ok(Response {
            code,
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// GET `path` from the agent at `addr` and return the body of its 200 answer.
pub fn get(addr: SocketAddr, path: &str) -> Result<String, ClientError> {
    Client::agent(addr)?.get(path)
}

/// Waits until the agent `child` runs serves /metrics at `addr` with 200 (it serves only once
/// every program is attached); how long that took. Fails when the child exits first or
/// `timeout` passes.
pub fn wait_serving(
    addr: SocketAddr,
    child: &mut Child,
    timeout: Duration,
) -> Result<Duration, ClientError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ClientError::Exited { addr, status });
        }
        // The listener is bound before the programs are attached: a request may wait there.
        let left = timeout.saturating_sub(start.elapsed());
        let client = Client {
            peer: AGENT,
            addr,
            timeout: left.max(Duration::from_millis(100)),
        };
        match client.get("/metrics") {
            Ok(_) => return Ok(start.elapsed()),
            Err(last) if start.elapsed() >= timeout => {
                return Err(ClientError::NotServing {
                    addr,
                    timeout,
                    last: Box::new(last),
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn timeouts_parse_as_every_duration_does() {
        // SAFETY: this test alone sets the variable, and reads it back right away.
        unsafe { std::env::set_var(TIMEOUT_ENV, "250ms") };
        assert_eq!(timeout_from_env().unwrap(), Duration::from_millis(250));
        unsafe { std::env::set_var(TIMEOUT_ENV, "soon") };
        let e = timeout_from_env().unwrap_err();
        assert!(
            e.to_string().starts_with("GDS_CLIENT_TIMEOUT=\"soon\": "),
            "{e}"
        );
        unsafe { std::env::remove_var(TIMEOUT_ENV) };
        assert_eq!(seconds(Duration::from_secs(10)), "10 s");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(seconds(Duration::from_millis(250)), "250 ms");
    }

    /// A server that answers every connection with `answer` once it has read the request.
    fn serve_once(answer: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut byte = [0u8];
            while !req.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                req.push(byte[0]);
            }
            s.write_all(answer).unwrap();
        });
        addr
    }

    fn client(addr: SocketAddr, timeout: Duration) -> Client {
        Client {
            peer: AGENT,
            addr,
            timeout,
        }
    }

    #[test]
    fn status_and_chunked_body() {
        let addr = serve_once(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nno!\r\n0\r\n\r\n",
        );
        let r = client(addr, DEFAULT_TIMEOUT).request("/x").unwrap();
        assert_eq!((r.code, r.status.as_str()), (404, "HTTP/1.1 404 Not Found"));
        assert_eq!(r.body, "no!");
        let addr = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy");
        let e = client(addr, DEFAULT_TIMEOUT).get("/metrics").unwrap_err();
        assert!(matches!(e, ClientError::Status { .. }), "{e}");
    }

    #[test]
    fn a_silent_server_is_no_answer_not_an_os_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let holder = std::thread::spawn(move || l.accept().map(|(s, _)| s));
        let e = client(addr, Duration::from_millis(200))
            .get("/debug/stalls")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the agent at {addr} accepted the connection but sent no answer within 200 ms \
                 (is it stuck?)"
            )
        );
        drop(holder.join());
    }

    /// A server that reads the request's head, then runs `answer` on the connection.
    fn serve_with(answer: fn(TcpStream)) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut byte = [0u8];
            while !req.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                req.push(byte[0]);
            }
            answer(s);
        });
        addr
    }

    #[test]
    fn a_trickling_answer_is_cut_at_the_deadline() {
        let addr = serve_with(|mut s| {
            if s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").is_err() {
                return;
            }
            for b in b"gds_up 1\n".iter().cycle() {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let e = client(addr, Duration::from_millis(300))
            .get("/debug/snapshot")
            .unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(e, ClientError::NoAnswer { received, .. } if received > 0),
            "{e}"
        );
        assert!(took < Duration::from_millis(600), "{took:?}");
        assert!(e.to_string().contains("sent only"), "{e}");
    }

    #[test]
    fn an_answer_over_the_limit_is_refused() {
        let addr = serve_with(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            let block = vec![b' '; 1 << 20];
            for _ in 0..=(MAX_ANSWER_BYTES >> 20) {
                if s.write_all(&block).is_err() {
                    return;
                }
            }
        });
        let e = client(addr, DEFAULT_TIMEOUT).get("/x").unwrap_err();
        assert!(matches!(e, ClientError::TooBig { .. }), "{e}");
    }
}
